//! Repair: rebuild the catalog's chunk index from the packs' own indexes.
//!
//! Every pack carries its own index (docs/format.md, *Pack files*), so the `packs` and `chunks` tables can be
//! derived from the store alone. `repair index` lists every pack file, reads and checks each one's index, and
//! makes the two tables agree with what it found, in one `IMMEDIATE` transaction (so a crash leaves the old
//! index or the new one):
//!
//! - a chunk row that matches an entry of a sound pack exactly is kept;
//! - a chunk row whose pack is missing or damaged, or that disagrees with the pack's index, is re-pointed to
//!   an entry of the same chunk in a sound pack if there is one, and removed otherwise;
//! - every chunk in a sound pack that the index lacks is added (chunks no checkpoint uses are left for GC);
//! - pack rows are added for sound packs the catalog did not know and removed for packs missing or damaged.
//!   A damaged pack's file is left where it is; GC deletes it as an orphan later, so move it aside first to
//!   keep it for forensics.
//!
//! It holds the GC lease, and refuses while a commit is running (after expiring the sessions of dead ones):
//! a commit between publishing a pack and recording it would race the rebuild. Its transaction holds the
//! catalog's write lock while it reads the pack indexes, so commits started meanwhile wait for it.
//!
//! With `--read-data` it then reads every indexed chunk (refreshing its lease meanwhile) and rebuilds once
//! more leaving out the blobs that fail their hash; commits started during the read delay that second
//! rebuild until they end (up to ten minutes), rather than throw the reading away.
//!
//! If the catalog file is gone, a new one is created with the parameters of the copy beside it
//! (`REPO/params`; a copy this build cannot use stops the repair) and the chunk index rebuilt into it.
//! Trees, file contents and checkpoints live only in the catalog, so none survives that; the chunks
//! stay, and later commits of the same data deduplicate against them.
//!
//! Afterwards each checkpoint is reported whole or damaged, with what it misses, by the same reachability
//! check `verify` makes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{TransactionBehavior, params};

use crate::backend::Backend;
use crate::catalog::{Catalog, host_name, now_ns};
use crate::error::{Error, Result};
use crate::params::RepoParams;
use crate::verify::{AffectedFile, DamagedPack};

/// A session or lease on another host is taken for dead after this long without a heartbeat (as GC does).
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// How often a long read refreshes the lease: well inside [`STALE_AFTER`].
const HEARTBEAT: Duration = Duration::from_secs(60);

/// How long the second rebuild of `--read-data` waits for running commits to end before it gives up: the read
/// before it may have taken hours, and commits take seconds.
const WAIT_FOR_COMMITS: Duration = Duration::from_secs(600);

/// A checkpoint's state after a repair.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointState {
    /// Full checkpoint id.
    pub id: String,
    /// The committed path.
    pub path: String,
    /// Commit time, nanoseconds since the Unix epoch (and `time` in RFC 3339 in JSON).
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::time_ns")]
    pub time_ns: i64,
    /// Everything it reaches is in the catalog and the chunk index.
    pub whole: bool,
    /// Files and directories that cannot be restored whole.
    pub files: u64,
    /// Directory trees missing or incomplete in the catalog.
    pub missing_trees: u64,
    /// File contents missing from the catalog.
    pub missing_contents: u64,
    /// Segments missing from the catalog.
    pub missing_segments: u64,
    /// References to chunks found in no sound pack.
    pub missing_chunks: u64,
}

