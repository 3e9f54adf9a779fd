//! The cluster secret: a random token the manager creates in its data
//! directory (`cluster-secret`, mode 0600) on first start. Gateways present
//! it (`Authorization: Bearer <secret>`) to read what only they may read:
//! iSCSI CHAP secrets and reservation state. Whoever can read the file is
//! trusted as a gateway; it is passed to daemons as a file path
//! (`--cluster-secret-file`), never on a command line, and never logged.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// File name of the secret inside the manager's data directory.
pub const FILE_NAME: &str = "cluster-secret";
/// Random bytes in a new secret (hex-encoded in the file).
pub const SECRET_BYTES: usize = 32;
/// A secret file longer than this is not one of ours.
const FILE_BYTES_MAX: u64 = 4096;

/// Read the secret at `path`: the file's first line, which must not be
/// empty.
pub fn read(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(FILE_BYTES_MAX).read_to_string(&mut text))
        .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
    let s = text.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        return Err(format!(
            "the cluster secret file {} is empty",
            path.display()
        ));
    }
    Ok(s)
}

/// Read the secret at `path`, creating it (0600, from /dev/urandom) when
/// the file does not exist.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    if !path.exists() {
        let mut b = [0u8; SECRET_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| {
                f.write_all(format!("{hex}\n").as_bytes())?;
                f.sync_all()
            });
        match created {
            Ok(()) => tracing::info!(path = %path.display(), "created the cluster secret"),
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create the cluster secret {}: {e}",
                    path.display()
                ));
            }
        }
    }
    read(path)
}

/// Compare a presented token with the secret in time independent of where
/// they differ.
pub fn matches(presented: &str, secret: &str) -> bool {
    let (a, b) = (presented.as_bytes(), secret.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ x;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    // Proves the secret is created once with mode 0600 and read back the
    // same, and that comparison accepts only the exact secret.
    #[test]
    fn create_read_compare() {
        let dir = std::env::temp_dir().join(format!("tessera-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(FILE_NAME);
        let s = load_or_create(&p).unwrap();
        assert_eq!(s.len(), 2 * SECRET_BYTES);
        assert_eq!(load_or_create(&p).unwrap(), s);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches(&s, &s));
        assert!(!matches(&s[1..], &s));
        assert!(!matches(&format!("{s}x"), &s));
        assert!(!matches("", &s));
        std::fs::write(&p, "\n").unwrap();
        assert!(read(&p).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
