//! The commit pipeline: walk → read → chunk → hash → dedup → compress → pack → catalog.
//!
//! Three kinds of thread, joined by bounded channels so memory stays flat whatever the input:
//! - the *walker* (the caller's thread) walks the tree, skips files unchanged since the parent checkpoint,
//!   reads and chunks the rest, sending each chunk to the workers and an ordered event to the assembler;
//! - *workers* (one per core, at most 16, or 4 into a bucket) hash chunks, look them up in the chunk index
//!   and compress only the new ones;
//! - the *assembler* consumes events in order, packs new chunks, builds segments, contents and trees, and
//!   writes them to the catalog, the checkpoint itself last, after every pack it needs is durable.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};
use walkdir::WalkDir;

use crate::aligned::AlignedBuf;
use crate::backend::Backend;
use crate::catalog::{Batch, Catalog, Journal, Marks, NewCheckpoint, Session, host_name, now_ns};
use crate::checkpoint::{Checkpoint, checkpoint_id};
use crate::chunker::{Block, BlockChunker, Buf, ChunkBytes, Cutter, read_at_most};
use crate::content::ChunkCursor;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::inflight::InFlight;
use crate::params::RepoParams;
use crate::progress::{NoProgress, Progress};
use crate::region::{
    REGION_MAX_WORKERS, REGION_MIN_THREADS, cut_region, region_budget, region_len, region_min_file, stitch,
};
use crate::sparse::{HoleSkippingReader, is_zero};
use crate::store::{Compressor, Packer};
use crate::tree::{self, ChunkRef, Entry, EntryKind, Xattr};
use crate::xattrs::On;

