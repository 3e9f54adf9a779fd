//! iSCSI access control end to end with libiscsi's own tools: per-volume
//! initiator ACLs and CHAP (one-way and mutual) set through the `tessera`
//! CLI, enforced by the gateway at discovery and login, with the login
//! status codes RFC 7143 §11.13.5 assigns (0x0201 authentication failure,
//! 0x0202 authorization failure); and the secrets nowhere in logs, API
//! answers, metrics or command lines.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tessera_tests::{Cluster, ClusterOptions, TempDir, bin, have, http_get, poll, run};

const IQN: &str = "iqn.2026-11.io.tessera:";
const GOOD: &str = "iqn.2020-01.test:good";
const OTHER: &str = "iqn.2020-01.test:other";
const SECRET: &str = "alice-secret-0001";
const MUTUAL_INITIATOR: &str = "bob-secret-00002";
const MUTUAL_TARGET: &str = "target-secret-03";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `iscsi-ls` (discovery) as `initiator`, optionally with CHAP credentials
/// in the URL (`user%secret`).
fn ls(portal: &str, initiator: &str, url_user: Option<&str>) -> String {
    let url = match url_user {
        Some(u) => format!("iscsi://{u}@{portal}"),
        None => format!("iscsi://{portal}"),
    };
    let o = Command::new("timeout")
        .args(["30", "iscsi-ls", "-i", initiator])
        .arg(url)
        .output()
        .expect("iscsi-ls");
    text(&o)
}

/// `iscsi-inq` of a volume's LUN 0 as `initiator`: (success, output).
fn inq(portal: &str, vol: &str, initiator: &str, env: &[(&str, &str)]) -> (bool, String) {
    let o = Command::new("timeout")
        .args(["30", "iscsi-inq", "-i", initiator])
        .arg(format!("iscsi://{portal}/{IQN}{vol}/0"))
        .envs(env.iter().copied())
        .output()
        .expect("iscsi-inq");
    (o.status.success(), text(&o))
}

fn listed(ls_out: &str, vol: &str) -> bool {
    ls_out.contains(&format!("Target:{IQN}{vol} "))
}

