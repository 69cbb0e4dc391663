//! Verify: check the catalog against the chunk store, and optionally every chunk's bytes.
//!
//! Three phases, each bounded in memory however large the repository (what grows with the repository lives in
//! SQLite temporary tables of this connection, as GC's mark does; only one pack's index or one tree's entries
//! is held at a time):
//!
//! 1. **Structure**, in one read snapshot of the catalog. Every pack row's file must exist with the recorded
//!    size and a sound header, footer and index ([`crate::pack::read_index`]); every chunk row must name an
//!    existing pack row, lie inside that pack's blob area and agree with the pack's own index entry (the
//!    catalog's rows need only be a subset of the index: GC leaves unused blobs in packs). Then every
//!    checkpoint is walked (trees, contents, segments; objects shared between checkpoints are walked once)
//!    and every object it reaches must be in the catalog, well formed, hash to its own id (so a row altered in
//!    place is found), and every chunk it references must be
//!    in the chunk index with the length the file expects. A missing object is recorded, not fatal, so one
//!    damaged checkpoint does not hide another.
//! 2. **Data** (optional): the selected packs are read sequentially in large reads and every chunk the
//!    catalog places in them is decompressed and rehashed. Packs are selected all at once, by a fixed
//!    partition (`n/m`: the packs whose name hashes to `n - 1` modulo `m`, so parts `1/m` to `m/m` read each
//!    pack exactly once however the runs are spread over days), or by a random share (`5%`).
//! 3. **Damage → files**, in a fresh snapshot: segments holding a damaged chunk (a scan of `segments`),
//!    contents holding those or missing segments (a damaged chunk is also the content of a one-chunk file),
//!    then the trees whose entries lead to them, to a fixpoint (one scan of `trees` per directory level). Only checkpoints whose root tree is hit are walked, and
//!    only along hit subtrees, to name the affected paths.
//!
//! Verify never writes the catalog, so it runs beside commits and GC. The data phase runs outside any
//! snapshot (a read transaction held for hours would keep the write-ahead log from being checkpointed). A
//! pack file that is missing but whose row is also gone from the current catalog was deleted by a concurrent
//! GC (which drops rows before files): that is not damage, and rows pointing into it are not checked.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};

use crate::backend::Backend;
use crate::catalog::{
    CHUNK_ROW_COLUMNS, Catalog, ChunkRow, KIND_CONTENT, KIND_SEGMENT, KIND_TREE, PackRow, RowsByPack, in_snapshot,
    now_ns, rows_in_pack,
};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::pack::{FOOTER_LEN, HEADER_LEN, PackEntry};
use crate::progress::{NoProgress, Progress};
use crate::runs::{MAX_GAP, RunError, RunReader, Span, run_len};
use crate::store::BlobDecoder;
use crate::tree::{EntryKind, content_id, decode_segment, decode_tree, segment_id, tree_id, validate_name};

/// At most this many damaged chunks, damaged objects and affected files are listed in a report (the totals
/// count them all), so a repository whose whole chunk index is lost still gives a report that fits in memory.
pub(crate) const MAX_LISTED: usize = 1000;

/// Which share of the packs `verify` reads in full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DataSubset {
    /// Read no chunk data; check structure only.
    None,
    /// Read every pack.
    All,
    /// Read part `n` of `of` (1-based), a fixed partition of the packs: running 1/10 .. 10/10 covers them all.
    Part {
        /// Which part, 1 to `of`.
        n: u32,
        /// Number of parts.
        of: u32,
    },
    /// Read a random share of the packs, 0.0 to 1.0.
    Fraction(f64),
}

impl FromStr for DataSubset {
    type Err = String;

    /// Parses `N/M` (part N of M, 1 <= N <= M) or `P%` (a random P percent, 0 < P <= 100).
    ///
    /// ```
    /// use snapstore::DataSubset;
    /// assert_eq!("2/7".parse(), Ok(DataSubset::Part { n: 2, of: 7 }));
    /// assert_eq!("5%".parse(), Ok(DataSubset::Fraction(0.05)));
    /// assert_eq!("100%".parse(), Ok(DataSubset::All));
    /// assert!("0/3".parse::<DataSubset>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("'{s}' is not a data subset: use N/M (part N of M, e.g. 1/10) or a percentage (e.g. 5%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad());
            }
            return Ok(if p == 100.0 { DataSubset::All } else { DataSubset::Fraction(p / 100.0) });
        }
        let (n, of) = s.split_once('/').ok_or_else(bad)?;
        let (n, of): (u32, u32) = (n.trim().parse().map_err(|_| bad())?, of.trim().parse().map_err(|_| bad())?);
        if n == 0 || n > of {
            return Err(bad());
        }
        Ok(if of == 1 { DataSubset::All } else { DataSubset::Part { n, of } })
    }
}

/// The first 8 bytes of BLAKE3 of the parts, as a number: stable across runs, builds and machines.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Which part (0-based) of `of` a pack belongs to. Depends on the name alone, so the partition does not
/// shift as packs come and go: a pack keeps its part until GC deletes it.
pub(crate) fn pack_part(name: &str, of: u32) -> u32 {
    (hash64(&[name.as_bytes()]) % of as u64) as u32
}

impl DataSubset {
    /// Refuses a subset built by hand that names no part there is (`Part` with `n` outside 1 to `of`) or no
    /// share (`Fraction` not within 0 to 1): it would divide by zero or select nothing meant.
    pub(crate) fn check(&self) -> Result<()> {
        let ok = match *self {
            DataSubset::Part { n, of } => n >= 1 && n <= of,
            DataSubset::Fraction(f) => (0.0..=1.0).contains(&f),
            DataSubset::None | DataSubset::All => true,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "{self:?} is not a data subset: a part n of `of` needs 1 <= n <= of, a fraction 0 to 1"
            )))
        }
    }

    /// Whether this subset reads the pack `name`; `seed` varies random selections between runs.
    fn selects(&self, name: &str, seed: u64) -> bool {
        match *self {
            DataSubset::None => false,
            DataSubset::All => true,
            DataSubset::Part { n, of } => pack_part(name, of) == n - 1,
            DataSubset::Fraction(f) => (hash64(&[&seed.to_le_bytes(), name.as_bytes()]) as f64) < f * u64::MAX as f64,
        }
    }
}

/// How to verify.
#[derive(Clone)]
pub struct VerifyOptions {
    /// How much chunk data to read, decompress and rehash.
    pub read_data: DataSubset,
    /// Threads reading and checking packs [0: one per core, at most 32].
    pub threads: usize,
    /// Receives progress.
    pub progress: Arc<dyn Progress>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { read_data: DataSubset::None, threads: 0, progress: Arc::new(NoProgress) }
    }
}

/// A pack file that is missing or fails its own checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedPack {
    /// The pack's object name.
    pub pack: String,
    /// What is wrong with it.
    pub problem: String,
}

/// A chunk the catalog or a checkpoint needs that cannot be read back intact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedChunk {
    /// The chunk's id, hex.
    pub id: String,
    /// The pack the catalog places it in, if any.
    pub pack: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// A tree, content or segment that a checkpoint reaches but the catalog lacks or holds malformed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedObject {
    /// `tree`, `content` or `segment`.
    pub kind: String,
    /// The object's id, hex.
    pub id: String,
    /// What is wrong.
    pub problem: String,
}