/// What `repair index` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RepairReport {
    /// The catalog was missing and a new one was created (no checkpoint survives that).
    pub catalog_created: bool,
    /// The parameters the new catalog was given from the copy beside the lost one (`REPO/params`); `None`
    /// when there was no copy and the defaults (or format 1's) were taken.
    pub params_recovered: Option<RepoParams>,
    /// Dead writer sessions expired before the rebuild.
    pub sessions_expired: u64,
    /// Pack files found in the store.
    pub packs_scanned: u64,
    /// Pack files whose own index could not be read or failed its checks; their chunks were not indexed.
    pub damaged_packs: Vec<DamagedPack>,
    /// Pack rows added for sound packs the catalog did not record.
    pub packs_added: u64,
    /// Pack rows removed (their pack is missing or damaged).
    pub packs_removed: u64,
    /// Chunk rows in the index after the repair.
    pub chunks_indexed: u64,
    /// Chunk rows added from pack indexes.
    pub chunks_added: u64,
    /// Chunk rows moved to another copy of the chunk in a sound pack.
    pub chunks_repointed: u64,
    /// Chunk rows removed: the chunk is in no sound pack.
    pub chunks_removed: u64,
    /// Chunk data was read and checked against the chunks' ids (`--read-data`).
    pub data_read: bool,
    /// Blobs whose bytes do not match their chunk id, left out of the index (the row re-pointed to a sound
    /// copy, or removed so that the next commit of the same data stores the chunk afresh).
    pub damaged_chunks_total: u64,
    /// Those blobs (at most 1000 listed).
    pub damaged_chunks: Vec<crate::verify::DamagedChunk>,
    /// Every checkpoint, newest first, whole or damaged.
    pub checkpoints: Vec<CheckpointState>,
    /// Files of damaged checkpoints that cannot be restored whole (at most 1000 listed).
    pub affected_files: Vec<AffectedFile>,
    /// All such files.
    pub affected_files_total: u64,
}

impl RepairReport {
    /// Whether nothing is left damaged: the catalog was not lost, every pack is sound and every checkpoint
    /// whole.
    pub fn is_whole(&self) -> bool {
        !self.catalog_created && self.damaged_packs.is_empty() && self.checkpoints.iter().all(|c| c.whole)
    }
}