/// How to commit.
#[derive(Clone)]
pub struct CommitOptions {
    /// The checkpoint's message.
    pub message: String,
    /// Tags to attach.
    pub tags: Vec<String>,
    /// Read every file even if its size, mtime, ctime and inode match the parent checkpoint, and every name of a
    /// hard-linked file even if another was read in this commit.
    pub reread: bool,
    /// Record unreadable files as skipped instead of failing the commit.
    pub skip_unreadable: bool,
    /// Host name to record; `None` reads the machine's.
    pub host: Option<String>,
    /// Worker threads for hashing and compression; 0 means one per core, at most 16 (at most 4 into a bucket).
    pub threads: usize,
    /// When nothing differs from the parent checkpoint (same tree: names, contents, modes, mtimes), make no
    /// new checkpoint and report the parent's id with [`CommitSummary::unchanged`] set.
    pub skip_unchanged: bool,
    /// Make this checkpoint a part of a group (a coordinated checkpoint of several processes): it is offered
    /// as a restore point only with the whole group, once every part is in.
    pub group: Option<crate::GroupPart>,
    /// Receives progress.
    pub progress: Arc<dyn Progress>,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            message: String::new(),
            tags: Vec::new(),
            reread: false,
            skip_unreadable: false,
            host: None,
            threads: 0,
            skip_unchanged: false,
            group: None,
            progress: Arc::new(NoProgress),
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CommitSummary {
    /// The new checkpoint's id; with [`CommitSummary::unchanged`], the parent's.
    pub id: String,
    /// Nothing differed from the parent and [`CommitOptions::skip_unchanged`] was set: no checkpoint was made.
    pub unchanged: bool,
    /// The parent checkpoint (previous checkpoint of the same path and host), if any.
    pub parent: Option<String>,
    /// The new checkpoint's commit time (with [`CommitSummary::unchanged`], the parent's), nanoseconds since
    /// the Unix epoch; in JSON also as `time`, in RFC 3339.
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::time_ns")]
    pub time_ns: i64,
    /// Files not in the parent checkpoint.
    pub files_new: u64,
    /// Files in the parent checkpoint that changed (and were read).
    pub files_changed: u64,
    /// Files unchanged since the parent checkpoint (not read).
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Special files (devices, sockets, FIFOs) skipped.
    pub special_skipped: u64,
    /// Unreadable files or directories skipped (only with `skip_unreadable`).
    pub unreadable_skipped: u64,
    /// Files, directories or symlinks left out because they vanished after their directory was listed
    /// (recorded as skipped, with the reason [`VANISHED`]).
    pub vanished: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Files unchanged by stat read all the same, because their parent content holds chunks a read marked
    /// damaged, or, after a `repair index` removed rows, chunks the index lacks: this commit stores those
    /// chunks afresh (counted in `files_unchanged` too).
    pub files_reread_for_damage: u64,
    /// Sum of file sizes in the checkpoint.
    pub logical_bytes: u64,
    /// Chunks this commit added to the store.
    pub chunks_new: u64,
    /// Chunks read that the store already had.
    pub chunks_reused: u64,
    /// Raw bytes of the new chunks.
    pub bytes_new: u64,
    /// Bytes the new chunks take after compression.
    pub bytes_stored: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What to commit.
pub(crate) enum Source<'a> {
    Path(&'a Path),
    Reader { name: &'a str, reader: &'a mut dyn Read },
}

/// How far ahead of this machine's clock the newest checkpoint of a path may be dated for a commit to follow
/// it (see `commit`): clocks of machines that share a repository disagree by less.
const MAX_SKEW_NS: i64 = 24 * 3600 * 1_000_000_000;

/// Refuses a stream's name that cannot be the name of the file it becomes (empty, `.`, `..`, with a `/` or a
/// NUL byte): before anything is created for the commit.
pub fn validate_stream_name(name: &str) -> Result<()> {
    tree::validate_name(name.as_bytes()).map_err(|_| Error::InvalidInput(format!("invalid stream name {name:?}")))
}

struct Job {
    seq: u64,
    data: ChunkBytes,
    /// Set for a chunk cut where the previous version had a chunk: the worker checks it against that chunk
    /// and answers the walker, not the assembler (see `Walker::send_guided`).
    verify: Option<Verify>,
}

#[cfg(test)]
thread_local! {
    /// Chunks taken at a previous version's cut on this thread, for tests that must know the guide was used.
    static GUIDED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Previous chunks sent to the workers to be checked, on this thread.
    static CANDIDATES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Regions of large files stitched on this thread, for tests of the regions' length.
    static REGIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

struct Verify {
    /// Cleared when the walker drops the candidate at a change, so that a queued one is not hashed in vain.
    wanted: Arc<AtomicBool>,
    expect: ObjectId,
    /// The job's `seq`, and the chunk hashed if it is the expected one.
    reply: Sender<(u64, Result<Option<Hashed>>)>,
}

#[derive(Clone)]
struct Hashed {
    seq: u64,
    id: ObjectId,
    len: u32,
    /// Flags and stored bytes, when the chunk index lacked the chunk.
    blob: Option<(u8, Vec<u8>)>,
}

enum Event {
    DirStart(Entry),
    DirEnd,
    /// A file's entry, and for a stream the entry committed last under its name: where the bytes come out
    /// the same, the entry keeps that one's times, so that the tree is the parent's and `--skip-unchanged`
    /// skips it (round 35 review, F1: a stream's time is the commit's, so no stream was ever unchanged).
    FileStart(Entry, Option<Box<Entry>>),
    /// The next chunk, by sequence number, with what it took from the [`InFlight`] budget.
    Chunk(u64, u64),
    FileEnd,
    /// The file changed while being read: drop what was gathered for it.
    FileAbort,
    /// An entry complete as it is (unchanged file, symlink).
    Leaf(Entry),
    /// A later name of a hard-linked file this commit has read under another name, unchanged since: its
    /// content and attributes are that name's.
    Linked(Entry),
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileStatus {
    New,
    Changed,
    Unchanged,
}

/// Everything a commit needs from the repository.
pub(crate) struct Context<'a> {
    pub catalog_path: &'a Path,
    pub repo_root: &'a Path,
    pub backend: Arc<dyn Backend>,
    pub params: &'a RepoParams,
    /// Where a remote repository writes each catalog change to its bucket.
    pub journal: Option<Journal<'a>>,
}

fn entry_from(name: Vec<u8>, kind: EntryKind, md: &Metadata) -> Entry {
    Entry {
        name,
        kind,
        mode: md.permissions().mode() & 0o7777,
        mtime_ns: crate::fileclock::mtime_ns(md),
        ctime_ns: crate::fileclock::ctime_ns(md),
        ino: md.ino(),
        owner: Some(crate::tree::Owner::of(md)),
        link: if kind == EntryKind::File { link_group(md) } else { None },
        xattrs: Vec::new(),
        size: if kind == EntryKind::File { md.len() } else { 0 },
        target: Vec::new(),
    }
}

/// The hard-link group of a file with other names: the same for every name of one inode, and no other
/// file's. Its device and inode hashed, since a commit can cross into other filesystems.
fn link_group(md: &Metadata) -> Option<u64> {
    (md.nlink() > 1).then(|| {
        let mut h = crate::id::domain_hasher("snapstore-link-v1");
        h.update(&md.dev().to_le_bytes());
        h.update(&md.ino().to_le_bytes());
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
    })
}

fn unchanged(prev: &Entry, now: &Entry) -> bool {
    prev.kind == EntryKind::File
        && prev.ctime_ns != UNSEEN_CTIME
        && prev.size == now.size
        && prev.mtime_ns == now.mtime_ns
        && prev.ctime_ns == now.ctime_ns
        && prev.ino == now.ino
}

/// The ctime recorded for an entry whose stat could not vouch for it (see [`Walker::stat_entry`]): no file
/// has it, so the next commit reads the file again, and no checkout trusts the record.
pub(crate) const UNSEEN_CTIME: i64 = i64::MIN;

/// Runs a commit of `source` into the repository, inside a writer session (see docs/format.md, GC).
pub(crate) fn commit(ctx: &Context<'_>, source: Source<'_>, opts: &CommitOptions) -> Result<CommitSummary> {
    // Before any work: a bad tag would otherwise fail the commit at its very end.
    for t in &opts.tags {
        crate::checkpoint::validate_new_tag(t)?;
    }
    crate::params::check_threads(opts.threads)?;
    let host = opts.host.clone().unwrap_or_else(host_name);
    let mut catalog = Catalog::open(ctx.catalog_path)?;
    if let Some(part) = &opts.group {
        crate::group::check_part(&catalog, part)?;
    }
    // The session names the machine the process runs on, whatever host the checkpoint is labelled with:
    // GC judges a session on this machine by its process, not by its heartbeat.
    let session = catalog.begin_session("commit", &host_name())?;
    let result = run(ctx, source, opts, &catalog, session, host);
    if !matches!(&result, Ok(s) if !s.unchanged) {
        // Nothing was published. Best effort: a session left behind only delays GC until it is found dead.
        let _ = catalog.end_session(session);
    }
    result
}

fn run(
    ctx: &Context<'_>,
    source: Source<'_>,
    opts: &CommitOptions,
    catalog: &Catalog,
    session: Session,
    host: String,
) -> Result<CommitSummary> {
    let started = Instant::now();
    let (path_key, root_name) = match &source {
        Source::Path(p) => {
            let (abs, key) = abs_and_key(p)?;
            let name = abs.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_else(|| b"root".to_vec());
            (key, name)
        }
        Source::Reader { name, .. } => {
            validate_stream_name(name)?;
            (format!("stdin:{name}"), name.as_bytes().to_vec())
        }
    };
    // An ordinary checkpoint's parent is never a group's part, which may never become a restore point.
    let parent = match opts.group {
        None => catalog.latest_of_path(&host, &path_key)?,
        Some(_) => catalog.latest_of_path_or_part(&host, &path_key)?,
    };
    let parent_root = match &parent {
        Some(p) => listing(catalog.tree(&catalog.checkpoint_root(&p.id)?))?,
        None => None,
    };
    // Chunks a read found damaged are stored afresh by this commit where it meets their bytes, which heals
    // every checkpoint using them: a file unchanged by stat whose parent content holds one is read too.
    let marked = if parent.is_some() && !opts.reread { catalog.damaged_marks(MARKS_HELD)? } else { None };
    // So are those whose parent content holds a chunk the index lacks, while a repair or a GC has found some
    // may be missing: such a file taken by stat made a checkpoint that restores nothing of it (round 35
    // review, F2).
    let unindexed = parent.is_some()
        && !opts.reread
        && crate::catalog::meta_value(catalog.connection(), crate::catalog::CHUNKS_UNINDEXED)?.is_some();
    // Attributes are carried over from the parent only where it recorded them: across the upgrade that began
    // recording them, its entries' "none" means "not looked at".
    let carry_xattrs = !opts.reread && parent.as_ref().map_or(Ok(false), |p| catalog.recorded_xattrs(&p.id))?;

    let threads = if opts.threads == 0 {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        default_threads(cores, ctx.backend.write_memory())
    } else {
        opts.threads
    };
    let (job_tx, job_rx) = bounded::<Job>(threads * 4);
    let (res_tx, res_rx) = bounded::<Result<Hashed>>(threads * 4);
    let (ev_tx, ev_rx) = bounded::<Event>(1024);
    // Blocks must hold a maximum chunk. A chunk in flight keeps its whole block alive, so the block size, not
    // the budget, sets what the blocks cost: 2 MiB blocks took about 6 MiB more at 16 threads than 1 MiB ones,
    // and 512 KiB ones cost 4 % more instructions, copying the chunks that straddle two blocks
    // (docs/benchmarks.md, *Peak RSS by core count*).
    let block_len = (1 << 20).max(2 * ctx.params.chunk_max as usize);
    let (pool_tx, pool_rx) = bounded::<AlignedBuf>(8);

    let mut summary = CommitSummary { parent: parent.as_ref().map(|p| p.id.clone()), ..Default::default() };
    let inflight = InFlight::new(in_flight_budget(threads, ctx.params.chunk_max));
    let outcome = std::thread::scope(|s| {
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (job_rx, res_tx) = (job_rx.clone(), res_tx.clone());
            workers.push(s.spawn(move || worker(ctx, job_rx, res_tx)));
        }
        drop(job_rx);
        let inflight = &inflight;
        let assembler = s.spawn(move || {
            // Closed however the assembler ends, a panic included: the walker must not wait for it.
            let _close = inflight.closer();
            let mut asm = Assembler::new(ctx, session)?;
            asm.run(ev_rx, res_rx, inflight)?;
            Ok::<_, Error>(asm)
        });
        let mut walker = Walker {
            ctx,
            opts,
            jobs: job_tx,
            events: ev_tx,
            seq: 0,
            summary: &mut summary,
            skipped: Vec::new(),
            prev: vec![parent_root.map(|entries| entries.into_iter().map(|e| (e.name.clone(), e)).collect())],
            catalog,
            cutter: Cutter::new(ctx.params),
            block_len,
            pool_tx,
            pool_rx,
            stopped: false,
            results: res_tx.clone(),
            inflight,
            threads,
            failed: None,
            read_links: HashMap::new(),
            carry_xattrs,
            multigrain: HashMap::new(),
            marked,
            unindexed,
        };
        let walked = match source {
            Source::Path(p) => walker.walk(p, &root_name),
            Source::Reader { reader, .. } => walker.stream(root_name.clone(), reader),
        };
        let walked = walked.and_then(|()| {
            walker.events.send(Event::Done).map_err(|_| Error::Internal("assembler stopped".into()))?;
            Ok(std::mem::take(&mut walker.skipped))
        });
        drop(walker);
        let assembled = assembler.join().map_err(|_| Error::Internal("assembler panicked".into()));
        for w in workers {
            w.join().map_err(|_| Error::Internal("worker panicked".into()))?;
        }
        match (walked, assembled?) {
            (Ok(skipped), Ok(asm)) => Ok((asm, skipped)),
            // The walker only saw the pipeline stop; the assembler knows why.
            (Err(Error::Internal(_)), Err(e)) => Err(e),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    });
    let (mut asm, skipped) = outcome?;

    let (root_tree, root_entry) = asm.root()?;
    summary.logical_bytes = asm.logical_bytes;
    summary.files_changed -= asm.streams_unchanged;
    summary.files_unchanged += asm.streams_unchanged;
    if opts.skip_unchanged
        && opts.group.is_none()
        // Chunks stored afresh (damaged or condemned ones) are recorded only with a checkpoint.
        && asm.chunks_new == 0
        // Special files are never recorded, so they are skipped alike at every commit.
        && skipped.iter().all(|(_, why)| why.starts_with(SPECIAL))
        && let Some(parent) = &parent
        // A parent forgotten meanwhile is no reason to fail: the commit then publishes as usual.
        && matches!(catalog.checkpoint_root(&parent.id), Ok(root) if root == root_tree)
    {
        // Everything it names is the parent's, so stored already; what the pipeline holds unrecorded is dropped.
        summary.id = parent.id.clone();
        summary.time_ns = parent.time_ns;
        summary.unchanged = true;
        summary.seconds = started.elapsed().as_secs_f64();
        opts.progress.finish();
        return Ok(summary);
    }
    summary.vanished = skipped.iter().filter(|(_, why)| why == VANISHED).count() as u64;
    summary.unreadable_skipped = skipped.len() as u64 - summary.vanished - summary.special_skipped;
    summary.chunks_new = asm.chunks_new;
    summary.chunks_reused = asm.chunks_reused;
    summary.bytes_new = asm.bytes_new;
    summary.bytes_stored = asm.bytes_stored;
    // Never before the newest checkpoint of the path from any host, so that the order of a path's checkpoints
    // is the order they were committed in even where clocks disagree (a run moved to a node whose clock lags,
    // a clock stepped back): `latest`, a Checkpointer's resume and retention's ranks go by it. Not past a day
    // ahead: a time that far off is a broken clock, and following it would date every later checkpoint of
    // the path within nanoseconds of it, for good, where retention's periods would thin them to one.
    let now = now_ns();
    let time_ns = match catalog.newest_time_of_path(&path_key)? {
        Some(newest) if newest >= now && newest - now <= MAX_SKEW_NS => newest + 1,
        _ => now,
    };
    let nonce = (std::process::id() as u64) << 32 | (started.elapsed().subsec_nanos() as u64);
    let id = checkpoint_id(&root_tree, summary.parent.as_deref(), time_ns, &host, &path_key, nonce);
    let mut tags = opts.tags.clone();
    tags.sort();
    tags.dedup();
    let record = Checkpoint {
        id: id.clone(),
        parent: summary.parent.clone(),
        time_ns,
        message: opts.message.clone(),
        tags,
        host,
        path: path_key,
        root: root_tree.to_hex(),
        files: summary.files_new + summary.files_changed + summary.files_unchanged,
        dirs: summary.dirs,
        symlinks: summary.symlinks,
        logical_bytes: summary.logical_bytes,
        bytes_new: summary.bytes_new,
        bytes_stored: summary.bytes_stored,
        skipped: skipped.len() as u64,
    };
    debug_assert_eq!(root_entry.name, root_name);
    asm.publish(NewCheckpoint { record, root: root_tree, skipped, group: opts.group.clone(), xattrs: true })?;
    summary.id = id;
    summary.time_ns = time_ns;
    summary.seconds = started.elapsed().as_secs_f64();
    opts.progress.finish();
    Ok(summary)
}

/// Why an entry that vanished while a commit ran is recorded as skipped.
pub const VANISHED: &str = "vanished while the commit ran";

/// How a special file (FIFO, socket, device), which a checkpoint does not hold, is recorded as skipped: this,
/// then `: ` and what it is.
pub const SPECIAL: &str = "special file, not recorded";

/// The key the checkpoints of a committed path are recorded under ([`crate::Checkpoint::path`]): its absolute
/// form cleaned by its letters (no `.`, `..` or trailing `/`), and where it is not UTF-8 written `bytes:` with
/// the bytes outside UTF-8 escaped. What retention's path scope and `--path` filters compare with.
///
/// ```
/// assert_eq!(snapstore::path_key("/data/run-1").unwrap(), "/data/run-1");
/// ```
pub fn path_key(path: impl AsRef<Path>) -> Result<String> {
    Ok(abs_and_key(path.as_ref())?.1)
}

/// A committed path's absolute form, cleaned, and the key its checkpoints are recorded under
/// (`checkpoints.path`). Cleaned as restic (Go's `filepath.Clean`) does, by the letters: `dir/`, `./dir`
/// and `x/../dir` are one series, where they had been three, each without a parent to guide it and each
/// its own retention group. Except that what comes before a `..` is first resolved on disk, as the kernel
/// resolves it when the files are read: through a symlink `a/link/../run` is not `a/run` but the `run`
/// beside the link's target, and keying it `a/run` made two directories one series, whose retention then
/// forgot one's only checkpoint. A path without `..` is keyed by its letters, symlinks and all, so a
/// `current` link to the latest release keeps one series across releases.
fn abs_and_key(path: &Path) -> Result<(std::path::PathBuf, String)> {
    let mut abs = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let parts: Vec<_> = abs.components().collect();
    if let Some(last_up) = parts.iter().rposition(|c| *c == std::path::Component::ParentDir) {
        let head: std::path::PathBuf = parts[..=last_up].iter().collect();
        // Where that does not resolve (a part missing), the commit fails reading the path anyway.
        if let Ok(real) = std::fs::canonicalize(&head) {
            abs = parts[last_up + 1..].iter().fold(real, |p, c| p.join(c));
        }
    }
    let mut clean = std::path::PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::CurDir => {}
            other => clean.push(other),
        }
    }
    let key = key_of(&clean);
    Ok((clean, key))
}

/// The catalog's key for an absolute path: the path itself where it is UTF-8, else `bytes:` and the path with
/// each byte that is not part of UTF-8 written `\xNN` and each backslash doubled. Two paths never share a
/// key: a lossy conversion made `job\xff` and `job\xfe` one path, so that retention took their checkpoints
/// for one series and forgot one directory's only checkpoint. No absolute path starts with `bytes:`.
fn key_of(abs: &Path) -> String {
    let bytes = abs.as_os_str().as_bytes();
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.to_owned();
    }
    let mut key = String::from("bytes:");
    for chunk in bytes.utf8_chunks() {
        key.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            key.push_str(&format!("\\x{b:02x}"));
        }
    }
    key
}