/// A checkpoint that reaches damage, with how much.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AffectedCheckpoint {
    /// Full checkpoint id.
    pub id: String,
    /// The committed path.
    pub path: String,
    /// Commit time, nanoseconds since the Unix epoch (and `time` in RFC 3339 in JSON).
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::time_ns")]
    pub time_ns: i64,
    /// Files and directories of this checkpoint that cannot be restored whole.
    pub files: u64,
    /// Directory trees missing or incomplete in the catalog.
    pub missing_trees: u64,
    /// File contents missing from the catalog.
    pub missing_contents: u64,
    /// Segments missing from the catalog.
    pub missing_segments: u64,
    /// References to damaged or missing chunks.
    pub damaged_chunks: u64,
}

/// A file or directory of a checkpoint that cannot be restored whole.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AffectedFile {
    /// Full checkpoint id.
    pub checkpoint: String,
    /// Path inside the checkpoint, starting with the committed name (as `show` prints it); `.` is the
    /// checkpoint's root itself. In JSON, `path_b64` holds a name that is not UTF-8 in base64.
    #[serde(flatten, serialize_with = "crate::json_path::path")]
    pub path: PathBuf,
    /// Why it is affected.
    pub problem: String,
}

/// What verify found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Marks this run's reads disproved (chunk, pack), for a bucket's shared objects of them to go too.
    #[serde(skip)]
    pub(crate) marks_disproved: Vec<(ObjectId, String)>,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Packs the catalog records.
    pub packs: u64,
    /// Chunks the catalog records.
    pub chunks: u64,
    /// Pack files in the store that the catalog does not record (GC removes them; `repair index` adopts them).
    pub packs_not_in_catalog: u64,
    /// Packs whose chunks were read, decompressed and rehashed.
    pub packs_read: u64,
    /// Chunks read and rehashed.
    pub chunks_read: u64,
    /// Stored bytes read.
    pub bytes_read: u64,
    /// Packs missing or failing their own checks (every chunk the catalog places in them counts as damaged).
    pub damaged_packs: Vec<DamagedPack>,
    /// Damaged chunks, at most 1000.
    pub damaged_chunks: Vec<DamagedChunk>,
    /// All damaged chunks.
    pub damaged_chunks_total: u64,
    /// Of those, the chunks in damaged packs (damaged for that reason alone).
    pub damaged_chunks_in_damaged_packs: u64,
    /// Catalog objects missing or malformed, at most 1000.
    pub damaged_objects: Vec<DamagedObject>,
    /// All missing or malformed catalog objects.
    pub damaged_objects_total: u64,
    /// Every checkpoint that reaches damage, newest first.
    pub affected_checkpoints: Vec<AffectedCheckpoint>,
    /// Affected files and directories, at most 1000, by checkpoint (newest first) then path.
    pub affected_files: Vec<AffectedFile>,
    /// All affected files and directories.
    pub affected_files_total: u64,
    /// Of the damaged chunks, those marked in the catalog (by this run or an earlier read): the next commit
    /// that meets their bytes stores them afresh, which makes every checkpoint using them whole again. None
    /// in a repository opened for reading only.
    pub damaged_chunks_marked: u64,
    /// In a bucket: records gone from it, as [`crate::SyncSummary::records_missing`] names them. A catalog
    /// rebuilt from the bucket lacks what they recorded.
    pub records_missing: Vec<String>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl VerifyReport {
    /// Whether no damage at all was found.
    pub fn is_clean(&self) -> bool {
        self.damaged_packs.is_empty()
            && self.damaged_chunks_total == 0
            && self.damaged_objects_total == 0
            && self.affected_checkpoints.is_empty()
            && self.records_missing.is_empty()
    }
}

pub(crate) fn verify(catalog_path: &Path, backend: Arc<dyn Backend>, opts: &VerifyOptions) -> Result<VerifyReport> {
    verify_with(&Catalog::open(catalog_path)?, catalog_path, backend, opts)
}

/// [`verify`] on an open catalog, whose connection keeps the damage found in `temp.v_bad_chunk` (chunk id,
/// pack name, problem) until the next verify on it: `repair index --read-data` leaves those blobs out.
pub(crate) fn verify_with(
    cat: &Catalog,
    catalog_path: &Path,
    backend: Arc<dyn Backend>,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    opts.read_data.check()?;
    crate::params::check_threads(opts.threads)?;
    let started = Instant::now();
    let conn = cat.connection();
    create_temp_tables(conn)?;
    let mut report = VerifyReport::default();
    let seed = hash64(&[&std::process::id().to_le_bytes(), &now_ns().to_le_bytes()]);
    opts.progress.start("verify", None);
    let targets = in_snapshot(conn, || {
        let targets = check_packs(conn, catalog_path, backend.as_ref(), &mut report)?;
        walk_checkpoints(conn)?;
        mark_missing_chunks(conn)?;
        Ok(targets.into_iter().filter(|(_, name)| opts.read_data.selects(name, seed)).collect::<Vec<_>>())
    })?;
    if !targets.is_empty() {
        // Now that the packs to read are known, the bar can show how far through them it is.
        let mut size = conn.prepare_cached("SELECT size FROM packs WHERE id = ?1")?;
        let mut total = 0u64;
        for (id, _) in &targets {
            total += size.query_row([id], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64;
        }
        opts.progress.start("verify", Some(total));
        read_data(conn, catalog_path, &backend, &targets, opts, &mut report)?;
        let mut read = conn.prepare_cached("INSERT OR IGNORE INTO temp.v_read_pack (id) VALUES (?1)")?;
        for (id, _) in &targets {
            read.execute([id])?;
        }
    }
    // After the data is read, so that what the read finds is what a chunk read again is reported with.
    in_snapshot(conn, || {
        known_damage(conn)?;
        collect_damage(conn, &mut report)
    })?;
    if report.damaged_chunks_total > 0 && cat.read_only().is_none() {
        // Not finding the catalog free within the busy timeout leaves the damage unmarked, not unreported.
        report.damaged_chunks_marked = mark_found_damage(conn).unwrap_or(0);
    }
    if !targets.is_empty() && cat.read_only().is_none() {
        // Best effort, as marking is: a mark left stays reported, and the next read clears it.
        report.marks_disproved = clear_disproved_marks(conn).unwrap_or_default();
    }
    report.seconds = started.elapsed().as_secs_f64();
    opts.progress.finish();
    Ok(report)
}

/// Finds what checkpoints reach that the catalog lacks (trees, contents, segments, chunk rows), and which
/// files that affects. Pack files are not looked at: `repair index` calls this right after rebuilding the
/// chunk index from them.
pub(crate) fn reach_damage(conn: &Connection) -> Result<VerifyReport> {
    create_temp_tables(conn)?;
    let mut report = VerifyReport::default();
    in_snapshot(conn, || {
        walk_checkpoints(conn)?;
        mark_missing_chunks(conn)?;
        collect_damage(conn, &mut report)
    })?;
    Ok(report)
}

/// Marks the damaged chunks found (`temp.v_bad_chunk`) that the index holds, and returns how many of those
/// found are marked. The only write verify makes, after its read snapshot.
fn mark_found_damage(conn: &Connection) -> Result<u64> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    // Only rows still where they were read: a commit may have stored a fresh copy meanwhile.
    tx.execute(
        "INSERT OR IGNORE INTO damaged_chunks (id, found_ns)
         SELECT b.id, ?1 FROM temp.v_bad_chunk b
         WHERE EXISTS (SELECT 1 FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.id = b.id AND p.name = b.pack)",
        [now_ns()],
    )?;
    let marked: i64 = tx.query_row(
        "SELECT count(*) FROM temp.v_bad_chunk b WHERE EXISTS (SELECT 1 FROM damaged_chunks d WHERE d.id = b.id)",
        [],
        |r| r.get(0),
    )?;
    tx.commit()?;
    Ok(marked as u64)
}

