//! Reading a live SQLite database consistently while other connections write: every page is
//! read through SQLite inside one read transaction, so the bytes are exactly one committed
//! state (WAL content included). Never a copy of the file and its `-wal`, never `VACUUM INTO`
//! (which re-lays every page and defeats deduplication).
//!
//! Pages stream from the `sqlite_dbpage` virtual table (built in: see .cargo/config.toml). A
//! SQLite built without it falls back to the online backup API, in one step, into a temporary
//! file of the store.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::error::SourceError;

const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A database's facts, read inside the same transaction as its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DbMeta {
    pub page_size: u32,
    pub page_count: u64,
    pub user_version: i64,
    pub wal: bool,
}

/// Receives each page of a database, in order.
pub(crate) type PageSink<'a> = dyn FnMut(&DbMeta, &[u8]) -> Result<(), crate::error::Error> + 'a;

/// Whether `path` starts with the SQLite header (databases are recognised by content, not name).
pub(crate) fn is_database(path: &Path) -> bool {
    header(path).is_some()
}

/// (page size, WAL mode) from a database file's header; `None` if it is not a database.
pub(crate) fn header(path: &Path) -> Option<(u32, bool)> {
    let mut h = [0u8; 20];
    std::fs::File::open(path).ok()?.read_exact(&mut h).ok()?;
    parse_header(&h)
}

/// Page size and WAL flag from a database's first 20 bytes; `None` unless a valid header.
pub(crate) fn parse_header(h: &[u8]) -> Option<(u32, bool)> {
    if h.len() < 20 || &h[..16] != MAGIC {
        return None;
    }
    // Offset 16, big-endian; 1 means 65536. Bytes 18 and 19 are 2 in WAL mode.
    let raw = u16::from_be_bytes([h[16], h[17]]);
    let page = if raw == 1 { 65536 } else { u32::from(raw) };
    if !(512..=65536).contains(&page) || !page.is_power_of_two() {
        return None;
    }
    Some((page, h[18] == 2 && h[19] == 2))
}

/// The databases directly inside `dir`, by file name.
pub(crate) fn list_databases(dir: &Path) -> Result<Vec<(String, PathBuf)>, SourceError> {
    let io = |source| SourceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let ft = entry.file_type().map_err(io)?;
        let path = entry.path();
        if ft.is_file() && is_database(&path) {
            // Database names travel through JSON (journal, schema_versions): UTF-8 only.
            match entry.file_name().into_string() {
                Ok(name) => out.push((name, path)),
                Err(_) => tracing::warn!(
                    path = %path.display(),
                    "skipping a database whose file name is not UTF-8: rename it to include it"
                ),
            }
        }
    }
    out.sort();
    Ok(out)
}

fn open(path: &Path, busy: Duration) -> Result<Connection, SourceError> {
    let err = |source| SourceError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    // Read-write (never create) so that a hot journal can be rolled back and the last reader of
    // a WAL database removes the -wal/-shm it had to create; read-only if we may not write.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match Connection::open_with_flags(path, flags) {
        Ok(c) => c,
        Err(_) => Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?,
    };
    conn.busy_timeout(busy).map_err(err)?;
    Ok(conn)
}

/// Streams the pages of one consistent state of the database at `path` to `on_page`, in order.
pub(crate) fn read_pages(
    path: &Path,
    busy: Duration,
    tmp_dir: &Path,
    on_page: &mut PageSink<'_>,
) -> Result<DbMeta, crate::error::Error> {
    let err = |source| SourceError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = open(path, busy)?;
    conn.execute_batch("BEGIN DEFERRED").map_err(err)?;
    let result = (|| {
        // The first read starts the read transaction; every later statement sees its state.
        let user_version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err)?;
        let page_size: u32 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(err)?;
        let page_count: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(err)?;
        let page_count = page_count.max(0) as u64;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(err)?;
        let meta = DbMeta {
            page_size,
            page_count,
            user_version,
            wal: mode.eq_ignore_ascii_case("wal"),
        };
        match conn.prepare("SELECT pgno, data FROM sqlite_dbpage('main')") {
            Ok(mut stmt) => {
                let mut rows = stmt.query([]).map_err(err)?;
                let mut expect = 1u64;
                while let Some(row) = rows.next().map_err(err)? {
                    let pgno: i64 = row.get(0).map_err(err)?;
                    let pgno = pgno.max(0) as u64;
                    let data = row.get_ref(1).map_err(err)?;
                    let data = data.as_blob().map_err(|e| err(e.into()))?;
                    if pgno != expect || data.len() != page_size as usize {
                        return Err(SourceError::NotSqlite {
                            path: path.to_path_buf(),
                            message: format!("page {pgno} out of order or of the wrong size"),
                        }
                        .into());
                    }
                    on_page(&meta, data)?;
                    expect += 1;
                }
                if expect != page_count + 1 {
                    return Err(SourceError::NotSqlite {
                        path: path.to_path_buf(),
                        message: format!(
                            "read {} pages, the database has {page_count}",
                            expect - 1
                        ),
                    }
                    .into());
                }
                Ok(meta)
            }
            Err(e) if e.to_string().contains("sqlite_dbpage") => {
                // Silent, this cost a measurement here: a build run from outside the repository
                // (`--manifest-path`) misses .cargo/config.toml, and snapshots took 2.5x as long.
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "this build's SQLite has no sqlite_dbpage table: databases are copied \
                         through the backup API into the store's tmp/ first, which is slower and \
                         needs free space; build memsnap from its folder (its .cargo/config.toml \
                         sets LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_DBPAGE_VTAB)"
                    );
                });
                read_via_backup(&conn, path, tmp_dir, meta, on_page)
            }
            Err(e) => Err(err(e).into()),
        }
    })();
    let _ = conn.execute_batch("COMMIT");
    result
}