/// The compressor new chunks of this repository are stored with.
fn compressor(params: &RepoParams) -> Result<Compressor> {
    Compressor::new(params.compression_level, params.groups_bytes())
}

/// What a hashing or region worker holds: its own catalog connection for lookups, and a compressor.
fn worker_setup(ctx: &Context<'_>) -> Result<(Catalog, Compressor)> {
    Ok((Catalog::open_for_worker(ctx.catalog_path)?, compressor(ctx.params)?))
}

fn worker(ctx: &Context<'_>, jobs: Receiver<Job>, results: Sender<Result<Hashed>>) {
    // Opened at the first job: while region workers cut a large file these workers may get none, and a
    // catalog connection and a compressor cost each of them about 2 MiB.
    let mut setup = None;
    let hasher = ChunkHasher::new(ctx.params);
    for job in jobs {
        let (catalog, compressor) = match &mut setup {
            Some(s) => s,
            None => {
                let opened = worker_setup(ctx);
                match opened {
                    Ok(v) => setup.insert(v),
                    Err(e) => {
                        let _ = results.send(Err(e));
                        return;
                    }
                }
            }
        };
        let (catalog, compressor) = (&*catalog, compressor);
        let sent = match job.verify {
            None => results.send(hasher.hash(catalog, compressor, &job.data, job.seq)).is_ok(),
            Some(v) => {
                // Nobody listening means the walker dropped this candidate at a change: not a failure.
                if v.wanted.load(Ordering::Relaxed) {
                    let out = hasher.verify(catalog, compressor, &job.data, &v.expect);
                    let _ = v.reply.send((job.seq, out));
                }
                true
            }
        };
        if !sent {
            return;
        }
    }
}

/// Names a chunk, and compresses it when the chunk index lacks it: the work done per chunk on all cores.
struct ChunkHasher {
    max: usize,
    zero_id: ObjectId,
}

impl ChunkHasher {
    fn new(params: &RepoParams) -> Self {
        let max = params.chunk_max as usize;
        ChunkHasher { max, zero_id: ObjectId::of(&vec![0u8; max]) }
    }

    fn id_of(&self, data: &[u8]) -> ObjectId {
        // Runs of zeros cut into maximum chunks (see Cutter::cut): their id is known without hashing.
        if data.len() == self.max && is_zero(data) { self.zero_id } else { ObjectId::of(data) }
    }

    fn hash(&self, catalog: &Catalog, compressor: &mut Compressor, data: &[u8], seq: u64) -> Result<Hashed> {
        self.store(catalog, compressor, data, self.id_of(data), seq)
    }

    /// The chunk hashed if it is chunk `expect`; `None` if its bytes differ.
    fn verify(
        &self,
        catalog: &Catalog,
        compressor: &mut Compressor,
        data: &[u8],
        expect: &ObjectId,
    ) -> Result<Option<Hashed>> {
        let id = self.id_of(data);
        if id != *expect {
            return Ok(None);
        }
        // Looked up all the same: a chunk the index lost is stored again rather than referenced.
        self.store(catalog, compressor, data, id, 0).map(Some)
    }

    fn store(
        &self,
        catalog: &Catalog,
        compressor: &mut Compressor,
        data: &[u8],
        id: ObjectId,
        seq: u64,
    ) -> Result<Hashed> {
        let known = catalog.has_chunk(&id)?;
        let blob = (!known).then(|| {
            let (flags, blob) = compressor.compress(data);
            (flags, blob.to_vec())
        });
        Ok(Hashed { seq, id, len: data.len() as u32, blob })
    }
}

/// What a region worker made of one region: its chunks (offset, hashed), whether the file ended early, and
/// the runs of zeros it cut into maximum chunks, with one such chunk as hashed.
struct RegionDone {
    chunks: Vec<(u64, Hashed)>,
    short: bool,
    zero_runs: Vec<(u64, u64)>,
    zero: Option<Hashed>,
}

/// Cuts and hashes region `k` of `f` on its own (see `region.rs`).
fn region_worker(
    ctx: &Context<'_>,
    f: &File,
    (len, region): (u64, u64),
    cutter: Cutter,
    tasks: Receiver<u64>,
    done: Sender<(u64, Result<RegionDone>)>,
) {
    let setup = worker_setup(ctx);
    let (catalog, mut compressor) = match setup {
        Ok(v) => v,
        Err(e) => {
            if let Ok(k) = tasks.recv() {
                let _ = done.send((k, Err(e)));
            }
            return;
        }
    };
    let hasher = ChunkHasher::new(ctx.params);
    let mut buf = Vec::new();
    for k in tasks {
        let start = k * region;
        let end = (start + region).min(len);
        // The region and one maximum chunk beyond it, so every chunk starting inside it can be cut.
        let want = ((end + cutter.max() as u64).min(len) - start) as usize;
        buf.resize(want, 0);
        // The path is a stand-in: the walker reports a read error against the file it is reading.
        let out = read_at_most(f, &mut buf, start).map_err(|e| Error::io("", e)).and_then(|n| {
            let mut done = RegionDone { chunks: Vec::new(), short: n < want, zero_runs: Vec::new(), zero: None };
            for (at, l) in cut_region(&cutter, &buf[..n], (end - start) as usize) {
                let h = hasher.hash(&catalog, &mut compressor, &buf[at..at + l], 0)?;
                let at = start + at as u64;
                if h.id == hasher.zero_id && l == hasher.max {
                    match done.zero_runs.last_mut() {
                        Some(run) if run.1 == at => run.1 += l as u64,
                        _ => done.zero_runs.push((at, at + l as u64)),
                    }
                    done.zero.get_or_insert_with(|| h.clone());
                }
                done.chunks.push((at, h));
            }
            Ok(done)
        });
        if done.send((k, out)).is_err() {
            return;
        }
    }
}

struct Walker<'a, 'b> {
    ctx: &'a Context<'a>,
    opts: &'a CommitOptions,
    jobs: Sender<Job>,
    events: Sender<Event>,
    seq: u64,
    summary: &'b mut CommitSummary,
    skipped: Vec<(Vec<u8>, String)>,
    /// For each open directory level, the parent checkpoint's entries at the same place.
    prev: Vec<Option<HashMap<Vec<u8>, Entry>>>,
    catalog: &'a Catalog,
    cutter: Cutter,
    block_len: usize,
    /// Spent read buffers, for reuse.
    pool_tx: Sender<AlignedBuf>,
    pool_rx: Receiver<AlignedBuf>,
    /// The pipeline behind the walker has stopped.
    stopped: bool,
    /// Where chunks hashed by region workers join the workers' results.
    results: Sender<Result<Hashed>>,
    inflight: &'b InFlight,
    threads: usize,
    /// Why region chunking failed, when it was not the file's fault.
    failed: Option<Error>,
    /// Hard-linked files read whole by this commit, by link group: what they were when read (see
    /// [`ReadAs`]), so that a later name of one, unchanged since, is not read again.
    read_links: HashMap<u64, ReadAs>,
    /// The parent checkpoint recorded extended attributes, so an entry unchanged by its stat can take its
    /// parent's (and `--reread` was not given).
    carry_xattrs: bool,
    /// Whether each filesystem met, by device, has multigrain timestamps (see [`Walker::stat_entry`]).
    multigrain: HashMap<u64, bool>,
    /// The chunks marked damaged, when there are any: a file unchanged by stat that holds one is read.
    marked: Option<Marks>,
    /// Whether checkpoints may reference chunks the index lacks ([`crate::catalog::CHUNKS_UNINDEXED`]): a
    /// file unchanged by stat that holds one is read.
    unindexed: bool,
}

/// Chunks marked damaged this many at most are held in memory by a commit (32 bytes each): beyond them, a
/// repository has lost so much that the commit reads every file whose parent content it cannot rule out.
const MARKS_HELD: usize = 65_536;