fn create_temp_tables(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS v_seen (kind INTEGER NOT NULL, id BLOB NOT NULL, PRIMARY KEY (kind, id)) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS v_refs (id BLOB PRIMARY KEY, len INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS v_bad_chunk (id BLOB PRIMARY KEY, pack TEXT, problem TEXT NOT NULL) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS v_bad_obj (kind INTEGER NOT NULL, id BLOB NOT NULL, problem TEXT NOT NULL,
                                                    PRIMARY KEY (kind, id)) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS v_hit (kind INTEGER NOT NULL, id BLOB NOT NULL, gen INTEGER NOT NULL,
                                                PRIMARY KEY (kind, id)) WITHOUT ROWID;
         CREATE TEMP TABLE IF NOT EXISTS v_skip_pack (id INTEGER PRIMARY KEY);
         CREATE TEMP TABLE IF NOT EXISTS v_read_pack (id INTEGER PRIMARY KEY);
         DELETE FROM temp.v_seen; DELETE FROM temp.v_refs; DELETE FROM temp.v_bad_chunk; DELETE FROM temp.v_bad_obj;
         DELETE FROM temp.v_hit; DELETE FROM temp.v_skip_pack; DELETE FROM temp.v_read_pack;",
    )?;
    Ok(())
}

/// Whether the current catalog (not this connection's snapshot) still records the pack: if not, a concurrent
/// GC deleted it, which is not damage.
fn pack_still_recorded(catalog_path: &Path, name: &str) -> Result<bool> {
    let fresh = Catalog::open(catalog_path)?;
    Ok(fresh.connection().prepare("SELECT 1 FROM packs WHERE name = ?1")?.exists([name])?)
}

/// A pack's index as its chunks' entries, or the damage that keeps it from being read.
type LookedUp = Result<std::result::Result<HashMap<ObjectId, PackEntry>, String>>;

/// [`LookedUp`] for pack `name` of the `size` the catalog recorded.
fn look_up_pack(backend: &dyn Backend, name: &str, size: i64) -> LookedUp {
    let actual = backend.size(name).map_err(|e| Error::backend(name, e))?;
    if actual != size as u64 {
        return Ok(Err(format!("the pack file is {actual} bytes but the catalog recorded {size}")));
    }
    match crate::pack::read_index_sized(backend, name, actual) {
        Ok(entries) => Ok(Ok(entries.into_iter().map(|e| (e.id, e)).collect())),
        Err(e) if e.is_corruption() => Ok(Err(crate::pack::problem_of(&e, name))),
        Err(e) => Err(e),
    }
}

/// Checks every pack row against its file and every chunk row against its pack. Returns the packs whose
/// chunks can be read (sound packs), as (row id, name).
fn check_packs(
    conn: &Connection,
    catalog_path: &Path,
    backend: &dyn Backend,
    report: &mut VerifyReport,
) -> Result<Vec<(i64, String)>> {
    report.checkpoints = conn.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get::<_, i64>(0))? as u64;
    report.chunks = conn.query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0))? as u64;
    let packs: Vec<(i64, String, i64)> = conn
        .prepare("SELECT id, name, size FROM packs ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    report.packs = packs.len() as u64;
    {
        let known: HashSet<&str> = packs.iter().map(|(_, n, _)| n.as_str()).collect();
        let listed = backend.list("packs/").map_err(|e| Error::backend("packs/", e))?;
        report.packs_not_in_catalog =
            listed.iter().filter(|n| n.ends_with(".pack") && !known.contains(n.as_str())).count() as u64;
    }
    let mut bad_chunk =
        conn.prepare_cached("INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem) VALUES (?1, ?2, ?3)")?;
    let mut sorted = conn.prepare(&format!("SELECT {CHUNK_ROW_COLUMNS} FROM chunks ORDER BY pack"))?;
    let mut rows = RowsByPack::new(&mut sorted)?;
    let mut sound = Vec::new();
    let looks = crate::backend::overlapped(backend, &packs, |(_, name, size)| look_up_pack(backend, name, *size));
    for ((id, name, size), looked) in looks.map(|(p, looked)| (p.clone(), looked)) {
        let index = match looked {
            Ok(index) => index,
            // Gone, before its size was looked at or after: with its row gone too, a concurrent GC deleted it.
            Err(Error::Backend { source, .. }) if source.kind() == ErrorKind::NotFound => {
                if !pack_still_recorded(catalog_path, &name)? {
                    conn.execute("INSERT OR IGNORE INTO temp.v_skip_pack (id) VALUES (?1)", [id])?;
                    continue;
                }
                Err("the pack file is missing".to_string())
            }
            Err(e) => return Err(e),
        };
        match index {
            Ok(index) => {
                let blobs_end = size as u64 - FOOTER_LEN as u64 - (index.len() * crate::pack::ENTRY_LEN) as u64;
                rows.of_pack(id, |row| {
                    if let Some(why) = row_problem(&row, &index, blobs_end) {
                        bad_chunk.execute(params![row.id, name, why])?;
                    }
                    Ok(())
                })?;
                sound.push((id, name));
            }
            Err(problem) => {
                let why = format!("in a damaged pack ({problem})");
                let mut used = false;
                rows.of_pack(id, |row| {
                    used = true;
                    bad_chunk.execute(params![row.id, name, why])?;
                    Ok(())
                })?;
                // One whose every chunk has been stored afresh elsewhere holds nothing the catalog uses: GC
                // drops its row.
                if used {
                    report.damaged_packs.push(DamagedPack { pack: name, problem });
                }
            }
        }
    }
    conn.execute(
        "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem)
         SELECT c.id, NULL, 'the catalog places it in pack row ' || c.pack || ', which does not exist' FROM chunks c
         WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.id = c.pack)",
        [],
    )?;
    Ok(sound)
}

/// What is wrong with a chunk row of a readable pack, if anything: it must lie in the blob area and agree with
/// the pack's own index.
fn row_problem(row: &ChunkRow, index: &HashMap<ObjectId, PackEntry>, blobs_end: u64) -> Option<String> {
    let ChunkRow { offset, stored_len, raw_len, flags, .. } = *row;
    let end = (offset as u64).saturating_add(stored_len as u64);
    if offset < HEADER_LEN as i64 || end > blobs_end {
        return Some(format!(
            "the catalog places it at {offset}..{end}, outside the pack's blob area {HEADER_LEN}..{blobs_end}"
        ));
    }
    match ObjectId::from_slice(&row.id).and_then(|c| index.get(&c)) {
        None => Some("not in its pack's own index".to_string()),
        Some(e)
            if e.offset != offset as u64 || e.stored_len != stored_len || e.raw_len != raw_len || e.flags != flags =>
        {
            Some(format!(
                "the catalog (offset {offset}, {stored_len} bytes stored, {raw_len} raw, flags {flags}) \
                 disagrees with the pack's index (offset {}, {} stored, {} raw, flags {})",
                e.offset, e.stored_len, e.raw_len, e.flags
            ))
        }
        Some(_) => None,
    }
}