/// Fallback for a SQLite without `sqlite_dbpage`: one backup step (which runs in a single read
/// transaction of the source) into a temporary file, then its pages.
fn read_via_backup(
    conn: &Connection,
    path: &Path,
    tmp_dir: &Path,
    meta: DbMeta,
    on_page: &mut PageSink<'_>,
) -> Result<DbMeta, crate::error::Error> {
    let err = |source| SourceError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tmp_dir.join(format!("backup-{:016x}.sqlite", rand::random::<u64>()));
    let result = (|| {
        let mut dst = Connection::open(&tmp).map_err(err)?;
        {
            let backup = rusqlite::backup::Backup::new(conn, &mut dst).map_err(err)?;
            // The source is read inside this connection's open transaction: one step copies
            // exactly that state, and anything but Done means the copy is incomplete.
            let step = backup.step(-1).map_err(err)?;
            if step != rusqlite::backup::StepResult::Done {
                return Err(SourceError::NotSqlite {
                    path: path.to_path_buf(),
                    message: format!("the backup copy did not complete ({step:?})"),
                }
                .into());
            }
        }
        drop(dst);
        let mut f = std::fs::File::open(&tmp).map_err(|e| crate::error::Error::io(&tmp, e))?;
        let mut page = vec![0u8; meta.page_size as usize];
        let mut count = 0u64;
        loop {
            match f.read_exact(&mut page) {
                Ok(()) => {
                    on_page(&meta, &page)?;
                    count += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(crate::error::Error::io(&tmp, e)),
            }
        }
        if count != meta.page_count {
            return Err(SourceError::NotSqlite {
                path: path.to_path_buf(),
                message: format!(
                    "the backup copy has {count} pages, the database {}",
                    meta.page_count
                ),
            }
            .into());
        }
        Ok(meta)
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards .cargo/config.toml: without SQLITE_ENABLE_DBPAGE_VTAB every snapshot would take
    /// the slower backup fallback.
    #[test]
    fn bundled_sqlite_has_the_dbpage_table() {
        let c = Connection::open_in_memory().expect("open");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("create");
        let n: i64 = c
            .query_row("SELECT count(*) FROM sqlite_dbpage('main')", [], |r| {
                r.get(0)
            })
            .expect(
                "sqlite_dbpage is missing: build from the project root (see .cargo/config.toml)",
            );
        assert!(n >= 2);
    }

    #[test]
    fn pages_read_inside_a_transaction_form_the_database_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.sqlite");
        let c = Connection::open(&db).expect("open");
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA user_version=7; CREATE TABLE t(x);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO t SELECT randomblob(3000) FROM n;",
        )
        .expect("fill");
        let mut bytes = Vec::new();
        let meta = read_pages(&db, Duration::from_secs(1), dir.path(), &mut |_, p| {
            bytes.extend_from_slice(p);
            Ok(())
        })
        .expect("read");
        assert!(meta.wal);
        assert_eq!(meta.user_version, 7);
        assert_eq!(bytes.len() as u64, meta.page_count * meta.page_size as u64);
        // The writer's connection is still open: its committed rows live in the -wal, and the
        // pages read include them.
        let copy = dir.path().join("copy.sqlite");
        std::fs::write(&copy, &bytes).expect("write");
        let r = Connection::open(&copy).expect("open copy");
        let n: i64 = r
            .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
            .expect("count");
        assert_eq!(n, 50);
        let ok: String = r
            .query_row("PRAGMA integrity_check", [], |x| x.get(0))
            .expect("check");
        assert_eq!(ok, "ok");
        drop(c);
    }
}