/// A directory's listing in the parent checkpoint, or none where that tree is damaged: the commit then reads
/// what is below as new, and its checkpoint is whole whatever became of the parent's.
fn listing(tree: Result<Vec<Entry>>) -> Result<Option<Vec<Entry>>> {
    match tree {
        Ok(entries) => Ok(Some(entries)),
        Err(e) if e.is_corruption() => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a file was when a commit read it: size, mtime, ctime and inode.
type ReadAs = (u64, i64, i64, u64);

/// From the stat itself, not the entry, whose ctime may be [`UNSEEN_CTIME`].
fn read_as(md: &Metadata) -> ReadAs {
    (md.len(), crate::fileclock::mtime_ns(md), crate::fileclock::ctime_ns(md), md.ino())
}

/// Hard-linked files a commit remembers having read, at most: about 100 bytes each in the walker and the
/// assembler together. Beyond them, later names are read as any file.
const READ_LINKS_MAX: usize = 65_536;

impl Walker<'_, '_> {
    /// The entry for what `md`, a stat of the file or directory at `path` asked for once the coarse clock read
    /// `asked`, says. One whose ctime lies in the granule the stat was taken in is recorded with
    /// [`UNSEEN_CTIME`]: where timestamps are coarse (1 s, 2 s on FAT, a clock tick on kernels before 6.13
    /// or on filesystems without multigrain timestamps) a change made just after the stat keeps size, mtime
    /// and ctime, and the next commit would skip the file as unchanged for ever (git's "racily clean"
    /// entries). Where the kernel gives multigrain timestamps no change after a stat keeps its ctime, unless
    /// the filesystem stores whole seconds (an ext4 of 128-byte inodes: no nanoseconds).
    fn stat_entry(&mut self, name: Vec<u8>, kind: EntryKind, md: &Metadata, asked: i64, path: &Path) -> Entry {
        let mut e = entry_from(name, kind, md);
        let multigrain = *self.multigrain.entry(md.dev()).or_insert_with(|| crate::fileclock::multigrain(path));
        if !(multigrain && md.ctime_nsec() != 0) && crate::fileclock::may_change_unseen(e.ctime_ns, asked) {
            e.ctime_ns = UNSEEN_CTIME;
        }
        e
    }

    fn send(&self, ev: Event) -> Result<()> {
        self.events.send(ev).map_err(|_| Error::Internal("assembler stopped".into()))
    }

    /// Leaves out an entry that could not be read: recorded as skipped with `skip_unreadable`, else the
    /// commit fails. An entry that vanished after its directory was listed (a program deleting its temporary
    /// files while its state is committed) is always left out and recorded: it is not part of the state any
    /// more, and failing would make committing a live directory fail at random.
    fn skip(&mut self, path: &Path, rel: &Path, err: std::io::Error) -> Result<()> {
        if err.kind() == std::io::ErrorKind::NotFound {
            self.opts.progress.warn(&format!("left out {}: it vanished while the commit ran", path.display()));
            self.skipped.push((rel.as_os_str().as_encoded_bytes().to_vec(), VANISHED.to_string()));
            return Ok(());
        }
        if !self.opts.skip_unreadable {
            return Err(Error::Unreadable { path: path.to_path_buf(), source: err });
        }
        self.opts.progress.warn(&format!("skipped unreadable {}: {err}", path.display()));
        self.skipped.push((rel.as_os_str().as_encoded_bytes().to_vec(), err.to_string()));
        Ok(())
    }

    fn walk(&mut self, root: &Path, root_name: &[u8]) -> Result<()> {
        let root_md = std::fs::symlink_metadata(root).map_err(|e| Error::reading_source(root, e))?;
        self.opts.progress.start("commit", root_md.is_file().then_some(root_md.len()));
        let repo = std::fs::metadata(self.ctx.repo_root).ok().map(|m| (m.dev(), m.ino()));
        let mut depth_open = 0usize;
        let mut it = WalkDir::new(root).follow_links(false).follow_root_links(false).sort_by_file_name().into_iter();
        while let Some(item) = it.next() {
            let entry = match item {
                Ok(e) => e,
                Err(err) => {
                    let path = err.path().unwrap_or(root).to_path_buf();
                    let io = err.into_io_error().unwrap_or_else(|| std::io::Error::other("filesystem loop"));
                    if path == root {
                        return Err(Error::io(path, io));
                    }
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    self.skip(&path, &rel, io)?;
                    continue;
                }
            };
            let depth = entry.depth();
            while depth_open > depth {
                self.send(Event::DirEnd)?;
                self.prev.pop();
                depth_open -= 1;
            }
            let asked = crate::fileclock::coarse_now();
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) => {
                    let io = e.into_io_error().unwrap_or_else(|| std::io::Error::other("stat failed"));
                    let rel = entry.path().strip_prefix(root).unwrap_or(entry.path()).to_path_buf();
                    self.skip(entry.path(), &rel, io)?;
                    if entry.file_type().is_dir() {
                        // Listed as a directory but not there to stat: not to be read either (it would be
                        // recorded twice).
                        it.skip_current_dir();
                    }
                    continue;
                }
            };
            let name = if depth == 0 { root_name.to_vec() } else { entry.file_name().as_encoded_bytes().to_vec() };
            let rel = entry.path().strip_prefix(root).unwrap_or(entry.path()).to_path_buf();
            let ft = md.file_type();
            let prev = self.prev[depth].as_ref().and_then(|m| m.get(&name)).cloned();
            if ft.is_dir() {
                if repo == Some((md.dev(), md.ino())) {
                    self.opts
                        .progress
                        .warn(&format!("not committing the repository itself ({})", entry.path().display()));
                    it.skip_current_dir();
                    continue;
                }
                let mut e = self.stat_entry(name, EntryKind::Dir, &md, asked, entry.path());
                // Setting an attribute changes the ctime: a directory whose ctime and inode are as before has
                // the attributes it had.
                let carried = prev.as_ref().filter(|p| {
                    self.carry_xattrs
                        && p.kind == EntryKind::Dir
                        && e.ctime_ns != UNSEEN_CTIME
                        && (p.ctime_ns, p.ino) == (e.ctime_ns, e.ino)
                });
                e.xattrs = match carried {
                    Some(p) => p.xattrs.clone(),
                    None => {
                        let Some(x) = self.xattrs_or_skip(On::Path(entry.path()), entry.path(), &rel)? else {
                            it.skip_current_dir();
                            continue;
                        };
                        x
                    }
                };
                let prev_children = match prev {
                    Some(p) if p.kind == EntryKind::Dir => match p.object()? {
                        Some(tree) => listing(self.catalog.tree(&tree))?
                            .map(|entries| entries.into_iter().map(|e| (e.name.clone(), e)).collect()),
                        None => None,
                    },
                    _ => None,
                };
                self.summary.dirs += 1;
                self.send(Event::DirStart(e))?;
                self.prev.push(prev_children);
                depth_open += 1;
            } else if ft.is_symlink() {
                let target = match std::fs::read_link(entry.path()) {
                    Ok(t) => t,
                    Err(e) => {
                        self.skip(entry.path(), &rel, e)?;
                        continue;
                    }
                };
                // A symlink's ctime vouches for nothing: no commit skips one, no checkout trusts one.
                let mut e = entry_from(name, EntryKind::Symlink, &md);
                e.target = target.into_os_string().into_encoded_bytes();
                self.summary.symlinks += 1;
                self.send(Event::Leaf(e))?;
            } else if ft.is_file() {
                let e = self.stat_entry(name, EntryKind::File, &md, asked, entry.path());
                let heal = match &prev {
                    Some(p) if !self.opts.reread && unchanged(p, &e) => self.holds_marked(p),
                    _ => false,
                };
                self.summary.files_reread_for_damage += heal as u64;
                match prev {
                    Some(p) if !self.opts.reread && !heal && unchanged(&p, &e) => {
                        // Its ctime is as before, so are its attributes (see the directory's above).
                        let mut e = e;
                        e.target = p.target;
                        e.xattrs = if self.carry_xattrs {
                            p.xattrs
                        } else {
                            let Some(x) = self.xattrs_or_skip(On::Path(entry.path()), entry.path(), &rel)? else {
                                continue;
                            };
                            x
                        };
                        self.summary.files_unchanged += 1;
                        self.send(Event::Leaf(e))?;
                    }
                    p => {
                        // With --reread, a file whose metadata matches still counts as unchanged.
                        let status = match &p {
                            Some(p) if unchanged(p, &e) => FileStatus::Unchanged,
                            Some(_) => FileStatus::Changed,
                            None => FileStatus::New,
                        };
                        // Another name of a file read already, whose ctime says it has not changed since: its
                        // bytes are that name's (the link group is its device and inode).
                        if !self.opts.reread && e.link.is_some_and(|g| self.read_links.get(&g) == Some(&read_as(&md))) {
                            self.count(status);
                            self.send(Event::Linked(e))?;
                            continue;
                        }
                        // The previous version's chunks guide the cutting of this one.
                        let prior = p.filter(|p| p.kind == EntryKind::File).and_then(|p| p.object().ok().flatten());
                        self.opts.progress.file(&rel);
                        if let Some((Some(group), read)) = self.file(entry.path(), &rel, e, status, prior)?
                            && (self.read_links.len() < READ_LINKS_MAX || self.read_links.contains_key(&group))
                        {
                            self.read_links.insert(group, read);
                        }
                    }
                }
            } else {
                // Recorded, so that `show` and `log` say the checkpoint lacks it, as for an unreadable file.
                self.summary.special_skipped += 1;
                self.opts.progress.warn(&format!("skipped special file {}", entry.path().display()));
                let what = if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else if ft.is_char_device() {
                    "a character device"
                } else {
                    "a block device"
                };
                self.skipped.push((rel.as_os_str().as_encoded_bytes().to_vec(), format!("{SPECIAL}: {what}")));
            }
        }
        while depth_open > 0 {
            self.send(Event::DirEnd)?;
            depth_open -= 1;
        }
        Ok(())
    }

    /// Whether the parent's content of an unchanged file holds a chunk marked damaged, or one the index lacks
    /// while some may be missing. A content that cannot be listed counts as holding one: reading the
    /// file again records it afresh.
    fn holds_marked(&self, p: &Entry) -> bool {
        let set = match &self.marked {
            Some(Marks::Many) => return true,
            Some(Marks::Set(set)) => Some(set),
            None if !self.unindexed => return false,
            None => None,
        };
        let holds = || -> Result<bool> {
            let Some(content) = p.object()? else { return Ok(false) };
            let mut cursor = ChunkCursor::of_size(self.catalog, &content, Some(p.size))?;
            while let Some((_, r)) = cursor.next_chunk()? {
                if set.is_some_and(|set| set.contains(&r.id))
                    || (self.unindexed && !self.catalog.has_chunk_row(&r.id)?)
                {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        holds().unwrap_or(true)
    }

    /// The extended attributes at `on` (the entry at `path`), or `None` once the entry is left out as
    /// unreadable (see [`Walker::skip`]).
    fn xattrs_or_skip(&mut self, on: On<'_>, path: &Path, rel: &Path) -> Result<Option<Vec<Xattr>>> {
        match crate::xattrs::read(on) {
            Ok(x) => Ok(Some(x)),
            Err(e) => self.skip(path, rel, e).map(|()| None),
        }
    }

    fn count(&mut self, status: FileStatus) {
        match status {
            FileStatus::Changed => self.summary.files_changed += 1,
            FileStatus::Unchanged => self.summary.files_unchanged += 1,
            FileStatus::New => self.summary.files_new += 1,
        }
    }

    /// Reads one file, retrying if it changes underneath; a file that never holds still fails the commit
    /// (or is skipped), so no checkpoint records content that was never in the file. Returns, for a file
    /// recorded, its link group and what it was when read.
    fn file(
        &mut self,
        path: &Path,
        rel: &Path,
        entry: Entry,
        status: FileStatus,
        prior: Option<ObjectId>,
    ) -> Result<Option<(Option<u64>, ReadAs)>> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let f = match File::open(path) {
                Ok(f) => f,
                Err(e) => return self.skip(path, rel, e).map(|()| None),
            };
            let asked = crate::fileclock::coarse_now();
            let before = f.metadata().map_err(|e| Error::io(path, e))?;
            let mut entry = self.stat_entry(entry.name.clone(), EntryKind::File, &before, asked, path);
            entry.size = before.len();
            let Some(xattrs) = self.xattrs_or_skip(On::Fd(f.as_fd()), path, rel)? else {
                return Ok(None);
            };
            entry.xattrs = xattrs;
            // A stat that vouches for nothing (see `stat_entry`) cannot vouch for a later name either: a change
            // right after it could keep the stat, and the later name would get these bytes for good.
            let group = entry.link.filter(|_| entry.ctime_ns != UNSEEN_CTIME);
            let read_as_was = (group, read_as(&before));
            self.send(Event::FileStart(entry, None))?;
            let read = self.chunks_file(&f, before.len(), prior.as_ref()).map_err(|e| Error::io(path, e));
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.stopped {
                return Err(Error::Internal("assembler stopped".into()));
            }
            if let Err(e) = read {
                self.send(Event::FileAbort)?;
                return match e {
                    Error::Io { source, .. } => self.skip(path, rel, source).map(|()| None),
                    other => Err(other),
                };
            }
            let after = match std::fs::symlink_metadata(path) {
                Ok(md) => md,
                Err(e) => {
                    self.send(Event::FileAbort)?;
                    return self.skip(path, rel, e).map(|()| None);
                }
            };
            let read_len = read.expect("checked");
            if read_len == before.len()
                && after.len() == before.len()
                && after.mtime() == before.mtime()
                && after.mtime_nsec() == before.mtime_nsec()
                && after.ctime() == before.ctime()
                && after.ctime_nsec() == before.ctime_nsec()
                && after.ino() == before.ino()
            {
                self.send(Event::FileEnd)?;
                self.count(status);
                return Ok(Some(read_as_was));
            }
            self.send(Event::FileAbort)?;
            self.opts.progress.warn(&format!("{} changed while being read; reading it again", path.display()));
        }
        if self.opts.skip_unreadable {
            return self.skip(path, rel, std::io::Error::other("file kept changing while being read")).map(|()| None);
        }
        Err(Error::FileChanged(path.to_path_buf()))
    }

    /// Sends every chunk of a file to the pipeline; returns the bytes read. A large file is read by a
    /// second thread, so that reading overlaps chunking; if it had a previous version (`prior`), that
    /// version's cuts are tried first.
    fn chunks_file(&mut self, f: &File, len: u64, prior: Option<&ObjectId>) -> std::io::Result<u64> {
        if len < 2 * self.block_len as u64 {
            return self.chunks_inline(&mut &*f, prior);
        }
        if prior.is_none()
            && len >= region_min_file(self.threads.min(REGION_MAX_WORKERS))
            && self.threads >= REGION_MIN_THREADS
        {
            return self.chunks_regions(f, len);
        }
        let (pool_tx, pool_rx) = (self.pool_tx.clone(), self.pool_rx.clone());
        let block_len = self.block_len;
        std::thread::scope(|s| {
            let (tx, rx) = bounded::<std::io::Result<Block>>(2);
            s.spawn(move || {
                // Every hole the size of a block is this one block of zeros, shared.
                let zeros = Arc::new(Buf::new(AlignedBuf::zeroed(block_len), None));
                let mut reader = HoleSkippingReader::new(f);
                let mut spare = None;
                loop {
                    let mut v = spare.take().or_else(|| pool_rx.try_recv().ok()).unwrap_or_default();
                    let (item, done) = match reader.next_block(&mut v, block_len, len) {
                        Ok(None) => {
                            spare = Some(v);
                            (Ok(zeros.clone()), false)
                        }
                        Ok(Some(n)) => (Ok(Arc::new(Buf::new(v, Some(pool_tx.clone())))), n < block_len),
                        Err(e) => (Err(e), true),
                    };
                    if tx.send(item).is_err() || done {
                        return;
                    }
                }
            });
            let chunker = BlockChunker::new(self.cutter, || rx.recv().map_or(Ok(None), |r| r.map(Some)));
            match prior {
                Some(prior) => self.send_guided(chunker, prior),
                None => self.send_chunks(chunker),
            }
        })
    }

    /// Sends every chunk of a changed file, taking its previous version's cuts wherever the bytes between
    /// them are unchanged, which spares the rolling hash over all of them; elsewhere it cuts as usual. The
    /// result is exactly the usual chunking: FastCDC's cut depends only on the bytes from the chunk's start to
    /// the cut, unless the input ends less than a maximum chunk after the start, so a previous chunk whose
    /// bytes are the same, at a cut of this version, far enough from both ends, is a chunk of this version.
    ///
    /// The workers check candidates ahead of the position, as far as the two blocks at hand reach; the walker
    /// takes their answers in order. At a chunk that differs the walker cuts it as usual. Where that cut ends
    /// on the next candidate's start, as after an edit in place, the candidates beyond stand; otherwise their
    /// answers are dropped and the walker cuts as usual until a cut falls on a previous one again. The window
    /// of candidates grows by one per chunk that holds and drops to one when the candidates are dropped, so a
    /// file changed throughout wastes little hashing.
    fn send_guided(
        &mut self,
        mut chunker: BlockChunker<impl FnMut() -> std::io::Result<Option<Block>>>,
        prior: &ObjectId,
    ) -> std::io::Result<u64> {
        const MAX_WINDOW: usize = 48;
        let stop = |walker: &mut Self, e: Error| {
            walker.failed = Some(e);
            std::io::Error::other("guided chunking failed")
        };
        let stopped = |walker: &mut Self| {
            walker.stopped = true;
            std::io::Error::other("commit pipeline stopped")
        };
        // A previous version the catalog cannot list (damage that `verify` reports) only costs the guide: this
        // version is cut as usual from there on.
        let guide_lost = |walker: &Self, e: Error| {
            walker.opts.progress.warn(&format!("previous version unreadable, cutting as usual: {e}"));
        };
        let mut cursor = match ChunkCursor::new(self.catalog, prior) {
            Ok(c) => Some(c),
            Err(e) => {
                guide_lost(self, e);
                None
            }
        };
        let prior_len = cursor.as_ref().map_or(0, |c| c.size());
        let max = self.cutter.max() as u64;
        // The previous version's chunks not yet passed, in order; the first `answers.len()` are with the
        // workers, and `answers` holds what came back for them.
        let mut ahead: VecDeque<(u64, ChunkRef)> = VecDeque::new();
        let mut answers: VecDeque<Option<Option<Hashed>>> = VecDeque::new();
        // Replies come on a channel of their own per run of candidates, so that answers for candidates
        // dropped at a change never mix with later ones.
        let (mut reply_tx, mut reply_rx) = crossbeam_channel::unbounded();
        let mut wanted = Arc::new(AtomicBool::new(true));
        let (mut pos, mut first_seq, mut window) = (0u64, 0u64, 1usize);
        // Bytes from `pos` to the end of the last candidate sent.
        let mut sent_to = 0u64;
        loop {
            while answers.len() < window {
                let n = answers.len();
                if ahead.len() <= n {
                    match cursor.as_mut().map(|c| c.next_chunk()) {
                        Some(Ok(Some(c))) => ahead.push_back(c),
                        Some(Ok(None)) | None => break,
                        Some(Err(e)) => {
                            guide_lost(self, e);
                            cursor = None;
                            break;
                        }
                    }
                }
                let (at, r) = ahead[n];
                if at < pos {
                    // Passed while cutting as usual (only the first can be: the rest follow it).
                    debug_assert_eq!(n, 0);
                    ahead.pop_front();
                    continue;
                }
                // Input must follow for more than a maximum chunk, in the previous version and in this one.
                if at != pos + sent_to || at + max >= prior_len || chunker.peek((sent_to + max) as usize, 1)?.is_none()
                {
                    break;
                }
                let Some(data) = chunker.peek(sent_to as usize, r.len as usize)? else { break };
                let job = Job {
                    seq: first_seq + n as u64,
                    data,
                    verify: Some(Verify { wanted: wanted.clone(), expect: r.id, reply: reply_tx.clone() }),
                };
                if self.jobs.send(job).is_err() {
                    return Err(stopped(self));
                }
                #[cfg(test)]
                CANDIDATES.with(|c| c.set(c.get() + 1));
                answers.push_back(None);
                sent_to += r.len as u64;
            }
            if !answers.is_empty() {
                while answers[0].is_none() {
                    let Ok((seq, out)) = reply_rx.recv() else { return Err(stopped(self)) };
                    answers[(seq - first_seq) as usize] = Some(out.map_err(|e| stop(self, e))?);
                }
                if let Some(Some(Some(h))) = answers.pop_front() {
                    #[cfg(test)]
                    GUIDED.with(|g| g.set(g.get() + 1));
                    let len = h.len as u64;
                    chunker.advance(len as usize);
                    ahead.pop_front();
                    (pos, sent_to, first_seq) = (pos + len, sent_to - len, first_seq + 1);
                    window = (window + 1).min(MAX_WINDOW);
                    self.forward(Some(h), ChunkBytes::Owned(Vec::new()))?;
                    continue;
                }
                // A change. Cut the changed chunk as usual: where it ends on the next candidate's start (an
                // edit in place, as in a disk image), the candidates beyond it still stand, with the answers
                // the workers have for them.
                let Some(chunk) = chunker.next_chunk()? else { return Ok(pos) };
                let len = chunk.len() as u64;
                pos += len;
                self.forward(None, chunk)?;
                ahead.pop_front();
                first_seq += 1;
                if answers.front().is_some() && ahead.front().is_some_and(|(at, _)| *at == pos) {
                    sent_to -= len;
                    continue;
                }
                // Otherwise what the workers say about the candidates beyond it no longer matters.
                answers.clear();
                wanted.store(false, Ordering::Relaxed);
                wanted = Arc::new(AtomicBool::new(true));
                (reply_tx, reply_rx) = crossbeam_channel::unbounded();
                (sent_to, window) = (0, 1);
                continue;
            }
            // A change, or no previous cut here: cut one chunk as usual, and look again after it.
            match chunker.next_chunk()? {
                Some(chunk) => {
                    pos += chunk.len() as u64;
                    self.forward(None, chunk)?;
                }
                None => return Ok(pos),
            }
        }
    }

    /// The length of the regions a large file is cut in, with what the store's writes hold left out of their
    /// budget.
    fn region_len(&self) -> u64 {
        region_len(self.threads.min(REGION_MAX_WORKERS), region_budget(self.ctx.backend.write_memory()))
    }

    /// Sends every chunk of a large file to the pipeline, cut and hashed region by region on all cores and
    /// stitched into the sequential chunking here (see `region.rs`). Returns the bytes read; fewer than `len`
    /// when the file shrank meanwhile (the caller then reads it again).
    fn chunks_regions(&mut self, f: &File, len: u64) -> std::io::Result<u64> {
        let (ctx, cutter, threads) = (self.ctx, self.cutter, self.threads.min(REGION_MAX_WORKERS));
        let region = self.region_len();
        let regions = len.div_ceil(region);
        let (task_tx, task_rx) = bounded::<u64>(regions as usize);
        let (done_tx, done_rx) = bounded::<(u64, Result<RegionDone>)>(threads + 1);
        std::thread::scope(|s| {
            for _ in 0..threads {
                let (tasks, done) = (task_rx.clone(), done_tx.clone());
                s.spawn(move || region_worker(ctx, f, (len, region), cutter, tasks, done));
            }
            drop((task_rx, done_tx));
            let stitched = self.stitch_regions(f, (len, region, threads), regions, &task_tx, &done_rx);
            // Stops the workers: no more tasks, and nobody takes what they finish.
            drop(task_tx);
            drop(done_rx);
            stitched
        })
    }

    /// With the file's length, the regions' length (`span`) and the number of region workers.
    fn stitch_regions(
        &mut self,
        f: &File,
        (len, span, workers): (u64, u64, usize),
        regions: u64,
        tasks: &Sender<u64>,
        done: &Receiver<(u64, Result<RegionDone>)>,
    ) -> std::io::Result<u64> {
        let stop = |walker: &mut Self, e: Error| {
            walker.failed = Some(e);
            std::io::Error::other("region chunking failed")
        };
        // At most this many regions are read or held at once, which bounds memory at a few regions.
        let window = workers as u64 + 2;
        let (mut sent, mut ready) = (0u64, HashMap::new());
        let (mut pos, mut total) = (0u64, 0u64);
        let mut junction_buf = Vec::new();
        // Junction chunks are hashed here, in order, not by the hashing workers: the assembler would hold
        // every region's chunks forwarded meanwhile while it waited for a worker's hash, and each worker
        // woken would set up a compressor and a catalog connection for one chunk a region.
        let mut own: Option<(ChunkHasher, Compressor)> = None;
        for k in 0..regions {
            #[cfg(test)]
            REGIONS.with(|r| r.set(r.get() + 1));
            while sent < regions && sent < k + window {
                tasks.send(sent).map_err(|_| std::io::Error::other("region workers stopped"))?;
                sent += 1;
            }
            let region = loop {
                if let Some(r) = ready.remove(&k) {
                    break r;
                }
                let (i, r) = done.recv().map_err(|_| std::io::Error::other("region workers stopped"))?;
                match r {
                    Ok(r) => ready.insert(i, r),
                    // Reading the file failed: the caller reports it against the file, as for any read.
                    Err(Error::Io { source, .. }) => return Err(source),
                    Err(e) => return Err(stop(self, e)),
                };
            };
            let region_end = ((k + 1) * span).min(len);
            let starts: Vec<u64> = region.chunks.iter().map(|(at, _)| *at).collect();
            let max = self.cutter.max() as u64;
            let cut_at = |p: u64| -> std::io::Result<(usize, bool)> {
                // Inside a zero run the chunk is a maximum chunk of zeros (Cutter::cut): nothing to read.
                if region.zero_runs.iter().any(|&(s, e)| s <= p && p + max <= e) {
                    return Ok((max as usize, true));
                }
                junction_buf.resize(((p + max).min(len) - p) as usize, 0);
                let n = read_at_most(f, &mut junction_buf, p)?;
                if n < junction_buf.len() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                Ok((self.cutter.cut(&junction_buf), false))
            };
            let (junction, first) = match stitch(&mut pos, region_end, &starts, cut_at) {
                Ok(v) => v,
                // The file shrank: stop here, and let the caller see a short read.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(total),
                Err(e) => return Err(e),
            };
            for (at, l, zero) in junction {
                if zero && let Some(z) = &region.zero {
                    total += l as u64;
                    self.forward(Some(z.clone()), ChunkBytes::Owned(Vec::new()))?;
                    continue;
                }
                // Cut again here, at the boundary.
                junction_buf.resize(l, 0);
                if read_at_most(f, &mut junction_buf, at)? < l {
                    return Ok(total);
                }
                let (hasher, compressor) = match &mut own {
                    Some(v) => v,
                    None => {
                        let c = compressor(self.ctx.params).map_err(|e| stop(self, e))?;
                        own.insert((ChunkHasher::new(self.ctx.params), c))
                    }
                };
                let h = hasher.hash(self.catalog, compressor, &junction_buf, 0).map_err(|e| stop(self, e))?;
                total += l as u64;
                self.forward(Some(h), ChunkBytes::Owned(Vec::new()))?;
            }
            for (at, h) in region.chunks.into_iter().skip(first) {
                pos = at + h.len as u64;
                total += h.len as u64;
                self.forward(Some(h), ChunkBytes::Owned(Vec::new()))?;
            }
            if region.short {
                return Ok(total);
            }
        }
        Ok(total)
    }

    /// Queues one chunk, in order: hashed already (`done`), or `data` for the workers to hash.
    fn forward(&mut self, done: Option<Hashed>, data: ChunkBytes) -> std::io::Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let len = done.as_ref().map_or(data.len() as u64, |h| h.len as u64);
        self.summary.bytes_read += len;
        self.opts.progress.bytes(len);
        // What the chunk holds alive until the assembler has used it: its bytes, or its blob; at least a
        // little, for the result itself, so that a long run of known chunks is bounded too.
        let held = done.as_ref().map_or(data.len(), |h| h.blob.as_ref().map_or(0, |(_, b)| b.len()));
        let charge = held.max(MIN_CHARGE) as u64;
        // The event goes first: the assembler drains results while it waits for this one, so a full results
        // channel cannot stall the walker.
        let sent = self.inflight.acquire(charge)
            && self.events.send(Event::Chunk(seq, charge)).is_ok()
            && match done {
                Some(mut h) => {
                    h.seq = seq;
                    self.results.send(Ok(h)).is_ok()
                }
                None => self.jobs.send(Job { seq, data, verify: None }).is_ok(),
            };
        if !sent {
            // Not a read error: the assembler or the workers failed, and their error is what to report.
            self.stopped = true;
            return Err(std::io::Error::other("commit pipeline stopped"));
        }
        Ok(())
    }

    /// Sends every chunk of `reader` to the pipeline, reading on this thread.
    fn chunks_inline(&mut self, reader: &mut dyn Read, prior: Option<&ObjectId>) -> std::io::Result<u64> {
        let (pool_tx, pool_rx, block_len) = (self.pool_tx.clone(), self.pool_rx.clone(), self.block_len);
        let chunker = BlockChunker::new(self.cutter, || {
            let mut v = pool_rx.try_recv().unwrap_or_default();
            let n = v.fill_from(reader, block_len)?;
            if n == 0 {
                // Back to the pool: the next small file would otherwise allocate a block afresh.
                let _ = pool_tx.try_send(v);
                return Ok(None);
            }
            Ok(Some(Arc::new(Buf::new(v, Some(pool_tx.clone())))))
        });
        match prior {
            Some(prior) => self.send_guided(chunker, prior),
            None => self.send_chunks(chunker),
        }
    }

    fn send_chunks(
        &mut self,
        mut chunker: BlockChunker<impl FnMut() -> std::io::Result<Option<Block>>>,
    ) -> std::io::Result<u64> {
        let mut total = 0u64;
        while let Some(chunk) = chunker.next_chunk()? {
            total += chunk.len() as u64;
            self.forward(None, chunk)?;
        }
        Ok(total)
    }

    fn stream(&mut self, name: Vec<u8>, reader: &mut dyn Read) -> Result<()> {
        self.opts.progress.start("commit", None);
        let now = now_ns();
        let entry = Entry {
            name,
            kind: EntryKind::File,
            mode: 0o600,
            mtime_ns: now,
            ctime_ns: now,
            ino: 0,
            // A stream's bytes have no owner; checked out, the file is the user's who runs the checkout.
            owner: None,
            link: None,
            xattrs: Vec::new(),
            size: 0,
            target: Vec::new(),
        };
        // The stream committed last under this name guides the cutting.
        let previous =
            self.prev[0].as_ref().and_then(|m| m.get(&entry.name)).filter(|p| p.kind == EntryKind::File).cloned();
        let prior = previous.as_ref().and_then(|p| p.object().ok().flatten());
        // Named as the checkpoint's path is (`stdin:NAME`), whatever the reader is.
        let key = format!("stdin:{}", String::from_utf8_lossy(&entry.name));
        let had_prior = previous.is_some();
        self.send(Event::FileStart(entry, previous.map(Box::new)))?;
        let read = self.chunks_inline(reader, prior.as_ref()).map_err(|e| Error::io(&key, e));
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if self.stopped {
            return Err(Error::Internal("assembler stopped".into()));
        }
        if let Err(e) = read {
            let _ = self.send(Event::FileAbort);
            return Err(e);
        }
        // A stream is always read whole: one committed before under its name is counted as changed.
        if had_prior {
            self.summary.files_changed += 1;
        } else {
            self.summary.files_new += 1;
        }
        self.send(Event::FileEnd)
    }
}

