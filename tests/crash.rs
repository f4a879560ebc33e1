//! Kill -9 at random moments: a snapshot process killed anywhere must leave every snapshot
//! committed before it intact (listed, verified, restorable to the same bytes) and no half
//! snapshot visible. `MEMSNAP_CRASH_ROUNDS=N` runs more rounds (default 6, a few seconds).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memsnap::sample::{SampleAgent, SampleSpec};

fn memsnap(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memsnap"));
    c.env("MEMSNAP_LOG", "error").arg("--store").arg(store);
    c
}

fn ids(store: &Path) -> Vec<String> {
    let out = memsnap(store)
        .args(["--json", "list"])
        .output()
        .expect("list");
    assert!(
        out.status.success(),
        "list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list JSON");
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .collect()
}

#[test]
fn snapshots_killed_at_random_moments_never_damage_committed_ones() {
    let rounds: u64 = std::env::var("MEMSNAP_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = SampleAgent::create(&tmp.path().join("agent"), &SampleSpec::tiny()).expect("agent");
    let store = tmp.path().join("store");
    let snap = |c: &mut Command| {
        c.args(["snapshot", "--tenant", "crash", "--agent", "a", "--source"])
            .arg(agent.root());
    };
    let mut first = memsnap(&store);
    snap(&mut first);
    assert!(first.status().expect("snapshot").success());
    assert_eq!(ids(&store).len(), 1);

    // Time one snapshot; kills land anywhere in three times that, so some snapshots finish.
    let t = Instant::now();
    let mut timed = memsnap(&store);
    snap(&mut timed);
    assert!(timed.status().expect("snapshot").success());
    let span = t.elapsed().as_micros().max(1000) as u64;
    let mut committed = ids(&store);

    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut kills = 0;
    for round in 0..rounds {
        agent.append_day(round, 0.05).expect("change the agent");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_micros(seed % (3 * span));
        let mut c = memsnap(&store);
        snap(&mut c);
        let mut child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(delay);
        let killed = child.kill().is_ok();
        let status = child.wait().expect("wait");
        let now = ids(&store);
        // Every earlier snapshot is still listed; at most the killed one was added.
        for id in &committed {
            assert!(
                now.contains(id),
                "round {round}: committed snapshot {id} vanished"
            );
        }
        assert!(now.len() <= committed.len() + 1, "round {round}: {now:?}");
        if killed && !status.success() {
            kills += 1;
        }
        committed = now;
        let v = memsnap(&store)
            .args(["--json", "verify", "--read-data"])
            .output()
            .expect("verify");
        assert!(
            v.status.success(),
            "round {round} (killed after {delay:?}): verify failed: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // Every surviving snapshot restores.
    for (i, id) in committed.iter().enumerate() {
        let target = tmp.path().join(format!("restore-{i}"));
        let out = memsnap(&store)
            .args(["restore", id, "--target"])
            .arg(&target)
            .output()
            .expect("restore");
        assert!(
            out.status.success(),
            "restore {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(target.join("memdir").join(".git").is_dir());
    }
    eprintln!(
        "{rounds} rounds, {kills} snapshots killed mid-way, {} snapshots verified and restored",
        committed.len()
    );
}
