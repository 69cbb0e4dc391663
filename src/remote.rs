//! A repository in an S3 bucket: the bucket holds the packs and, as records, every change to the catalog;
//! the SQLite catalog is a local working copy rebuilt from the records.
//!
//! The protocol (docs/format.md, *Remote repositories*) in brief. Every catalog transaction of a remote
//! repository first writes its change to the bucket as a record (`records/SEQ-HASH`), inside the transaction,
//! so nothing is in a catalog that is not in the bucket. `SEQ` is one more than the highest sequence number the
//! writer had applied, so replaying records in `(SEQ, name)` order respects causality. Writers register a
//! session object and wait while a GC sweeps; GC sweeps only while no session exists anywhere, holding a sweep
//! lock that new writers wait on and sync after.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Bucket, Replaced};
use crate::catalog::{Batch, Catalog, host_name, now_ns, process_identity, remote_seq};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::params::RepoParams;
use rusqlite::OptionalExtension;

/// The repository's parameters, written once at `init`.
const CONFIG: &str = "config";
/// Change records, one per catalog transaction.
const RECORDS: &str = "records/";
/// One object per running commit.
const SESSIONS: &str = "sessions/";
/// Held by the one GC running.
pub(crate) const GC_LOCK: &str = "locks/gc";
/// Held by a GC while it deletes: writers do not start meanwhile.
pub(crate) const SWEEP_LOCK: &str = "locks/sweep";

/// Held by a forget (or retention) from the sync before it deletes to its record: two forgets on two machines,
/// each keeping what the other forgets, would otherwise empty a path between them.
pub(crate) const FORGET_LOCK: &str = "locks/forget";
/// How long a forget waits for another to end.
const FORGET_WAIT: Duration = Duration::from_secs(120);

/// Sessions and locks are refreshed this often, by a thread of their own; GC takes a session of another host
/// that was not refreshed for its `stale_after` (1 hour by default) for dead.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

/// A lock (GC's, or its sweep lock) not refreshed for this long, by the server's clock, belongs to a GC that
/// is gone or stalled, and is taken over.
const LOCK_STALE: Duration = Duration::from_secs(600);

/// How long a writer waits for a GC's sweep to end before giving up (`SNAPSTORE_SWEEP_WAIT`, seconds).
const SWEEP_WAIT: Duration = Duration::from_secs(600);

/// Who holds a session or lock, and since when.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Holder {
    pub host: String,
    pub pid: u32,
    pub process: String,
    /// Its pid namespace ([`crate::catalog::pid_namespace`]); absent from holders written before it was.
    #[serde(default)]
    pub pidns: String,
    /// Unique per holder: a lock read back with another token belongs to someone else.
    pub token: String,
    pub started_ns: i64,
    pub heartbeat_ns: i64,
}

impl Holder {
    fn me() -> Holder {
        let now = now_ns();
        let pid = std::process::id();
        Holder {
            host: host_name(),
            pid,
            process: process_identity(pid),
            pidns: crate::catalog::pid_namespace(),
            token: token(),
            started_ns: now,
            heartbeat_ns: now,
        }
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct")
    }

    /// The error for a GC (or its sweep) that this holder's lock shows running.
    fn gc_running(self) -> Error {
        Error::GcRunning { pid: self.pid, host: self.host, started: crate::checkpoint::format_utc(self.started_ns) }
    }

    /// The error for a sweep this holder's `locks/sweep` shows running, waited for `waited`.
    fn sweep_running(self, waited: Duration) -> Error {
        let started = crate::checkpoint::format_utc(self.started_ns);
        Error::SweepRunning { pid: self.pid, host: self.host, started, waited_secs: waited.as_secs() }
    }

    /// The error for a forget that this holder's `locks/forget` shows running.
    fn forget_running(self) -> Error {
        Error::ForgetRunning { pid: self.pid, host: self.host, started: crate::checkpoint::format_utc(self.started_ns) }
    }
}

/// A session's or lock's object as read: whose, since when, and which version.
struct Held {
    holder: Holder,
    /// When the object was last written, by the server's clock.
    modified_ns: i64,
    /// The version read, for a write that must not overwrite anyone else's since.
    e_tag: Option<String>,
}

/// Whether a record's bytes hash to the (at least 32) hex digits its name ends with.
fn matches_its_name(name: &str, data: &[u8]) -> bool {
    let hash = name.rsplit_once('-').map_or("", |(_, h)| h);
    hash.len() >= 32 && ObjectId::of(data).to_hex().starts_with(&hash.to_ascii_lowercase())
}

/// The sequence number of the record object `records/SEQ-HASH` (both in hex); `None` for any other name.
fn record_seq(name: &str) -> Option<u64> {
    let (seq, hash) = name.strip_prefix(RECORDS)?.split_once('-')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if hex(seq) && hex(hash) { u64::from_str_radix(seq, 16).ok() } else { None }
}

/// The empty record that fills number `seq`, once its record is accepted as lost ([`Remote::accept_missing`]):
/// the same bytes under the same name from every machine that fills it, so filling twice is harmless.
fn filler(seq: u64) -> Result<(String, Vec<u8>)> {
    let empty = crate::record::encode(&Batch::default())?;
    let hash = ObjectId::of(&empty).to_hex();
    Ok((format!("{RECORDS}{seq:016x}-{}", &hash[..32]), empty))
}

fn token() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!("{}/{}/{}/{n}", host_name(), std::process::id(), now_ns());
    ObjectId::of(seed.as_bytes()).to_hex()[..32].to_string()
}

/// A running commit's (or reader's) session object, deleted when dropped. `None`: a read whose credentials
/// may not write to the bucket, which reads without one ([`Remote::begin_session`]).
pub(crate) struct RemoteSession {
    name: Option<String>,
    beat: Option<Heartbeat>,
    bucket: Arc<Bucket>,
}

impl Drop for RemoteSession {
    /// Best effort: a session left behind only delays GC's sweeps until it is found dead.
    fn drop(&mut self) {
        drop(self.beat.take());
        if let Some(name) = &self.name {
            let _ = self.bucket.delete(name);
        }
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncSummary {
    /// Records in the bucket.
    pub records: u64,
    /// Records applied now (written by other machines, or by this one before a crash).
    pub applied: u64,
    /// Checkpoints in the catalog afterwards (group parts included).
    pub checkpoints: u64,
    /// Records gone from the bucket (deleted behind snapstore's back, or moved out of `records/` because
    /// damaged), at most 1000, each a line saying which: a catalog rebuilt from the bucket (a new machine,
    /// `sync --rebuild`) lacks what they recorded, which a machine that applied them keeps. Empty when whole.
    pub records_missing: Vec<String>,
    /// Whether this machine's copy of the catalog was built again from the bucket first: asked for
    /// (`sync --rebuild`), or because a record that removes arrived after records numbered above it, which
    /// only a replay in order applies right.
    pub rebuilt: bool,
    /// Records that wait, unapplied (each also in `records_missing`): they arrived out of order, or after one
    /// that did, and remove something, while this copy holds what records lost from the bucket (or damaged
    /// there) changed, which building it again in order would drop. Until they are applied this copy lacks
    /// what they removed, so no commit, forget or tag change is made on it ([`crate::Error::RecordsWaiting`]).
    pub records_waiting: Vec<String>,
}

/// Marks shared through the bucket (`records/damage-CHUNK-PACK`, CHUNK the chunk id in hex, PACK 32 hex digits
/// of the hash of the pack's name; the object holds the pack's name): a read on one machine that met a chunk's
/// damage tells every machine, so that a commit of the same bytes on any of them stores a fresh copy. Not a
/// record: it has no sequence number (builds before it pass over such names), and marks commute, each applied
/// only where the machine's row still places the chunk in that pack.
const DAMAGE: &str = "records/damage-";

/// A GC's trace of the pack files it is about to delete (`records/swept-TOKEN`; the object holds their names, a
/// line each), written once the records of its sweep are in the bucket and before any file goes. A copy that
/// still places chunks in one of those packs lacks a record of that sweep: lost, or waiting. Lost while it was
/// the newest record, before its machine synced again, it leaves no gap (the next record takes its number) and
/// no [`LOST`] marker, and a commit on that copy would reuse chunks whose pack is gone (round 27 review, F1).
/// So a sync marks those chunks damaged, and the next commit meeting their bytes stores them afresh. Not a
/// record: it has no sequence number (builds before it pass over such names), and it commutes with records:
/// it marks where a row names a listed pack, and the names are kept, so that a record applied after it (lost
/// and put back, or late) has its rows there marked too ([`swept_among`]). It does not help where the loss
/// also takes the trace, which is newer than the records. Its marks are shared as any ([`DAMAGE`]): the
/// machine whose rows name the chunks' sound copies (moved by the lost sweep) learns from them which to
/// publish. Never deleted: one per GC that deletes files.
const SWEPT: &str = "records/swept-";

/// Pack names per [`SWEPT`] object, so that what a sync holds of one stays small whatever a GC deletes.
const SWEPT_NAMES: usize = 4096;

/// Marks [`Remote::share_marks`] sends at once.
const SHARE_AT_ONCE: usize = 16;

/// Where pack files live in the bucket.
const PACKS: &str = "packs/";

/// The packs `batch` places chunks in that a [`SWEPT`] trace this catalog applied named (their names are kept
/// in `remote_records` beside the bucket objects it applied, as the pack files are objects it knows gone): a
/// record applied after the trace, lost and put back or late, whose rows there must be marked as the trace's
/// own are.
fn swept_among(conn: &rusqlite::Connection, batch: &Batch) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached("SELECT 1 FROM remote_records WHERE name = ?1")?;
    let placed = batch
        .packs
        .iter()
        .chain(&batch.moved)
        .map(|(name, _, _)| name)
        .chain(batch.locates.iter().map(|(name, _)| name));
    let mut swept = Vec::new();
    for name in placed {
        if stmt.query_row([name], |_| Ok(())).optional()?.is_some() {
            swept.push(name.clone());
        }
    }
    Ok(swept)
}

/// The bucket object sharing the mark of `chunk` in `pack`.
fn damage_name(chunk: &ObjectId, pack: &str) -> String {
    format!("{DAMAGE}{}-{}", chunk.to_hex(), pack_hash(pack))
}

/// The chunk a [`damage_name`] names, and the hash part naming its pack.
fn damage_of(name: &str) -> Option<(ObjectId, &str)> {
    let (chunk, pack) = name.strip_prefix(DAMAGE)?.split_once('-')?;
    if pack.len() != 32 {
        return None;
    }
    Some((ObjectId::from_hex(chunk)?, pack))
}

/// The part of a [`damage_name`] naming `pack`.
fn pack_hash(pack: &str) -> String {
    ObjectId::of(pack.as_bytes()).to_hex()[..32].to_string()
}

/// A mark another machine shared ([`DAMAGE`]).
pub(crate) struct SharedMark {
    /// The object's name in the bucket.
    pub name: String,
    /// The chunk marked.
    pub chunk: ObjectId,
    pack_hash: String,
}

impl SharedMark {
    /// Whether the mark is of the copy in `pack`.
    pub(crate) fn names_pack(&self, pack: &str) -> bool {
        pack_hash(pack) == self.pack_hash
    }
}

/// Objects fetched at once by [`fetch_groups`]' groups, and the most bytes a group holds (unless one object
/// alone is larger): a bucket's latency is waited out once per group instead of once per object, while what
/// is held stays small whatever the number of objects.
const FETCH_AT_ONCE: usize = 16;
const FETCH_BYTES: u64 = 16 << 20;

/// `items` in order, in consecutive groups of at most [`FETCH_AT_ONCE`] and [`FETCH_BYTES`] (by `size`).
fn fetch_groups<'a, T>(items: &'a [T], size: impl Fn(&T) -> u64 + 'a) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .take(FETCH_AT_ONCE)
            .take_while(|item| {
                bytes += size(item);
                bytes <= FETCH_BYTES
            })
            .count()
            .max(1);
        let (group, after) = rest.split_at(n);
        rest = after;
        Some(group)
    })
}