/// Builds one file's content from its chunks in order, cutting segments as it goes.
struct ContentBuilder {
    entry: Entry,
    /// A stream's previous entry (see [`Event::FileStart`]).
    previous: Option<Box<Entry>>,
    size: u64,
    segment: Vec<ChunkRef>,
    segment_ids: Vec<u8>,
    first: Option<ChunkRef>,
    chunks: u64,
}

struct Assembler<'a> {
    session: Session,
    journal: Option<Journal<'a>>,
    catalog: Catalog,
    packer: Packer,
    batch: Batch,
    /// Open directories: each with its entry and the children gathered so far. Level 0 is the virtual root.
    stack: Vec<(Option<Entry>, Vec<Entry>)>,
    file: Option<ContentBuilder>,
    pending: HashMap<u64, Hashed>,
    logical_bytes: u64,
    /// Streams whose bytes are those committed last under their name: counted unchanged, not changed.
    streams_unchanged: u64,
    chunks_new: u64,
    chunks_reused: u64,
    bytes_new: u64,
    bytes_stored: u64,
    /// The content and attributes of each hard-linked file recorded so far, by link group, for its later
    /// names ([`Event::Linked`]): kept for the same files as the walker's `read_links`.
    link_targets: HashMap<u64, (Vec<u8>, Vec<Xattr>)>,
}