/// Walks every checkpoint, recording missing or malformed objects in `v_bad_obj` and every chunk reference
/// in `v_refs`. Objects are deduplicated through `v_seen`, so shared subtrees are walked once.
fn walk_checkpoints(conn: &Connection) -> Result<()> {
    let roots: Vec<Vec<u8>> =
        conn.prepare("SELECT root FROM checkpoints")?.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    let mut w = Walker::new(conn)?;
    for root in roots {
        // A malformed root id is found again by `collect_damage`, which names the checkpoint.
        if let Some(root) = ObjectId::from_slice(&root) {
            w.walk(root)?;
        }
    }
    Ok(())
}

struct Walker<'c> {
    seen: rusqlite::CachedStatement<'c>,
    bad: rusqlite::CachedStatement<'c>,
    tree: rusqlite::CachedStatement<'c>,
    content: rusqlite::CachedStatement<'c>,
    segment: rusqlite::CachedStatement<'c>,
    chunk_ref: rusqlite::CachedStatement<'c>,
    chunk_max: u64,
}

impl<'c> Walker<'c> {
    fn new(conn: &'c Connection) -> Result<Self> {
        Ok(Walker {
            seen: conn.prepare_cached("INSERT OR IGNORE INTO temp.v_seen (kind, id) VALUES (?1, ?2)")?,
            bad: conn.prepare_cached("INSERT OR IGNORE INTO temp.v_bad_obj (kind, id, problem) VALUES (?1, ?2, ?3)")?,
            tree: conn.prepare_cached("SELECT data FROM trees WHERE id = ?1")?,
            content: conn.prepare_cached("SELECT size, segments FROM contents WHERE id = ?1")?,
            segment: conn.prepare_cached("SELECT data FROM segments WHERE id = ?1")?,
            chunk_ref: conn.prepare_cached("INSERT OR IGNORE INTO temp.v_refs (id, len) VALUES (?1, ?2)")?,
            chunk_max: crate::catalog::chunk_max(conn)?,
        })
    }

    fn first_visit(&mut self, kind: i64, id: &ObjectId) -> Result<bool> {
        Ok(self.seen.execute(params![kind, &id.0[..]])? == 1)
    }

    fn damaged(&mut self, kind: i64, id: &ObjectId, problem: &str) -> Result<()> {
        self.bad.execute(params![kind, &id.0[..], problem])?;
        Ok(())
    }

    fn walk(&mut self, root: ObjectId) -> Result<()> {
        if !self.first_visit(KIND_TREE, &root)? {
            return Ok(());
        }
        let mut stack = vec![root];
        while let Some(tree) = stack.pop() {
            let data: Option<Vec<u8>> = self.tree.query_row([&tree.0[..]], |r| r.get(0)).optional()?;
            let Some(data) = data else {
                self.damaged(KIND_TREE, &tree, "missing from the catalog")?;
                continue;
            };
            let entries = match decode_tree(&data) {
                Ok(entries) => entries,
                Err(e) => {
                    let why = match e {
                        Error::Corrupt { what } => what,
                        other => other.to_string(),
                    };
                    self.damaged(KIND_TREE, &tree, &why)?;
                    continue;
                }
            };
            for e in &entries {
                if validate_name(&e.name).is_err() {
                    self.damaged(KIND_TREE, &tree, "holds an unsafe name")?;
                    continue;
                }
                match (e.kind, ObjectId::from_slice(&e.target)) {
                    (EntryKind::Symlink, _) => {}
                    (_, None) => self.damaged(KIND_TREE, &tree, "holds an entry with a malformed id")?,
                    (EntryKind::Dir, Some(id)) => {
                        if self.first_visit(KIND_TREE, &id)? {
                            stack.push(id);
                        }
                    }
                    (EntryKind::File, Some(id)) => {
                        if self.first_visit(KIND_CONTENT, &id)? {
                            self.content(id, e.size)?;
                        }
                    }
                }
            }
            // A tree is named by the hash of its entries: any altered field of any row shows here (after the
            // checks above, whose findings say more, since a tree keeps the first problem found).
            if tree_id(&entries) != tree {
                self.damaged(KIND_TREE, &tree, "does not match its id (its entries were altered)")?;
            }
        }
        Ok(())
    }

    fn content(&mut self, id: ObjectId, file_size: u64) -> Result<()> {
        let row: Option<(i64, Vec<u8>)> =
            self.content.query_row([&id.0[..]], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        let Some((size, segs)) = row else {
            // A content of one chunk has no row: it is the chunk, which must be indexed with the file's size
            // (a missing chunk row is then reported as such, and `repair index` can bring it back). Only a file
            // too large to be one chunk has certainly lost its content row.
            if file_size > self.chunk_max {
                return self.damaged(KIND_CONTENT, &id, "missing from the catalog");
            }
            self.chunk_ref.execute(params![&id.0[..], file_size as i64])?;
            return Ok(());
        };
        if !segs.len().is_multiple_of(ObjectId::LEN) {
            return self.damaged(KIND_CONTENT, &id, "has a malformed segment list");
        }
        if content_id(size as u64, &segs) != id {
            self.damaged(KIND_CONTENT, &id, "does not match its id (its row was altered)")?;
        } else if size as u64 != file_size {
            self.damaged(KIND_CONTENT, &id, &format!("is {size} bytes but its file records {file_size}"))?;
        }
        for seg in segs.chunks_exact(ObjectId::LEN) {
            let seg = ObjectId::from_slice(seg).expect("32 bytes");
            if !self.first_visit(KIND_SEGMENT, &seg)? {
                continue;
            }
            let data: Option<Vec<u8>> = self.segment.query_row([&seg.0[..]], |r| r.get(0)).optional()?;
            let Some(data) = data else {
                self.damaged(KIND_SEGMENT, &seg, "missing from the catalog")?;
                continue;
            };
            if segment_id(&data) != seg {
                self.damaged(KIND_SEGMENT, &seg, "does not match its id (its row was altered)")?;
            }
            match decode_segment(&data) {
                Ok(refs) => {
                    for r in refs {
                        self.chunk_ref.execute(params![&r.id.0[..], r.len])?;
                    }
                }
                Err(_) => self.damaged(KIND_SEGMENT, &seg, "is malformed")?,
            }
        }
        Ok(())
    }
}

/// Chunks an earlier read marked damaged (`damaged_chunks`), which no later commit has stored afresh: damage
/// known without reading them again. A catalog read as it is at an older schema has no marks.
fn known_damage(conn: &Connection) -> Result<()> {
    let marks =
        conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'damaged_chunks'")?.exists([])?;
    if marks {
        // A mark whose blob this run read and found sound does not hold (the pack was put back, or the read
        // that marked it met a pack GC had just moved): it is not damage, and `clear_disproved_marks` drops it.
        conn.execute(
            "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem)
             SELECT d.id, (SELECT name FROM packs WHERE id = c.pack), 'marked damaged by an earlier read'
             FROM damaged_chunks d JOIN chunks c ON c.id = d.id
             WHERE c.pack NOT IN (SELECT id FROM temp.v_read_pack EXCEPT SELECT id FROM temp.v_skip_pack)",
            [],
        )?;
    }
    Ok(())
}

/// Drops the marks of chunks whose blobs this run read and found sound (see `known_damage`), after its read
/// snapshot. Returns them, each with the pack it read, so that in a bucket the mark's shared object goes too
/// (`Remote::withdraw_marks`): GC prunes none whose pack still holds its row, and every machine built afresh
/// applied it and reported the sound chunk damaged (round 22 review, x06).
fn clear_disproved_marks(conn: &Connection) -> Result<Vec<(ObjectId, String)>> {
    let tx = conn.unchecked_transaction()?;
    let disproved = "FROM damaged_chunks d JOIN chunks c ON c.id = d.id JOIN packs p ON p.id = c.pack
         WHERE c.pack IN (SELECT id FROM temp.v_read_pack EXCEPT SELECT id FROM temp.v_skip_pack)
           AND NOT EXISTS (SELECT 1 FROM temp.v_bad_chunk b WHERE b.id = d.id)";
    let cleared: Vec<(ObjectId, String)> = tx
        .prepare(&format!("SELECT d.id, p.name {disproved}"))?
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?)))?
        .filter_map(|row| row.map(|(id, pack)| ObjectId::from_slice(&id).map(|id| (id, pack))).transpose())
        .collect::<rusqlite::Result<_>>()?;
    tx.execute(&format!("DELETE FROM damaged_chunks WHERE id IN (SELECT d.id {disproved})"), [])?;
    tx.commit()?;
    Ok(cleared)
}