/// `tessera` with extra environment and optional stdin.
fn cli(c: &Cluster, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(bin("tessera"));
    cmd.arg("--manager")
        .arg(&c.manager)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("tessera");
    {
        let mut i = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    let o = child.wait_with_output().expect("tessera");
    assert!(o.status.success(), "tessera {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).to_string()
}

// Proves ACLs and CHAP through the CLI and real initiators: discovery lists
// only the targets an initiator may log in to; an initiator outside a
// volume's ACL is refused with 0x0202 and one without or with a wrong CHAP
// secret with 0x0201; the right secret (environment or URL form) logs in;
// mutual CHAP authenticates the target, and a wrong target secret makes the
// initiator refuse it; clearing CHAP and the ACL opens the volume again;
// no secret appears in the daemons' logs, API answers or metrics.
#[test]
fn acl_and_chap_with_real_initiators() {
    for tool in ["iscsi-ls", "iscsi-inq"] {
        assert!(
            have(tool),
            "{tool} is missing: tests/run.sh installs libiscsi-bin"
        );
    }
    let dir = TempDir::new("iscsi-access");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: ["open", "acl", "chap", "mutual"]
            .iter()
            .map(|v| (v.to_string(), "16M".to_string()))
            .collect(),
    };
    let c = Cluster::start(&dir.0, &opts);
    let p = c.iscsi[0].clone();

    let acl = cli(&c, &["volume", "acl", "add", "acl", GOOD], &[], None);
    assert!(acl.contains(GOOD), "{acl}");
    let secret_file = dir.0.join("alice.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let secret_path = secret_file.to_str().unwrap();
    let out = cli(
        &c,
        &[
            "volume",
            "chap",
            "set",
            "chap",
            "--user",
            "alice",
            "--secret-file",
            secret_path,
        ],
        &[],
        None,
    );
    assert!(out.contains("user alice") && !out.contains(SECRET), "{out}");
    // Initiator secret from stdin, the target's from the environment.
    let out = cli(
        &c,
        &[
            "--output",
            "json",
            "volume",
            "chap",
            "set",
            "mutual",
            "--user",
            "bob",
            "--secret-file",
            "-",
            "--mutual-user",
            "tgt",
        ],
        &[("TESSERA_CHAP_MUTUAL_SECRET", MUTUAL_TARGET)],
        Some(&format!("{MUTUAL_INITIATOR}\n")),
    );
    assert!(out.contains("\"mutual_chap_user\": \"tgt\""), "{out}");
    assert!(
        !out.contains(MUTUAL_INITIATOR) && !out.contains(MUTUAL_TARGET),
        "{out}"
    );

    // Gateways poll access control; wait until the ACL is in force.
    let other = poll("the ACL to apply", Duration::from_secs(20), || {
        let o = ls(&p, OTHER, None);
        (!listed(&o, "acl") && listed(&o, "open")).then_some(o)
    });
    // Discovery without CHAP: everything but the ACL'd volume.
    for v in ["open", "chap", "mutual"] {
        assert!(listed(&other, v), "{v} missing for {OTHER}:\n{other}");
    }
    let good = ls(&p, GOOD, None);
    for v in ["open", "acl", "chap", "mutual"] {
        assert!(listed(&good, v), "{v} missing for {GOOD}:\n{good}");
    }

    // ACL: authorization failure for others, login for the listed one.
    let (ok, out) = inq(&p, "acl", OTHER, &[]);
    assert!(!ok && out.contains("Authorization failure(514)"), "{out}");
    let (ok, out) = inq(&p, "acl", GOOD, &[]);
    assert!(ok && out.contains("DIRECT_ACCESS"), "{out}");

    // One-way CHAP.
    let (ok, out) = inq(&p, "chap", OTHER, &[]);
    assert!(
        !ok && out.contains("Authentication failure(513)"),
        "no secret: {out}"
    );
    let wrong = [
        ("LIBISCSI_CHAP_USERNAME", "alice"),
        ("LIBISCSI_CHAP_PASSWORD", "not-the-secret"),
    ];
    let (ok, out) = inq(&p, "chap", OTHER, &wrong);
    assert!(
        !ok && out.contains("Authentication failure(513)"),
        "wrong secret: {out}"
    );
    let wrong_user = [
        ("LIBISCSI_CHAP_USERNAME", "mallory"),
        ("LIBISCSI_CHAP_PASSWORD", SECRET),
    ];
    let (ok, out) = inq(&p, "chap", OTHER, &wrong_user);
    assert!(
        !ok && out.contains("Authentication failure(513)"),
        "wrong user: {out}"
    );
    let right = [
        ("LIBISCSI_CHAP_USERNAME", "alice"),
        ("LIBISCSI_CHAP_PASSWORD", SECRET),
    ];
    let (ok, out) = inq(&p, "chap", OTHER, &right);
    assert!(ok && out.contains("DIRECT_ACCESS"), "right secret: {out}");
    // Credentials in the URL form: discovery (which needs none; the target
    // answers AuthMethod=None to the initiator's "CHAP,None") and a login.
    let with_chap = ls(&p, OTHER, Some(&format!("alice%{SECRET}")));
    for v in ["open", "chap", "mutual"] {
        assert!(listed(&with_chap, v), "{v} missing:\n{with_chap}");
    }
    let o = Command::new("iscsi-inq")
        .args(["-i", OTHER])
        .arg(format!("iscsi://alice%{SECRET}@{p}/{IQN}chap/0"))
        .output()
        .expect("iscsi-inq");
    assert!(o.status.success(), "URL credentials: {}", text(&o));

    // Mutual CHAP.
    let mutual = [
        ("LIBISCSI_CHAP_USERNAME", "bob"),
        ("LIBISCSI_CHAP_PASSWORD", MUTUAL_INITIATOR),
        ("LIBISCSI_CHAP_TARGET_USERNAME", "tgt"),
        ("LIBISCSI_CHAP_TARGET_PASSWORD", MUTUAL_TARGET),
    ];
    let (ok, out) = inq(&p, "mutual", OTHER, &mutual);
    assert!(ok && out.contains("DIRECT_ACCESS"), "mutual: {out}");
    let mut bad_target = mutual;
    bad_target[3].1 = "not-the-target-secret";
    let (ok, out) = inq(&p, "mutual", OTHER, &bad_target);
    assert!(
        !ok && out.contains("Invalid CHAP_R response from the target"),
        "{out}"
    );
    let mut bad_initiator = mutual;
    bad_initiator[1].1 = "not-bobs-secret!";
    let (ok, out) = inq(&p, "mutual", OTHER, &bad_initiator);
    assert!(!ok && out.contains("Authentication failure(513)"), "{out}");

    // Secrets are not in answers, metrics or logs.
    let info = cli(
        &c,
        &["--output", "json", "volume", "acl", "list", "chap"],
        &[],
        None,
    );
    assert!(
        info.contains("\"chap_user\": \"alice\"") && !info.contains(SECRET),
        "{info}"
    );
    let metrics = http_get(&format!("{}/metrics", c.manager)).expect("manager metrics");
    let map = http_get(&format!("{}/v1/map", c.manager)).expect("map");
    for s in [SECRET, MUTUAL_INITIATOR, MUTUAL_TARGET] {
        assert!(!metrics.contains(s) && !map.contains(s));
        for entry in std::fs::read_dir(dir.0.join("logs")).unwrap() {
            let path = entry.unwrap().path();
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!log.contains(s), "a secret is in {}", path.display());
        }
    }

    // Clearing CHAP and the ACL opens both volumes again.
    cli(&c, &["volume", "chap", "clear", "chap"], &[], None);
    cli(&c, &["volume", "acl", "remove", "acl", GOOD], &[], None);
    poll("access changes to apply", Duration::from_secs(20), || {
        let o = ls(&p, OTHER, None);
        listed(&o, "acl").then_some(())
    });
    let (ok, out) = inq(&p, "chap", OTHER, &[]);
    assert!(ok, "CHAP cleared: {out}");
    let (ok, out) = inq(&p, "acl", OTHER, &[]);
    assert!(ok, "ACL emptied: {out}");
    let listing = cli(&c, &["volume", "acl", "list", "acl"], &[], None);
    assert!(listing.contains("initiators  any"), "{listing}");
}

// Proves the CLI's CHAP input rules: no secret on the command line (there
// is no flag for it), a missing secret or a short one is one error line
// and exit 1, and an ACL entry must be an iSCSI name.
#[test]
fn chap_cli_refusals() {
    let dir = TempDir::new("iscsi-access-cli");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("v".into(), "16M".into())],
    };
    let c = Cluster::start(&dir.0, &opts);
    let fails = |args: &[&str], env: &[(&str, &str)]| {
        let o = Command::new(bin("tessera"))
            .arg("--manager")
            .arg(&c.manager)
            .args(args)
            .env_remove("TESSERA_CHAP_SECRET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("tessera");
        assert!(!o.status.success(), "{args:?} succeeded");
        text(&o)
    };
    let e = fails(
        &["volume", "chap", "set", "v", "--user", "u", "--secret", "x"],
        &[],
    );
    assert!(e.contains("--secret"), "{e}");
    let e = fails(&["volume", "chap", "set", "v", "--user", "u"], &[]);
    assert!(e.contains("TESSERA_CHAP_SECRET"), "{e}");
    let e = fails(
        &["volume", "chap", "set", "v", "--user", "u"],
        &[("TESSERA_CHAP_SECRET", "sh0rt")],
    );
    assert!(e.contains("12 to 255 bytes") && !e.contains("sh0rt"), "{e}");
    let e = fails(&["volume", "acl", "add", "v", "host1"], &[]);
    assert!(e.contains("iqn."), "{e}");
    let e = fails(&["volume", "acl", "add", "nope", GOOD], &[]);
    assert!(e.contains("not found"), "{e}");
    let out = run(Command::new(bin("tessera"))
        .arg("--manager")
        .arg(&c.manager)
        .args(["volume", "chap", "set", "v", "--user", "u"])
        .env("TESSERA_CHAP_SECRET", "long-enough-secret"));
    assert!(out.contains("user u"), "{out}");
}