fn push_segment(batch: &mut Batch, b: &mut ContentBuilder, refs: &[ChunkRef]) {
    let encoded = tree::encode_segment(refs);
    let id = tree::segment_id(&encoded);
    batch.bytes += encoded.len() + 32;
    batch.segments.push((id, encoded));
    b.segment_ids.extend_from_slice(&id.0);
}

/// The most hashing workers a commit starts unless told otherwise. Each costs about 2 MiB (its compressor,
/// catalog connection and output buffer): 32 took a first commit of a tree to 83 MiB, 16 to 55. At the
/// 160-240 MB/s per core that zstd compresses new chunks here, 16 already take in 3 GB/s of new data, about
/// what a fast NVMe disk reads; unchanged chunks are only hashed, many times faster.
const DEFAULT_MAX_THREADS: usize = 16;

/// The same into a store whose writes hold memory of their own (a bucket's upload parts, 18 MiB by default):
/// its uploads set the pace, and 4 workers compress far more than three parts in flight send, while each one
/// more costs memory the uploads already took. A first commit into a bucket (moto) of 60 files of 4 MiB
/// peaked at 58-61 MiB with 4 threads, 66-67 with 8 and 79-84 with 16, in about the same time.
const UPLOADING_MAX_THREADS: usize = 4;

/// Worker threads for a commit left to choose, on `cores` cores, into a store whose writes hold `store_writes`
/// bytes ([`crate::backend::Backend::write_memory`]).
fn default_threads(cores: usize, store_writes: u64) -> usize {
    cores.min(if store_writes > 0 { UPLOADING_MAX_THREADS } else { DEFAULT_MAX_THREADS })
}

/// Bytes of chunks and blobs alive between the walker and the assembler (see `inflight.rs`): enough to keep
/// every worker busy through a few chunks' worth of scheduling jitter.
const IN_FLIGHT_BYTES: u64 = 8 << 20;

/// The byte budget between walker and assembler: room for a few of the largest chunks per worker too, or a
/// repository of large chunks would compress only one or two at a time.
fn in_flight_budget(threads: usize, chunk_max: u32) -> u64 {
    #[cfg(test)]
    if let Some(b) = tests::BUDGET.with(|b| b.get()) {
        return b;
    }
    IN_FLIGHT_BYTES.max((threads as u64 + 2) * chunk_max as u64)
}

/// The least a chunk is charged to the budget: its result, map entry and event.
const MIN_CHARGE: usize = 256;

/// Catalog rows are written out once this many bytes of them are held.
const BATCH_BYTES: usize = 8 << 20;

impl<'a> Assembler<'a> {
    fn new(ctx: &Context<'a>, session: Session) -> Result<Self> {
        Ok(Assembler {
            session,
            journal: ctx.journal,
            catalog: Catalog::open(ctx.catalog_path)?,
            packer: Packer::new(ctx.backend.clone(), ctx.params.pack_target_size),
            batch: Batch::default(),
            stack: vec![(None, Vec::new())],
            file: None,
            pending: HashMap::new(),
            logical_bytes: 0,
            streams_unchanged: 0,
            chunks_new: 0,
            chunks_reused: 0,
            bytes_new: 0,
            bytes_stored: 0,
            link_targets: HashMap::new(),
        })
    }

