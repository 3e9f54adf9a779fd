//! Operator switches with real processes: `tessera cluster set noout`
//! keeps a storage daemon that stays silent past `--down-out-after` in the
//! cluster (its groups degraded, the volume still read and written through
//! the other copies), and `tessera cluster unset noout` lets the manager
//! take its disk out and rebuild its groups on the fourth daemon, which
//! `nobackfill` holds until it is unset.

use std::process::Command;
use std::time::Duration;
use tessera_tests::*;

// Proves that under `noout` a daemon stopped past --down-out-after is held
// in (status says so, no disk out, no backfill) while verified writes and
// reads go on, that unknown switch names are one clear CLI error, that
// under `nobackfill` the disk goes out but nothing is pushed to the new
// copies, and that unsetting both starts the rebuild: the disk goes out, the cluster
// becomes clean on the three live daemons with identical copies, and what
// was written reads back.
#[test]
fn noout_holds_a_silent_daemon_in_until_unset() {
    require(&["fio"]);
    let dir = TempDir::new("noout");
    let opts = ClusterOptions {
        storage_daemons: 4,
        disk_size: "1G",
        volumes: vec![("m".into(), "96M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &["127.0.0.1:0"],
        &["--replicas", "3", "--down-out-after", "2s"],
    );
    let uri = c.uri("m");
    let write = |name: &str, offset: &str| {
        fio_wait_ok(spawn_fio_nbd(
            &uri,
            &[
                &format!("--name={name}"),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--offset={offset}"),
                "--size=16m",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_fatal=1",
            ],
        ))
    };
    write("before", "0");
    // The primaries wrote their own copies in parallel with the replicas
    // (staged, mapped at the first replica's acknowledgement), and fio's
    // verify above read every write back.
    let installed: f64 = c
        .storage_metrics()
        .iter()
        .map(|m| {
            metric_sum(
                m,
                "tessera_storage_staged_writes_total{outcome=\"installed\"}",
            )
        })
        .sum();
    assert!(installed > 0.0, "no staged write was installed");

    let set = c.cli(&["cluster", "set", "noout"]);
    assert!(set.contains("noout"), "{set}");
    assert!(c.cli(&["status"]).contains("flags     noout"));
    // A mistyped switch: one line on stderr, non-zero exit, nothing set.
    let out = Command::new(bin("tessera"))
        .args(["--manager", &c.manager, "cluster", "set", "nodown"])
        .output()
        .expect("run tessera");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nodown"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flags: serde_json::Value =
        serde_json::from_str(&c.cli(&["--output", "json", "cluster", "flags"])).expect("json");
    assert_eq!(flags["flags"], serde_json::json!(["noout"]));

    let frozen = c.freeze("storage-1");
    // Held in is counted only once the daemon has been down longer than
    // --down-out-after: the manager had the chance to take it out.
    let s = poll("the silent daemon held in", Duration::from_secs(60), || {
        let s = status_json(&c);
        (s["disks_held_in"] == 1).then_some(s)
    });
    assert_eq!(s["disks_out"], 0, "{s}");
    assert_eq!(s["pgs_backfilling"], 0, "{s}");
    assert!(s["pgs_degraded"].as_u64().unwrap_or(0) > 0, "{s}");
    // The volume goes on with two copies of each group.
    write("degraded", "32m");
    let s = status_json(&c);
    assert_eq!(
        (s["disks_out"].as_u64(), s["disks_held_in"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );

    // `nobackfill` before the disk goes out: its groups are re-placed on
    // the fourth daemon, but no backfill push starts until it is unset.
    c.cli(&["cluster", "set", "nobackfill"]);
    poll(
        "every live daemon holding backfill",
        Duration::from_secs(30),
        || {
            let m = c.live_storage_metrics();
            (m.len() == 3
                && m.iter().all(|t| {
                    metric_sum(t, "tessera_storage_recovery_paused{kind=\"backfill\"}") == 1.0
                }))
            .then_some(())
        },
    );
    let pushed = settled_storage_metric(&c, "tessera_storage_recovery_bytes_total");
    c.cli(&["cluster", "unset", "noout"]);
    poll("the disk taken out", Duration::from_secs(30), || {
        (status_json(&c)["disks_out"] == 1).then_some(())
    });
    poll(
        "groups waiting to backfill",
        Duration::from_secs(30),
        || (status_json(&c)["pgs_backfilling"].as_u64().unwrap_or(0) > 0).then_some(()),
    );
    // Every live daemon has published twice since the groups were
    // re-placed: nothing was pushed, nothing became clean.
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_recovery_bytes_total"),
        pushed,
        "backfill pushed under nobackfill"
    );
    let after = status_json(&c);
    assert!(
        after["pgs_backfilling"].as_u64().unwrap_or(0) > 0,
        "{after}"
    );
    assert_ne!(after["pgs_clean"], after["pgs_total"], "{after}");
    c.cli(&["cluster", "unset", "nobackfill"]);
    poll("the rebuild to finish", Duration::from_secs(120), || {
        let s = status_json(&c);
        (s["pgs_clean"] == s["pgs_total"]).then_some(())
    });
    // Every chunk's copies (on the three live daemons) are identical, and
    // both writes read back.
    assert!(compare_copies(&c, "m") > 0);
    for (name, offset) in [("before", "0"), ("degraded", "32m")] {
        fio_wait_ok(spawn_fio_nbd(
            &uri,
            &[
                &format!("--name={name}"),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--offset={offset}"),
                "--size=16m",
                "--iodepth=8",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_only",
            ],
        ));
    }
    frozen.resume();
    c.stop();
}