/// The names of the records `catalog` applied or wrote, and of the other objects under `records/` it applied:
/// not the pack names traces gave ([`swept_among`]), which grow with every pack any GC deleted (round 29
/// review, F2), and which a sync looks up one by one.
pub(crate) fn applied_records(catalog: &Catalog) -> Result<HashSet<String>> {
    // A range of the primary key: `records/` up to `records0`, '0' following '/'.
    let mut stmt = catalog
        .connection()
        .prepare("SELECT name FROM remote_records WHERE name >= 'records/' AND name < 'records0'")?;
    Ok(stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?)
}

/// At most this many records gone from the bucket are named ([`SyncSummary::records_missing`]).
const MISSING_SHOWN: usize = 1000;

/// Records gone from the bucket, from the names it lists under `records/` and those a catalog applied. Every
/// number up to the highest has a record, since a writer numbers its record one past the highest it applied
/// or wrote and snapstore deletes none, so a number without one is a record deleted before this catalog
/// applied it. (Of two records with one number, the loss of one this catalog never applied goes unseen.)
#[derive(Debug, Default, PartialEq)]
struct Gone {
    /// Records the catalog applied that the bucket no longer lists, by name.
    applied: Vec<String>,
    /// Runs of sequence numbers (first, last) with no record in either.
    gaps: Vec<(u64, u64)>,
}

impl Gone {
    fn find<'a>(listed: impl Iterator<Item = &'a str>, applied: &HashSet<String>) -> Gone {
        let listed: HashSet<&str> = listed.collect();
        let numbered = |n: &&String| record_seq(n).is_some();
        let mut gone = Gone {
            applied: applied.iter().filter(numbered).filter(|n| !listed.contains(n.as_str())).cloned().collect(),
            gaps: Vec::new(),
        };
        gone.applied.sort();
        let mut seqs: Vec<u64> =
            listed.iter().copied().chain(applied.iter().map(String::as_str)).filter_map(record_seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut next = 1;
        for seq in seqs {
            if seq > next {
                gone.gaps.push((next, seq - 1));
            }
            next = next.max(seq.saturating_add(1));
        }
        gone
    }

    /// A line for each, and for each record another machine's copy applied and lost (`elsewhere`), at most
    /// [`MISSING_SHOWN`].
    fn lines(&self, elsewhere: &[LostElsewhere]) -> Vec<String> {
        let elsewhere = elsewhere.iter().map(|l| {
            let until = if l.found_damaged {
                "a machine that applied it runs `snapstore sync --accept-missing` (`--everywhere` if none did)"
            } else {
                "that machine runs `snapstore sync --accept-missing`"
            };
            format!("{}: {} ({}), gone from the bucket: gc deletes nothing until {until}", l.record, l.by(), l.marker)
        });
        let applied = self
            .applied
            .iter()
            .map(|n| format!("{n}: applied by this machine's copy of the catalog, gone from the bucket"));
        let gaps = self.gaps.iter().map(|&(first, last)| {
            if first == last {
                format!("{RECORDS}{first:016x}-*: no record with this number, in the bucket or applied here")
            } else {
                format!(
                    "{RECORDS}{first:016x}-* to {RECORDS}{last:016x}-*: no record with these {} numbers, in the \
                     bucket or applied here",
                    last - first + 1
                )
            }
        });
        applied.chain(elsewhere).chain(gaps).take(MISSING_SHOWN).collect()
    }
}

/// Shared word that a machine's copy of the catalog applied a record the bucket lost
/// (`records/lost-SEQ-HASH-REPLICA`: the record's name after `records/`, then this copy's [`replica`] id; the
/// object holds the host's name). Only the machines that applied a lost record know it was there: one that
/// did not sees at most a gap, none at all when it was the newest, and its GC took the packs of the lost
/// record's checkpoints for orphans, which the machines that applied it still restore from (round 22 review).
/// Every machine's sync reports each marker of another copy as a record missing, so that GC everywhere
/// deletes nothing until the machine that wrote it accepts the loss (`sync --accept-missing`, which removes
/// its markers) or the record is back. Not a record: it has no sequence number.
const LOST: &str = "records/lost-";

/// The copy id of a [`LOST`] marker that a sync which found the record damaged wrote: it applied nothing, but
/// the record may be moved out of `records/` next, as the error tells the user.
const FOUND_DAMAGED: &str = "0000000000000000";

/// The marker, written by the copy `replica`, that `record` (`records/SEQ-HASH`) is gone from the bucket.
fn lost_name(record: &str, replica: &str) -> String {
    format!("{LOST}{}-{replica}", record.strip_prefix(RECORDS).unwrap_or(record))
}

/// The record a [`lost_name`] names, and the copy that wrote it.
fn lost_of(name: &str) -> Option<(String, &str)> {
    let (record, replica) = name.strip_prefix(LOST)?.rsplit_once('-')?;
    let record = format!("{RECORDS}{record}");
    record_seq(&record)?;
    (!replica.is_empty()).then_some((record, replica))
}

/// The file, in the directory of a machine's copy of the catalog, holding that copy's id for [`LOST`]
/// markers. Beside the catalog rather than in it, so that a copy rebuilt from the bucket (which no longer
/// holds what the lost records changed) keeps the id, and its first sync removes the markers it wrote before.
const REPLICA_FILE: &str = "replica";

/// The id of the machine's copy of the catalog in `dir` ([`REPLICA_FILE`]); made (`create`) if it has none.
fn replica(dir: &std::path::Path, create: bool) -> Result<Option<String>> {
    let path = dir.join(REPLICA_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if id.trim().len() == 16 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Ok(Some(id.trim().to_string()));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&path, e)),
    }
    if !create {
        return Ok(None);
    }
    let id = token()[..16].to_string();
    let tmp = dir.join(format!("{REPLICA_FILE}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::io(&path, e))?;
    Ok(Some(id))
}

/// The file, in the directory of a machine's copy of the catalog, of the bucket's orphan packs its GC has seen:
/// a line per orphan, the time it was first seen (nanoseconds, this machine's clock) and its name.
const ORPHANS_SEEN: &str = "orphans-seen";

/// Forgets, in one transaction (a statement of its own waits for the disk each time: 329 marks took 4 s),
/// that the catalog applied the bucket objects `names` (deleted).
fn forget_objects(catalog: &rusqlite::Connection, names: &[impl AsRef<str>]) -> Result<()> {
    let tx = catalog.unchecked_transaction()?;
    for name in names {
        tx.execute("DELETE FROM remote_records WHERE name = ?1", [name.as_ref()])?;
    }
    tx.commit()?;
    Ok(())
}

/// A [`LOST`] marker as listed, with the record it names and the copy that wrote it.
type Marker<'a> = (&'a crate::backend::ObjectMeta, String, &'a str);

/// The [`LOST`] markers among `listed`.
fn markers_in(listed: &[crate::backend::ObjectMeta]) -> Vec<Marker<'_>> {
    listed.iter().filter_map(|o| lost_of(&o.name).map(|(record, replica)| (o, record, replica))).collect()
}

/// Another copy's [`LOST`] marker of a record still missing.
struct LostElsewhere {
    /// The marker's name.
    marker: String,
    /// The record it names.
    record: String,
    /// The host the copy is on, as its marker says.
    host: String,
    /// Written by a sync that found the record damaged ([`FOUND_DAMAGED`]), not by a copy that applied it.
    found_damaged: bool,
}

impl LostElsewhere {
    /// Who reported the record lost.
    fn by(&self) -> String {
        let who =
            if self.found_damaged { "found damaged by a sync on" } else { "applied by the copy of the catalog on" };
        format!("{who} {}", self.host)
    }
}

/// The bucket side of a remote repository.
pub(crate) struct Remote {
    pub bucket: Arc<Bucket>,
    /// The directory of this machine's copy of the catalog, which holds its [`replica`] id; `None` for a
    /// handle that only takes and checks locks.
    pub cache: Option<PathBuf>,
}

impl Remote {
    fn err(&self, name: &str, e: std::io::Error) -> Error {
        Error::backend(format!("{}/{name}", self.bucket.url()), e)
    }

    /// Writes the parameters of a new repository; fails if the bucket prefix holds one already.
    pub fn init(&self, params: &RepoParams) -> Result<()> {
        let mut pairs: std::collections::BTreeMap<&str, String> = params.to_pairs().into_iter().collect();
        pairs.insert("repo_id", token());
        let body = serde_json::to_vec_pretty(&pairs).expect("strings");
        if !self.bucket.create(CONFIG, body).map_err(|e| self.err(CONFIG, e))? {
            return Err(Error::RepositoryExists(PathBuf::from(self.bucket.url())));
        }
        Ok(())
    }

