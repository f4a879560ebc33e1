//! Change detection (store-format.md, "Change detection"): a file or database whose `stat` is
//! unchanged since the agent's last snapshot is not read again, and no change is ever missed,
//! not even one byte written behind a restored size and mtime.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use memsnap::{
    AgentId, Memsnap, PruneRequest, RestoreRequest, SnapshotInfo, SnapshotRequest, SourceSpec,
    StoreOptions,
};
use rusqlite::Connection;

struct Agent {
    tmp: tempfile::TempDir,
    store: Memsnap,
}

impl Agent {
    /// A memdir of two notes, one rollback-journal database with one text row, one state file;
    /// all older than the racy window when the first snapshot lists them.
    fn new() -> Result<Agent> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("agent");
        for d in ["memdir/notes", "sqlite", "state"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::write(
            root.join("memdir/MEMORY.md"),
            "# MEMORY\n\n- [a](notes/a.md)\n",
        )?;
        fs::write(
            root.join("memdir/notes/a.md"),
            "The user prefers short answers.\n".repeat(200),
        )?;
        fs::write(root.join("state/cursor.json"), r#"{"offset": 7}"#)?;
        let c = Connection::open(root.join("sqlite/long_term.sqlite"))?;
        c.execute_batch(
            "CREATE TABLE memories(id INTEGER PRIMARY KEY, content TEXT);
             INSERT INTO memories(content) VALUES ('hello world, the user likes tea');",
        )?;
        drop(c);
        let store = Memsnap::create(tmp.path().join("store"), StoreOptions::default())?;
        settle();
        Ok(Agent { tmp, store })
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("agent")
    }

    fn id() -> AgentId {
        AgentId::new("default", "cd").expect("valid agent")
    }

    fn snapshot(&self) -> Result<SnapshotInfo> {
        let req = SnapshotRequest::new(Self::id()).sources(SourceSpec::from_root(self.root()));
        Ok(self.store.snapshot(&req)?)
    }

    fn restore(&self, snap: &str) -> Result<PathBuf> {
        let target = self.tmp.path().join(format!("restored-{snap}"));
        let req = RestoreRequest::new(snap).agent(Self::id()).target(&target);
        self.store.restore(&req)?;
        Ok(target)
    }

    fn db(&self) -> PathBuf {
        self.root().join("sqlite/long_term.sqlite")
    }
}

/// Lets the racy window (100 ms) pass, so that only `stat` decides.
fn settle() {
    std::thread::sleep(Duration::from_millis(250));
}

fn state_bytes() -> u64 {
    r#"{"offset": 7}"#.len() as u64
}

/// Overwrites bytes in place and puts the file's mtime back: size and mtime are as before.
fn patch_keeping_mtime(path: &Path, from: &[u8], to: &[u8]) -> Result<()> {
    let mtime = fs::metadata(path)?.modified()?;
    let size = fs::metadata(path)?.len();
    let mut bytes = fs::read(path)?;
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .with_context(|| format!("{} holds no {:?}", path.display(), from))?;
    bytes[at..at + to.len()].copy_from_slice(to);
    // Write in place (same inode), as an editor or a database would.
    use std::os::unix::fs::FileExt;
    let f = fs::File::options().write(true).open(path)?;
    f.write_all_at(&bytes[at..at + to.len()], at as u64)?;
    f.set_modified(mtime)?;
    drop(f);
    ensure!(fs::metadata(path)?.modified()? == mtime && fs::metadata(path)?.len() == size);
    Ok(())
}

fn text_of(db: &Path) -> Result<String> {
    let c = Connection::open(db)?;
    Ok(
        c.query_row("SELECT content FROM memories WHERE id = 1", [], |r| {
            r.get(0)
        })?,
    )
}

#[test]
fn unchanged_files_and_databases_are_not_read_again() -> Result<()> {
    let a = Agent::new()?;
    let first = a.snapshot()?;
    ensure!(first.stats.bytes_read > 8192, "{:?}", first.stats);
    let second = a.snapshot()?;
    // Only the state capture (a provider's output, always read) is read again.
    ensure!(
        second.stats.bytes_read == state_bytes() && second.stats.new_chunks == 0,
        "an unchanged agent was read again: {:?}",
        second.stats
    );
    let restored = a.restore(&second.id)?;
    ensure!(text_of(&restored.join("sqlite/long_term.sqlite"))?.starts_with("hello world"));
    ensure!(
        fs::read(restored.join("memdir/notes/a.md"))?
            == fs::read(a.root().join("memdir/notes/a.md"))?
    );
    Ok(())
}

#[test]
fn one_byte_behind_unchanged_size_and_mtime_is_seen() -> Result<()> {
    let a = Agent::new()?;
    a.snapshot()?;
    let cached = a.snapshot()?;
    ensure!(
        cached.stats.bytes_read == state_bytes(),
        "{:?}",
        cached.stats
    );

    let note = a.root().join("memdir/notes/a.md");
    patch_keeping_mtime(&note, b"short", b"Short")?;
    patch_keeping_mtime(&a.db(), b"hello world", b"jello world")?;
    settle();
    let after = a.snapshot()?;
    let db_size = fs::metadata(a.db())?.len();
    let note_size = fs::metadata(&note)?.len();
    ensure!(
        after.stats.bytes_read == db_size + note_size + state_bytes(),
        "exactly the changed note and database are read again: {:?} (db {db_size}, note \
         {note_size})",
        after.stats
    );
    let restored = a.restore(&after.id)?;
    ensure!(
        text_of(&restored.join("sqlite/long_term.sqlite"))?.starts_with("jello world"),
        "the database change was missed"
    );
    ensure!(
        fs::read(restored.join("memdir/notes/a.md"))? == fs::read(&note)?,
        "the note change was missed"
    );
    // The earlier snapshot still has the old bytes.
    let old = a.restore(&cached.id)?;
    ensure!(text_of(&old.join("sqlite/long_term.sqlite"))?.starts_with("hello world"));
    Ok(())
}

#[test]
fn a_commit_to_the_wal_is_seen_while_the_writer_stays_open() -> Result<()> {
    let a = Agent::new()?;
    let writer = Connection::open(a.db())?;
    writer
        .execute_batch("PRAGMA journal_mode=WAL; INSERT INTO memories(content) VALUES ('two');")?;
    settle();
    a.snapshot()?;
    let cached = a.snapshot()?;
    ensure!(
        cached.stats.bytes_read == state_bytes(),
        "{:?}",
        cached.stats
    );
    let db_stat = fs::metadata(a.db())?.modified()?;
    writer.execute("INSERT INTO memories(content) VALUES ('three')", [])?;
    ensure!(
        fs::metadata(a.db())?.modified()? == db_stat,
        "the commit went to the WAL only"
    );
    settle();
    let after = a.snapshot()?;
    let restored = a.restore(&after.id)?;
    let c = Connection::open(restored.join("sqlite/long_term.sqlite"))?;
    let n: i64 = c.query_row("SELECT count(*) FROM memories", [], |r| r.get(0))?;
    ensure!(n == 3, "the restored database has {n} rows, not 3");
    drop(writer);
    Ok(())
}

#[test]
fn a_file_changed_just_before_the_listing_is_read_again_next_time() -> Result<()> {
    let a = Agent::new()?;
    a.snapshot()?;
    // Changed inside the racy window: the snapshot reads it but must not vouch for its stat.
    let note = a.root().join("memdir/notes/a.md");
    fs::write(&note, "The user prefers long answers.\n".repeat(200))?;
    let racy = a.snapshot()?;
    ensure!(racy.stats.bytes_read >= 6000, "{:?}", racy.stats);
    let next = a.snapshot()?;
    ensure!(
        next.stats.bytes_read >= 6000,
        "a racy file was taken as unchanged: {:?}",
        next.stats
    );
    Ok(())
}

#[test]
fn content_pruned_since_the_last_snapshot_is_read_again() -> Result<()> {
    let a = Agent::new()?;
    let first = a.snapshot()?;
    // Every snapshot gone and its chunks pruned: the cache still names them.
    a.store.delete(&first.id, Some(&Agent::id()))?;
    let pruned = a.store.prune(&PruneRequest::default())?;
    ensure!(
        pruned.packs_deleted + pruned.packs_rewritten > 0,
        "{pruned:?}"
    );
    let again = a.snapshot()?;
    ensure!(
        again.stats.bytes_read > 8192 && again.stats.new_chunks > 0,
        "the snapshot relied on pruned chunks: {:?}",
        again.stats
    );
    let report = a.store.verify(None, None, true)?;
    ensure!(report.damaged.is_empty(), "{report:?}");
    let restored = a.restore(&again.id)?;
    ensure!(text_of(&restored.join("sqlite/long_term.sqlite"))?.starts_with("hello world"));
    Ok(())
}

#[test]
fn unreadable_change_detection_rows_mean_a_full_read_not_an_error() -> Result<()> {
    let a = Agent::new()?;
    let first = a.snapshot()?;
    {
        let db = redb::Database::open(a.tmp.path().join("store/index.redb"))?;
        let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("file_stats");
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(table)?;
            let keys: Vec<Vec<u8>> = redb::ReadableTable::iter(&t)?
                .map(|r| r.map(|(k, _)| k.value().to_vec()))
                .collect::<Result<_, _>>()?;
            ensure!(!keys.is_empty(), "the first snapshot wrote no rows");
            for k in keys {
                t.insert(k.as_slice(), [9u8, 9, 9].as_slice())?;
            }
        }
        tx.commit()?;
    }
    let again = a.snapshot()?;
    ensure!(
        again.stats.bytes_read == first.stats.bytes_read,
        "damaged rows must not be trusted: {:?} vs {:?}",
        again.stats,
        first.stats
    );
    // The snapshot wrote good rows again.
    let third = a.snapshot()?;
    ensure!(third.stats.bytes_read == state_bytes(), "{:?}", third.stats);
    Ok(())
}
