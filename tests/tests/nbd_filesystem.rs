//! A real filesystem on a Tessera volume: nbdfuse exposes the NBD export as
//! a file, a loop device turns it into a block device, and ext4 runs on it:
//! mkfs, mount, a tree of files, unmount, `e2fsck -f` clean, a fresh
//! connection, mount again, identical contents. Every mount, loop device
//! and FUSE mount is undone by Drop guards, also when the test fails.
//!
//! Needs root, /dev/fuse and loop devices. Where they are missing the test
//! fails with a message saying which, rather than passing silently.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tessera_tests::*;

fn status_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Fails with a clear reason when the environment cannot run the test.
fn require_environment() {
    for t in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
    ] {
        assert!(
            have(t),
            "{t} is not installed: run the suite through tests/run.sh, which installs it"
        );
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "FUSE is not usable here: /dev/fuse is missing (this test needs FUSE and loop devices)"
    );
    let uid = run(Command::new("id").arg("-u"));
    assert_eq!(
        uid.trim(),
        "0",
        "this test needs root to attach loop devices and mount ext4"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "loop devices are not usable here: /dev/loop-control is missing"
    );
}

/// An nbdfuse process serving `<dir>/nbd`; unmounted (fusermount3 -u) and
/// reaped on drop.
struct Fuse {
    dir: PathBuf,
    child: Option<Child>,
}

impl Fuse {
    fn mount(dir: &Path, uri: &str) -> Fuse {
        std::fs::create_dir_all(dir).expect("fuse dir");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Fuse {
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let child = f.child.as_mut().expect("child");
        poll("nbdfuse to be ready", Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("nbdfuse exited early ({st}): is FUSE usable here?");
            }
            pidfile.exists().then_some(())
        });
        f
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = status_ok(Command::new("fusermount3").arg("-u").arg(&self.dir));
        if let Some(mut child) = self.child.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    // Lazy unmount, then the process we started, by PID.
                    let _ = status_ok(Command::new("fusermount3").arg("-uz").arg(&self.dir));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A loop device attached to a file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "loop devices are not usable here: losetup -f --show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = status_ok(Command::new("losetup").arg("-d").arg(&self.dev));
    }
}

/// A mounted filesystem; unmounted on drop (lazily if busy).
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn at(dev: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("mount dir");
        run(Command::new("mount").args(["-t", "ext4", dev]).arg(dir));
        Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    fn unmount(mut self) {
        run(Command::new("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted && !status_ok(Command::new("umount").arg(&self.dir)) {
            let _ = status_ok(Command::new("umount").arg("-l").arg(&self.dir));
        }
    }
}

/// The tree written and checked: (relative path, contents).
fn tree() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for d in 0..4u64 {
        for f in 0..12u64 {
            let size = match f % 4 {
                0 => 0,
                1 => 1234,
                2 => 64 * 1024 + 17,
                _ => 1 << 20,
            };
            v.push((
                format!("dir{d}/sub{}/file{f}.bin", f % 3),
                pattern(d * 100 + f, size),
            ));
        }
    }
    v.push(("top.txt".into(), b"tessera\n".to_vec()));
    v
}

// Proves ext4 works on a Tessera volume through nbdfuse + a loop device:
// the filesystem checks clean after unmount, and after a fresh connection
// every file reads back identical.
#[test]
fn ext4_over_nbdfuse_and_loop() {
    require_environment();
    let dir = TempDir::new("nbdfs");
    let c = Cluster::start(
        &dir.path().join("cluster"),
        &ClusterOptions {
            storage_daemons: 2,
            disk_size: "1G",
            volumes: vec![("fs".into(), "256M".into())],
        },
    );
    let uri = c.uri("fs");
    let files = tree();
    {
        let fuse = Fuse::mount(&dir.path().join("fuse"), &uri);
        let lo = Loop::attach(&fuse.file());
        run(Command::new("mkfs.ext4").args(["-q", "-F", &lo.dev]));
        let m = Mount::at(&lo.dev, &dir.path().join("mnt"));
        for (path, data) in &files {
            let p = m.dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, data).expect("write file");
        }
        run(&mut Command::new("sync"));
        m.unmount();
        // -f: check even though clean; -n: change nothing. Exit 0 = no
        // errors found.
        run(Command::new("e2fsck").args(["-f", "-n", &lo.dev]));
        drop(lo);
        drop(fuse);
    }
    // A new connection, loop device and mount: the same files.
    let fuse = Fuse::mount(&dir.path().join("fuse2"), &uri);
    let lo = Loop::attach(&fuse.file());
    let m = Mount::at(&lo.dev, &dir.path().join("mnt2"));
    for (path, data) in &files {
        let got = std::fs::read(m.dir.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(got == *data, "{path} differs after remount");
    }
    m.unmount();
    run(Command::new("e2fsck").args(["-f", "-n", &lo.dev]));
}
