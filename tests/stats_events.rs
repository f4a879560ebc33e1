//! `memsnap stats` (counts, sizes, ratios, unused bytes through delete and prune), lifecycle
//! events (the CLI's `--events` JSON lines and a library publisher) and the Prometheus metrics
//! (`stats --prometheus`, `Memsnap::metrics_text`).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{AGENT, Fixture, TENANT, find_by, str_of};
use memsnap::sample::{SampleAgent, SampleSpec};
use memsnap::{AgentId, Event, EventPublisher, Memsnap, SnapshotRequest, SourceSpec, StoreOptions};
use serde_json::Value;

/// Sum of the sizes of the store's `packs/<xx>/<id>.pack` files.
fn pack_bytes(store: &Path) -> u64 {
    let mut total = 0;
    for d in std::fs::read_dir(store.join("packs"))
        .expect("packs dir")
        .flatten()
    {
        for f in std::fs::read_dir(d.path()).expect("pack subdir").flatten() {
            if f.path().extension().is_some_and(|e| e == "pack") {
                total += f.metadata().expect("metadata").len();
            }
        }
    }
    total
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key:?} is not a number in {v:#}"))
}

fn agent_stats<'a>(stats: &'a Value, agent: &str) -> &'a Value {
    find_by(stats, "agents", "agent", agent)
}

/// Fixture with two snapshots of ana (nearly equal) and one of bob (a second tiny agent).
fn two_agents() -> (Fixture, SampleAgent, String, String, String) {
    let f = Fixture::new();
    let s1 = f.snapshot_id();
    f.agent.append_day(7, 0.05).expect("append a day");
    let s2 = f.snapshot_id();
    let bob = SampleAgent::create(&f.path("bob"), &SampleSpec::tiny()).expect("bob");
    bob.append_day(11, 0.2).expect("bob's day");
    let v = f
        .cmd()
        .args(["snapshot", "--tenant", TENANT, "--agent", "bob", "--source"])
        .arg(bob.root())
        .json();
    let s3 = str_of(&v, "id").to_owned();
    (f, bob, s1, s2, s3)
}

#[test]
fn stats_counts_sizes_and_unused_bytes_through_delete_and_prune() {
    let (f, _bob, s1, _s2, _s3) = two_agents();
    let stats = f.cmd().arg("stats").json();
    let store = &stats["store"];
    assert_eq!(u(store, "snapshots"), 3, "{stats:#}");
    assert_eq!(u(store, "agents"), 2);
    assert_eq!(u(store, "stored_bytes"), pack_bytes(&f.store));
    assert_eq!(u(store, "unused_bytes"), 0);
    assert_eq!(u(store, "chunks_unused"), 0);
    assert_eq!(u(store, "reclaimable_bytes"), 0);
    assert_eq!(u(store, "chunks"), u(store, "chunks_referenced"));
    assert!(u(store, "packs") >= 1);
    let listed: u64 = f
        .cmd()
        .arg("list")
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|s| u(s, "logical_bytes"))
        .sum();
    assert_eq!(u(store, "logical_bytes"), listed);

    let ana = agent_stats(&stats, AGENT);
    let bob = agent_stats(&stats, "bob");
    assert_eq!(u(ana, "snapshots"), 2);
    assert_eq!(u(bob, "snapshots"), 1);
    for a in [ana, bob] {
        assert!(u(a, "stored_bytes") > 0 && u(a, "stored_bytes") <= u(store, "stored_bytes"));
        assert!(u(a, "chunks") <= u(store, "chunks"));
        assert!(u(a, "latest_logical_bytes") <= u(a, "logical_bytes"));
    }
    assert!(
        ana["dedup_ratio"].as_f64().expect("ratio") > 1.5,
        "two nearly equal snapshots deduplicate: {ana:#}"
    );
    assert!(ana["compression_ratio"].as_f64().expect("ratio") > 0.0);

    // The filter narrows the agents, never the store.
    let only_bob = f.cmd().args(["stats", "--agent", "bob"]).json();
    assert_eq!(only_bob["agents"].as_array().expect("agents").len(), 1);
    assert_eq!(only_bob["store"], stats["store"]);

    // The first snapshot has chunks of its own: deleting it leaves them unused.
    f.cmd().args(["delete", &s1]).stdout();
    let after = f.cmd().arg("stats").json();
    assert_eq!(u(&after["store"], "snapshots"), 2);
    assert!(u(&after["store"], "unused_bytes") > 0, "{after:#}");
    assert!(u(&after["store"], "chunks_unused") > 0);
    assert!(u(&after["store"], "reclaimable_bytes") >= u(&after["store"], "unused_bytes"));
    assert_eq!(u(agent_stats(&after, AGENT), "snapshots"), 1);

    let plan = f
        .cmd()
        .args(["prune", "--dry-run", "--max-unused", "0"])
        .json();
    assert_eq!(
        u(&plan, "bytes_freed"),
        u(&after["store"], "reclaimable_bytes")
    );
    f.cmd().args(["prune", "--max-unused", "0"]).stdout();
    let pruned = f.cmd().arg("stats").json();
    assert_eq!(u(&pruned["store"], "unused_bytes"), 0, "{pruned:#}");
    assert_eq!(u(&pruned["store"], "reclaimable_bytes"), 0);
    assert_eq!(u(&pruned["store"], "stored_bytes"), pack_bytes(&f.store));
    assert!(u(&pruned["store"], "stored_bytes") < u(store, "stored_bytes"));

    // Human output mentions both agents.
    let human = f.cmd().arg("stats").stdout();
    assert!(
        human.contains("acme/ana") && human.contains("acme/bob"),
        "{human}"
    );
}

fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("events file")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

#[test]
fn events_file_gets_one_json_line_per_operation() {
    let f = Fixture::new();
    let events = f.path("events.jsonl");
    let ev = events.to_str().expect("utf-8 path");
    let run = |args: &[&str]| -> Value {
        let mut c = f.cmd();
        c.arg("--events").arg(&events).args(args);
        c.json()
    };
    let snap = |run: &dyn Fn(&[&str]) -> Value| -> String {
        let root = f.agent.root().to_str().expect("utf-8 path").to_owned();
        let v = run(&[
            "snapshot", "--tenant", TENANT, "--agent", AGENT, "--source", &root,
        ]);
        str_of(&v, "id").to_owned()
    };
    let s1 = snap(&run);
    f.agent.append_day(3, 0.05).expect("append a day");
    let s2 = snap(&run);
    let target = f.path("copy");
    run(&["restore", &s1, "--target", target.to_str().expect("utf-8")]);
    let bundle = f.path("ana.tar.zst");
    run(&["export", &s2, "--out", bundle.to_str().expect("utf-8")]);
    run(&["delete", &s1]);
    f.agent.append_day(4, 0.05).expect("append a day");
    let s3 = snap(&run);
    run(&["forget", "--tenant", TENANT, "--keep-last", "1"]);
    // The environment variable works as the option does.
    f.cmd()
        .env("MEMSNAP_EVENTS", ev)
        .args(["prune", "--max-unused", "0"])
        .json();
    run(&["import", bundle.to_str().expect("utf-8")]);
    // Reading commands and dry runs publish nothing.
    run(&["list"]);
    run(&["stats"]);
    run(&["prune", "--dry-run"]);

    let lines = read_events(&events);
    let kinds: Vec<&str> = lines.iter().map(|e| str_of(e, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "created",
            "restored",
            "exported",
            "deleted",
            "created",
            "forgotten",
            "pruned",
            "imported"
        ],
        "{lines:#?}"
    );
    let ids: Vec<Option<&str>> = lines.iter().map(|e| e["snapshot_id"].as_str()).collect();
    assert_eq!(
        ids,
        [
            Some(s1.as_str()),
            Some(s2.as_str()),
            Some(s1.as_str()),
            Some(s2.as_str()),
            Some(s1.as_str()),
            Some(s3.as_str()),
            Some(s2.as_str()),
            None,
            Some(s2.as_str()),
        ]
    );
    for e in &lines {
        assert!(u(e, "at_ms") > 0, "{e:#}");
        if e["kind"] != "pruned" {
            assert_eq!(e["tenant"], TENANT);
            assert_eq!(e["agent"], AGENT);
        }
    }
    assert_eq!(lines[2]["target"], target.to_str().expect("utf-8"));
    assert!(u(&lines[0], "new_stored_bytes") > 0);
    assert!(u(&lines[7], "bytes_freed") > 0, "{:#}", lines[7]);
    assert_eq!(lines[8]["already_present"], false);
}

#[derive(Default)]
struct Collect(Mutex<Vec<Event>>);

impl EventPublisher for Collect {
    fn publish(&self, event: &Event) {
        self.0.lock().expect("lock").push(event.clone());
    }
}

