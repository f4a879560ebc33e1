//! `cargo bench --bench stages [-- --mib N]`: throughput of each stage of the snapshot pipeline
//! on one core, on real data (the pages and notes of a deterministic sample agent), to compare
//! with the machine's physical rates (page-cache read, BLAKE3, FastCDC, zstd) and to choose
//! parameters. Results are written down by hand in benches/RESULTS.md.

use std::path::Path;
use std::time::Instant;

use memsnap::sample::{SampleAgent, SampleSpec};

// The store's zero-run frames, compiled here from the same file: the codec is crate-private
// (its unit tests compile here as well, unused).
#[allow(dead_code, unused_imports)]
#[path = "../src/store/planes.rs"]
mod planes;
#[allow(dead_code, unused_imports)]
#[path = "../src/zstd_frames.rs"]
mod zstd_frames;

/// Runs `f` until it has taken at least 1 s (at least 3 rounds); returns the best MB/s.
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 3 || started.elapsed().as_secs_f64() < 1.0 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        rounds += 1;
    }
    bytes as f64 / best / 1e6
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn row(stage: &str, input: &str, mbs: f64, extra: &str) {
    println!("| {stage} | {input} | {mbs:.0} | {extra} |");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = SampleAgent::create(
        &dir.path().join("agent"),
        &SampleSpec::with_total_bytes(mib << 20, 42),
    )
    .expect("sample agent");
    let vector = read_file(&agent.sqlite_dir().join("vector.sqlite"));
    let long_term = read_file(&agent.sqlite_dir().join("long_term.sqlite"));
    let mut notes = Vec::new();
    for e in walkdir::WalkDir::new(agent.memdir())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.path().to_string_lossy().contains(".git"))
    {
        notes.extend_from_slice(&read_file(e.path()));
    }
    println!(
        "inputs: vector.sqlite {} MiB, long_term.sqlite {} MiB, notes {} MiB (one core each)\n",
        vector.len() >> 20,
        long_term.len() >> 20,
        notes.len() >> 20
    );
    println!("| stage | input | MB/s | notes |\n|---|---|---|---|");

    // Reading: page cache to memory, and pages through SQLite's sqlite_dbpage.
    let vpath = agent.sqlite_dir().join("vector.sqlite");
    row(
        "read (page cache)",
        "vector.sqlite",
        rate(vector.len(), || {
            std::hint::black_box(read_file(&vpath));
        }),
        "",
    );
    let conn = rusqlite::Connection::open(&vpath).expect("open");
    row(
        "read (sqlite_dbpage)",
        "vector.sqlite",
        rate(vector.len(), || {
            let mut stmt = conn
                .prepare_cached("SELECT data FROM sqlite_dbpage('main')")
                .expect("dbpage");
            let mut rows = stmt.query([]).expect("query");
            let mut n = 0usize;
            while let Some(r) = rows.next().expect("row") {
                n += r.get_ref(0).expect("data").as_blob().expect("blob").len();
            }
            assert_eq!(n, vector.len());
        }),
        "one virtual-table row per page",
    );

    // Hashing.
    row(
        "BLAKE3",
        "vector.sqlite, whole",
        rate(vector.len(), || {
            std::hint::black_box(blake3::hash(&vector));
        }),
        "one-shot (SIMD across 1 KiB chunks)",
    );
    row(
        "BLAKE3",
        "vector.sqlite, 4 KiB chunks",
        rate(vector.len(), || {
            for c in vector.chunks(4096) {
                std::hint::black_box(blake3::hash(c));
            }
        }),
        "chunk ids",
    );
    row(
        "SHA-256",
        "vector.sqlite, whole",
        rate(vector.len(), || {
            use sha2::Digest;
            std::hint::black_box(sha2::Sha256::digest(&vector));
        }),
        "export digests",
    );

    // Chunking.
    for (name, data) in [("notes", &notes), ("vector.sqlite", &vector)] {
        let mut count = 0;
        let mbs = rate(data.len(), || {
            count = fastcdc::v2020::FastCDC::new(data, 4096, 16384, 65536).count();
        });
        row("FastCDC 4/16/64 KiB", name, mbs, &format!("{count} chunks"));
    }

    // Compression of 4 KiB pages (the unit memsnap stores) and, for comparison, of 64 KiB.
    for (name, data) in [("vector.sqlite", &vector), ("long_term.sqlite", &long_term)] {
        for level in [-5, -1, 1, 3] {
            for block in [4096usize, 65536] {
                let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
                let mut out = 0usize;
                let mbs = rate(data.len(), || {
                    out = data
                        .chunks(block)
                        .map(|b| c.compress(b).expect("compress").len().min(b.len()))
                        .sum();
                });
                row(
                    &format!("zstd {level}, {} KiB blocks", block / 1024),
                    name,
                    mbs,
                    &format!("{:.3} of input", out as f64 / data.len() as f64),
                );
            }
        }
    }
    // What the store does with pages of high entropy (one embedding and its free space).
    let mut out = 0usize;
    let mbs = rate(vector.len(), || {
        out = vector
            .chunks(4096)
            .map(|b| zstd_frames::zero_runs(b).map_or(b.len(), |f| f.len().min(b.len())))
            .sum();
    });
    row(
        "zero runs as zstd RLE blocks, 4 KiB",
        "vector.sqlite",
        mbs,
        &format!("{:.3} of input", out as f64 / vector.len() as f64),
    );
    // The plane codec, which the store uses for such pages.
    let mut out = 0usize;
    let mbs = rate(vector.len(), || {
        out = vector
            .chunks(4096)
            .map(|b| planes::encode(b, 0).map_or(b.len(), |f| f.len()))
            .sum();
    });
    row(
        "plane codec (Huffman sign-exponent plane), 4 KiB",
        "vector.sqlite",
        mbs,
        &format!("{:.3} of input", out as f64 / vector.len() as f64),
    );
    let coded: Vec<Vec<u8>> = vector
        .chunks(4096)
        .filter_map(|b| planes::encode(b, 0))
        .collect();
    row(
        "plane codec decode, 4 KiB",
        "vector.sqlite (plane-coded pages)",
        rate(coded.len() * 4096, || {
            let mut page = vec![0u8; 4096];
            for f in &coded {
                planes::decode_into(f, &mut page).expect("decode");
                std::hint::black_box(&page);
            }
        }),
        &format!("{} of {} pages", coded.len(), vector.len() / 4096),
    );
    let mut d = zstd::bulk::Decompressor::new().expect("zstd");
    let frames: Vec<Vec<u8>> = vector
        .chunks(4096)
        .filter_map(zstd_frames::zero_runs)
        .collect();
    row(
        "zstd decompress, 4 KiB blocks",
        "vector.sqlite (zero-run frames)",
        rate(frames.len() * 4096, || {
            for f in &frames {
                std::hint::black_box(d.decompress(f, 4096).expect("decompress"));
            }
        }),
        "",
    );
    for level in [-1, 3] {
        let mut c = zstd::bulk::Compressor::new(level).expect("zstd");
        let frames: Vec<Vec<u8>> = vector
            .chunks(4096)
            .map(|b| c.compress(b).expect("compress"))
            .collect();
        row(
            "zstd decompress, 4 KiB blocks",
            &format!("vector.sqlite (level {level})"),
            rate(vector.len(), || {
                for f in &frames {
                    std::hint::black_box(d.decompress(f, 4096).expect("decompress"));
                }
            }),
            "",
        );
    }
}