    fn run(&mut self, events: Receiver<Event>, results: Receiver<Result<Hashed>>, inflight: &InFlight) -> Result<()> {
        for ev in events {
            match ev {
                Event::DirStart(e) => self.stack.push((Some(e), Vec::new())),
                Event::DirEnd => {
                    let (entry, children) =
                        self.stack.pop().ok_or_else(|| Error::Internal("unbalanced tree".into()))?;
                    let mut entry = entry.ok_or_else(|| Error::Internal("closed the root".into()))?;
                    let id = tree::tree_id(&children);
                    let data = tree::encode_tree(&children);
                    self.batch.bytes += data.len() + 32;
                    self.batch.trees.push((id, data));
                    entry.target = id.0.to_vec();
                    self.add_child(entry)?;
                }
                Event::Leaf(e) => {
                    if e.kind == EntryKind::File {
                        self.logical_bytes += e.size;
                    }
                    self.add_child(e)?;
                }
                Event::Linked(mut e) => {
                    let group = e.link.ok_or_else(|| Error::Internal("linked entry without a group".into()))?;
                    let (target, xattrs) = self
                        .link_targets
                        .get(&group)
                        .cloned()
                        .ok_or_else(|| Error::Internal("linked entry before its file".into()))?;
                    (e.target, e.xattrs) = (target, xattrs);
                    self.logical_bytes += e.size;
                    self.add_child(e)?;
                }
                Event::FileStart(entry, previous) => {
                    self.file = Some(ContentBuilder {
                        entry,
                        previous,
                        size: 0,
                        segment: Vec::new(),
                        segment_ids: Vec::new(),
                        first: None,
                        chunks: 0,
                    });
                }
                Event::Chunk(seq, charge) => {
                    let h = loop {
                        if let Some(h) = self.pending.remove(&seq) {
                            break h;
                        }
                        let r = results.recv().map_err(|_| Error::Internal("workers stopped".into()))??;
                        self.pending.insert(r.seq, r);
                    };
                    self.chunk(h)?;
                    inflight.release(charge);
                }
                Event::FileEnd => {
                    let b = self.file.take().ok_or_else(|| Error::Internal("file end without start".into()))?;
                    self.finish_file(b)?;
                }
                Event::FileAbort => self.file = None,
                Event::Done => return Ok(()),
            }
        }
        Err(Error::Internal("commit walk ended early".into()))
    }

    fn add_child(&mut self, e: Entry) -> Result<()> {
        self.stack.last_mut().ok_or_else(|| Error::Internal("no open directory".into()))?.1.push(e);
        self.maybe_flush()
    }

    fn chunk(&mut self, h: Hashed) -> Result<()> {
        if let Some((flags, blob)) = h.blob {
            // The worker found the chunk missing; it may since have been packed by this commit or indexed by
            // another process.
            if self.packer.is_pending(&h.id) || self.catalog.has_chunk(&h.id)? {
                self.chunks_reused += 1;
            } else {
                self.chunks_new += 1;
                self.bytes_new += h.len as u64;
                self.bytes_stored += blob.len() as u64;
                let published = self.packer.add(h.id, flags, h.len, &blob)?;
                if !published.is_empty() {
                    self.batch.packs.extend(published);
                    self.write_batch()?;
                }
            }
        } else {
            self.chunks_reused += 1;
        }
        let b = self.file.as_mut().ok_or_else(|| Error::Internal("chunk outside a file".into()))?;
        b.size += h.len as u64;
        b.chunks += 1;
        b.first.get_or_insert(ChunkRef { id: h.id, len: h.len });
        b.segment.push(ChunkRef { id: h.id, len: h.len });
        if tree::ends_segment(&h.id, b.segment.len()) {
            let seg = std::mem::take(&mut b.segment);
            push_segment(&mut self.batch, b, &seg);
        }
        Ok(())
    }

    fn finish_file(&mut self, mut b: ContentBuilder) -> Result<()> {
        let id = match b.first {
            // One chunk is the whole content and names it (docs/format.md): no content or segment row. Most
            // small files are one chunk, and these rows were most of what the catalog held per file.
            Some(only) if b.chunks == 1 && tree::named_by_chunk(only.len) => {
                if !b.segment_ids.is_empty() {
                    // The chunk also ended a segment (its id starts with a zero byte), which `chunk` queued
                    // just now, after any batch write: take it back.
                    let (seg, _) = self.batch.segments.pop().ok_or_else(|| Error::Internal("segment lost".into()))?;
                    if seg.0[..] != b.segment_ids[..] {
                        return Err(Error::Internal("segment order".into()));
                    }
                }
                only.id
            }
            _ => {
                if !b.segment.is_empty() {
                    let seg = std::mem::take(&mut b.segment);
                    push_segment(&mut self.batch, &mut b, &seg);
                }
                let id = tree::content_id(b.size, &b.segment_ids);
                self.batch.bytes += b.segment_ids.len() + 48;
                self.batch.contents.push((id, b.size, b.segment_ids));
                id
            }
        };
        let mut entry = b.entry;
        entry.size = b.size;
        entry.target = id.0.to_vec();
        if let Some(p) = b.previous.filter(|p| p.target == entry.target) {
            (entry.mtime_ns, entry.ctime_ns) = (p.mtime_ns, p.ctime_ns);
            self.streams_unchanged += 1;
        }
        if let Some(group) = entry.link
            && (self.link_targets.len() < READ_LINKS_MAX || self.link_targets.contains_key(&group))
        {
            self.link_targets.insert(group, (entry.target.clone(), entry.xattrs.clone()));
        }
        self.logical_bytes += b.size;
        self.add_child(entry)
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.batch.bytes >= BATCH_BYTES { self.write_batch() } else { Ok(()) }
    }