    /// The parameters written at `init`.
    pub fn params(&self) -> Result<RepoParams> {
        let pairs = self.config()?;
        RepoParams::from_lookup(|k| pairs.get(k).cloned())
    }

    /// The id `init` gave the repository: a local copy made from another repository is discarded.
    pub fn repo_id(&self) -> Result<String> {
        Ok(self.config()?.remove("repo_id").unwrap_or_default())
    }

    fn config(&self) -> Result<std::collections::HashMap<String, String>> {
        let body = match self.bucket.get(CONFIG) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoRepository(PathBuf::from(self.bucket.url())));
            }
            other => other.map_err(|e| self.err(CONFIG, e))?,
        };
        let pairs: std::collections::HashMap<String, String> = serde_json::from_slice(&body).map_err(|e| {
            Error::Format(format!("{}/{CONFIG} is not a snapstore configuration: {e}", self.bucket.url()))
        })?;
        Ok(pairs)
    }

    /// Writes `batch` as a record, inside the catalog transaction `tx` that makes the same change locally.
    pub fn publish(&self, tx: &rusqlite::Transaction<'_>, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let seq = remote_seq(tx)? + 1;
        let data = crate::record::encode(batch)?;
        let name = format!("{RECORDS}{seq:016x}-{}", &ObjectId::of(&data).to_hex()[..32]);
        self.bucket.put(&name, data).map_err(|e| self.err(&name, e))?;
        crate::fault::point("record-written");
        tx.execute("INSERT OR IGNORE INTO remote_records (name) VALUES (?1)", [&name])?;
        tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('remote_seq', ?1)", [seq.to_string()])?;
        Ok(())
    }

    /// The objects `items` name (each item's object name and listed size), each item with its object's body, in
    /// order: fetched in [`fetch_groups`], a group's requests in flight at once.
    fn fetched<'a, T>(
        &'a self,
        items: &'a [T],
        object: impl Fn(&T) -> (&'a str, u64) + Copy + 'a,
    ) -> impl Iterator<Item = (&'a T, std::io::Result<Vec<u8>>)> + 'a {
        fetch_groups(items, move |item| object(item).1).flat_map(move |group| {
            let names: Vec<&str> = group.iter().map(|item| object(item).0).collect();
            group.iter().zip(self.bucket.get_all(&names))
        })
    }

    /// Applies every record of the bucket the catalog has not applied, in causal order.
    pub fn sync(&self, catalog: &mut Catalog) -> Result<SyncSummary> {
        self.sync_records(catalog, None)
    }

    /// [`Remote::sync`], applying only the records named in `only` when given (a copy of what another
    /// catalog applied: see [`crate::restate`]).
    pub(crate) fn sync_records(&self, catalog: &mut Catalog, only: Option<&HashSet<String>>) -> Result<SyncSummary> {
        let listed = self.bucket.list(RECORDS).map_err(|e| self.err(RECORDS, e))?;
        let known = applied_records(catalog)?;
        let mut new: Vec<(u64, &str, u64)> = Vec::new();
        for o in &listed {
            if known.contains(&o.name) || only.is_some_and(|only| !only.contains(&o.name)) {
                continue;
            }
            // Not a name snapstore writes (a README someone put there): not a record, so nothing to apply.
            // Refusing it would stop every command on every machine for an object that holds no checkpoint.
            let Some(seq) = record_seq(&o.name) else { continue };
            new.push((seq, &o.name, o.size));
        }
        new.sort();
        // Records numbered from here on came after what this copy applied.
        let seen = crate::catalog::remote_seq(catalog.connection())?;
        // What was applied before and is no longer listed is gone. This copy alone holds what those records
        // changed: a rebuild would drop it, and its markers with it, and every GC would then collect what its
        // checkpoints use.
        let gone = Gone::find(listed.iter().map(|o| o.name.as_str()), &known);
        // So does a record it applied that the bucket holds damaged: a rebuild would stop at it, and once it is
        // moved out of `records/`, as the error says, drop what it changed (round 25 review, R1).
        let mut held_damaged = self.still_damaged(catalog, &listed)?;
        let mut holds_lost = !gone.applied.is_empty() || !held_damaged.is_empty();
        let mut waiting: Vec<String> = Vec::new();
        let mut filled = false;
        let mut placed_swept: Vec<String> = Vec::new();
        let numbered = listed.iter().filter(|o| record_seq(&o.name).is_some());
        let mut s = SyncSummary { records: numbered.count() as u64, ..Default::default() };
        let mut applied_now = HashSet::new();
        for (&(seq, name, _), data) in self.fetched(&new, |&(_, name, size)| (name, size)) {
            let data = data.map_err(|e| self.err(name, e))?;
            // The name carries a hash of the bytes (see `publish`): a byte changed where zstd does not notice
            // would otherwise be applied as it reads.
            let damaged = |what: &str| {
                // Moved out of `records/` as this error says, the record would leave no trace for machines that
                // never applied it (none at all when it was the newest), whose GC would then delete what its
                // checkpoints use; this marker holds every GC back until a machine that applied it accepts the
                // loss. Best effort: credentials that may only read cannot leave it.
                let _ = self.bucket.put(&lost_name(name, FOUND_DAMAGED), host_name().into_bytes());
                Error::corrupt(format!(
                    "{}/{name}: {what}. Records are applied in order, so no machine can sync past it. A machine \
                     that applied it before still works: do not run `sync --rebuild` there. To let the others go \
                     on, move that object out of records/ (what it recorded, one commit's or gc's change, is then \
                     lost to machines that had not applied it; each machine that applied it reports the loss to \
                     the others, whose gc deletes nothing until it runs `snapstore sync --accept-missing`)",
                    self.bucket.url()
                ))
            };
            if !matches_its_name(name, &data) {
                return Err(damaged("the record does not match the hash in its name"));
            }
            let batch = crate::record::decode(&data).map_err(|e| match e {
                Error::Corrupt { what } => damaged(&what),
                other => other,
            })?;
            // A record numbered below one applied here already (lost and put back, or seen late) comes after
            // records that followed it. One that only adds commutes with them; one that removes, moves or
            // retags does not: a GC's record of what it swept, put back after a machine stored those chunks
            // again, would delete the new rows. Only a replay of every record in order places it right. While
            // one waits, so does every later one that removes: its writer had applied the one waiting, and a
            // GC's record after a forget's drops what the forget left unused (round 25 review, R3).
            if (seq < seen || !waiting.is_empty()) && !batch.only_adds() {
                if !holds_lost {
                    held_damaged = self.damaged_among(catalog, &listed, &known)?;
                    holds_lost = !held_damaged.is_empty();
                }
                if holds_lost {
                    // Left for later: reported, so GC deletes nothing meanwhile (as for the lost records), and
                    // no commit or forget is made on this copy ([`SyncSummary::records_waiting`]).
                    waiting.push(name.to_string());
                    continue;
                }
                return Err(Error::RebuildNeeded(format!(
                    "{}/{name} reached this machine after records numbered above it, and applied out of order \
                     it would undo part of what they did (it was lost from the bucket and is back, or came \
                     late). This machine's copy of the catalog is built again from the bucket, every record in \
                     order, at the next command; or run `snapstore sync --rebuild` now",
                    self.bucket.url()
                )));
            }
            if catalog.apply_record(name, seq, &batch)? {
                s.applied += 1;
                // An empty record fills the number of one accepted as lost, which this copy never applied.
                filled |= batch.is_empty();
                // One lost and put back, or late, may place chunks in packs that a GC deleted meanwhile (as
                // orphans, or moved on), whose trace this copy read before (round 28 review, F1).
                placed_swept.extend(swept_among(catalog.connection(), &batch)?);
            }
            applied_now.insert(name);
        }
        // Sweeps whose records this copy lacks, once the records it can apply are in. Not into a scratch copy
        // (`only`): it takes rows from another copy, not from this bucket's history.
        if only.is_none() {
            self.apply_sweep_traces(catalog, &listed, &known, &placed_swept)?;
        }
        // Other machines' marks, once the records they rely on are in; then this one's, shared.
        let marks: Vec<(&str, ObjectId, u64)> = listed
            .iter()
            .filter(|o| !known.contains(&o.name))
            .filter_map(|o| damage_of(&o.name).map(|(chunk, _)| (o.name.as_str(), chunk, o.size)))
            .collect();
        let mut fetched = Vec::new();
        for (&(name, chunk, _), body) in self.fetched(&marks, |&(name, _, size)| (name, size)) {
            let pack = match body {
                Ok(body) => String::from_utf8_lossy(&body).into_owned(),
                // Pruned by a GC since the listing: the chunk has moved on.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(name, e)),
            };
            fetched.push((name, chunk, pack));
        }
        crate::catalog::apply_shared_marks(catalog.connection_mut(), &fetched)?;
        self.share_marks(catalog);
        s.checkpoints =
            catalog.connection().query_row("SELECT count(*) FROM checkpoints", [], |r| r.get::<_, i64>(0))? as u64;
        let elsewhere = self.lost_markers(&listed, &gone, &applied_now)?;
        // A record this copy never applied is gone: if a GC's, this copy places chunks in packs it deleted, and
        // a commit here would reuse them (round 26 review, F1). The next writer here checks the packs first.
        if !gone.gaps.is_empty() || !elsewhere.is_empty() || filled {
            catalog
                .connection()
                .execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, '1')", [PACKS_UNCHECKED])?;
        }
        s.records_missing = gone.lines(&elsewhere);
        s.records_missing.extend(held_damaged.iter().map(|name| {
            format!(
                "{name}: applied by this machine's copy of the catalog, damaged in the bucket: move it out of \
                 records/, then run `snapstore sync --accept-missing` here"
            )
        }));
        s.records_missing.extend(waiting.iter().map(|name| {
            format!(
                "{name}: arrived after records numbered above it, or after one that waits; applied by building \
                 this machine's copy of the catalog again in order, once the records this machine applied that \
                 are gone from the bucket or damaged there are back, or accepted as lost (`snapstore sync \
                 --accept-missing`: what they changed then leaves this machine too)"
            )
        }));
        s.records_waiting = waiting;
        Ok(s)
    }

    /// Reads the [`SWEPT`] traces of `listed` that the catalog has not applied (`known`) and marks damaged every
    /// chunk it places in a pack one names; notes each applied, all in one transaction.
    fn apply_sweep_traces(
        &self,
        catalog: &mut Catalog,
        listed: &[crate::backend::ObjectMeta],
        known: &HashSet<String>,
        placed_swept: &[String],
    ) -> Result<()> {
        let traces: Vec<(&str, u64)> = listed
            .iter()
            .filter(|o| o.name.starts_with(SWEPT) && !known.contains(&o.name))
            .map(|o| (o.name.as_str(), o.size))
            .collect();
        if traces.is_empty() && placed_swept.is_empty() {
            return Ok(());
        }
        let tx = catalog.connection_mut().transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        crate::catalog::mark_packs_damaged(&tx, placed_swept.iter().map(String::as_str))?;
        for (&(name, _), body) in self.fetched(&traces, |&(name, size)| (name, size)) {
            let body = match body {
                Ok(body) => body,
                // Deleted by hand since the listing: the next listing lacks it too.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(name, e)),
            };
            let body = String::from_utf8_lossy(&body);
            // Shared as any mark: a GC on a machine whose rows name a sound copy (moved by the lost sweep)
            // publishes it once it sees the mark, which heals this copy.
            crate::catalog::mark_packs_damaged(&tx, body.lines())?;
            // Each name too, for a record applied later that places chunks there (see `swept_among`).
            for pack in body.lines().filter(|l| l.starts_with(PACKS)) {
                tx.execute("INSERT OR IGNORE INTO remote_records (name) VALUES (?1)", [pack])?;
            }
            tx.execute("INSERT OR IGNORE INTO remote_records (name) VALUES (?1)", [name])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes the [`SWEPT`] traces of `packs`, the files a GC deletes next. This machine's next sync applies
    /// them as any other's do (its rows name none of those packs, but it keeps their names for a record that
    /// arrives later). A failure stops the GC before it deletes anything.
    pub(crate) fn trace_sweep(&self, packs: &[&str]) -> Result<()> {
        for group in packs.chunks(SWEPT_NAMES) {
            let name = format!("{SWEPT}{}", token());
            self.bucket.put(&name, group.join("\n").into_bytes()).map_err(|e| self.err(&name, e))?;
        }
        Ok(())
    }

    /// The records of `listed` this catalog applied (`known`) whose bucket copy is damaged or gone since the
    /// listing, read one and all: a late record is about to rebuild the copy, which would stop at such a record.
    /// Each is remembered in the catalog ([`HELD_DAMAGED`]), so that later syncs read only those again, and
    /// marked as [`FOUND_DAMAGED`], as a sync that meets it does.
    fn damaged_among(
        &self,
        catalog: &Catalog,
        listed: &[crate::backend::ObjectMeta],
        known: &HashSet<String>,
    ) -> Result<Vec<String>> {
        let applied: Vec<(&str, u64)> = listed
            .iter()
            .filter(|o| record_seq(&o.name).is_some() && known.contains(&o.name))
            .map(|o| (o.name.as_str(), o.size))
            .collect();
        let damaged = self.damaged(&applied)?;
        for name in &damaged {
            let _ = self.bucket.put(&lost_name(name, FOUND_DAMAGED), host_name().into_bytes());
        }
        set_held_damaged(catalog.connection(), &damaged)?;
        Ok(damaged)
    }

    /// Those of the records [`Remote::damaged_among`] found damaged that still are, listed in `listed`: one
    /// back intact, or gone (a record gone from the bucket is reported as such), is forgotten.
    fn still_damaged(&self, catalog: &Catalog, listed: &[crate::backend::ObjectMeta]) -> Result<Vec<String>> {
        let held = held_damaged(catalog.connection())?;
        if held.is_empty() {
            return Ok(held);
        }
        let records: Vec<(&str, u64)> =
            listed.iter().filter(|o| held.contains(&o.name)).map(|o| (o.name.as_str(), o.size)).collect();
        let damaged = self.damaged(&records)?;
        if damaged != held {
            set_held_damaged(catalog.connection(), &damaged)?;
        }
        Ok(damaged)
    }

    /// The names among `records` whose object does not match its name or does not decode, or is gone.
    fn damaged(&self, records: &[(&str, u64)]) -> Result<Vec<String>> {
        let mut damaged = Vec::new();
        self.each_record(records, |name, batch| {
            if batch.is_none() {
                damaged.push(name.to_string());
            }
        })?;
        damaged.sort();
        Ok(damaged)
    }

    /// Reads `records` (name, size) and calls `f` with each one decoded, one at a time, or with `None` for one
    /// that does not match its name, does not decode, or is gone since it was listed.
    fn each_record(&self, records: &[(&str, u64)], mut f: impl FnMut(&str, Option<Batch>)) -> Result<()> {
        for (&(name, _), data) in self.fetched(records, |&(name, size)| (name, size)) {
            let batch = match data {
                Ok(data) if matches_its_name(name, &data) => crate::record::decode(&data).ok(),
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(self.err(name, e)),
            };
            f(name, batch);
        }
        Ok(())
    }

    /// Brings this copy's [`LOST`] markers in line with the records it applied that the bucket lost (`gone`,
    /// from `listed`: see [`Remote::own_markers`]). A marker of a record found damaged goes once a sync applied
    /// it (`applied_now`): it was put back intact. Returns the other copies' markers of records still missing.
    fn lost_markers(
        &self,
        listed: &[crate::backend::ObjectMeta],
        gone: &Gone,
        applied_now: &HashSet<&str>,
    ) -> Result<Vec<LostElsewhere>> {
        let markers = markers_in(listed);
        let mine = self.own_markers(&markers, &gone.applied)?;
        let records: HashSet<&str> = listed.iter().map(|o| o.name.as_str()).collect();
        // One found damaged before and applied now is back, intact.
        for (o, _, _) in markers.iter().filter(|(_, r, id)| *id == FOUND_DAMAGED && applied_now.contains(r.as_str())) {
            let _ = self.bucket.delete(&o.name);
        }
        let others: Vec<&Marker<'_>> = markers
            .iter()
            .filter(|(_, record, id)| Some(*id) != mine.as_deref() && !records.contains(record.as_str()))
            .collect();
        let mut elsewhere = Vec::new();
        for (&&(o, ref record, _), body) in self.fetched(&others, |m| (m.0.name.as_str(), m.0.size)) {
            let host = match body {
                Ok(body) => String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(255).collect(),
                // Removed since the listing: that machine accepted the loss.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.err(&o.name, e)),
            };
            let found_damaged = o.name.ends_with(FOUND_DAMAGED);
            elsewhere.push(LostElsewhere { marker: o.name.clone(), record: record.clone(), host, found_damaged });
        }
        Ok(elsewhere)
    }

    /// Writes a marker of this copy's for each record of `gone` (applied here, lost from the bucket) that
    /// `markers` lacks, and deletes those of its `markers` for any other record: accepted as lost, back in the
    /// bucket, or no longer applied here (a copy rebuilt from the bucket). Best effort, as for marks:
    /// credentials that may only read leave them unwritten. Returns this copy's id, if it has one.
    fn own_markers(&self, markers: &[Marker<'_>], gone: &[String]) -> Result<Option<String>> {
        let mine = match &self.cache {
            Some(dir) => replica(dir, !gone.is_empty())?,
            None => None,
        };
        if let Some(mine) = &mine {
            for record in gone {
                if !markers.iter().any(|(_, r, id)| r == record && id == mine) {
                    let name = lost_name(record, mine);
                    if self.bucket.put(&name, host_name().into_bytes()).is_err() {
                        break;
                    }
                }
            }
            for (o, _, _) in markers.iter().filter(|(_, r, id)| id == mine && !gone.contains(r)) {
                let _ = self.bucket.delete(&o.name);
            }
        }
        Ok(mine)
    }

    /// The entries of `packs` as the records that brought them list them (pack and moved-pack items): for a
    /// pack whose object is lost, the one list left of the chunks it held. Reads records until every pack is
    /// found, passing over any that is damaged; a pack no record names is left out.
    pub(crate) fn pack_entries_recorded(
        &self,
        packs: &[&str],
    ) -> Result<std::collections::HashMap<String, Vec<crate::pack::PackEntry>>> {
        let listed = self.bucket.list(RECORDS).map_err(|e| self.err(RECORDS, e))?;
        let records: Vec<(&str, u64)> =
            listed.iter().filter(|o| record_seq(&o.name).is_some()).map(|o| (o.name.as_str(), o.size)).collect();
        let mut wanted: HashSet<&str> = packs.iter().copied().collect();
        let mut found = std::collections::HashMap::new();
        for (&(name, _), data) in self.fetched(&records, |&(name, size)| (name, size)) {
            if wanted.is_empty() {
                break;
            }
            let data = data.map_err(|e| self.err(name, e))?;
            if !matches_its_name(name, &data) {
                continue;
            }
            let Ok(batch) = crate::record::decode(&data) else { continue };
            for (pack, _, entries) in batch.packs.into_iter().chain(batch.moved) {
                if wanted.remove(pack.as_str()) {
                    found.insert(pack, entries);
                }
            }
        }
        Ok(found)
    }

    /// Accepts that the records gone from the bucket are lost for good, so that GC, which deletes nothing
    /// while any is missing, goes on: this catalog stops looking for those it applied (it keeps what they
    /// changed, and its [`LOST`] markers go), and each sequence number left without a record gets an empty
    /// one. Every machine that applied a lost record must accept it so.
    ///
    /// A number without a record that this copy never applied, and that no other copy's marker claims, is
    /// refused unless `everywhere`: the machine that applied it may not have synced since the loss, and an
    /// accept here would let GC collect what that machine's checkpoints use (round 22 review). `everywhere`
    /// fills those numbers too and removes every other copy's markers, for a loss no machine left holds.
    /// Returns what was accepted, as [`SyncSummary::records_missing`] names it, and the checkpoints written to
    /// the bucket again (see [`crate::restate`]).
    pub(crate) fn accept_missing(
        &self,
        catalog: &mut Catalog,
        everywhere: bool,
    ) -> Result<(Vec<String>, crate::restate::Restated)> {
        let waiting = self.sync(catalog)?.records_waiting;
        let listed = self.bucket.list(RECORDS).map_err(|e| self.err(RECORDS, e))?;
        let names = || listed.iter().map(|o| o.name.as_str());
        let known = applied_records(catalog)?;
        let gone = Gone::find(names(), &known);
        let elsewhere = self.lost_markers(&listed, &gone, &HashSet::new())?;
        // Numbers this copy applied a record under, or another copy's marker claims (its GC block stays).
        let vouched: HashSet<u64> =
            gone.applied.iter().chain(elsewhere.iter().map(|l| &l.record)).filter_map(|n| record_seq(n)).collect();
        let rest: HashSet<String> = known.iter().filter(|n| !gone.applied.contains(n)).cloned().collect();
        let mut gaps = Gone::find(names(), &rest).gaps;
        // The newest records lost leave no gap below what the bucket lists, but this copy numbers its next
        // record after them: every other machine would then see a gap no marker vouches for. Filled too.
        let highest = names().chain(rest.iter().map(String::as_str)).filter_map(record_seq).max().unwrap_or(0);
        if let Some(top) = gone.applied.iter().filter_map(|n| record_seq(n)).max().filter(|&top| top > highest) {
            gaps.push((highest + 1, top));
        }
        let unvouched: Vec<u64> =
            gaps.iter().flat_map(|&(first, last)| first..=last).filter(|n| !vouched.contains(n)).take(11).collect();
        if !everywhere && !unvouched.is_empty() {
            let shown: Vec<String> = unvouched.iter().take(10).map(|n| format!("{RECORDS}{n:016x}-*")).collect();
            return Err(Error::InvalidInput(format!(
                "not accepted: no record with {} {}{}, which this machine never applied. The machine that applied \
                 one reports it as its own at its next command (any command syncs): accept it there. Accepted \
                 here, gc would collect what that machine's checkpoints use. If no machine that applied them is \
                 left, run `snapstore sync --accept-missing --everywhere`",
                if unvouched.len() == 1 { "the number" } else { "the numbers" },
                shown.join(", "),
                if unvouched.len() > 10 { " and more" } else { "" }
            )));
        }
        let mut accepted = gone.lines(&[]);
        // What the lost records added that only this copy holds goes back into the bucket first, in records
        // that only add: once the loss is accepted nothing holds other machines' GC back, and they would take
        // its packs for orphans (round 24 review, F5).
        let restated = match &self.cache {
            Some(dir) if !gone.applied.is_empty() => {
                crate::restate::restate(self, catalog, dir, &self.forgotten_by(&waiting)?)?
            }
            _ => Default::default(),
        };
        let tx = catalog.connection_mut().transaction()?;
        for name in &gone.applied {
            tx.execute("DELETE FROM remote_records WHERE name = ?1", [name])?;
        }
        // Without them, their numbers may be gaps too. Filled in the transaction that forgets the names: a
        // crash between the two would leave numbers this copy no longer vouches for.
        for &(first, last) in &gaps {
            for seq in first..=last {
                let (name, empty) = filler(seq)?;
                self.bucket.put(&name, empty).map_err(|e| self.err(&name, e))?;
                tx.execute("INSERT OR IGNORE INTO remote_records (name) VALUES (?1)", [&name])?;
            }
        }
        // A machine that applied a record found damaged speaks for it. Before the names go: once they have,
        // no later accept here would know to delete such a marker, which holds every GC back (round 24
        // review, F3); this copy's own markers hold GC back meanwhile.
        for name in &gone.applied {
            let marker = lost_name(name, FOUND_DAMAGED);
            self.bucket.delete(&marker).map_err(|e| self.err(&marker, e))?;
        }
        tx.commit()?;
        if everywhere {
            for l in &elsewhere {
                self.bucket.delete(&l.marker).map_err(|e| self.err(&l.marker, e))?;
                accepted.push(format!("{}: {}", l.record, l.by()));
            }
        }
        // This copy's own markers go with the names (best effort, as a sync's do).
        if let Some(mine) = self.cache.as_deref().map(|dir| replica(dir, false)).transpose()?.flatten() {
            for name in &gone.applied {
                let _ = self.bucket.delete(&lost_name(name, &mine));
            }
        }
        Ok((accepted, restated))
    }

    /// The checkpoints that `records` forget, read from the bucket (one damaged or gone since is passed
    /// over: it forgets nothing until it is back).
    fn forgotten_by(&self, records: &[String]) -> Result<HashSet<String>> {
        let sized: Vec<(&str, u64)> = records.iter().map(|n| (n.as_str(), 0)).collect();
        let mut forgotten = HashSet::new();
        self.each_record(&sized, |_, batch| forgotten.extend(batch.into_iter().flat_map(|b| b.forget)))?;
        Ok(forgotten)
    }

    /// Shares this machine's marks that the bucket does not have yet ([`DAMAGE`]). Best effort: a machine
    /// whose credentials may not write, or a failing request, leaves them for the next sync to share.
    pub(crate) fn share_marks(&self, catalog: &mut Catalog) {
        let Ok(marks) = crate::catalog::marks_with_packs(catalog.connection()) else { return };
        let unshared: Vec<(String, String)> = marks
            .into_iter()
            .map(|(chunk, pack)| (damage_name(&chunk, &pack), pack))
            .filter(|(name, _)| {
                let shared = catalog
                    .connection()
                    .query_row("SELECT 1 FROM remote_records WHERE name = ?1", [name], |_| Ok(()))
                    .optional();
                matches!(shared, Ok(None))
            })
            .collect();
        // 16 at a time: a pack lost makes hundreds of marks, and one request after another took seconds per
        // 40 MB of chunks (round 28 review, F3).
        for group in unshared.chunks(SHARE_AT_ONCE) {
            let put: Vec<bool> = std::thread::scope(|s| {
                let running: Vec<_> = group
                    .iter()
                    .map(|(name, pack)| s.spawn(move || self.bucket.put(name, pack.clone().into_bytes()).is_ok()))
                    .collect();
                running.into_iter().map(|t| t.join().unwrap_or(false)).collect()
            });
            // One transaction per group: a statement of its own waits for the disk each time.
            let noted = |conn: &rusqlite::Connection| -> rusqlite::Result<()> {
                let tx = conn.unchecked_transaction()?;
                for ((name, _), _) in group.iter().zip(&put).filter(|(_, ok)| **ok) {
                    tx.execute("INSERT OR IGNORE INTO remote_records (name) VALUES (?1)", [name])?;
                }
                tx.commit()
            };
            let _ = noted(catalog.connection());
            // One refusal (read-only credentials) or failure stops the rest: each would fail alike.
            if put.contains(&false) {
                return;
            }
        }
    }

    /// Deletes the shared objects of marks a read of their blobs disproved on this machine (`disproved`: chunk,
    /// pack): the copy there is sound, so no machine should apply the mark again. Best effort, as sharing is.
    pub(crate) fn withdraw_marks(&self, catalog: &Catalog, disproved: &[(ObjectId, String)]) {
        let names: Vec<String> = disproved.iter().map(|(chunk, pack)| damage_name(chunk, pack)).collect();
        let withdrawn: Vec<&String> = names.iter().take_while(|name| self.bucket.delete(name).is_ok()).collect();
        let _ = forget_objects(catalog.connection(), &withdrawn);
    }

    /// Of `orphans`, those a GC on this machine first saw at least `grace` ago ([`ORPHANS_SEEN`]), to delete.
    /// With `record` (the packs this run recorded dead and deletes next), the others are remembered as seen
    /// now, names no longer orphans forgotten, and those packs remembered as due at once: one left by a GC
    /// killed among its deletes is named by no record the next run has, yet no machine restores from it.
    /// Without a directory for the copy, none.
    pub(crate) fn orphans_due(&self, orphans: &[String], grace: Duration, record: Option<&[&str]>) -> Vec<String> {
        let Some(dir) = &self.cache else { return Vec::new() };
        let path = dir.join(ORPHANS_SEEN);
        let seen: std::collections::HashMap<String, i64> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').and_then(|(t, name)| Some((name.to_string(), t.parse().ok()?))))
            .collect();
        let now = now_ns();
        let grace = i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX);
        let first = |name: &String| seen.get(name).copied().unwrap_or(now);
        if let Some(dead) = record {
            let mut lines: String = orphans.iter().map(|name| format!("{} {name}\n", first(name))).collect();
            lines.extend(dead.iter().map(|name| format!("0 {name}\n")));
            let tmp = dir.join(format!("{ORPHANS_SEEN}.{}", std::process::id()));
            // Best effort: a list lost only makes the orphans wait a grace again.
            if std::fs::write(&tmp, lines).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
        orphans.iter().filter(|name| now.saturating_sub(first(name)) >= grace).cloned().collect()
    }

    /// The marks shared through the bucket ([`DAMAGE`]), as listed now.
    pub(crate) fn shared_marks(&self) -> Result<Vec<SharedMark>> {
        let listed = self.bucket.list(DAMAGE).map_err(|e| self.err(DAMAGE, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|o| {
                let (chunk, pack_hash) = damage_of(&o.name)?;
                let pack_hash = pack_hash.to_string();
                Some(SharedMark { name: o.name, chunk, pack_hash })
            })
            .collect())
    }

    /// Deletes the shared marks that no longer hold anywhere, by `catalog`, which synced under GC's sweep lock:
    /// the chunk is gone, or the pack the mark names is (GC's record of its death located every machine's row
    /// elsewhere, or dropped it), or GC published a sound copy as the chunk's place (`settled`). A pack that
    /// `catalog` still has may hold the row of a machine whose rows diverged from this one's without a record
    /// (two machines storing one chunk), so its marks stay otherwise: deleted because this machine's row is
    /// elsewhere, the mark was lost to a machine built afresh, whose GC then took the sound copy for unused.
    /// Returns how many were deleted.
    pub(crate) fn prune_marks(
        &self,
        backend: &dyn crate::backend::Backend,
        catalog: &rusqlite::Connection,
        marks: Vec<SharedMark>,
        settled: &HashSet<String>,
    ) -> Result<u64> {
        if marks.is_empty() {
            return Ok(0);
        }
        let packs: HashSet<String> = catalog
            .prepare("SELECT name FROM packs")?
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|name| name.map(|n| pack_hash(&n)))
            .collect::<rusqlite::Result<_>>()?;
        let mut gone = Vec::new();
        for m in marks {
            let chunk_known = catalog
                .query_row("SELECT 1 FROM chunks WHERE id = ?1", [&m.chunk.0[..]], |_| Ok(()))
                .optional()?
                .is_some();
            if !chunk_known || !packs.contains(&m.pack_hash) || settled.contains(&m.name) {
                gone.push(m.name);
            }
        }
        // 16 at a time, as GC deletes packs: each is a request, made under the sweep lock.
        let mut pruned = Vec::new();
        let mut failed = None;
        for (name, deleted) in crate::backend::overlapped(backend, &gone, |name| self.bucket.delete(name)) {
            match deleted {
                Ok(()) => pruned.push(name),
                Err(e) => {
                    failed = Some(self.err(name, e));
                    break;
                }
            }
        }
        forget_objects(catalog, &pruned)?;
        failed.map_or(Ok(pruned.len() as u64), Err)
    }

    /// Registers a commit (or a reader of packs) in the bucket, after any sweep under way has ended. The
    /// caller syncs next, so that whatever that sweep deleted is gone from its catalog before it relies on
    /// anything there.
    /// `notice` is told once, if the sweep is waited for.
    ///
    /// A reader (`reading`) whose credentials may not write to the bucket (a machine given read-only keys to
    /// restore) reads without a session, after telling `notice` so: a GC on another machine may then delete a
    /// pack it reads, after moving the chunks elsewhere, and the read fails as damaged; run again, it reads
    /// them where they moved. It also leaves a dead GC's sweep lock for others to clear.
    pub fn begin_session(&self, reading: bool, notice: &dyn Fn(&str)) -> Result<RemoteSession> {
        let holder = Holder::me();
        let name = format!("{SESSIONS}{}", holder.token);
        let session = match self.bucket.put(&name, holder.encode()) {
            Ok(()) => {
                let beat = Some(Heartbeat::start(self.bucket.clone(), name.clone(), holder));
                RemoteSession { beat, name: Some(name), bucket: self.bucket.clone() }
            }
            Err(e) if reading && e.kind() == std::io::ErrorKind::PermissionDenied => {
                notice(&format!(
                    "reading without a session: these credentials may not write to {} (its session object was \
                     refused); a gc running on another machine meanwhile can make this read fail as damaged, and \
                     running it again then succeeds",
                    self.bucket.url()
                ));
                RemoteSession { beat: None, name: None, bucket: self.bucket.clone() }
            }
            Err(e) => return Err(self.err(&name, e)),
        };
        // The session is visible before the lock is read: a GC that takes the lock after this read sees the
        // session and defers its sweep; one that took it before is waited for.
        let wait = match std::env::var("SNAPSTORE_SWEEP_WAIT") {
            Err(_) => SWEEP_WAIT,
            Ok(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
                Error::InvalidInput(format!("SNAPSTORE_SWEEP_WAIT={v:?}: give a whole number of seconds"))
            })?),
        };
        let started = Instant::now();
        let mut told = false;
        while let Some(Held { holder: lock, modified_ns, .. }) = self.holder(SWEEP_LOCK)? {
            // A GC killed while it held the lock would otherwise stop every commit and restore; its lock
            // stops being refreshed, and the first to see that removes it (the GC, if only stalled, finds
            // its lock gone before it deletes anything more).
            // (Telling a holder on another host dead writes a probe, which a reader without a session may not.)
            if session.name.is_some() && self.dead(&lock, modified_ns, LOCK_STALE)? {
                self.bucket.delete(SWEEP_LOCK).map_err(|e| self.err(SWEEP_LOCK, e))?;
                continue;
            }
            // A reader without a session may not remove the lock, but already reads at the risk of a GC (a
            // failed read, right when run again): a dead holder's lock would otherwise keep a restore-only node
            // from restoring until a machine that may write runs a command (round 22 review, x04). Without
            // the server's clock (a probe is a write) the holder's age is judged by this machine's, with twice
            // the margin.
            if session.name.is_none() && dead_to_a_reader(&lock, modified_ns) {
                notice(&format!(
                    "reading beside {SWEEP_LOCK} of a gc on {} (pid {}) that is gone: these credentials may not \
                     remove it; the next command of a machine that may write does",
                    lock.host, lock.pid
                ));
                break;
            }
            if started.elapsed() > wait {
                drop(session);
                return Err(lock.sweep_running(wait));
            }
            if !std::mem::replace(&mut told, true) {
                notice(&format!(
                    "waiting for a gc on {} (pid {}, since {}) to finish deleting from the bucket: up to {} s \
                     (SNAPSTORE_SWEEP_WAIT)",
                    lock.host,
                    lock.pid,
                    crate::checkpoint::format_utc(lock.started_ns),
                    wait.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(session)
    }

    /// Fails if GC took this session for dead (it may have swept what the commit relies on).
    pub fn check_session(&self, s: &RemoteSession) -> Result<()> {
        let Some(name) = &s.name else { return Err(Error::SessionExpired) };
        if s.beat.as_ref().is_some_and(|b| b.lost()) || self.bucket.head(name).map_err(|e| self.err(name, e))?.is_none()
        {
            return Err(Error::SessionExpired);
        }
        Ok(())
    }

    /// The sessions alive in the bucket; dead ones are deleted. Returns (expired, alive holders).
    pub fn sessions(&self, stale_after: Duration) -> Result<(u64, Vec<Holder>)> {
        self.sessions_removing(stale_after, true)
    }

    /// [`Remote::sessions`], deleting the dead ones' objects only if `remove` (not for a dry run).
    pub fn sessions_removing(&self, stale_after: Duration, remove: bool) -> Result<(u64, Vec<Holder>)> {
        let mut alive = Vec::new();
        let mut expired = 0;
        for o in self.bucket.list(SESSIONS).map_err(|e| self.err(SESSIONS, e))? {
            let Some(Held { holder: h, modified_ns, .. }) = self.holder(&o.name)? else { continue };
            if self.dead(&h, modified_ns, stale_after)? {
                if remove {
                    self.bucket.delete(&o.name).map_err(|e| self.err(&o.name, e))?;
                }
                expired += 1;
            } else {
                alive.push(h);
            }
        }
        Ok((expired, alive))
    }

    /// Whether a holder is gone: one of this boot and pid namespace, by its process; one of an earlier boot of
    /// this machine, gone ([`crate::catalog::whose`]); any other (another host, or one that only shares this
    /// host's name), by no heartbeat for `stale` by the server's clock (its objects' modification times), so
    /// that no two machines' clocks are compared.
    fn dead(&self, h: &Holder, modified_ns: i64, stale: Duration) -> Result<bool> {
        if let Some(dead) = crate::gc::dead_here((&h.host, h.pid, &h.process, &h.pidns), h.heartbeat_ns, &host_name()) {
            return Ok(dead);
        }
        let stale_ns = i64::try_from(stale.as_nanos()).unwrap_or(i64::MAX);
        Ok(self.server_now()?.saturating_sub(modified_ns) > stale_ns)
    }

    /// The server's clock: the modification time of an object written now.
    fn server_now(&self) -> Result<i64> {
        let probe = format!("locks/clock-{}", token());
        self.bucket.put(&probe, Vec::new()).map_err(|e| self.err(&probe, e))?;
        let meta = self.bucket.head(&probe).map_err(|e| self.err(&probe, e))?;
        let _ = self.bucket.delete(&probe);
        meta.map(|m| m.modified_ns).ok_or_else(|| Error::Internal(format!("{probe} vanished")))
    }

    /// A session's or lock's holder as the bucket has it now.
    fn holder(&self, name: &str) -> Result<Option<Held>> {
        let Some(read) = self.bucket.get_versioned(name).map_err(|e| self.err(name, e))? else { return Ok(None) };
        let holder = serde_json::from_slice(&read.body).unwrap_or_else(|_| Holder {
            // Unreadable: judged by its age alone, as from another host.
            host: "?".into(),
            pid: 0,
            process: String::new(),
            pidns: String::new(),
            token: String::new(),
            started_ns: 0,
            heartbeat_ns: 0,
        });
        Ok(Some(Held { holder, modified_ns: read.modified_ns, e_tag: read.e_tag }))
    }

    /// Takes GC's lock `name` with a conditional create, taking over one whose holder is dead; fails with
    /// [`Error::GcRunning`] if another process holds it.
    pub fn lock(&self, name: &str) -> Result<Lock> {
        self.try_lock(name)?.map_err(Holder::gc_running)
    }

    /// Takes the lock that forgets hold from their sync to their record ([`FORGET_LOCK`]), waiting up to
    /// [`FORGET_WAIT`] for another forget to end.
    /// `notice` is told once, when the wait starts.
    pub fn forget_lock(&self, notice: &dyn Fn(&str)) -> Result<Lock> {
        let started = Instant::now();
        let mut told = false;
        loop {
            match self.try_lock(FORGET_LOCK)? {
                Ok(lock) => return Ok(lock),
                Err(h) if started.elapsed() > FORGET_WAIT => {
                    return Err(h.forget_running());
                }
                Err(h) => {
                    if !std::mem::replace(&mut told, true) {
                        notice(&format!(
                            "waiting for a forget, retention run or tag change on {} (pid {}, since {}) to finish \
                             with the bucket: up to {} s",
                            h.host,
                            h.pid,
                            crate::checkpoint::format_utc(h.started_ns),
                            FORGET_WAIT.as_secs()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(250))
                }
            }
        }
    }

    /// Takes lock `name` with a conditional create, taking over one whose holder is dead; `Err` names the
    /// live holder.
    ///
    /// A dead holder's lock is replaced only while it is the version judged dead (`If-Match`), so of two
    /// takers who judged it so, one wins and the other finds the winner's lock alive. Where the server has no
    /// conditional writes, see [`Remote::take_over`].
    fn try_lock(&self, name: &str) -> Result<std::result::Result<Lock, Holder>> {
        let me = Holder::me();
        for _ in 0..3 {
            let created = self.bucket.create(name, me.encode()).map_err(|e| self.err(name, e))?;
            let (taken, pause) = match self.holder(name)? {
                _ if created => (true, 0),
                // A create retried after a lost response reports the object as existing: it may be ours.
                Some(f) if f.holder.token == me.token => (true, 1000),
                Some(f) if !self.dead(&f.holder, f.modified_ns, LOCK_STALE)? => return Ok(Err(f.holder)),
                Some(dead) => self.take_over(name, &me, &dead)?.map_or((false, 0), |pause| (true, pause)),
                None => (false, 0),
            };
            if taken {
                std::thread::sleep(Duration::from_millis(pause));
                if self.holder(name)?.is_some_and(|f| f.holder.token == me.token) {
                    let beat = Some(Heartbeat::start(self.bucket.clone(), name.to_string(), me.clone()));
                    let remote = Remote { bucket: self.bucket.clone(), cache: None };
                    return Ok(Ok(Lock { name: name.to_string(), token: me.token, beat, remote }));
                }
            }
        }
        // Taken by another process between our reads and our writes, every time.
        Ok(Err(Holder { host: "another machine".into(), pid: 0, started_ns: now_ns(), ..Holder::me() }))
    }

    /// Replaces lock `name`, read as `dead`, with `me`'s. `None` if another taker was first; else how long to
    /// wait (ms) before reading the lock back to confirm it.
    ///
    /// Without conditional writes the dead lock is deleted and created afresh, and a second taker that read
    /// the dead holder too can delete this one's lock and create its own: the pause lets that happen before
    /// the read-back, so that only the later taker keeps the lock, unless it stalled for longer than the
    /// pause between its read and its delete.
    fn take_over(&self, name: &str, me: &Holder, dead: &Held) -> Result<Option<u64>> {
        match self.bucket.replace(name, me.encode(), dead.e_tag.as_deref()).map_err(|e| self.err(name, e))? {
            Replaced::Done => Ok(Some(0)),
            Replaced::Changed => Ok(None),
            Replaced::Unsupported => {
                self.bucket.delete(name).map_err(|e| self.err(name, e))?;
                let created = self.bucket.create(name, me.encode()).map_err(|e| self.err(name, e))?;
                Ok(created.then_some(1000))
            }
        }
    }

    /// Fails unless `lock` is still ours: a holder that stopped refreshing it for [`LOCK_STALE`] may have been
    /// taken over.
    pub fn check_lock(&self, lock: &Lock) -> Result<()> {
        match self.holder(&lock.name)? {
            Some(f) if f.holder.token == lock.token && !lock.beat.as_ref().is_some_and(|b| b.lost()) => Ok(()),
            _ => Err(Error::LockLost(lock.name.clone())),
        }
    }
}

/// Refreshes a session or lock object every [`HEARTBEAT_EVERY`] on a thread of its own, for as long as the
/// operation holding it runs, however long it goes without writing anything else.
struct Heartbeat {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(bucket: Arc<Bucket>, name: String, holder: Holder) -> Heartbeat {
        Self::every(HEARTBEAT_EVERY, bucket, name, holder)
    }

    fn every(interval: Duration, bucket: Arc<Bucket>, name: String, mut holder: Holder) -> Heartbeat {
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, l) = (stop.clone(), lost.clone());
        let thread = std::thread::spawn(move || {
            let (flag, cv) = &*s;
            let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
            let mut conditional = true;
            loop {
                // The flag is read before waiting as well: a holder dropped before this thread first waited
                // would otherwise have its drop wait out a whole interval.
                let waited = cv.wait_timeout_while(stopped, interval, |stop| !*stop);
                let timeout;
                (stopped, timeout) = waited.unwrap_or_else(|e| e.into_inner());
                if !timeout.timed_out() {
                    return;
                }
                if !refresh(&bucket, &name, &mut holder, &mut conditional, |_| {}) {
                    l.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
        });
        Heartbeat { stop, lost, thread: Some(thread) }
    }

    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// One heartbeat of `holder`'s object `name`; `false` once the object is no longer `holder`'s. `between` runs
/// after the read and before the write, given what is to be written (for tests).
///
/// Gone (GC took the holder for dead), or a lock taken over by another holder after this process stalled:
/// putting ours back would hide that, and take the lock from its new holder, whose check would then fail
/// while ours passed. The write is conditional on the version read still being there, so a takeover between
/// the read and the write is seen too; on a server without conditional writes (`conditional` is then cleared
/// for the next beats) it is a plain write, and that window of milliseconds stays open.
fn refresh(
    bucket: &Bucket,
    name: &str,
    holder: &mut Holder,
    conditional: &mut bool,
    between: impl FnOnce(&Holder),
) -> bool {
    let ours = |body: &[u8]| serde_json::from_slice::<Holder>(body).is_ok_and(|h| h.token == holder.token);
    let read = match bucket.get_versioned(name) {
        Ok(Some(read)) if ours(&read.body) => read,
        Ok(_) => return false,
        // A transient failure: the next beat tries again, well within the staleness limit.
        Err(_) => return true,
    };
    holder.heartbeat_ns = now_ns();
    between(holder);
    let written = match bucket.replace(name, holder.encode(), read.e_tag.as_deref().filter(|_| *conditional)) {
        Ok(Replaced::Unsupported) => {
            *conditional = false;
            bucket.put(name, holder.encode()).map(|()| Replaced::Done)
        }
        r => r,
    };
    !matches!(written, Ok(Replaced::Changed))
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A lock object held in the bucket, released when dropped.
pub(crate) struct Lock {
    name: String,
    token: String,
    beat: Option<Heartbeat>,
    remote: Remote,
}

impl Drop for Lock {
    /// Deletes the lock object if it is still ours. Best effort: one left behind goes stale after
    /// [`LOCK_STALE`].
    fn drop(&mut self) {
        drop(self.beat.take());
        if matches!(self.remote.holder(&self.name), Ok(Some(f)) if f.holder.token == self.token) {
            let _ = self.remote.bucket.delete(&self.name);
        }
    }
}

/// Whether a reader that may not write (so may not probe the server's clock) takes a lock's holder for dead:
/// on this machine, its process is gone; elsewhere, its lock was last refreshed over twice [`LOCK_STALE`]
/// ago by this machine's clock, the margin standing for clocks that disagree.
fn dead_to_a_reader(h: &Holder, modified_ns: i64) -> bool {
    if let Some(dead) = crate::gc::dead_here((&h.host, h.pid, &h.process, &h.pidns), h.heartbeat_ns, &host_name()) {
        return dead;
    }
    let stale_ns = i64::try_from(2 * LOCK_STALE.as_nanos()).unwrap_or(i64::MAX);
    now_ns().saturating_sub(modified_ns) > stale_ns
}

/// Where the local working copy of a remote repository's catalog lives: `SNAPSTORE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/snapstore`, else `~/.cache/snapstore`; one directory per bucket URL.
pub(crate) fn cache_dir(url: &str) -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = env("SNAPSTORE_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("snapstore")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/snapstore")))
        .ok_or_else(|| {
            Error::InvalidInput("set SNAPSTORE_CACHE_DIR (or HOME) for the local copy of the catalog".into())
        })?;
    let bucket: String = url
        .trim_start_matches("s3://")
        .chars()
        .take_while(|c| *c != '/')
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    Ok(base.join(format!("{bucket}-{}", &ObjectId::of(url.as_bytes()).to_hex()[..16])))
}

/// The repository id recorded in a local copy, if any.
pub(crate) fn local_repo_id(conn: &rusqlite::Connection) -> Result<Option<String>> {
    crate::catalog::meta_value(conn, "remote_repo_id")
}

/// Whether a migration marked this local copy to be built again from the bucket (see migration 9).
pub(crate) fn rebuild_pending(conn: &rusqlite::Connection) -> Result<bool> {
    Ok(crate::catalog::meta_value(conn, "rebuild_pending")?.is_some())
}

/// Where a build before the twenty-fifth session marked a copy that met a record late, which a sync now
/// decides afresh each time: a rebuild that failed left the mark, and every command failed with it (round 25
/// review, R1). Removed.
pub(crate) fn clear_late_mark(conn: &rusqlite::Connection) -> Result<()> {
    conn.execute("DELETE FROM meta WHERE key = 'rebuild_pending' AND value = 'put back'", [])?;
    Ok(())
}

/// The `meta` key set while this copy may place chunks in packs a GC deleted in a record it never applied:
/// [`crate::gc::mark_missing_packs`] before the next write here.
pub(crate) const PACKS_UNCHECKED: &str = "packs_unchecked";

/// The `meta` key naming, a line each, the records this copy applied that a sync found damaged in the bucket
/// while a late record was to rebuild it ([`Remote::sync`]).
const HELD_DAMAGED: &str = "held_damaged_records";

fn held_damaged(conn: &rusqlite::Connection) -> Result<Vec<String>> {
    let value = crate::catalog::meta_value(conn, HELD_DAMAGED)?.unwrap_or_default();
    Ok(value.lines().map(str::to_string).collect())
}

fn set_held_damaged(conn: &rusqlite::Connection, names: &[String]) -> Result<()> {
    if names.is_empty() {
        conn.execute("DELETE FROM meta WHERE key = ?1", [HELD_DAMAGED])?;
    } else {
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", [HELD_DAMAGED, &names.join("\n")])?;
    }
    Ok(())
}

pub(crate) fn set_local_repo_id(conn: &rusqlite::Connection, id: &str) -> Result<()> {
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('remote_repo_id', ?1)", [id])?;
    Ok(())
}

/// Deletes a local copy of a catalog (it is rebuilt from the bucket).
pub(crate) fn discard_copy(root: &std::path::Path) -> Result<()> {
    for f in COPY_FILES {
        match std::fs::remove_file(root.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(root.join(f), e)),
            _ => {}
        }
    }
    Ok(())
}

/// The files of this machine's copy of the catalog.
const COPY_FILES: [&str; 3] = [crate::CATALOG_FILE, "catalog.db-wal", "catalog.db-shm"];

/// Moves this machine's copy of the catalog aside (`*.previous`), for [`restore_copy`] to bring back should
/// building a new one fail: a rebuild that cannot finish (a damaged record) must not leave a machine that
/// worked without any copy. A copy set aside by an earlier rebuild that did not end is replaced.
pub(crate) fn set_aside_copy(root: &std::path::Path) -> Result<()> {
    for f in COPY_FILES {
        let (from, to) = (root.join(f), root.join(format!("{f}.previous")));
        match std::fs::rename(&from, &to) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_file(&to);
            }
            Err(e) => return Err(Error::io(from, e)),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Puts back the copy [`set_aside_copy`] moved aside (`keep`), over whatever was built since, or drops it.
pub(crate) fn restore_copy(root: &std::path::Path, keep: bool) -> Result<()> {
    if keep {
        discard_copy(root)?;
    }
    for f in COPY_FILES {
        let (aside, back) = (root.join(format!("{f}.previous")), root.join(f));
        let done = if keep { std::fs::rename(&aside, &back) } else { std::fs::remove_file(&aside) };
        match done {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(aside, e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(all(test, feature = "s3"))]
mod tests {
    use super::*;

    fn test_bucket() -> Option<Arc<Bucket>> {
        crate::backend::test_bucket().map(Arc::new)
    }

    #[test]
    fn fetch_groups_keep_order_and_bound_count_and_bytes() {
        let sizes: Vec<u64> = [vec![1; 40], vec![10 << 20, 10 << 20, 40 << 20, 1]].concat();
        let groups: Vec<Vec<u64>> = fetch_groups(&sizes, |&s| s).map(<[u64]>::to_vec).collect();
        let lens: Vec<usize> = groups.iter().map(Vec::len).collect();
        // 16 small ones a group; then the two of 10 MiB apart, and the one over the bound alone.
        assert_eq!(lens, [16, 16, 9, 1, 1, 1]);
        assert_eq!(groups.concat(), sizes, "every item once, in order");
        assert_eq!(fetch_groups(&[] as &[u64], |&s| s).count(), 0);
    }

    fn token_at(bucket: &Bucket, name: &str) -> String {
        serde_json::from_slice::<Holder>(&bucket.get(name).unwrap()).unwrap().token
    }

    /// A holder whose lock another took over (after it stalled past the staleness limit) stops beating and
    /// knows it lost the lock; it never writes itself back over the new holder.
    #[test]
    fn a_heartbeat_never_takes_back_a_lock_another_holder_took_over() {
        let Some(bucket) = test_bucket() else { return };
        let (old, new) = (Holder::me(), Holder::me());
        bucket.put("locks/gc", old.encode()).unwrap();
        let beat = Heartbeat::every(Duration::from_millis(50), bucket.clone(), "locks/gc".into(), old.clone());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!beat.lost());
        assert_eq!(token_at(&bucket, "locks/gc"), old.token);
        bucket.put("locks/gc", new.encode()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(beat.lost());
        assert_eq!(token_at(&bucket, "locks/gc"), new.token, "the new holder keeps the lock");
        // Deleted outright (a session GC expired): lost as well, and not put back.
        bucket.put("sessions/x", old.encode()).unwrap();
        let beat = Heartbeat::every(Duration::from_millis(50), bucket.clone(), "sessions/x".into(), old);
        bucket.delete("sessions/x").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(beat.lost());
        assert!(bucket.head("sessions/x").unwrap().is_none());
    }

    /// A takeover that lands between a heartbeat's read and its write: the write is refused, the heartbeat
    /// reports the lock lost, and the new holder keeps it.
    #[test]
    fn a_heartbeat_sees_a_takeover_between_its_read_and_its_write() {
        let Some(bucket) = test_bucket() else { return };
        let (mut old, new) = (Holder::me(), Holder::me());
        bucket.put("locks/gc", old.encode()).unwrap();
        let mut conditional = true;
        assert!(refresh(&bucket, "locks/gc", &mut old, &mut conditional, |_| {}));
        assert_eq!(token_at(&bucket, "locks/gc"), old.token);
        // The beat's own write landed but its answer was lost, and the retry is refused: still held.
        let landed = |h: &Holder| bucket.put("locks/gc", h.encode()).unwrap();
        assert!(refresh(&bucket, "locks/gc", &mut old, &mut conditional, landed));
        let took_over = |_: &Holder| bucket.put("locks/gc", new.encode()).unwrap();
        assert!(!refresh(&bucket, "locks/gc", &mut old, &mut conditional, took_over));
        assert_eq!(token_at(&bucket, "locks/gc"), new.token, "the new holder keeps the lock");
        assert!(conditional, "the server does conditional writes: no fallback");
        // Deleted between the read and the write (a session GC expired): lost, and not put back.
        bucket.put("sessions/y", old.encode()).unwrap();
        let expired = |_: &Holder| bucket.delete("sessions/y").unwrap();
        assert!(!refresh(&bucket, "sessions/y", &mut old, &mut conditional, expired));
        assert!(bucket.head("sessions/y").unwrap().is_none());
    }

    /// Two processes that read the same dead holder and then both take its lock over: the second finds it
    /// taken, and the first keeps it.
    #[test]
    fn a_dead_lock_taken_over_twice_goes_to_the_first_taker_only() {
        let Some(bucket) = test_bucket() else { return };
        let remote = Remote { bucket: bucket.clone(), cache: None };
        let (first, second) = (Holder::me(), Holder::me());
        bucket.put(GC_LOCK, dead_holder().encode()).unwrap();
        let read = remote.holder(GC_LOCK).unwrap().unwrap();
        assert!(remote.dead(&read.holder, read.modified_ns, LOCK_STALE).unwrap());
        assert_eq!(remote.take_over(GC_LOCK, &first, &read).unwrap(), Some(0));
        assert_eq!(remote.take_over(GC_LOCK, &second, &read).unwrap(), None, "both takers would hold the lock");
        assert_eq!(token_at(&bucket, GC_LOCK), first.token);
    }

    /// Of this boot and pid namespace, but not this process: dead by its process, at once.
    fn dead_holder() -> Holder {
        let me = Holder::me();
        let boot = me.process.split_once('/').map(|(b, _)| b.to_string()).unwrap_or_default();
        Holder { process: format!("{boot}/1"), ..me }
    }

    /// Two processes that both find a lock's holder dead and take it over at the same moment: exactly one of
    /// them gets the lock, every time.
    #[test]
    fn two_takers_of_a_dead_lock_never_both_get_it() {
        let Some(bucket) = test_bucket() else { return };
        let remote = Remote { bucket: bucket.clone(), cache: None };
        let dead = dead_holder();
        for round in 0..12 {
            bucket.put(GC_LOCK, dead.encode()).unwrap();
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<_> = std::thread::scope(|s| {
                let takers: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let got = remote.try_lock(GC_LOCK).unwrap();
                            // Both decide before either lock is released.
                            barrier.wait();
                            got.map(|lock| lock.token.clone())
                        })
                    })
                    .collect();
                takers.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            assert!(bucket.head(GC_LOCK).unwrap().is_none(), "the winner's lock is released when dropped");
        }
    }
}

/// Tests that need no S3 server.
#[cfg(test)]
mod listing_tests {
    use super::*;

    fn name(seq: u64, hash: &str) -> String {
        format!("{RECORDS}{seq:016x}-{hash}")
    }

    fn records_gone<'a>(listed: impl Iterator<Item = &'a str>, applied: &HashSet<String>) -> Vec<String> {
        Gone::find(listed, applied).lines(&[])
    }

    /// A marker of a lost record names the record and the copy that lost it, and is neither a record nor a
    /// gap; names that only look like one are not taken for one.
    #[test]
    fn lost_markers_name_their_record_and_copy_and_are_no_records() {
        let record = name(0x2a, "0123456789abcdef0123456789abcdef");
        let marker = lost_name(&record, "00ff00ff00ff00ff");
        assert_eq!(marker, format!("{LOST}000000000000002a-0123456789abcdef0123456789abcdef-00ff00ff00ff00ff"));
        assert_eq!(lost_of(&marker), Some((record.clone(), "00ff00ff00ff00ff")));
        assert_eq!(record_seq(&marker), None);
        assert_eq!(lost_of("records/lost-zz-00ff"), None);
        assert_eq!(lost_of(&format!("{LOST}000000000000002a-00ff")), None, "no record name before the copy");
        assert_eq!(lost_of(&record), None);
        let applied: HashSet<String> = [name(1, "a")].into_iter().collect();
        assert!(records_gone([name(1, "a"), marker].iter().map(String::as_str), &applied).is_empty());
    }

    /// A copy's id is made once and kept (a rebuilt copy must find the markers it wrote before); a damaged
    /// file is replaced.
    #[test]
    fn a_copys_replica_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(replica(dir.path(), false).unwrap(), None);
        let id = replica(dir.path(), true).unwrap().unwrap();
        assert_eq!(id.len(), 16);
        assert_eq!(replica(dir.path(), false).unwrap(), Some(id.clone()));
        assert_eq!(replica(dir.path(), true).unwrap(), Some(id.clone()));
        std::fs::write(dir.path().join(REPLICA_FILE), "garbage").unwrap();
        assert_eq!(replica(dir.path(), false).unwrap(), None);
        assert_ne!(replica(dir.path(), true).unwrap(), Some(id));
    }

    /// A bucket whose every number up to the highest has a record, whatever this copy applied, is whole;
    /// a record applied here and gone is named, and numbers with no record anywhere are named as runs.
    #[test]
    fn records_gone_names_deleted_records_and_runs_of_missing_numbers() {
        let listed = [name(1, "a"), name(2, "b"), name(2, "c"), name(3, "d"), "records/README".into()];
        let applied: HashSet<String> = [name(1, "a"), name(2, "b")].into_iter().collect();
        assert!(records_gone(listed.iter().map(String::as_str), &applied).is_empty());
        assert!(records_gone(listed.iter().map(String::as_str), &HashSet::new()).is_empty());

        // Record 2-b was applied here and deleted; 4 and 6 to 8 were deleted before anyone here applied them.
        let listed = [name(1, "a"), name(2, "c"), name(3, "d"), name(5, "e"), name(9, "f")];
        let gone = records_gone(listed.iter().map(String::as_str), &applied);
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(gone[0].starts_with(&format!("{}: applied by this machine", name(2, "b"))), "{gone:?}");
        assert!(gone[1].starts_with(&format!("{}: no record with this number", name(4, "*"))), "{gone:?}");
        assert!(gone[2].starts_with(&format!("{} to {}: no record with these 3 numbers", name(6, "*"), name(8, "*"))));

        // Shared marks are no records: neither gone when pruned nor gaps.
        let mark = damage_name(&ObjectId::of(b"c"), "packs/00/p.pack");
        let applied: HashSet<String> = [name(1, "a"), mark.clone()].into_iter().collect();
        assert!(records_gone([name(1, "a")].iter().map(String::as_str), &applied).is_empty());
        assert_eq!(damage_of(&mark).map(|(c, _)| c), Some(ObjectId::of(b"c")));
        assert_eq!(damage_of("records/damage-00-11"), None);

        // The newest records gone, this copy having applied them: named, and the numbers before them are there.
        let applied: HashSet<String> = [name(1, "a"), name(2, "b"), name(3, "c")].into_iter().collect();
        let gone = records_gone([name(1, "a")].iter().map(String::as_str), &applied);
        assert_eq!(gone.len(), 2, "{gone:?}");
        assert!(gone.iter().all(|g| g.contains("applied by this machine")), "{gone:?}");
    }
}