#[test]
fn library_publisher_and_metrics_count_ok_and_error() {
    let f = Fixture::new();
    let collected = Arc::new(Collect::default());
    let m = Memsnap::create(&f.store, StoreOptions::default())
        .expect("store")
        .with_events(collected.clone());
    let ana = AgentId::new(TENANT, AGENT).expect("name");
    let info = m
        .snapshot(&SnapshotRequest::new(ana.clone()).sources(SourceSpec::from_root(f.agent.root())))
        .expect("snapshot");
    let missing = f.path("no-such-agent");
    let err = m.snapshot(
        &SnapshotRequest::new(AgentId::new(TENANT, "ghost").expect("name"))
            .sources(SourceSpec::from_root(&missing)),
    );
    assert!(err.is_err(), "a snapshot of nothing fails");
    // A clone shares the publisher and the metrics.
    m.clone().delete(&info.id, Some(&ana)).expect("delete");

    let events = collected.0.lock().expect("lock").clone();
    let kinds: Vec<&str> = events.iter().map(Event::kind).collect();
    assert_eq!(kinds, ["created", "deleted"]);
    let json = serde_json::to_value(&events[0]).expect("serialize");
    assert_eq!(json["kind"], "created");
    assert_eq!(json["snapshot_id"], info.id.as_str());

    let text = m.metrics_text();
    assert!(
        text.contains(r#"memsnap_operations_total{op="snapshot",outcome="error"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"memsnap_operations_total{op="snapshot",outcome="ok"} 1"#));
    assert!(text.contains(r#"memsnap_operations_total{op="delete",outcome="ok"} 1"#));
    assert!(text.contains(r#"memsnap_operation_duration_seconds_count{op="snapshot"} 2"#));
    assert!(text.contains(&format!(
        "memsnap_read_bytes_total {}",
        info.stats.bytes_read
    )));
    assert!(!text.contains("ghost") && !text.contains(&info.id));
}

/// `name{labels} value` or `name value`: the sample's name, labels and value.
fn sample(line: &str) -> (String, Vec<(String, String)>, f64) {
    let (head, value) = line.rsplit_once(' ').expect("name and value");
    let value: f64 = value
        .parse()
        .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => {
            let inner = rest.strip_suffix('}').expect("closing brace");
            let labels = inner
                .split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("quoted label value");
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            (n.to_owned(), labels)
        }
        None => (head.to_owned(), Vec::new()),
    };
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
        "bad metric name in {line:?}"
    );
    (name, labels, value)
}

#[test]
fn stats_prometheus_is_the_text_format_with_store_gauges_and_no_ids() {
    let (f, _bob, s1, s2, s3) = two_agents();
    f.cmd().args(["delete", &s1]).stdout();
    let stats = f.cmd().arg("stats").json();
    let text = f.cmd().args(["stats", "--prometheus"]).stdout();

    let mut samples = std::collections::BTreeMap::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
        } else if line.starts_with("# HELP ") || line.starts_with("# ") {
            continue;
        } else {
            let (name, labels, value) = sample(line);
            for (k, _) in &labels {
                assert!(["op", "outcome", "le"].contains(&k.as_str()), "{line}");
            }
            if labels.is_empty() {
                samples.insert(name, value);
            }
        }
    }
    let store = &stats["store"];
    for (metric, field) in [
        ("memsnap_store_snapshots", "snapshots"),
        ("memsnap_store_chunks", "chunks"),
        ("memsnap_store_packs", "packs"),
        ("memsnap_store_stored_bytes", "stored_bytes"),
        ("memsnap_store_unused_bytes", "unused_bytes"),
        ("memsnap_store_logical_bytes", "logical_bytes"),
    ] {
        assert!(typed.contains(metric), "no # TYPE for {metric}\n{text}");
        assert_eq!(
            samples.get(metric),
            Some(&(u(store, field) as f64)),
            "{metric}"
        );
    }
    assert_eq!(samples["memsnap_store_snapshots"], 2.0);
    assert!(samples["memsnap_store_unused_bytes"] > 0.0);
    // This process ran no operation.
    assert!(text.contains(r#"memsnap_operations_total{op="snapshot",outcome="ok"} 0"#));
    for id in [&s1, &s2, &s3] {
        assert!(
            !text.contains(id.as_str()),
            "snapshot id in metrics\n{text}"
        );
    }
    for name in [TENANT, AGENT, "bob"] {
        assert!(
            !text.contains(&format!("\"{name}\"")),
            "{name} labels a series\n{text}"
        );
    }
}