/// Chunks that checkpoints reference but the chunk index lacks, or holds with another length.
fn mark_missing_chunks(conn: &Connection) -> Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem)
         SELECT r.id, NULL, 'referenced by a file but missing from the chunk index' FROM temp.v_refs r
         WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = r.id)",
        [],
    )?;
    conn.execute(
        "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem)
         SELECT r.id, p.name, 'the chunk index gives length ' || c.raw_len || ' but files expect ' || r.len
         FROM temp.v_refs r JOIN chunks c ON c.id = r.id LEFT JOIN packs p ON p.id = c.pack
         WHERE c.raw_len != r.len AND NOT EXISTS (SELECT 1 FROM temp.v_skip_pack s WHERE s.id = c.pack)",
        [],
    )?;
    Ok(())
}

/// The result of reading one pack.
struct PackRead {
    name: String,
    pack_id: i64,
    chunks: u64,
    bytes: u64,
    /// The file disappeared while it was read.
    vanished: bool,
    bad: Vec<(ObjectId, String)>,
}

fn read_data(
    conn: &Connection,
    catalog_path: &Path,
    backend: &Arc<dyn Backend>,
    targets: &[(i64, String)],
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<()> {
    // Capped so that the threads' shares of the read budget stay above its floor (see `read_share`).
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(crate::store::READERS_WITHIN_BUDGET))
    } else {
        opts.threads
    }
    .min(targets.len().max(1));
    // Shared as checkout's are: 8 MiB each took `verify --read-data` to 141 MiB at 16 threads.
    let max_read = crate::store::read_share(backend.reads_are_requests(), threads);
    // A pack's rows are found through its own index, one keyed lookup each, so that no statement (and so no
    // snapshot) stays open across the phase.
    let mut row_of = conn.prepare_cached(
        "SELECT offset, stored_len, raw_len, flags FROM chunks c WHERE id = ?1 AND pack = ?2
         AND NOT EXISTS (SELECT 1 FROM temp.v_bad_chunk b WHERE b.id = c.id)",
    )?;
    let mut pack_row = conn.prepare_cached("SELECT 1 FROM packs WHERE id = ?1")?;
    let mut scan_of = conn.prepare_cached(
        "SELECT id, offset, stored_len, raw_len, flags FROM chunks c WHERE pack = ?1
         AND NOT EXISTS (SELECT 1 FROM temp.v_bad_chunk b WHERE b.id = c.id) ORDER BY offset",
    )?;
    let (job_tx, job_rx) = crossbeam_channel::bounded::<(i64, String, Vec<PackRow>)>(threads * 2);
    let (res_tx, res_rx) = crossbeam_channel::unbounded::<Result<PackRead>>();
    let mut results = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..threads {
            let (job_rx, res_tx) = (job_rx.clone(), res_tx.clone());
            let backend = backend.clone();
            let progress = opts.progress.clone();
            s.spawn(move || {
                let mut checker = match BlobChecker::new(max_read) {
                    Ok(c) => c,
                    Err(e) => return drop(res_tx.send(Err(e))),
                };
                for (pack_id, name, rows) in job_rx {
                    let r = checker.read_pack(backend.as_ref(), progress.as_ref(), pack_id, name, &rows);
                    let failed = r.is_err();
                    if res_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop((job_rx, res_tx));
        let sent = (|| -> Result<()> {
            for (pack_id, name) in targets {
                let rows: Vec<PackRow> = match crate::pack::read_index(backend.as_ref(), name) {
                    Ok(entries) => rows_in_pack(entries, *pack_id, &mut row_of)?,
                    // Gone with its row (a concurrent GC): nothing to read; the read below notices the file is
                    // gone and that the catalog no longer names it.
                    Err(_) if !pack_row.exists([pack_id])? => Vec::new(),
                    // Changed since it was checked (damage): a full scan for its rows, and the read below says
                    // what happened to the file.
                    Err(_) => scan_of
                        .query_map([pack_id], |r| {
                            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })?
                        .map(|r| {
                            let (id, offset, stored, raw, flags) = r?;
                            let id = ObjectId::from_slice(&id).ok_or_else(|| Error::corrupt("malformed chunk id"))?;
                            Ok((id, offset as u64, stored, raw, flags))
                        })
                        .collect::<Result<_>>()?,
                };
                if job_tx.send((*pack_id, name.clone(), rows)).is_err() {
                    break; // every worker stopped on an error, reported below
                }
                results.extend(res_rx.try_iter());
            }
            Ok(())
        })();
        drop(job_tx);
        results.extend(res_rx.iter());
        sent
    })?;
    for r in results {
        let r = r?;
        if r.vanished {
            if !pack_still_recorded(catalog_path, &r.name)? {
                continue;
            }
            let problem = "the pack file disappeared while it was read".to_string();
            conn.execute(
                "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem)
                 SELECT id, ?2, 'in a damaged pack (' || ?3 || ')' FROM chunks WHERE pack = ?1",
                params![r.pack_id, r.name, problem],
            )?;
            report.damaged_packs.push(DamagedPack { pack: r.name, problem });
            continue;
        }
        report.packs_read += 1;
        report.chunks_read += r.chunks;
        report.bytes_read += r.bytes;
        for (id, why) in r.bad {
            conn.execute(
                "INSERT OR IGNORE INTO temp.v_bad_chunk (id, pack, problem) VALUES (?1, ?2, ?3)",
                params![&id.0[..], r.name, why],
            )?;
        }
    }
    Ok(())
}

/// Reads a pack's blobs in large sequential reads and checks each chunk against its id.
struct BlobChecker {
    decoder: BlobDecoder,
    runs: RunReader,
    spans: Vec<Span>,
    /// Reads of back-to-back blobs are merged up to this size (a blob larger than it is read alone).
    max_read: u64,
}

impl BlobChecker {
    fn new(max_read: u64) -> Result<Self> {
        Ok(BlobChecker { decoder: BlobDecoder::new()?, runs: RunReader::default(), spans: Vec::new(), max_read })
    }

    fn read_pack(
        &mut self,
        backend: &dyn Backend,
        progress: &dyn Progress,
        pack_id: i64,
        name: String,
        rows: &[PackRow],
    ) -> Result<PackRead> {
        let mut res = PackRead { name, pack_id, chunks: 0, bytes: 0, vanished: false, bad: Vec::new() };
        self.spans.clear();
        self.spans.extend(rows.iter().map(|r| (r.1, r.2)));
        let mut i = 0;
        while i < rows.len() {
            let j = i + run_len(self.spans[i..].iter().copied(), self.max_read, MAX_GAP);
            let decoder = &mut self.decoder;
            let bad = &mut res.bad;
            let read = self.runs.read(backend, &res.name, &self.spans[i..j], |n, blob| {
                let (id, _, _, raw_len, flags) = rows[i + n];
                if let Err(why) = decoder.decode(&id, flags, raw_len, blob) {
                    bad.push((id, why));
                }
                Ok::<_, std::convert::Infallible>(())
            });
            match read {
                Ok(()) => {}
                Err(RunError::Read(_, e)) if e.kind() == ErrorKind::NotFound => {
                    res.vanished = true;
                    return Ok(res);
                }
                // The structure check saw the file long enough; a short read now means it was damaged since.
                Err(RunError::Read(n, e)) if e.kind() == ErrorKind::UnexpectedEof => {
                    for row in &rows[i + n..j] {
                        res.bad.push((row.0, format!("cannot be read ({e})")));
                    }
                }
                Err(RunError::Read(_, e)) => return Err(Error::backend(&res.name, e)),
                Err(RunError::Handler(never)) => match never {},
            }
            let (start, end) = (rows[i].1, rows[j - 1].1 + rows[j - 1].2 as u64);
            res.chunks += (j - i) as u64;
            res.bytes += end - start;
            progress.bytes(end - start);
            i = j;
        }
        Ok(res)
    }
}

/// The damaged chunks the last verify on this connection found, at most [`MAX_LISTED`] (by pack, then id);
/// with `in_packs_only`, only blobs read and found wrong (not chunks missing from every pack).
pub(crate) fn listed_bad_chunks(conn: &Connection, in_packs_only: bool) -> Result<Vec<DamagedChunk>> {
    let filter = if in_packs_only { "WHERE pack IS NOT NULL" } else { "" };
    Ok(conn
        .prepare(&format!("SELECT id, pack, problem FROM temp.v_bad_chunk {filter} ORDER BY pack, id LIMIT ?1"))?
        .query_map([MAX_LISTED as i64], |r| {
            Ok(DamagedChunk { id: crate::id::to_hex(&r.get::<_, Vec<u8>>(0)?), pack: r.get(1)?, problem: r.get(2)? })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Fills the report's damage lists, and maps damaged objects to the checkpoints and files they affect.
fn collect_damage(conn: &Connection, report: &mut VerifyReport) -> Result<()> {
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n as u64);
    report.damaged_chunks_total = count("SELECT count(*) FROM temp.v_bad_chunk")?;
    report.damaged_objects_total = count("SELECT count(*) FROM temp.v_bad_obj")?;
    report.damaged_chunks = listed_bad_chunks(conn, false)?;
    if !report.damaged_packs.is_empty() {
        let damaged: HashSet<&str> = report.damaged_packs.iter().map(|p| p.pack.as_str()).collect();
        let mut stmt =
            conn.prepare("SELECT pack, count(*) FROM temp.v_bad_chunk WHERE pack IS NOT NULL GROUP BY pack")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if damaged.contains(r.get::<_, String>(0)?.as_str()) {
                report.damaged_chunks_in_damaged_packs += r.get::<_, i64>(1)? as u64;
            }
        }
    }
    report.damaged_objects = conn
        .prepare("SELECT kind, id, problem FROM temp.v_bad_obj ORDER BY kind DESC, id LIMIT ?1")?
        .query_map([MAX_LISTED as i64], |r| {
            Ok(DamagedObject {
                kind: kind_name(r.get(0)?).to_string(),
                id: crate::id::to_hex(&r.get::<_, Vec<u8>>(1)?),
                problem: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    if report.damaged_chunks_total == 0 && report.damaged_objects_total == 0 {
        let malformed = count("SELECT count(*) FROM checkpoints WHERE length(root) != 32")?;
        if malformed == 0 {
            return Ok(());
        }
    }
    spread_damage(conn)?;
    affected(conn, report)
}

fn kind_name(kind: i64) -> &'static str {
    match kind {
        KIND_TREE => "tree",
        KIND_CONTENT => "content",
        KIND_SEGMENT => "segment",
        _ => "chunk",
    }
}

/// Fills `v_hit` with every segment, content and tree that leads to damage.
fn spread_damage(conn: &Connection) -> Result<()> {
    conn.execute("DELETE FROM temp.v_hit", [])?;
    conn.execute("INSERT OR IGNORE INTO temp.v_hit (kind, id, gen) SELECT kind, id, 0 FROM temp.v_bad_obj", [])?;
    let any_bad_chunk: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM temp.v_bad_chunk)", [], |r| r.get(0))?;
    if any_bad_chunk {
        // A file of one chunk names that chunk as its content.
        conn.execute("INSERT OR IGNORE INTO temp.v_hit (kind, id, gen) SELECT 2, id, 0 FROM temp.v_bad_chunk", [])?;
        // One pass over all segments, one indexed lookup per chunk reference: no chunk set held in memory.
        let mut is_bad = conn.prepare_cached("SELECT 1 FROM temp.v_bad_chunk WHERE id = ?1")?;
        let mut hit = conn.prepare_cached("INSERT OR IGNORE INTO temp.v_hit (kind, id, gen) VALUES (?1, ?2, 0)")?;
        let mut segments = conn.prepare("SELECT id, data FROM segments")?;
        let mut rows = segments.query([])?;
        while let Some(row) = rows.next()? {
            let (id, data): (Vec<u8>, Vec<u8>) = (row.get(0)?, row.get(1)?);
            let Ok(refs) = decode_segment(&data) else { continue };
            for r in refs {
                if is_bad.exists([&r.id.0[..]])? {
                    hit.execute(params![KIND_SEGMENT, id])?;
                    break;
                }
            }
        }
    }
    {
        let mut seg_hit = conn.prepare_cached("SELECT 1 FROM temp.v_hit WHERE kind = ?1 AND id = ?2")?;
        let mut hit = conn.prepare_cached("INSERT OR IGNORE INTO temp.v_hit (kind, id, gen) VALUES (?1, ?2, 0)")?;
        let mut contents = conn.prepare("SELECT id, segments FROM contents")?;
        let mut rows = contents.query([])?;
        while let Some(row) = rows.next()? {
            let (id, segs): (Vec<u8>, Vec<u8>) = (row.get(0)?, row.get(1)?);
            for seg in segs.chunks(ObjectId::LEN) {
                if seg_hit.exists(params![KIND_SEGMENT, seg])? {
                    hit.execute(params![KIND_CONTENT, id])?;
                    break;
                }
            }
        }
    }
    // Trees whose entries lead to something hit, one directory level per pass: each pass decodes every tree
    // once, with a keyed lookup in v_hit per entry, so nothing but one tree is held in memory.
    let mut hit_at = conn.prepare_cached("SELECT 1 FROM temp.v_hit WHERE kind = ?1 AND id = ?2 AND gen = ?3")?;
    let mut hit = conn.prepare_cached("INSERT OR IGNORE INTO temp.v_hit (kind, id, gen) VALUES (3, ?1, ?2)")?;
    let mut trees = conn.prepare("SELECT id, data FROM trees")?;
    let mut level = 0i64;
    loop {
        let mut added = 0;
        let mut rows = trees.query([])?;
        while let Some(row) = rows.next()? {
            let (id, data): (Vec<u8>, Vec<u8>) = (row.get(0)?, row.get(1)?);
            let Ok(entries) = decode_tree(&data) else { continue };
            for e in entries {
                let kind = match e.kind {
                    EntryKind::File => KIND_CONTENT,
                    EntryKind::Dir => KIND_TREE,
                    EntryKind::Symlink => continue,
                };
                if hit_at.exists(params![kind, e.target, level])? {
                    added += hit.execute(params![id, level + 1])?;
                    break;
                }
            }
        }
        if added == 0 {
            return Ok(());
        }
        level += 1;
    }
}

/// Names the affected checkpoints and, walking only their hit subtrees, the affected paths.
fn affected(conn: &Connection, report: &mut VerifyReport) -> Result<()> {
    let cps: Vec<(String, String, i64, Vec<u8>)> = conn
        .prepare(
            "SELECT id, path, time_ns, root FROM checkpoints c
             WHERE length(root) != 32 OR EXISTS (SELECT 1 FROM temp.v_hit h WHERE h.kind = 3 AND h.id = c.root)
             ORDER BY time_ns DESC, id",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut hit = conn.prepare_cached("SELECT 1 FROM temp.v_hit WHERE kind = ?1 AND id = ?2")?;
    let mut bad_obj = conn.prepare_cached("SELECT problem FROM temp.v_bad_obj WHERE kind = ?1 AND id = ?2")?;
    let mut bad_chunk = conn.prepare_cached("SELECT 1 FROM temp.v_bad_chunk WHERE id = ?1")?;
    let mut tree_data = conn.prepare_cached("SELECT data FROM trees WHERE id = ?1")?;
    let mut content = conn.prepare_cached("SELECT segments FROM contents WHERE id = ?1")?;
    let mut segment = conn.prepare_cached("SELECT data FROM segments WHERE id = ?1")?;
    for (id, path, time_ns, root) in cps {
        let mut a = AffectedCheckpoint {
            id,
            path,
            time_ns,
            files: 0,
            missing_trees: 0,
            missing_contents: 0,
            missing_segments: 0,
            damaged_chunks: 0,
        };
        let mut record = |a: &mut AffectedCheckpoint, path: &Path, problem: String| {
            a.files += 1;
            report.affected_files_total += 1;
            if report.affected_files.len() < MAX_LISTED {
                let path = if path.as_os_str().is_empty() { ".".into() } else { path.to_path_buf() };
                report.affected_files.push(AffectedFile { checkpoint: a.id.clone(), path, problem });
            }
        };
        let Some(root) = ObjectId::from_slice(&root) else {
            record(&mut a, Path::new(""), "the checkpoint's root id is malformed".into());
            report.affected_checkpoints.push(a);
            continue;
        };
        let mut stack = vec![(root, PathBuf::new())];
        while let Some((tree, path)) = stack.pop() {
            let problem: Option<String> =
                bad_obj.query_row(params![KIND_TREE, &tree.0[..]], |r| r.get(0)).optional()?;
            if let Some(problem) = problem {
                a.missing_trees += 1;
                record(&mut a, &path, format!("directory tree {problem}"));
            }
            let data: Option<Vec<u8>> = tree_data.query_row([&tree.0[..]], |r| r.get(0)).optional()?;
            let entries = data.and_then(|d| decode_tree(&d).ok()).unwrap_or_default();
            for e in entries.into_iter().rev() {
                let Some(target) = ObjectId::from_slice(&e.target) else { continue };
                let child = path.join(OsStr::from_bytes(&e.name));
                match e.kind {
                    EntryKind::Dir if hit.exists(params![KIND_TREE, &target.0[..]])? => stack.push((target, child)),
                    EntryKind::File if hit.exists(params![KIND_CONTENT, &target.0[..]])? => {
                        let why =
                            file_damage(&mut a, &target, &mut bad_obj, &mut bad_chunk, &mut content, &mut segment)?;
                        record(&mut a, &child, why);
                    }
                    _ => {}
                }
            }
        }
        report.affected_checkpoints.push(a);
    }
    Ok(())
}

/// Says why a file's content is damaged, and counts what is missing into the checkpoint's totals.
fn file_damage(
    a: &mut AffectedCheckpoint,
    content_id: &ObjectId,
    bad_obj: &mut rusqlite::CachedStatement<'_>,
    bad_chunk: &mut rusqlite::CachedStatement<'_>,
    content: &mut rusqlite::CachedStatement<'_>,
    segment: &mut rusqlite::CachedStatement<'_>,
) -> Result<String> {
    let mut problem_of = |kind: i64, id: &ObjectId| -> Result<Option<String>> {
        Ok(bad_obj.query_row(params![kind, &id.0[..]], |r| r.get(0)).optional()?)
    };
    if let Some(p) = problem_of(KIND_CONTENT, content_id)? {
        a.missing_contents += 1;
        return Ok(format!("file content {p}"));
    }
    let segs: Option<Vec<u8>> = content.query_row([&content_id.0[..]], |r| r.get(0)).optional()?;
    let (mut segments_missing, mut chunks_bad) = (0u64, 0u64);
    if segs.is_none() && bad_chunk.exists([&content_id.0[..]])? {
        // A content of one chunk: the chunk itself.
        chunks_bad += 1;
    }
    let segs = segs.unwrap_or_default();
    for seg in segs.chunks_exact(ObjectId::LEN) {
        let seg = ObjectId::from_slice(seg).expect("32 bytes");
        if problem_of(KIND_SEGMENT, &seg)?.is_some() {
            segments_missing += 1;
            continue;
        }
        let data: Vec<u8> = segment.query_row([&seg.0[..]], |r| r.get(0)).optional()?.unwrap_or_default();
        for r in decode_segment(&data).unwrap_or_default() {
            if bad_chunk.exists([&r.id.0[..]])? {
                chunks_bad += 1;
            }
        }
    }
    a.missing_segments += segments_missing;
    a.damaged_chunks += chunks_bad;
    let mut parts = Vec::new();
    if chunks_bad > 0 {
        parts.push(format!("{chunks_bad} damaged chunk{}", if chunks_bad == 1 { "" } else { "s" }));
    }
    if segments_missing > 0 {
        parts.push(format!("{segments_missing} segment{} missing", if segments_missing == 1 { "" } else { "s" }));
    }
    Ok(if parts.is_empty() { "damaged".to_string() } else { parts.join(", ") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Hooked;
    use std::sync::Mutex;

    /// A new repository with `params` (in the returned directory's `repo`) holding one checkpoint of `len`
    /// pseudo-random bytes; returns the checkpoint's id too.
    fn repo_with_one_checkpoint(
        params: crate::RepoParams,
        len: usize,
        seed: u64,
    ) -> (tempfile::TempDir, PathBuf, crate::Repository, String) {
        let dir = tempfile::tempdir().unwrap();
        let (repo_path, src) = (dir.path().join("repo"), dir.path().join("state.bin"));
        let repo = crate::Repository::init_with(&repo_path, params).unwrap();
        std::fs::write(&src, crate::testutil::pseudo_random(len, seed)).unwrap();
        let id = repo.commit(&src, &Default::default()).unwrap().id;
        (dir, repo_path, repo, id)
    }

    #[test]
    fn a_pack_collected_while_verify_looks_at_it_is_no_damage() {
        let (_dir, repo_path, repo, id) = repo_with_one_checkpoint(Default::default(), 1 << 20, 5);
        // Forgotten, so that its pack is garbage: deleting it and its rows is what GC does.
        repo.forget(&[id.as_str()]).unwrap();
        let catalog = repo_path.join("catalog.db");
        // The first pack is deleted, row first, right after verify has looked at its size.
        let mut backend = Hooked::new(&repo_path);
        let (at, done) = (catalog.clone(), std::sync::atomic::AtomicBool::new(false));
        backend.after_size = Box::new(move |inner, name| {
            if name.ends_with(".pack") && !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let conn = Connection::open(&at).unwrap();
                let id: i64 = conn.query_row("SELECT id FROM packs WHERE name = ?1", [name], |r| r.get(0)).unwrap();
                conn.execute("DELETE FROM chunks WHERE pack = ?1", [id]).unwrap();
                conn.execute("DELETE FROM packs WHERE id = ?1", [id]).unwrap();
                inner.remove(name)?;
            }
            Ok(())
        });
        let report = verify(&catalog, Arc::new(backend), &VerifyOptions::default()).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A store over `repo_path` that logs the length of every read.
    fn logging_reads(repo_path: &Path) -> (Hooked, Arc<Mutex<Vec<usize>>>) {
        let reads = Arc::new(Mutex::new(Vec::new()));
        let mut backend = Hooked::new(repo_path);
        let log = reads.clone();
        backend.on_read = Box::new(move |_, len| log.lock().unwrap().push(len));
        (backend, reads)
    }

    #[test]
    fn verify_threads_read_within_their_share_of_the_budget() {
        let params = crate::RepoParams { pack_target_size: 2 << 20, ..Default::default() };
        let (_dir, repo_path, ..) = repo_with_one_checkpoint(params, 24 << 20, 11);
        let (backend, reads) = logging_reads(&repo_path);
        let packs = backend.list("packs/").unwrap().iter().filter(|n| n.ends_with(".pack")).count();
        assert!(packs >= 8, "{packs} packs");
        let opts = VerifyOptions { read_data: DataSubset::All, threads: 64, ..Default::default() };
        let report = verify(&repo_path.join("catalog.db"), Arc::new(backend), &opts).unwrap();
        assert!(report.is_clean() && report.packs_read == packs as u64, "{report:?}");
        // One thread per pack, each reading at most its share of 16 MiB; the packs are larger than that.
        let share = (16 << 20) / packs;
        let longest = reads.lock().unwrap().iter().copied().max().unwrap();
        assert!(longest <= share && longest > share / 4, "longest read {longest}, share {share}");
    }

    #[test]
    fn merged_reads_stay_within_their_share_and_still_check_every_chunk() {
        let (_dir, repo_path, ..) = repo_with_one_checkpoint(Default::default(), 4 << 20, 9);
        let (backend, reads) = logging_reads(&repo_path);
        let pack = backend.list("packs/").unwrap().into_iter().find(|n| n.ends_with(".pack")).unwrap();
        let rows: Vec<PackRow> = crate::pack::read_index(&backend, &pack)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.offset, e.stored_len, e.raw_len, e.flags))
            .collect();
        let read = |max_read: u64| {
            reads.lock().unwrap().clear();
            let r = BlobChecker::new(max_read).unwrap().read_pack(&backend, &NoProgress, 1, pack.clone(), &rows);
            (r.unwrap(), reads.lock().unwrap().clone())
        };
        // One thread's share reads the whole pack at once; a share of 512 KiB takes many reads, none longer.
        let (whole, whole_reads) = read(crate::store::MAX_READ);
        assert_eq!(whole_reads.len(), 1, "{whole_reads:?}");
        let (shared, shared_reads) = read(512 << 10);
        assert!(shared_reads.len() >= 8 && shared_reads.iter().all(|&n| n <= 512 << 10), "{shared_reads:?}");
        for (r, reads) in [(&whole, &whole_reads), (&shared, &shared_reads)] {
            assert_eq!((r.chunks, r.bytes, r.bad.len()), (rows.len() as u64, reads.iter().sum::<usize>() as u64, 0));
        }

        // A damaged blob is still found when reads are split.
        let (id, offset, ..) = rows[rows.len() / 2];
        let f = std::fs::OpenOptions::new().read(true).write(true).open(repo_path.join(&pack)).unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, offset + 7).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[!byte[0]], offset + 7).unwrap();
        let (damaged, _) = read(512 << 10);
        assert_eq!(damaged.bad.iter().map(|(i, _)| i).collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn subsets_parse() {
        assert_eq!("1/10".parse(), Ok(DataSubset::Part { n: 1, of: 10 }));
        assert_eq!(" 10/10 ".parse(), Ok(DataSubset::Part { n: 10, of: 10 }));
        assert_eq!("1/1".parse(), Ok(DataSubset::All));
        assert_eq!("5%".parse(), Ok(DataSubset::Fraction(0.05)));
        assert_eq!("0.5%".parse(), Ok(DataSubset::Fraction(0.005)));
        assert_eq!("100%".parse(), Ok(DataSubset::All));
        for bad in ["", "0/3", "4/3", "1/0", "3", "x/3", "1/x", "0%", "101%", "-5%", "nan%", "%", "1/2/3"] {
            assert!(bad.parse::<DataSubset>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parts_cover_every_pack_exactly_once() {
        let names: Vec<String> = (0..500).map(|i| format!("packs/{:02x}/{i:064x}.pack", i % 256)).collect();
        for of in [2u32, 3, 7] {
            let mut per_part = vec![0; of as usize];
            for name in &names {
                let chosen: Vec<u32> = (1..=of).filter(|&n| DataSubset::Part { n, of }.selects(name, 0)).collect();
                assert_eq!(chosen.len(), 1, "{name} in parts {chosen:?} of {of}");
                per_part[chosen[0] as usize - 1] += 1;
            }
            // The hash spreads packs evenly enough that no part is empty or holds most of them.
            assert!(per_part.iter().all(|&c| c > 500 / of as usize / 2), "{per_part:?}");
        }
        // Stable: the same name always falls in the same part.
        assert_eq!(pack_part(&names[0], 10), pack_part(&names[0], 10));
    }

    #[test]
    fn fractions_select_about_their_share_and_vary_by_seed() {
        let names: Vec<String> = (0..2000).map(|i| format!("packs/00/{i}.pack")).collect();
        let count = |f: f64, seed: u64| names.iter().filter(|n| DataSubset::Fraction(f).selects(n, seed)).count();
        let n = count(0.1, 1);
        assert!((120..=280).contains(&n), "{n}");
        assert_ne!(
            names.iter().filter(|n| DataSubset::Fraction(0.5).selects(n, 1)).collect::<Vec<_>>(),
            names.iter().filter(|n| DataSubset::Fraction(0.5).selects(n, 2)).collect::<Vec<_>>()
        );
        assert_eq!(count(1.0, 3), names.len());
    }
}