/// Rebuilds the chunk index of the repository at `root`, whose packs are in `backend`; creates the catalog
/// if it is missing (but only where pack files are, so a mistyped path does not become a repository).
///
/// With `read_data`, every indexed chunk's bytes are then read and checked as `verify --read-data` does, and
/// the index is rebuilt once more leaving out the blobs that fail: a chunk the index does not hold is stored
/// again by the next commit that meets it, which makes whole every checkpoint that uses it.
pub(crate) fn repair_index(
    root: &Path,
    backend: Arc<dyn Backend>,
    read_data: Option<&crate::verify::VerifyOptions>,
) -> Result<RepairReport> {
    let catalog_path = root.join(crate::CATALOG_FILE);
    let mut report = RepairReport::default();
    if std::fs::metadata(&catalog_path).is_ok_and(|md| md.is_file() && md.len() == 0) {
        // An empty catalog holds nothing to keep: it is made anew, as a lost one is.
        std::fs::remove_file(&catalog_path).map_err(|e| Error::io(&catalog_path, e))?;
    }
    if !catalog_path.is_file() {
        let packs =
            if root.is_dir() { backend.list("packs/").map_err(|e| Error::backend("packs/", e))? } else { vec![] };
        if packs.is_empty() && !root.join("packs").is_dir() {
            return Err(Error::NoRepository(root.to_path_buf()));
        }
        // Read first: a copy this build cannot use stops the repair before it changes anything.
        report.params_recovered = RepoParams::read_copy(root)?;
        // The write-ahead log of a lost catalog belongs to no database any more; SQLite would replay it
        // into the new one.
        for stale in ["catalog.db-wal", "catalog.db-shm"] {
            match std::fs::remove_file(root.join(stale)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(root.join(stale), e)),
                _ => {}
            }
        }
        Catalog::create(&catalog_path, report.params_recovered.as_ref().unwrap_or(&RepoParams::default()))?;
        report.catalog_created = true;
    }
    let mut cat = Catalog::open(&catalog_path)?;
    let me = host_name();
    crate::gc::acquire_lease(cat.connection_mut(), &me, STALE_AFTER)?;
    let rebuilt = rebuild(&mut cat, backend.as_ref(), &me, false, &mut report).and_then(|()| {
        let Some(opts) = read_data else { return Ok(()) };
        report.data_read = true;
        with_heartbeat(&catalog_path, || crate::verify::verify_with(&cat, &catalog_path, backend.clone(), opts))?;
        // Only blobs whose bytes were read and found wrong: a chunk missing from the index is not in a pack.
        // Read from the table, not the report, whose list stops at 1000 and starts with the missing ones.
        let bad = crate::verify::listed_bad_chunks(cat.connection(), true)?;
        if bad.is_empty() {
            return Ok(());
        }
        report.damaged_chunks = bad;
        // What the first pass changed, added to what the second one does.
        let first = report.clone();
        let deadline = std::time::Instant::now() + WAIT_FOR_COMMITS;
        loop {
            match rebuild(&mut cat, backend.as_ref(), &me, true, &mut report) {
                Err(Error::CommitsRunning { .. }) if std::time::Instant::now() < deadline => {
                    crate::gc::touch_lease(cat.connection())?;
                    std::thread::sleep(Duration::from_millis(200));
                }
                r => break r,
            }
        }?;
        report.chunks_added += first.chunks_added;
        report.chunks_repointed += first.chunks_repointed;
        report.chunks_removed += first.chunks_removed;
        report.packs_added += first.packs_added;
        report.packs_removed += first.packs_removed;
        Ok(())
    });
    let _ = cat.connection().execute("DELETE FROM gc_lease WHERE pid = ?1", [std::process::id()]);
    rebuilt?;
    if report.catalog_created && report.params_recovered.is_none() {
        // The parameters were lost with the catalog, and the repository predates their copy beside it. Packs
        // without a byte-planes blob most likely come from a format 1 repository, made with normalization 1:
        // keep it readable by the builds that made it, and cutting as it did.
        let grouped: bool = cat.connection().query_row(
            "SELECT EXISTS (SELECT 1 FROM chunks WHERE flags = ?1)",
            [crate::pack::FLAG_GROUPED],
            |r| r.get(0),
        )?;
        if !grouped {
            cat.connection()
                .execute("UPDATE meta SET value = '1' WHERE key IN ('format_version', 'normalization')", [])?;
        }
    }

    // A repository from before the copy of its parameters gets one (from the catalog it has now).
    let copy = root.join(crate::params::PARAMS_FILE);
    if !copy.exists() {
        cat.params()?.write_copy(root).map_err(|e| Error::io(&copy, e))?;
    }

    let damage = crate::verify::reach_damage(cat.connection())?;
    // Every checkpoint row, group parts included: damage to a part is damage.
    for c in cat.all_checkpoints()? {
        let hit = damage.affected_checkpoints.iter().find(|a| a.id == c.id);
        report.checkpoints.push(CheckpointState {
            whole: hit.is_none(),
            files: hit.map_or(0, |a| a.files),
            missing_trees: hit.map_or(0, |a| a.missing_trees),
            missing_contents: hit.map_or(0, |a| a.missing_contents),
            missing_segments: hit.map_or(0, |a| a.missing_segments),
            missing_chunks: hit.map_or(0, |a| a.damaged_chunks),
            id: c.id,
            path: c.path,
            time_ns: c.time_ns,
        });
    }
    report.affected_files = damage.affected_files;
    report.affected_files_total = damage.affected_files_total;
    Ok(report)
}

/// Runs `read` while a thread keeps this process's lease fresh, so that a read of many hours is not taken
/// for a dead repair by a machine whose clock is all it can go by.
fn with_heartbeat<T>(catalog_path: &Path, read: impl FnOnce() -> T) -> T {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    std::thread::scope(|s| {
        s.spawn(move || {
            let Ok(cat) = Catalog::open(catalog_path) else { return };
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
                let _ = crate::gc::touch_lease(cat.connection());
            }
        });
        let out = read();
        drop(stop);
        out
    })
}