    fn write_batch(&mut self) -> Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        self.catalog.write_batch_with(&mut batch, Some(self.session), self.journal)?;
        for (_, _, entries) in &batch.packs {
            self.packer.indexed(entries);
        }
        Ok(())
    }

    /// The root tree (one entry: the committed file or directory) and that entry.
    fn root(&mut self) -> Result<(ObjectId, Entry)> {
        if self.stack.len() != 1 {
            return Err(Error::Internal("unbalanced tree at end of commit".into()));
        }
        let children = std::mem::take(&mut self.stack[0].1);
        let entry = match children.as_slice() {
            [only] => only.clone(),
            _ => {
                return Err(Error::InvalidInput("nothing to commit: the path was skipped".into()));
            }
        };
        let id = tree::tree_id(&children);
        self.batch.trees.push((id, tree::encode_tree(&children)));
        Ok((id, entry))
    }

    /// Publishes the last pack, then the checkpoint with every remaining row, in one transaction.
    fn publish(&mut self, checkpoint: NewCheckpoint) -> Result<()> {
        self.batch.packs.extend(self.packer.finish()?);
        self.batch.checkpoint = Some(checkpoint);
        self.write_batch()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::{CANDIDATES, GUIDED, REGIONS};
    use crate::backend::MemoryBackend;
    use crate::content::{ChunkCursor, root_entry};
    use crate::testutil::pseudo_random as data;
    use crate::{Chunker, CommitOptions, Error, ObjectId, Repository};

    /// Commits `before` then `after` as one stream; returns the chunk ids recorded for `after`, how many of
    /// them were taken at `before`'s cuts, and how many of `before`'s chunks the workers were sent to check.
    fn guided_commit(before: &[u8], after: &[u8]) -> (Vec<ObjectId>, (u64, u64), Repository, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        repo.commit_reader("state", &mut &before[..], &CommitOptions::default()).unwrap();
        GUIDED.with(|g| g.set(0));
        CANDIDATES.with(|c| c.set(0));
        let id = repo.commit_reader("state", &mut &after[..], &CommitOptions::default()).unwrap().id;
        let counts = (GUIDED.with(|g| g.get()), CANDIDATES.with(|c| c.get()));
        (chunk_ids(&repo, &id), counts, repo, dir)
    }

    /// The chunks checkpoint `id` recorded for its one file or stream, in order.
    fn chunk_ids(repo: &Repository, id: &str) -> Vec<ObjectId> {
        let catalog = repo.open_catalog().unwrap();
        let content = root_entry(&catalog, id).unwrap().object().unwrap().unwrap();
        let mut cursor = ChunkCursor::new(&catalog, &content).unwrap();
        let mut ids = Vec::new();
        while let Some((_, r)) = cursor.next_chunk().unwrap() {
            ids.push(r.id);
        }
        ids
    }

    fn plain_cuts(repo: &Repository, data: &[u8]) -> Vec<ObjectId> {
        let mut chunker = Chunker::new(data, repo.params());
        let mut ids = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            ids.push(ObjectId::of(c));
        }
        ids
    }

    /// A state image of `len` bytes with a run of zeros in it, as VM images and sparse tensors have.
    fn image(len: usize, seed: u64) -> Vec<u8> {
        let mut v = data(len, seed);
        v[len / 3..len / 3 + (1 << 20)].fill(0);
        v
    }

    #[test]
    fn previous_cuts_give_exactly_the_plain_chunking() {
        let base = image(6 << 20, 7);
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("unchanged", Box::new(|_| {})),
            (
                "pages rewritten in place",
                Box::new(|v| {
                    for at in [100_000, 2_500_000, 4_000_000] {
                        v[at..at + 4096].fill(7);
                    }
                }),
            ),
            ("bytes inserted", Box::new(|v| drop(v.splice(1_000_000..1_000_000, data(1000, 3))))),
            ("bytes deleted", Box::new(|v| drop(v.drain(2_000_000..2_005_000)))),
            ("zeros written over data", Box::new(|v| v[3_000_000..3_400_000].fill(0))),
            ("data written over zeros", Box::new(|v| v[(2 << 20) + 300_000..(2 << 20) + 310_000].fill(1))),
            ("truncated", Box::new(|v| v.truncate(5 << 20))),
            ("appended", Box::new(|v| v.extend(data(300_000, 4)))),
            (
                "edited near the end",
                Box::new(|v| {
                    let n = v.len();
                    v[n - 100_000] ^= 1;
                }),
            ),
            (
                "second half replaced",
                Box::new(|v| {
                    let n = v.len();
                    v[n / 2..].copy_from_slice(&data(n - n / 2, 5));
                }),
            ),
        ];
        for (what, edit) in edits {
            let mut after = base.clone();
            edit(&mut after);
            let (ids, (guided, checked), repo, _dir) = guided_commit(&base, &after);
            assert_eq!(ids, plain_cuts(&repo, &after), "{what}");
            // Every case leaves at least a megabyte before its first change as it was (a shift stops the guide
            // for the rest of the file): the previous cuts must have been taken there.
            assert!(guided >= 8, "{what}: only {guided} chunks taken at previous cuts");
            if what == "pages rewritten in place" {
                // Each changed chunk is checked once, in vain; the checks already made beyond it stand, rather
                // than being made again after it.
                let before = plain_cuts(&repo, &base);
                let changed = ids.iter().filter(|id| !before.contains(id)).count() as u64;
                assert!((1..=6).contains(&changed), "{changed} chunks changed");
                assert_eq!(checked, guided + changed, "previous chunks checked");
            }
        }
    }

    /// A file of one chunk is named by the chunk and adds no content or segment row, also when the chunk ends
    /// a segment (an id starting with a zero byte); longer and empty files keep their rows. All read back.
    #[test]
    fn one_chunk_files_are_named_by_their_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let ends_segment = (0u64..)
            .map(|seed| data(3000, seed))
            .find(|d| ObjectId::of(d).0[0] == 0)
            .expect("one in 256 ids starts with a zero byte");
        let files: [(&str, Vec<u8>); 4] = [
            ("small", b"one chunk\n".to_vec()),
            ("ends-segment", ends_segment.clone()),
            ("empty", Vec::new()),
            ("large", data(1 << 20, 9)),
        ];
        for (name, bytes) in &files {
            std::fs::write(src.join(name), bytes).unwrap();
        }
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let id = repo.commit(&src, &CommitOptions::default()).unwrap().id;
        let catalog = repo.open_catalog().unwrap();
        let count = |table: &str| -> i64 {
            catalog.connection().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
        };
        // Contents: the empty file's and the large file's only; segments: the large file's only.
        assert_eq!(count("contents"), 2);
        let large_segments: i64 = catalog
            .connection()
            .query_row("SELECT length(segments) / 32 FROM contents WHERE size > 0", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count("segments"), large_segments);
        for (name, bytes) in &files {
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut repo.open_file(&id, name).unwrap(), &mut back).unwrap();
            assert!(back == *bytes, "{name}");
            let entry = catalog.tree(&ObjectId::from_slice(&root_entry(&catalog, &id).unwrap().target).unwrap());
            let entry = entry.unwrap().into_iter().find(|e| e.name == name.as_bytes()).unwrap();
            let is_chunk = entry.target == ObjectId::of(bytes).0;
            assert_eq!(is_chunk, matches!(*name, "small" | "ends-segment"), "{name}");
        }
        let report =
            repo.verify(&crate::VerifyOptions { read_data: crate::DataSubset::All, ..Default::default() }).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A file whose bytes are exactly a content id's hashed encoding has a chunk id equal to that content id.
    /// Such lengths (29 + 32 k) keep their content row, so the two files stay apart, through GC too.
    #[test]
    fn a_chunk_crafted_to_carry_a_content_id_keeps_its_own_row() {
        let mut crafted = b"snapstore-content-v1\0".to_vec();
        crafted.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(ObjectId::of(&crafted), crate::tree::content_id(0, &[]), "the empty file's content id");
        assert!(!crate::tree::named_by_chunk(crafted.len() as u32));
        assert!(crate::tree::named_by_chunk(28) && crate::tree::named_by_chunk(30));
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("crafted"), &crafted).unwrap();
        std::fs::write(src.join("empty"), b"").unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let id = repo.commit(&src, &CommitOptions::default()).unwrap().id;
        let read = |cp: &str, name: &str| {
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut repo.open_file(cp, name).unwrap(), &mut back).unwrap();
            back
        };
        assert!(read(&id, "crafted") == crafted && read(&id, "empty").is_empty());
        // Checkout asks the chunk index first for files of a size a chunk can name (the empty file's 0 bytes
        // is one): the crafted chunk carries that id but not that length.
        let out = dir.path().join("out");
        repo.checkout(&id, &out, &Default::default()).unwrap();
        assert!(std::fs::read(out.join("crafted")).unwrap() == crafted);
        assert!(std::fs::read(out.join("empty")).unwrap().is_empty());
        // A second checkpoint holds only the crafted file; forgetting the first and collecting keeps its bytes.
        std::fs::remove_file(src.join("empty")).unwrap();
        let kept = repo.commit(&src, &CommitOptions::default()).unwrap().id;
        repo.forget(&[id.as_str()]).unwrap();
        repo.gc(&Default::default()).unwrap();
        assert!(read(&kept, "crafted") == crafted);
        let report =
            repo.verify(&crate::VerifyOptions { read_data: crate::DataSubset::All, ..Default::default() }).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    #[test]
    fn an_unreadable_previous_version_only_costs_the_guide() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let before = image(5 << 20, 11);
        repo.commit_reader("state", &mut &before[..], &CommitOptions::default()).unwrap();
        // Damage: the previous version's chunk lists are gone from the catalog.
        let db = rusqlite::Connection::open(dir.path().join("repo/catalog.db")).unwrap();
        assert!(db.execute("DELETE FROM segments", []).unwrap() > 0);
        drop(db);
        let mut after = before.clone();
        after[3_000_000] ^= 1;
        GUIDED.with(|g| g.set(0));
        let id = repo.commit_reader("state", &mut &after[..], &CommitOptions::default()).unwrap().id;
        assert_eq!(GUIDED.with(|g| g.get()), 0);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut repo.open_file(&id, "").unwrap(), &mut back).unwrap();
        assert!(back == after, "the new checkpoint must hold the new bytes");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        #[test]
        fn previous_cuts_give_the_plain_chunking_after_random_edits(
            seed in any::<u64>(),
            edits in proptest::collection::vec((0usize..5_000_000, 0usize..200_000, 0u8..3), 1..6),
        ) {
            let before = image(5 << 20, seed);
            let mut after = before.clone();
            for (at, len, kind) in edits {
                let at = at.min(after.len());
                let end = (at + len).min(after.len());
                match kind {
                    0 => after[at..end].fill(seed as u8),
                    1 => drop(after.splice(at..at, data(len, seed ^ 1))),
                    _ => drop(after.drain(at..end)),
                }
            }
            let (ids, _, repo, _dir) = guided_commit(&before, &after);
            prop_assert_eq!(ids, plain_cuts(&repo, &after));
        }
    }

    thread_local! {
        /// A budget for the commits this thread makes, in place of the real one.
        pub(super) static BUDGET: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
    }

    /// With a budget of one chunk the walker waits for room after every chunk: a store that fails makes the
    /// assembler stop, and the commit must end with its error instead of waiting for good.
    #[test]
    fn a_failing_store_ends_a_commit_whose_walker_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(dir.path().join("repo")).unwrap();
        let mem = MemoryBackend::new();
        let repo = Repository::open_with(dir.path().join("repo"), Arc::new(mem.clone())).unwrap();
        mem.set_failing(true);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            BUDGET.with(|b| b.set(Some(1)));
            let _ = tx.send(repo.commit_reader("state", &mut &data(8 << 20, 3)[..], &CommitOptions::default()));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the commit waited for good");
        assert!(matches!(result, Err(Error::Backend { .. })), "{result:?}");
    }

    #[test]
    fn storage_failure_fails_the_commit_with_its_own_error_and_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let params = crate::RepoParams { pack_target_size: 1 << 20, ..Default::default() };
        Repository::init_with(dir.path().join("repo"), params).unwrap();
        let mem = MemoryBackend::new();
        let repo = Repository::open_with(dir.path().join("repo"), Arc::new(mem.clone())).unwrap();
        let state = data(8 << 20, 1);
        let first = repo.commit_reader("state", &mut &state[..], &CommitOptions::default()).unwrap();
        mem.set_failing(true);
        let more = data(8 << 20, 2);
        let err = repo.commit_reader("state", &mut &more[..], &CommitOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err}");
        let list = repo.checkpoints().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, first.id);
        // Once storage works again, the next commit succeeds without any repair.
        mem.set_failing(false);
        let again = repo.commit_reader("state", &mut &more[..], &CommitOptions::default()).unwrap();
        assert_eq!(again.parent.as_deref(), Some(first.id.as_str()));
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for i in 0..20 {
            std::fs::write(src.join(format!("f{i}")), data(i * 50_000, i as u64)).unwrap();
        }
        std::fs::write(src.join("big"), data(7 << 20, 99)).unwrap();
        let mut roots = Vec::new();
        for threads in [1, 3] {
            let opts = CommitOptions { threads, reread: true, ..Default::default() };
            let s = repo.commit(&src, &opts).unwrap();
            roots.push(repo.checkpoint(&s.id).unwrap().root);
        }
        assert_eq!(roots[0], roots[1]);
    }

    #[test]
    fn a_commit_into_a_bucket_starts_fewer_workers_by_default() {
        assert_eq!(super::default_threads(2, 0), 2);
        assert_eq!(super::default_threads(64, 0), 16);
        assert_eq!(super::default_threads(2, 18 << 20), 2);
        assert_eq!(super::default_threads(64, 18 << 20), 4);
    }

    /// A store whose writes hold memory (a bucket's upload parts) gets it from the regions' budget, so a
    /// large file is cut in shorter regions, into exactly the same chunks.
    #[test]
    fn a_store_holding_uploads_shortens_the_regions_not_the_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("image");
        std::fs::write(&src, image(9 << 20, 8)).unwrap();
        let opts = CommitOptions { threads: 4, ..Default::default() };
        let mut seen = Vec::new();
        for write_memory in [0, 18 << 20] {
            let root = dir.path().join(format!("repo-{write_memory}"));
            Repository::init(&root).unwrap();
            let mem = MemoryBackend::new();
            mem.set_write_memory(write_memory);
            let repo = Repository::open_with(&root, Arc::new(mem)).unwrap();
            REGIONS.with(|r| r.set(0));
            let id = repo.commit(&src, &opts).unwrap().id;
            assert_eq!(
                chunk_ids(&repo, &id),
                plain_cuts(&repo, &std::fs::read(&src).unwrap()),
                "write memory {write_memory}"
            );
            seen.push(REGIONS.with(|r| r.get()));
        }
        // 2 MiB regions beside a local store; 1 MiB beside 18 MiB of uploads.
        assert_eq!(seen, [5, 9]);
    }

    #[test]
    fn path_keys_keep_utf8_paths_and_never_merge_two_paths() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let key = |b: &[u8]| super::key_of(std::path::Path::new(OsStr::from_bytes(b)));
        assert_eq!(key(b"/data/run-1"), "/data/run-1");
        assert_eq!(key("/données/é\\x".as_bytes()), "/données/é\\x");
        assert_eq!(key(b"/tmp/job\xff"), "bytes:/tmp/job\\xff");
        let paths: [&[u8]; 6] = [
            b"/tmp/job\xff",
            b"/tmp/job\xfe",
            b"/tmp/job\\xff",
            b"/tmp/job\\\xff",
            b"/tmp/a\\xff\xfe",
            b"/bytes:/tmp/job\\xff",
        ];
        let keys: std::collections::HashSet<String> = paths.iter().map(|p| key(p)).collect();
        assert_eq!(keys.len(), paths.len(), "{keys:?}");
    }

    /// `..` is resolved where the kernel resolves it: after a symlink, beside the link's target. Two
    /// directories never share a key through it, while a path without `..` keeps its symlinks.
    #[test]
    fn a_dotdot_after_a_symlink_keys_the_directory_it_reaches() {
        let t = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(t.path()).unwrap();
        for d in ["a/run", "b/x", "b/run"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink("../b/x", root.join("a/x")).unwrap();
        let key = |p: &str| super::path_key(root.join(p)).unwrap();
        assert_eq!(key("a/run"), root.join("a/run").to_str().unwrap());
        assert_eq!(key("a/x/../run"), root.join("b/run").to_str().unwrap());
        assert_eq!(key("a/run/../run/"), key("a/run"));
        // Without `..`, by the letters: a link's own name stays in the key.
        std::os::unix::fs::symlink("b", root.join("current")).unwrap();
        assert_eq!(key("current/run"), root.join("current/run").to_str().unwrap());
    }
}