// Proves discovery CHAP set through the CLI: iscsi-ls without credentials
// is refused with 0x0201, with the discovery credentials (URL form) it
// lists the targets, normal logins are not affected, and clearing it opens
// discovery again.
#[test]
fn discovery_chap_with_iscsi_ls() {
    assert!(
        have("iscsi-ls"),
        "iscsi-ls is missing: tests/run.sh installs libiscsi-bin"
    );
    let dir = TempDir::new("iscsi-discovery-chap");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("v".into(), "16M".into())],
    };
    let c = Cluster::start(&dir.0, &opts);
    let p = c.iscsi[0].clone();
    let secret = "discovery-secret-1";
    let out = cli(
        &c,
        &["iscsi", "discovery-chap", "set", "--user", "disc"],
        &[("TESSERA_CHAP_SECRET", secret)],
        None,
    );
    assert!(out.contains("user disc") && !out.contains(secret), "{out}");
    let refused = poll("discovery CHAP to apply", Duration::from_secs(20), || {
        let o = ls(&p, OTHER, None);
        (!listed(&o, "v")).then_some(o)
    });
    assert!(refused.contains("Authentication failure(513)"), "{refused}");
    let wrong = ls(&p, OTHER, Some("disc%not-the-secret"));
    assert!(wrong.contains("Authentication failure(513)"), "{wrong}");
    let with = ls(&p, OTHER, Some(&format!("disc%{secret}")));
    assert!(listed(&with, "v"), "{with}");
    let (ok, out) = inq(&p, "v", OTHER, &[]);
    assert!(ok, "normal login without CHAP: {out}");
    let shown = cli(
        &c,
        &["--output", "json", "iscsi", "discovery-chap", "show"],
        &[],
        None,
    );
    assert!(
        shown.contains("\"chap_user\": \"disc\"") && !shown.contains(secret),
        "{shown}"
    );
    cli(&c, &["iscsi", "discovery-chap", "clear"], &[], None);
    poll("discovery to open again", Duration::from_secs(20), || {
        listed(&ls(&p, OTHER, None), "v").then_some(())
    });
}