/// `drop_bad`: leave out the blobs the last verify on this connection found damaged (`temp.v_bad_chunk`).
fn rebuild(
    cat: &mut Catalog,
    backend: &dyn Backend,
    me: &str,
    drop_bad: bool,
    report: &mut RepairReport,
) -> Result<()> {
    let conn = cat.connection_mut();
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS r_scan (id BLOB NOT NULL, pack TEXT NOT NULL, offset INTEGER NOT NULL,
                                                 stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL,
                                                 flags INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS temp.r_scan_by_id ON r_scan (id);
         CREATE TEMP TABLE IF NOT EXISTS r_packs (name TEXT PRIMARY KEY, size INTEGER NOT NULL,
                                                  chunk_count INTEGER NOT NULL) WITHOUT ROWID;
         DELETE FROM temp.r_scan; DELETE FROM temp.r_packs;",
    )?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    crate::gc::touch_lease(&tx)?;
    let (expired, alive) = crate::gc::expire_sessions(&tx, me, STALE_AFTER)?;
    report.sessions_expired = expired;
    if alive > 0 {
        // A commit between publishing a pack and recording it would race the rebuild.
        return Err(Error::CommitsRunning { count: alive });
    }
    // Listed under the write lock with no session alive: no commit can be publishing a pack now.
    let mut names: Vec<String> = backend
        .list("packs/")
        .map_err(|e| Error::backend("packs/", e))?
        .into_iter()
        .filter(|n| n.ends_with(".pack"))
        .collect();
    names.sort();
    report.packs_scanned = names.len() as u64;
    report.damaged_packs.clear();
    {
        let mut add_pack =
            tx.prepare_cached("INSERT INTO temp.r_packs (name, size, chunk_count) VALUES (?1, ?2, ?3)")?;
        let mut add_entry = tx.prepare_cached(
            "INSERT INTO temp.r_scan (id, pack, offset, stored_len, raw_len, flags) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for name in names {
            match crate::pack::read_index(backend, &name) {
                Ok(entries) => {
                    let size = backend.size(&name).map_err(|e| Error::backend(&name, e))?;
                    add_pack.execute(params![name, size as i64, entries.len() as i64])?;
                    for e in entries {
                        add_entry.execute(params![
                            &e.id.0[..],
                            name,
                            e.offset as i64,
                            e.stored_len,
                            e.raw_len,
                            e.flags
                        ])?;
                    }
                }
                Err(e @ Error::Corrupt { .. }) => {
                    let problem = crate::pack::problem_of(&e, &name);
                    report.damaged_packs.push(DamagedPack { pack: name, problem });
                }
                Err(e) => return Err(e),
            }
        }
    }
    if drop_bad {
        report.damaged_chunks_total = tx.execute(
            "DELETE FROM temp.r_scan WHERE EXISTS
                 (SELECT 1 FROM temp.v_bad_chunk b WHERE b.id = r_scan.id AND b.pack = r_scan.pack)",
            [],
        )? as u64;
    }
    report.packs_added = tx.execute(
        "INSERT INTO packs (name, size, chunk_count, created_ns)
         SELECT name, size, chunk_count, ?1 FROM temp.r_packs r WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.name = r.name)",
        [now_ns()],
    )? as u64;
    tx.execute(
        "UPDATE packs SET (size, chunk_count) = (SELECT r.size, r.chunk_count FROM temp.r_packs r WHERE r.name = packs.name)
         WHERE name IN (SELECT name FROM temp.r_packs)",
        [],
    )?;
    // A row stays as it is only if a sound pack's index holds exactly that location.
    let valid = "EXISTS (SELECT 1 FROM temp.r_scan s JOIN packs p ON p.name = s.pack
                         WHERE s.id = chunks.id AND p.id = chunks.pack AND s.offset = chunks.offset
                           AND s.stored_len = chunks.stored_len AND s.raw_len = chunks.raw_len AND s.flags = chunks.flags)";
    // A mark was about the location a row leaves (see docs/format.md, *Verify and repair*).
    tx.execute(&format!("DELETE FROM damaged_chunks WHERE id IN (SELECT id FROM chunks WHERE NOT {valid})"), [])?;
    report.chunks_repointed = tx.execute(
        &format!(
            "UPDATE chunks SET (pack, offset, stored_len, raw_len, flags) =
                 (SELECT p.id, s.offset, s.stored_len, s.raw_len, s.flags FROM temp.r_scan s JOIN packs p ON p.name = s.pack
                  WHERE s.id = chunks.id ORDER BY s.rowid LIMIT 1)
             WHERE NOT {valid} AND EXISTS (SELECT 1 FROM temp.r_scan s WHERE s.id = chunks.id)"
        ),
        [],
    )? as u64;
    report.chunks_removed = tx
        .execute("DELETE FROM chunks WHERE NOT EXISTS (SELECT 1 FROM temp.r_scan s WHERE s.id = chunks.id)", [])?
        as u64;
    if report.chunks_removed > 0 {
        // Until each is stored afresh, a commit must not take a file holding one by its stat alone.
        crate::catalog::flag_unindexed(&tx)?;
    }
    report.chunks_added = tx.execute(
        "INSERT INTO chunks (id, pack, offset, stored_len, raw_len, flags)
         SELECT s.id, p.id, s.offset, s.stored_len, s.raw_len, s.flags FROM temp.r_scan s JOIN packs p ON p.name = s.pack
         WHERE s.rowid = (SELECT min(s2.rowid) FROM temp.r_scan s2 WHERE s2.id = s.id)
           AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = s.id)",
        [],
    )? as u64;
    report.packs_removed =
        tx.execute("DELETE FROM packs WHERE name NOT IN (SELECT name FROM temp.r_packs)", [])? as u64;
    tx.execute(
        "DELETE FROM condemned WHERE kind = 0 AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = condemned.id)",
        [],
    )?;
    crate::catalog::drop_orphan_marks(&tx)?;
    report.chunks_indexed = tx.query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0))? as u64;
    tx.commit()?;
    conn.execute_batch("DELETE FROM temp.r_scan; DELETE FROM temp.r_packs;")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::backend::MemoryBackend;
    use crate::testutil::pseudo_random;
    use crate::{CommitOptions, Repository};

    #[test]
    fn rebuilds_from_a_memory_backend_and_leaves_damaged_packs_out() {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(dir.path()).unwrap();
        let mem = MemoryBackend::new();
        let repo = Repository::open_with(dir.path(), Arc::new(mem.clone())).unwrap();
        let a = repo.commit_reader("a", &mut &pseudo_random(300_000, 1)[..], &CommitOptions::default()).unwrap();
        let mut w = mem.create().unwrap();
        w.write_all(b"not a pack at all, but long enough to have a header and a footer to check").unwrap();
        w.publish("packs/00/junk.pack").unwrap();
        repo.open_catalog().unwrap().connection().execute_batch("DELETE FROM chunks; DELETE FROM packs;").unwrap();
        let r = repo.repair_index().unwrap();
        assert_eq!(r.packs_scanned, 2);
        assert_eq!(r.damaged_packs.len(), 1);
        assert_eq!(r.damaged_packs[0].pack, "packs/00/junk.pack");
        assert!(r.chunks_added > 0 && r.packs_added == 1);
        assert_eq!(r.checkpoints.len(), 1);
        assert!(r.checkpoints[0].whole && r.checkpoints[0].id == a.id);
        assert!(!r.is_whole(), "a damaged pack is damage left");
    }
}
