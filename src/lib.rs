//! snapstore: a checkpoint store.
//!
//! A checkpoint is the saved state of a program or system at one point in time. snapstore stores each one as
//! content-defined chunks (FastCDC), named by their BLAKE3 hash and compressed with zstd, so that a new
//! checkpoint costs only what changed since the last. A SQLite catalog records every checkpoint, its tree and
//! each file's chunks; packs of chunks sit behind a small storage [`Backend`].
//!
//! ```
//! use snapstore::{CheckoutOptions, CommitOptions, Repository};
//! # fn main() -> snapstore::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("state.bin"), b"step 1000: weights...").unwrap();
//!
//! let repo = Repository::init(dir.path().join("repo"))?;
//! let opts = CommitOptions { message: "after step 1000".into(), ..Default::default() };
//! let summary = repo.commit(dir.path().join("state.bin"), &opts)?;
//!
//! repo.checkout(&summary.id[..8], dir.path().join("restored.bin"), &CheckoutOptions::default())?;
//! assert_eq!(std::fs::read(dir.path().join("restored.bin")).unwrap(), b"step 1000: weights...");
//! # Ok(()) }
//! ```
#![deny(missing_docs, unsafe_code)]

mod aligned;
pub mod backend;
mod catalog;
mod checkout;
mod checkpoint;
mod checkpointer;
mod chunker;
mod commit;
mod content;
mod copylock;
mod diff;
mod dirfd;
mod error;
pub mod fault;
mod fileclock;
mod gc;
mod group;
mod grouping;
mod id;
mod inflight;
mod pack;
mod params;
mod progress;
mod reach;
mod reader;
pub mod readonly;
mod record;
mod region;
mod remote;
mod repair;
mod restate;
mod retention;
mod runs;
mod sparse;
mod store;
mod tally;
#[cfg(test)]
mod testutil;
mod tree;
mod verify;
mod watch;
mod xattrs;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use backend::{Backend, LocalBackend, MemoryBackend};
pub use catalog::{Catalog, CatalogStats, ChunkLocation, SCHEMA_VERSION};
pub use checkout::{CheckoutOptions, CheckoutSummary};
pub use checkpoint::{Checkpoint, SHORT_ID_LEN, format_rfc3339, format_utc};
pub use checkpointer::{Checkpointer, CheckpointerOptions, Persisted, Restored, Schedule};
pub use chunker::Chunker;
pub use commit::{CommitOptions, CommitSummary, SPECIAL, VANISHED, path_key, validate_stream_name};
pub use diff::{Change, ChangeKind, DiffSummary};
pub use error::{Error, Result};
pub use gc::{GcOptions, GcSummary};
pub use group::{Group, GroupPart};
pub use id::ObjectId;
pub use pack::{PackEntry, read_index as read_pack_index};
pub use params::{FORMAT_VERSION, RepoParams};
pub use progress::{NoProgress, Progress};
pub use reader::FileReader;
pub use remote::SyncSummary;
pub use repair::{CheckpointState, RepairReport};
pub use retention::{Decision, Plan, Policy, UNLIMITED, parse_count, parse_duration};
pub use tree::{Entry, EntryKind, Owner, Xattr, decode_tree, encode_tree, tree_id, validate_name};
pub use verify::{
    AffectedCheckpoint, AffectedFile, DamagedChunk, DamagedObject, DamagedPack, DataSubset, VerifyOptions, VerifyReport,
};
pub use watch::{WatchEvent, WatchOptions, parse_interval};

/// File name of the catalog inside a repository directory.
pub const CATALOG_FILE: &str = "catalog.db";

/// A snapstore repository: a directory holding the catalog and the packs, or an S3 bucket prefix
/// (`s3://BUCKET/PREFIX`) holding the packs and the catalog's records, with a local working copy of the catalog.
pub struct Repository {
    root: PathBuf,
    catalog_path: PathBuf,
    backend: Arc<dyn Backend>,
    params: RepoParams,
    remote: Option<Arc<remote::Remote>>,
    /// Opened for reading only (on a read-only mount, or another user's): the catalog as it was when opened,
    /// which every later open must still find.
    read_only: Option<readonly::Fingerprint>,
    /// The owner of a repository of another user's on a writable disk, to which every change is refused.
    owner: Option<u32>,
    /// Told what a command on a bucket wants its user to know as it runs ([`Repository::on_notice`]).
    on_notice: Option<Arc<Notice>>,
}

/// What [`Repository::on_notice`] is given.
type Notice = dyn Fn(&str) + Send + Sync;

/// The error for `sync` asked of a local repository.
fn not_remote(path: &Path) -> Error {
    Error::InvalidInput(format!("{} is a local repository; sync is for s3:// repositories", path.display()))
}

/// [`Error::RecordsWaiting`] when `synced` left records waiting: this copy still lists what they removed.
fn refuse_while_waiting(synced: &SyncSummary) -> Result<()> {
    let Some(first) = synced.records_waiting.first() else { return Ok(()) };
    Err(Error::RecordsWaiting(format!(
        "{first}{} removes what this machine's copy of the catalog still lists, and waits, unapplied, because \
         this copy alone holds what records gone from the bucket (or damaged there) changed: `snapstore sync` \
         names them. Until they are back, or accepted as lost (`snapstore sync --accept-missing`), this machine \
         makes no commit, forget or tag change, which could rely on what another machine deleted; checkout and \
         verify still work",
        match synced.records_waiting.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        }
    )))
}

/// Connects to a bucket. A setting that cannot work (the URL, an endpoint without http(s)://, a malformed
/// variable, half a key pair) is for the caller to fix, so it is bad input, not a failure of the store.
fn connect_bucket(url: &str) -> Result<backend::Bucket> {
    backend::Bucket::connect(url).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => Error::InvalidInput(e.to_string()),
        _ => Error::backend(url, e),
    })
}

/// The bucket URL when `path` names a remote repository (`s3://...`).
fn remote_url(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| s.starts_with("s3://"))
}

/// `repair index` asked of a repository in a bucket, whose catalog is the bucket's records.
fn not_repairable() -> Error {
    Error::InvalidInput(
        "repair index is for local repositories: the bucket holds the catalog of an s3:// repository; rebuild this \
         machine's copy with `snapstore sync --rebuild`"
            .into(),
    )
}

/// Refuses a path that looks like a mistyped bucket URL (`s3:/b/p`, `S3://b/p`): taken as a local directory, it
/// would quietly make a repository there that no other machine ever sees. `./s3:...` names such a directory.
fn refuse_url_typo(path: &Path) -> Result<()> {
    let s = path.as_os_str().as_encoded_bytes();
    if s.len() >= 3 && s[..3].eq_ignore_ascii_case(b"s3:") && !s.starts_with(b"s3://") {
        return Err(Error::InvalidInput(format!(
            "{} looks like a mistyped bucket URL: write s3://BUCKET/PREFIX (lower case, two slashes), or ./{} for a \
             local directory of that name",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// What [`Repository::checkpoints_named`] returns, from an open catalog.
fn named(catalog: &Catalog, ids: &[&str]) -> Result<Vec<Checkpoint>> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::with_capacity(ids.len());
    for id in ids {
        let c = catalog.resolve(id)?;
        if seen.insert(c.id.clone()) {
            found.push(c);
        }
    }
    Ok(found)
}

/// Paths in JSON. JSON strings are Unicode, so a name that is not UTF-8 is given twice, as borg does: under
/// its own key with each byte outside UTF-8 shown as U+FFFD, readable as in text output, and under the key
/// with `_b64` appended as its bytes in base64, from which a script gets the name back exactly (to pass to
/// `checkout --path`, say). A UTF-8 name has no `_b64` key. The fields are flattened into their struct, so
/// each function here writes its own key.
pub(crate) mod json_path {
    use serde::ser::{SerializeMap, Serializer};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};

    fn entries<S: Serializer>(s: S, key: &'static str, p: Option<&Path>) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        if let Some(p) = p {
            let bytes = p.as_os_str().as_bytes();
            match std::str::from_utf8(bytes) {
                Ok(text) => map.serialize_entry(key, text)?,
                Err(_) => {
                    use base64::Engine as _;
                    map.serialize_entry(key, &String::from_utf8_lossy(bytes))?;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    map.serialize_entry(&format!("{key}_b64"), &b64)?;
                }
            }
        }
        map.end()
    }

    pub fn path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "path", Some(p))
    }

    pub fn link_target<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "link_target", p.as_deref())
    }

    pub fn link_target_before<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        entries(s, "link_target_before", p.as_deref())
    }
}

/// A file, directory or symlink of a checkpoint, with its path inside the checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileInfo {
    /// Path relative to the checkpoint's root; the root itself is its committed name. In JSON, a name that is
    /// not UTF-8 shows each byte outside UTF-8 as U+FFFD, and `path_b64` holds its bytes in base64.
    #[serde(flatten, serialize_with = "json_path::path")]
    pub path: PathBuf,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (files only).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Numeric owner and group (`uid` and `gid` in JSON); none for streams and checkpoints from before
    /// snapstore recorded them.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Where a symlink points (its bytes as recorded); `None` for files and directories. In JSON, as `path`
    /// is: `link_target_b64` where it is not UTF-8.
    #[serde(flatten, serialize_with = "json_path::link_target")]
    pub link_target: Option<PathBuf>,
    /// Names of its extended attributes (ACLs among them), sorted; in JSON only where there are some, a byte
    /// that is not part of UTF-8 shown as U+FFFD.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<String>,
}

/// An entry a commit left out of its checkpoint ([`Repository::skipped`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Relative to the committed directory (in JSON as [`FileInfo::path`] is, `path_b64` where not UTF-8).
    #[serde(flatten, serialize_with = "json_path::path")]
    pub path: PathBuf,
    /// Why: the read error, [`VANISHED`], or [`SPECIAL`] and what the file is.
    pub reason: String,
}

/// Which checkpoints a retention policy applies to.
#[derive(Debug, Clone, Default)]
pub struct RetentionScope {
    /// Only checkpoints carrying every one of these tags (none: all).
    pub tags: Vec<String>,
    /// Only checkpoints of these committed paths (absolute, or `stdin:NAME`; none: all).
    pub paths: Vec<String>,
    /// Apply the policy to all checkpoints together instead of per host and path.
    pub across_paths: bool,
}

/// Repository-wide figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RepoStats {
    /// Catalog totals.
    #[serde(flatten)]
    pub catalog: CatalogStats,
    /// Size of the catalog database file, write-ahead log included.
    pub catalog_bytes: u64,
    /// Logical bytes per unique chunk byte (higher is better).
    pub dedup_ratio: f64,
    /// Unique chunk bytes per stored byte (higher is better).
    pub compression_ratio: f64,
}

/// The session of a reader of packs in a bucket (a checkout, a verify, a file reader). When it ends, what the
/// reads marked damaged is shared with every machine: left for this machine's next command (as a file
/// reader's was), the mark reached no GC elsewhere meanwhile, which could then delete the only sound copy of
/// the chunk (round 22 review).
struct ReaderSession {
    remote: Arc<remote::Remote>,
    catalog_path: PathBuf,
    _session: remote::RemoteSession,
}

impl Drop for ReaderSession {
    fn drop(&mut self) {
        // Best effort, as for a checkout; the session object goes after it, with the fields.
        if let Ok(mut catalog) = Catalog::open(&self.catalog_path) {
            self.remote.share_marks(&mut catalog);
        }
    }
}

impl Repository {
    /// Creates a repository at `path` with default parameters. The directory may exist if it is empty.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// assert_eq!(repo.params().chunk_avg, 65536);
    /// assert!(snapstore::Repository::init(dir.path().join("repo")).is_err());
    /// ```
    pub fn init(path: impl AsRef<Path>) -> Result<Self> {
        Self::init_with(path, RepoParams::default())
    }

    /// Creates a repository with the given parameters, which it keeps for its whole life.
    pub fn init_with(path: impl AsRef<Path>, params: RepoParams) -> Result<Self> {
        params.validate()?;
        refuse_url_typo(path.as_ref())?;
        if let Some(url) = remote_url(path.as_ref()) {
            return Ok(Self::open_remote(url, Some(&params), false)?.0);
        }
        let root = path.as_ref().to_path_buf();
        if root.join(CATALOG_FILE).exists() {
            return Err(Error::RepositoryExists(root));
        }
        // Another process's unfinished `init` (a catalog being built) does not make the directory foreign.
        let foreign = |e: &std::fs::DirEntry| !e.file_name().to_string_lossy().starts_with(CATALOG_FILE);
        if root.exists()
            && std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))?.any(|e| e.as_ref().map_or(true, foreign))
        {
            return Err(Error::InvalidInput(format!(
                "{} exists and is not empty; choose a new or empty directory for the repository",
                root.display()
            )));
        }
        backend::local_dir(&root).map_err(|e| Error::io(&root, e))?;
        Catalog::create(&root.join(CATALOG_FILE), &params)?;
        params.write_copy(&root).map_err(|e| Error::io(root.join(params::PARAMS_FILE), e))?;
        Self::open(root)
    }

    /// Opens an existing repository, reading its parameters from its catalog.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// assert!(matches!(snapstore::Repository::open(dir.path()), Err(snapstore::Error::NoRepository(_))));
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        refuse_url_typo(path.as_ref())?;
        if let Some(url) = remote_url(path.as_ref()) {
            return Ok(Self::open_remote(url, None, false)?.0);
        }
        let root = path.as_ref().to_path_buf();
        let catalog_path = root.join(CATALOG_FILE);
        // Only a catalog that is not there means no repository: one that cannot be looked at (a directory
        // another user keeps private) is that error, not an invitation to `init`.
        let md = match std::fs::metadata(&catalog_path) {
            Ok(md) => md,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                return Err(Error::NoRepository(root));
            }
            Err(e) => return Err(Error::io(&catalog_path, e)),
        };
        if !md.is_file() {
            return Err(Error::NoRepository(root));
        }
        // Another user's repository is opened for reading only, as one on a read-only mount is: reading it leaves
        // nothing there that the owner could not read or write, and changing it is refused. On a read-only
        // mount (an archive disk or a snapshot from another machine, whose user ids differ) it is only read
        // anyway, and a change fails as one there does.
        let owner = readonly::another_users(&catalog_path).filter(|_| !readonly::on_read_only_fs(&catalog_path));
        let catalog = Catalog::open(&catalog_path)?;
        let params = catalog.params()?;
        let read_only = catalog.read_only().cloned();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(&root));
        Ok(Repository { root, catalog_path, backend, params, remote: None, read_only, owner, on_notice: None })
    }

    /// Opens the repository at `path`, or creates it with the default parameters if there is none there;
    /// says which (`true`: created). Two processes that start at once both end with the one repository.
    /// A directory that holds something else, or a catalog that cannot be read, is an error, as in
    /// [`Repository::init`] and [`Repository::open`]: nothing there is replaced.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let (repo, created) = snapstore::Repository::open_or_init(dir.path().join("repo")).unwrap();
    /// assert!(created);
    /// drop(repo);
    /// assert!(!snapstore::Repository::open_or_init(dir.path().join("repo")).unwrap().1);
    /// ```
    pub fn open_or_init(path: impl AsRef<Path>) -> Result<(Self, bool)> {
        match Self::open(&path) {
            // A file where the repository should be: said as `open` says it, not as a failed `mkdir`.
            Err(e @ Error::NoRepository(_)) if path.as_ref().metadata().is_ok_and(|m| !m.is_dir()) => Err(e),
            Err(Error::NoRepository(_)) => match Self::init(&path) {
                Ok(repo) => Ok((repo, true)),
                // Another process created it a moment ago.
                Err(Error::RepositoryExists(_)) => Ok((Self::open(&path)?, false)),
                Err(e) => Err(e),
            },
            other => other.map(|repo| (repo, false)),
        }
    }

    /// Opens (or, with `init`, creates) the repository in a bucket, bringing the local working copy of its
    /// catalog up to date: created from the bucket's records when missing, synced when behind; with `rebuild`,
    /// built again from the bucket without reading the copy there (see [`Repository::rebuild`]).
    fn open_remote(url: &str, init: Option<&RepoParams>, rebuild: bool) -> Result<(Self, SyncSummary)> {
        let bucket = Arc::new(connect_bucket(url)?);
        let root = remote::cache_dir(bucket.url())?;
        copylock::create(&root)?;
        let remote = Arc::new(remote::Remote { bucket: bucket.clone(), cache: Some(root.clone()) });
        if let Some(params) = init {
            remote.init(params)?;
        }
        let catalog_path = root.join(CATALOG_FILE);
        let repo_id = remote.repo_id()?;
        let mut rebuild = rebuild;
        if !rebuild && catalog_path.exists() {
            check_owner(&root, &std::fs::metadata(&catalog_path).map_err(|e| Error::io(&catalog_path, e))?)?;
            let cat = Catalog::open(&catalog_path)?;
            // The bucket prefix holds another repository than the one this copy was made from.
            if remote::local_repo_id(cat.connection())?.is_some_and(|id| id != repo_id) {
                drop(cat);
                copylock::exclusive(&root, || remote::discard_copy(&root))?;
            } else {
                // A migration found that the copy's rows cannot be brought forward: built again from the
                // records. (A record met late is decided on by each sync.)
                remote::clear_late_mark(cat.connection())?;
                rebuild = remote::rebuild_pending(cat.connection())?;
            }
        }
        let synced = match rebuild {
            true => Self::build_copy_again(&remote, &root, &repo_id)?,
            false => match Self::open_copy(&remote, &root, &repo_id) {
                Err(Error::RebuildNeeded(_)) => Self::build_copy_again(&remote, &root, &repo_id)?,
                other => other?,
            },
        };
        let params = Catalog::open(&catalog_path)?.params()?;
        let backend: Arc<dyn Backend> = Arc::new(backend::S3Backend::new(bucket, root.join("tmp")));
        Ok((
            Repository {
                root,
                catalog_path,
                backend,
                params,
                remote: Some(remote),
                read_only: None,
                owner: None,
                on_notice: None,
            },
            synced,
        ))
    }

    /// This machine's copy of a bucket's catalog in `root`, created when missing, synced.
    fn open_copy(remote: &remote::Remote, root: &Path, repo_id: &str) -> Result<SyncSummary> {
        let catalog_path = root.join(CATALOG_FILE);
        if !catalog_path.exists() {
            backend::local_dir(root).map_err(|e| Error::io(root, e))?;
            match Catalog::create(&catalog_path, &remote.params()?) {
                Ok(_) | Err(Error::RepositoryExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let mut cat = Catalog::open(&catalog_path)?;
        remote::set_local_repo_id(cat.connection(), repo_id)?;
        remote.sync(&mut cat)
    }

    /// [`Repository::open_copy`] from the bucket alone; the copy that was there comes back if that fails (a
    /// damaged record), since it may still work.
    /// Holds the copy exclusively meanwhile ([`copylock`]): the caller must have no catalog of it open.
    fn build_copy_again(remote: &remote::Remote, root: &Path, repo_id: &str) -> Result<SyncSummary> {
        copylock::exclusive(root, || {
            remote::set_aside_copy(root)?;
            match Self::open_copy(remote, root, repo_id) {
                Ok(synced) => {
                    remote::restore_copy(root, false)?;
                    Ok(SyncSummary { rebuilt: true, ..synced })
                }
                Err(e) => {
                    remote::restore_copy(root, true)?;
                    Err(e)
                }
            }
        })
    }

    /// A sync of this repository's copy, built again from the bucket where it must be.
    fn synced_copy(&self, remote: &remote::Remote) -> Result<SyncSummary> {
        // The catalog closes before a rebuild, which waits for every one open on the copy.
        let synced = remote.sync(&mut self.open_catalog()?);
        match synced {
            Err(Error::RebuildNeeded(_)) => Self::build_copy_again(remote, &self.root, &remote.repo_id()?),
            other => other,
        }
    }

    /// For a repository in a bucket: applies every change other machines wrote to the bucket since the last
    /// sync to the local copy of the catalog (done by every command on opening, too). A copy that can only be
    /// brought up to date by building it again from the bucket (a record that removes arrived after records
    /// numbered above it) is built again.
    pub fn sync(&self) -> Result<SyncSummary> {
        let remote = self.remote.as_ref().ok_or_else(|| not_remote(&self.root))?;
        self.synced_copy(remote)
    }

    /// For a repository in a bucket: accepts that the records [`SyncSummary::records_missing`] reports are
    /// lost for good (deleted from the bucket, or a damaged one moved out of `records/`), so that GC, which
    /// deletes nothing while records are missing, collects again. This machine keeps what the records it
    /// applied changed; each sequence number without a record gets an empty one. Run it on every machine that
    /// reports records it applied as missing: each one's sync tells every other machine (a `records/lost-...`
    /// object), whose GC then waits for its accept too. Returns the records accepted as lost.
    ///
    /// A checkpoint that only this machine still has (a lost record added it) is first written to the bucket
    /// again, with what it reaches that the bucket's records lack, in records that only add: otherwise every
    /// other machine's GC would take its packs for orphans once the loss is accepted. A checkpoint a lost
    /// record forgot here, which other machines still list, is forgotten again for them all: this machine's
    /// GC no longer keeps what it uses. Each is told through [`Repository::on_notice`].
    ///
    /// Refused ([`Error::InvalidInput`]) for a sequence number without a record that this machine never
    /// applied and no other machine has reported as its own: the machine that applied it may not have synced
    /// since the loss, and GC would collect what its checkpoints use. [`Repository::accept_missing_everywhere`]
    /// accepts those too.
    pub fn accept_missing_records(&self) -> Result<Vec<String>> {
        self.accept_missing(false)
    }

    /// As [`Repository::accept_missing_records`], for a loss no machine that applied the records is left to
    /// accept (the machine that wrote them is gone for good): fills every sequence number without a record,
    /// and withdraws every other machine's report of a record it lost. A checkpoint that only a lost record
    /// held is then lost for every machine that lacks it, and GC collects what it alone used, which `verify`
    /// on a machine that still lists it then reports.
    pub fn accept_missing_everywhere(&self) -> Result<Vec<String>> {
        self.accept_missing(true)
    }

    fn accept_missing(&self, everywhere: bool) -> Result<Vec<String>> {
        let remote = self.remote.as_ref().ok_or_else(|| not_remote(&self.root))?;
        let (accepted, restated) = remote.accept_missing(&mut self.open_catalog()?, everywhere)?;
        for id in restated.written {
            self.notice(&format!(
                "checkpoint {} was held by a lost record and only this machine still had it: written to the bucket \
                 again, so that it stays for every machine",
                &id[..8.min(id.len())]
            ));
        }
        for id in restated.forgotten {
            self.notice(&format!(
                "checkpoint {} was forgotten here by a lost record, and other machines still listed it, but it is \
                 no longer whole here: forgotten again in the bucket, so that every machine forgets it",
                &id[..8.min(id.len())]
            ));
        }
        for id in restated.relisted {
            self.notice(&format!(
                "checkpoint {} was forgotten here by a lost record, and other machines still list it: whole here, \
                 so listed here again (forget it again to have it gone everywhere)",
                &id[..8.min(id.len())]
            ));
        }
        for id in restated.damaged {
            self.notice(&format!(
                "checkpoint {} was held by a lost record and only this machine still lists it, but what it reaches \
                 is gone here too (a gc dropped or deleted it): not written back; `snapstore verify` names what it \
                 lacks",
                &id[..8.min(id.len())]
            ));
        }
        Ok(accepted)
    }

    /// Opens a repository in a bucket, returning what its sync on opening applied (a [`Repository::sync`]
    /// right after would find nothing new).
    pub fn open_synced(path: impl AsRef<Path>) -> Result<(Self, SyncSummary)> {
        let url = remote_url(path.as_ref()).ok_or_else(|| not_remote(path.as_ref()))?;
        Self::open_remote(url, None, false)
    }

    /// For a repository in a bucket: discards this machine's copy of the catalog without reading it (it may be
    /// damaged, or fail to sync) and builds it again from the bucket alone.
    pub fn rebuild(path: impl AsRef<Path>) -> Result<(Self, SyncSummary)> {
        let url = remote_url(path.as_ref()).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} is a local repository; rebuilding the catalog from a bucket is for s3:// repositories",
                path.as_ref().display()
            ))
        })?;
        // The copy that was there, which may still work, stays if the build fails.
        Self::open_remote(url, None, true)
    }

    /// Has `notice` told, in a sentence, what a command on a repository in a bucket wants its user to know as
    /// it runs, without failing:
    /// - that it starts waiting for another process's hold there, for what and how long at most: a commit,
    ///   checkout, verify or file reader for a GC deleting from the bucket (up to `SNAPSTORE_SWEEP_WAIT`
    ///   seconds, default 600), a forget, retention run or tag change for another one (up to 120 s); once per
    ///   wait;
    /// - that a checkout, verify or file reader reads without registering a session, because the credentials
    ///   may not write to the bucket (so a GC on another machine may make it fail; run again, it succeeds).
    ///
    /// Never for a local repository. The CLI prints these on stderr, so that a command held for minutes does
    /// not look hung.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let mut repo = snapstore::Repository::init(dir.path()).unwrap();
    /// repo.on_notice(|what| eprintln!("{what}"));
    /// ```
    pub fn on_notice(&mut self, notice: impl Fn(&str) + Send + Sync + 'static) {
        self.on_notice = Some(Arc::new(notice));
    }

    /// Passes `what` to [`Repository::on_notice`]'s notice, if one was given.
    fn notice(&self, what: &str) {
        if let Some(notice) = &self.on_notice {
            notice(what);
        }
    }

    /// The repository's directory, or its bucket URL.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.bucket.url().to_string(),
            None => self.root.display().to_string(),
        }
    }

    /// Requests sent to the bucket so far by this process (0 for a local repository).
    pub fn requests(&self) -> u64 {
        self.remote.as_ref().map_or(0, |r| r.bucket.requests())
    }

    /// For a repository in a bucket: a session registered there (after any sweep under way), then a sync, so
    /// that no GC deletes what the caller relies on or reads while the session lives (a reader on another
    /// machine would take a pack deleted under it for damage). It ends when dropped.
    /// `reading`: the caller only reads, and may go on without a session where the bucket's credentials do
    /// not let it register one ([`remote::Remote::begin_session`]).
    /// Also returns what that sync found.
    fn session(&self, reading: bool) -> Result<Option<(&Arc<remote::Remote>, remote::RemoteSession, SyncSummary)>> {
        let Some(remote) = &self.remote else { return Ok(None) };
        let session = remote.begin_session(reading, &|what| self.notice(what))?;
        // Built again here too: a program that keeps the repository open (a Checkpointer) opens it once, and
        // would otherwise fail every commit on a record that arrived late.
        let synced = self.synced_copy(remote)?;
        if !reading {
            refuse_while_waiting(&synced)?;
        }
        Ok(Some((remote, session, synced)))
    }

    /// Runs a writer: for a remote repository inside a [`Repository::session`], with every catalog change
    /// journaled to the bucket.
    fn writer<T>(&self, f: impl FnOnce(commit::Context<'_>) -> Result<T>) -> Result<T> {
        self.refuse_another_users()?;
        let Some((remote, session, _)) = self.session(false)? else {
            // Gone since it was opened (moved, deleted, unmounted): writing would make a half repository there.
            if !self.catalog_path.is_file() {
                return Err(Error::NoRepository(self.root.clone()));
            }
            // A repository made before `init` wrote the copy of its parameters gets it from its first writer.
            // Only a redundancy (the catalog holds the parameters), so a failure here fails nothing.
            if !self.root.join(params::PARAMS_FILE).exists() {
                let _ = self.params.write_copy(&self.root);
            }
            return f(self.context(None));
        };
        {
            let mut cat = self.open_catalog()?;
            if catalog::meta_value(cat.connection(), remote::PACKS_UNCHECKED)?.is_some() {
                gc::mark_missing_packs(&mut cat, &*self.backend)?;
            }
        }
        let journal = |tx: &rusqlite::Transaction<'_>, b: &catalog::Batch| {
            remote.check_session(&session)?;
            remote.publish(tx, b)
        };
        f(self.context(Some(&journal)))
    }

    /// [`Error::NotOwner`] for a change asked of another user's repository, before anything is written; also
    /// where the change would be none (a policy with nothing to forget), so that a job run as the wrong user
    /// fails from its first run.
    pub(crate) fn refuse_another_users(&self) -> Result<()> {
        match self.owner {
            Some(owner) => {
                Err(Error::NotOwner { path: self.root.clone(), owner, me: rustix::process::geteuid().as_raw() })
            }
            None => Ok(()),
        }
    }

    /// Runs a reader of packs (checkout, verify): for a remote repository inside a [`Repository::session`].
    /// On a read-only mount, a reader whose repository another mount wrote meanwhile fails as such: what it
    /// read, restored or reported damaged may mix two states. `f` is given what the session's sync found.
    fn reader<T>(&self, f: impl FnOnce(Option<&SyncSummary>) -> Result<T>) -> Result<T> {
        let session = self.read_session()?;
        let result = f(session.as_ref().map(|(_, synced)| synced));
        // Ending the session shares what the read found damaged.
        drop(session);
        self.checked_read(result)
    }

    /// A [`Repository::session`] for a reader of packs, which shares what the reads marked damaged when it
    /// ends; with what its sync found.
    fn read_session(&self) -> Result<Option<(ReaderSession, SyncSummary)>> {
        Ok(self.session(true)?.map(|(remote, session, synced)| {
            (
                ReaderSession { remote: remote.clone(), catalog_path: self.catalog_path.clone(), _session: session },
                synced,
            )
        }))
    }

    /// `result` of a read, or on a read-only mount whose repository another mount wrote meanwhile,
    /// [`Error::ChangedWhileRead`].
    fn checked_read<T>(&self, result: Result<T>) -> Result<T> {
        if let Some(opened) = &self.read_only
            && result.as_ref().err().is_none_or(Error::may_come_from_a_changing_read)
        {
            opened.check(&self.catalog_path)?;
        }
        result
    }

    /// Runs a forget, or a change of tags (what retention decides by): for a remote repository holding the
    /// bucket's forget lock, with the catalog synced after taking it, so that a forget or tag change on another
    /// machine is either finished and seen (a retention plan's kept checkpoints are checked against it, and
    /// its tags are read in its deleting transaction) or waits for this one; its change is journaled to the
    /// bucket.
    fn forgetting<T>(
        &self,
        catalog: &mut Catalog,
        f: impl FnOnce(&mut Catalog, Option<catalog::Journal<'_>>) -> Result<T>,
    ) -> Result<T> {
        self.refuse_another_users()?;
        let Some(remote) = &self.remote else { return f(catalog, None) };
        let lock = remote.forget_lock(&|what| self.notice(what))?;
        refuse_while_waiting(&remote.sync(catalog)?)?;
        fault::point("forget-synced");
        let journal = |tx: &rusqlite::Transaction<'_>, b: &catalog::Batch| {
            remote.check_lock(&lock)?;
            remote.publish(tx, b)
        };
        f(catalog, Some(&journal))
    }

    /// Opens an existing repository whose packs live in `backend` instead of its directory (the catalog
    /// stays in the directory). This is how tests inject storage faults, and where other stores plug in.
    ///
    /// ```
    /// use std::sync::Arc;
    /// let dir = tempfile::tempdir().unwrap();
    /// snapstore::Repository::init(dir.path()).unwrap();
    /// let mem = snapstore::MemoryBackend::new();
    /// let repo = snapstore::Repository::open_with(dir.path(), Arc::new(mem.clone())).unwrap();
    /// mem.set_failing(true);
    /// let err = repo.commit_reader("x", &mut &[1u8; 10][..], &Default::default()).unwrap_err();
    /// assert!(err.to_string().contains("injected I/O failure"));
    /// assert!(repo.checkpoints().unwrap().is_empty());
    /// ```
    pub fn open_with(path: impl AsRef<Path>, backend: Arc<dyn Backend>) -> Result<Self> {
        if remote_url(path.as_ref()).is_some() {
            return Err(Error::InvalidInput("open_with takes a local repository directory".into()));
        }
        let mut repo = Self::open(path)?;
        repo.backend = backend;
        Ok(repo)
    }

    /// The repository's directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The parameters recorded at `init`.
    pub fn params(&self) -> &RepoParams {
        &self.params
    }

    /// A new connection to the catalog, for inspection: it refuses every statement that would change it
    /// (SQLite's `query_only`), since a row changed by hand bypasses every rule the library keeps (a deleted
    /// chunk row breaks each checkpoint that uses the chunk). A repository changes through `Repository`'s
    /// methods only ([`Catalog::open`] is the library's own door, for its tests).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let catalog = repo.catalog().unwrap();
    /// assert_eq!(catalog.checkpoints().unwrap().len(), 0);
    /// assert!(catalog.connection().execute("DELETE FROM chunks", []).is_err());
    /// ```
    pub fn catalog(&self) -> Result<Catalog> {
        let catalog = self.open_catalog()?;
        catalog.connection().execute_batch("PRAGMA query_only = 1")?;
        Ok(catalog)
    }

    /// A new connection to the catalog for the library's own use, writes included.
    pub(crate) fn open_catalog(&self) -> Result<Catalog> {
        let catalog = Catalog::open(&self.catalog_path)?;
        if let Some(opened) = &self.read_only {
            // Written through another mount since: what this handle read before and reads now could mix.
            opened.check(&self.catalog_path)?;
        }
        Ok(catalog)
    }

    /// Commits a file or directory tree as a new checkpoint.
    ///
    /// Files whose size, mtime, ctime and inode match the previous checkpoint of the same path are not read
    /// again (unless [`CommitOptions::reread`]). The checkpoint becomes visible atomically, after all its
    /// data is durable.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// std::fs::create_dir(dir.path().join("run")).unwrap();
    /// std::fs::write(dir.path().join("run/a"), vec![1u8; 100_000]).unwrap();
    /// let first = repo.commit(dir.path().join("run"), &Default::default()).unwrap();
    /// let second = repo.commit(dir.path().join("run"), &Default::default()).unwrap();
    /// assert_eq!(first.files_new, 1);
    /// assert_eq!((second.files_unchanged, second.bytes_new), (1, 0));
    /// assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
    /// ```
    pub fn commit(&self, path: impl AsRef<Path>, opts: &CommitOptions) -> Result<CommitSummary> {
        self.writer(|ctx| commit::commit(&ctx, commit::Source::Path(path.as_ref()), opts))
    }

    /// Commits a stream (a state image written by another program) as a checkpoint holding one file, `name`.
    /// The reader's end (a read of 0 bytes) is taken as the state's: a reader fed by a producer that can fail
    /// (a child's stdout, a socket) should return an error at its end unless the producer succeeded, as
    /// `snapstore commit - -- COMMAND` does; an error from the reader, at any point, commits nothing.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let state = vec![42u8; 300_000];
    /// let s = repo.commit_reader("model.bin", &mut &state[..], &Default::default()).unwrap();
    /// assert_eq!(s.logical_bytes, 300_000);
    /// assert_eq!(repo.checkpoint(&s.id).unwrap().path, "stdin:model.bin");
    /// ```
    pub fn commit_reader(&self, name: &str, reader: &mut dyn Read, opts: &CommitOptions) -> Result<CommitSummary> {
        self.writer(|ctx| commit::commit(&ctx, commit::Source::Reader { name, reader }, opts))
    }

    /// Recreates checkpoint `id` (full id, unique prefix or `latest`) at `dest`, verifying every chunk.
    /// `dest` becomes what the committed path was: a directory, a file or a symlink. It must not exist, or
    /// be an empty directory, unless [`CheckoutOptions::in_place`], which updates it by writing only what
    /// differs.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// std::fs::create_dir_all(dir.path().join("run/sub")).unwrap();
    /// std::fs::write(dir.path().join("run/sub/a"), b"alpha").unwrap();
    /// repo.commit(dir.path().join("run"), &Default::default()).unwrap();
    /// let out = dir.path().join("out");
    /// let s = repo.checkout("latest", &out, &Default::default()).unwrap();
    /// assert_eq!((s.files, s.dirs), (1, 2));
    /// assert_eq!(std::fs::read(out.join("sub/a")).unwrap(), b"alpha");
    /// // A second checkout into the now non-empty destination needs `in_place`.
    /// assert!(matches!(repo.checkout("latest", &out, &Default::default()), Err(snapstore::Error::DestinationNotEmpty(_))));
    /// ```
    pub fn checkout(&self, id: &str, dest: impl AsRef<Path>, opts: &CheckoutOptions) -> Result<CheckoutSummary> {
        self.reader(|_| {
            let cp = self.checkpoint(id)?;
            let src = checkout::Source {
                catalog_path: &self.catalog_path,
                repo_root: &self.root,
                backend: self.backend.clone(),
            };
            checkout::checkout(&src, &cp.id, dest.as_ref(), opts).map_err(|e| self.unless_forgotten(e, &cp.id))
        })
    }

    /// Every group checkpoint, complete or not, newest first, with the parts it has.
    pub fn groups(&self) -> Result<Vec<Group>> {
        group::groups(&self.open_catalog()?)
    }

    /// The group checkpoint named `name`.
    pub fn group(&self, name: &str) -> Result<Group> {
        group::group(&self.open_catalog()?, name)
    }

    /// The group that `part` belongs to (of its name and part count): after its commit, how far along it is.
    pub fn group_of(&self, part: &GroupPart) -> Result<Group> {
        group::group_by_key(&self.open_catalog()?, &part.key())
    }

    /// Restores every part of a complete group, part `I` into `dest/part-I`; refuses an incomplete group
    /// ([`Error::GroupIncomplete`]).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// use snapstore::{CommitOptions, GroupPart};
    /// let part = |i| CommitOptions { group: Some(GroupPart::parse("step-100", &format!("{i}/2")).unwrap()), ..Default::default() };
    /// repo.commit_reader("rank0.bin", &mut &b"rank 0 state"[..], &part(0)).unwrap();
    /// assert!(repo.checkout_group("step-100", dir.path().join("out"), &Default::default()).is_err());
    /// repo.commit_reader("rank1.bin", &mut &b"rank 1 state"[..], &part(1)).unwrap();
    /// repo.checkout_group("step-100", dir.path().join("out"), &Default::default()).unwrap();
    /// assert_eq!(std::fs::read(dir.path().join("out/part-1")).unwrap(), b"rank 1 state");
    /// ```
    pub fn checkout_group(
        &self,
        name: &str,
        dest: impl AsRef<Path>,
        opts: &CheckoutOptions,
    ) -> Result<Vec<CheckoutSummary>> {
        let g = self.group(name)?;
        if !g.is_complete() {
            return Err(Error::GroupIncomplete { name: g.name, have: g.members.len() as u32, parts: g.parts });
        }
        let dest = dest.as_ref();
        std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
        g.members.iter().map(|(i, cp)| self.checkout(&cp.id, dest.join(format!("part-{i}")), opts)).collect()
    }

    /// The group checkpoints named `name`: one, unless two machines of a bucket each committed a part of that
    /// name with another part count before seeing the other's.
    pub fn groups_named(&self, name: &str) -> Result<Vec<Group>> {
        group::groups_named(&self.open_catalog()?, name)
    }

    /// Forgets group checkpoints with all their parts: every group of each name.
    pub fn forget_groups(&self, names: &[&str]) -> Result<Vec<Group>> {
        // Resolved after the forget lock's sync, so that a namesake another machine began is forgotten too.
        self.forgetting(&mut self.open_catalog()?, |catalog, journal| {
            let found: Vec<Group> =
                names.iter().map(|n| group::groups_named(catalog, n)).collect::<Result<Vec<_>>>()?.concat();
            let keys: Vec<String> = found.iter().map(|g| g.key.clone()).collect();
            catalog.delete_groups(&keys, journal)?;
            Ok(found)
        })
    }

    /// [`Catalog::unless_forgotten`] through a new connection.
    fn unless_forgotten(&self, e: Error, id: &str) -> Error {
        match self.open_catalog() {
            Ok(catalog) => catalog.unless_forgotten(e, id),
            Err(_) => e,
        }
    }

    /// All checkpoints, newest first.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let opts = snapstore::CommitOptions { tags: vec!["nightly".into()], ..Default::default() };
    /// let a = repo.commit_reader("s", &mut &b"one"[..], &opts).unwrap();
    /// let b = repo.commit_reader("s", &mut &b"two"[..], &opts).unwrap();
    /// let list = repo.checkpoints().unwrap();
    /// assert_eq!(list.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![b.id, a.id]);
    /// assert_eq!(list[0].tags, vec!["nightly".to_string()]);
    /// ```
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        self.open_catalog()?.checkpoints()
    }

    /// The checkpoint named by a full id, a unique prefix of 4 or more hex digits, or `latest`, each optionally
    /// followed by `~N`: the checkpoint N before it of the same path and host (see [`Catalog::resolve`]).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let s = repo.commit_reader("x", &mut &b"x"[..], &Default::default()).unwrap();
    /// assert_eq!(repo.checkpoint(&s.id[..4]).unwrap().id, s.id);
    /// assert_eq!(repo.checkpoint("latest").unwrap().id, s.id);
    /// let t = repo.commit_reader("x", &mut &b"y"[..], &Default::default()).unwrap();
    /// assert_eq!(repo.checkpoint("latest~1").unwrap().id, s.id);
    /// assert_eq!(repo.checkpoint(&format!("{}~1", &t.id[..8])).unwrap().id, s.id);
    /// assert!(matches!(repo.checkpoint("xyz!"), Err(snapstore::Error::InvalidId(_))));
    /// ```
    pub fn checkpoint(&self, id: &str) -> Result<Checkpoint> {
        self.open_catalog()?.resolve(id)
    }

    /// The checkpoints `ids` name (full ids, prefixes or `latest`), each once however often it is named, in
    /// the order first named.
    pub fn checkpoints_named(&self, ids: &[&str]) -> Result<Vec<Checkpoint>> {
        named(&self.open_catalog()?, ids)
    }

    /// Calls `f` for every entry of a checkpoint, in depth-first name order, the root first.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let s = repo.commit_reader("x.bin", &mut &b"abc"[..], &Default::default()).unwrap();
    /// let mut seen = Vec::new();
    /// repo.walk(&s.id, |f| { seen.push((f.path.clone(), f.size)); Ok(()) }).unwrap();
    /// assert_eq!(seen, vec![("x.bin".into(), 3)]);
    /// ```
    pub fn walk(&self, id: &str, mut f: impl FnMut(&FileInfo) -> Result<()>) -> Result<()> {
        let catalog = self.open_catalog()?;
        let cp = catalog.resolve(id)?;
        let root = content::root_entry(&catalog, &cp.id)?;
        let path = PathBuf::from(OsStr::from_bytes(&root.name));
        walk_entries(&catalog, vec![(root, path)], true, &mut f)
    }

    /// Lists what a checkpoint holds at `path` (relative to the committed directory; empty for all): a
    /// directory's entries, all the way down with `recursive`, or the file or symlink itself. Paths are
    /// relative to the committed directory.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// std::fs::create_dir_all(dir.path().join("run/sub")).unwrap();
    /// std::fs::write(dir.path().join("run/sub/a"), b"alpha").unwrap();
    /// std::fs::write(dir.path().join("run/b"), b"beta").unwrap();
    /// let s = repo.commit(dir.path().join("run"), &Default::default()).unwrap();
    /// let mut top = Vec::new();
    /// repo.list(&s.id, "", false, |f| { top.push(f.path.clone()); Ok(()) }).unwrap();
    /// assert_eq!(top, vec![std::path::PathBuf::from("b"), "sub".into()]);
    /// let mut all = Vec::new();
    /// repo.list(&s.id, "sub", true, |f| { all.push((f.path.clone(), f.size)); Ok(()) }).unwrap();
    /// assert_eq!(all, vec![("sub/a".into(), 5)]);
    /// ```
    pub fn list(
        &self,
        id: &str,
        path: impl AsRef<Path>,
        recursive: bool,
        mut f: impl FnMut(&FileInfo) -> Result<()>,
    ) -> Result<()> {
        let catalog = self.open_catalog()?;
        let cp = catalog.resolve(id)?;
        let root = content::root_entry(&catalog, &cp.id)?;
        let (entry, rel) = content::lookup(&catalog, &root, path.as_ref())?
            .ok_or_else(|| Error::PathNotFound { checkpoint: cp.short_id().to_string(), path: path.as_ref().into() })?;
        if entry.kind != EntryKind::Dir {
            let name = if rel.as_os_str().is_empty() { PathBuf::from(OsStr::from_bytes(&entry.name)) } else { rel };
            return walk_entries(&catalog, vec![(entry, name)], false, &mut f);
        }
        let tree = entry.object()?.expect("dir has a tree");
        let children = catalog.tree(&tree)?.into_iter().rev().map(|c| {
            let p = rel.join(OsStr::from_bytes(&c.name));
            (c, p)
        });
        walk_entries(&catalog, children.collect(), recursive, &mut f)
    }

    /// Opens one file of a checkpoint for reading and seeking, without restoring it: a read fetches only the
    /// chunks it covers. `path` is relative to the committed directory (for a checkpoint of one file, its
    /// name or the empty path).
    pub fn open_file(&self, id: &str, path: impl AsRef<Path>) -> Result<FileReader> {
        let reader = self.checked_read(self.open_file_unchecked(id, path.as_ref()))?;
        Ok(match &self.read_only {
            Some(opened) => reader.watch(self.catalog_path.clone(), opened.clone()),
            None => reader,
        })
    }

    fn open_file_unchecked(&self, id: &str, path: &Path) -> Result<FileReader> {
        // In a bucket, the reader holds a session for its whole life, as a checkout does for its run.
        let session = self.read_session()?;
        let catalog = self.open_catalog()?;
        let cp = catalog.resolve(id)?;
        let root = content::root_entry(&catalog, &cp.id)?;
        let not_found = || Error::PathNotFound { checkpoint: cp.short_id().to_string(), path: path.into() };
        let (entry, _) = content::lookup(&catalog, &root, path)?.ok_or_else(not_found)?;
        if entry.kind != EntryKind::File {
            return Err(Error::InvalidInput(format!(
                "{} in checkpoint {} is a {}, not a file",
                path.display(),
                cp.short_id(),
                if entry.kind == EntryKind::Dir { "directory" } else { "symlink" }
            )));
        }
        let content = entry.object()?.expect("file has content");
        let reader = FileReader::open(catalog, self.backend.clone(), &content)
            .map_err(|e| self.unless_forgotten(e, &cp.id))?
            .of_checkpoint(&cp.id);
        Ok(match session {
            Some((session, _)) => reader.hold(Box::new(session)),
            None => reader,
        })
    }

    /// Adds tags to checkpoint `id` and removes others (a tag in both is refused: [`Error::InvalidInput`]),
    /// and returns it as it is then, with what changed. A tag keeps a checkpoint from any retention policy with
    /// `keep_tags` naming it, so this is how a checkpoint committed without one is protected later. In a bucket the
    /// change takes turns with forgets ([`Repository::forget`]): a retention run on another machine either
    /// ran before it (and a checkpoint it forgot cannot be tagged: [`Error::ForgottenBeforeTagged`]) or sees
    /// it. `id` is resolved again after that sync, so `latest` is the newest of every machine's.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let c = repo.commit_reader("state", &mut &b"step 1"[..], &Default::default()).unwrap();
    /// let tagged = repo.tag(&c.id[..8], &["keep".into()], &["kept".into()]).unwrap();
    /// assert_eq!(tagged.checkpoint.tags, vec!["keep".to_string()]);
    /// assert_eq!((tagged.added, tagged.removed), (vec!["keep".to_string()], vec![]));
    /// ```
    pub fn tag(&self, id: &str, add: &[String], remove: &[String]) -> Result<Tagged> {
        self.refuse_another_users()?;
        for t in add {
            checkpoint::validate_new_tag(t)?;
        }
        let mut catalog = self.open_catalog()?;
        // Resolved now to fail at once on a typo, and again once synced under the lock: `latest` is then the
        // newest of every machine's, and a checkpoint forgotten meanwhile is told from one never there.
        let named = catalog.resolve(id)?;
        if let Some(both) = remove.iter().find(|t| add.contains(t)) {
            return Err(Error::InvalidInput(format!("tag {both:?} is both added and removed: give it once")));
        }
        let forgotten = |e| match e {
            Error::CheckpointNotFound(_) => Error::ForgottenBeforeTagged(named.short_id().to_string()),
            e => e,
        };
        let (c, (added, removed)) = self.forgetting(&mut catalog, |catalog, journal| {
            let c = catalog.resolve(id).map_err(forgotten)?;
            let change = catalog.retag(&c.id, add, remove, journal).map_err(forgotten)?;
            Ok((c, change))
        })?;
        Ok(Tagged { checkpoint: catalog.resolve(&c.id)?, added, removed })
    }

    /// Forgets checkpoints: removes them from the catalog (they no longer appear anywhere and cannot be
    /// brought back). Their data stays until [`Repository::gc`] finds it unused. Every id is resolved before
    /// anything is removed, so a typo forgets nothing. Returns the checkpoints forgotten. In a bucket, forgets
    /// of all machines take turns ([`Error::ForgetRunning`] after two minutes' wait).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let a = repo.commit_reader("s", &mut &b"one"[..], &Default::default()).unwrap();
    /// let b = repo.commit_reader("s", &mut &b"two"[..], &Default::default()).unwrap();
    /// assert!(repo.forget(&[&a.id[..6], "ffff"]).is_err());
    /// assert_eq!(repo.checkpoints().unwrap().len(), 2);
    /// repo.forget(&[&a.id[..6]]).unwrap();
    /// assert_eq!(repo.checkpoints().unwrap()[0].id, b.id);
    /// ```
    pub fn forget(&self, ids: &[&str]) -> Result<Vec<Checkpoint>> {
        self.refuse_another_users()?;
        let mut catalog = self.open_catalog()?;
        // One checkpoint named twice (a full id and a prefix of it) is forgotten, and reported, once.
        let found = named(&catalog, ids)?;
        for c in &found {
            if let Some((group, part)) = catalog.part_of(&c.id)? {
                return Err(Error::PartOfGroup { id: c.short_id().to_string(), group, part });
            }
        }
        self.delete(&mut catalog, found, &[], &[], &[])
    }

    /// Deletes `found`, but not those that carry one of `spare_tags` by then or lack one of `scope_tags` by
    /// then, and nothing if one of `kept` is gone by then ([`Error::RetentionRaced`]). Returns those deleted.
    fn delete(
        &self,
        catalog: &mut Catalog,
        found: Vec<Checkpoint>,
        spare_tags: &[String],
        scope_tags: &[String],
        kept: &[&str],
    ) -> Result<Vec<Checkpoint>> {
        fault::point("forget-chosen");
        // Nothing to delete needs no lock: a Checkpointer's or watch's retention after each commit, which
        // mostly forgets nothing, must not wait on another machine's forget (or its lock left by a crash).
        if found.is_empty() {
            return Ok(found);
        }
        let ids: Vec<&str> = found.iter().map(|c| c.id.as_str()).collect();
        let deleted = self.forgetting(catalog, |catalog, journal| {
            catalog.delete_checkpoints(&ids, spare_tags, scope_tags, kept, journal)
        })?;
        fault::point("forget-done");
        Ok(found.into_iter().filter(|c| deleted.contains(&c.id)).collect())
    }

    /// Decides what a retention policy keeps and forgets, with the reasons, without changing anything.
    /// Checkpoints outside `scope` are neither kept nor forgotten (they do not appear in the plan). A plan that
    /// would forget every checkpoint of a path is returned, to be shown; applying it is refused
    /// ([`Plan::refuse_emptying`]).
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// for step in 0..5u8 {
    ///     repo.commit_reader("state", &mut &[step; 100][..], &Default::default()).unwrap();
    /// }
    /// let policy = snapstore::Policy { keep_last: Some(2), ..Default::default() };
    /// let plan = repo.plan_retention(&policy, &Default::default()).unwrap();
    /// assert_eq!((plan.keep.len(), plan.forget.len()), (2, 3));
    /// assert_eq!(plan.keep[0].reasons, vec!["last 1".to_string()]);
    /// repo.apply_retention(&plan).unwrap();
    /// assert_eq!(repo.checkpoints().unwrap().len(), 2);
    /// ```
    pub fn plan_retention(&self, policy: &Policy, scope: &RetentionScope) -> Result<Plan> {
        if policy.is_empty() {
            return Err(Error::EmptyPolicy);
        }
        let all = self.checkpoints()?;
        let chosen: Vec<Checkpoint> = all
            .into_iter()
            .filter(|c| scope.tags.iter().all(|t| c.tags.contains(t)))
            .filter(|c| scope.paths.is_empty() || scope.paths.contains(&c.path))
            .collect();
        let mut plan = retention::plan(&chosen, policy, !scope.across_paths);
        plan.scope_tags = scope.tags.clone();
        Ok(plan)
    }

    /// Checkpoints `path` automatically until `stop` is set: a commit every [`WatchOptions::every`] when
    /// something changed, then the retention policy, and GC now and then. Each step is reported to `on`; a
    /// failed step is reported and retried at the next interval. A commit under way when `stop` is set
    /// completes first.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// std::fs::create_dir(dir.path().join("run")).unwrap();
    /// std::fs::write(dir.path().join("run/state"), b"step 1").unwrap();
    /// let stop = AtomicBool::new(false);
    /// let opts = snapstore::WatchOptions { every: std::time::Duration::from_millis(10), ..Default::default() };
    /// let mut made = Vec::new();
    /// repo.watch(dir.path().join("run"), &opts, &stop, |event| {
    ///     if let snapstore::WatchEvent::Checkpoint { summary, .. } = event {
    ///         made.push(summary.id.clone());
    ///     }
    ///     // Nothing changes after the first checkpoint: stop at the first look that finds so.
    ///     if made.len() == 1 && matches!(event, snapstore::WatchEvent::Unchanged(_)) {
    ///         stop.store(true, Ordering::SeqCst);
    ///     }
    /// }).unwrap();
    /// assert_eq!(made.len(), 1);
    /// assert_eq!(repo.checkpoints().unwrap().len(), 1);
    /// ```
    pub fn watch(
        &self,
        path: impl AsRef<Path>,
        opts: &WatchOptions,
        stop: &std::sync::atomic::AtomicBool,
        on: impl FnMut(WatchEvent<'_>),
    ) -> Result<()> {
        watch::watch(self, path.as_ref(), opts, stop, on)
    }

    /// Applies `policy` to the checkpoints recorded under one key (`checkpoints.path`), after a new one.
    /// Applies `policy` to the checkpoints of one committed path, those of `host` or (`None`) those of every
    /// host as one series, after a commit made `just_made`: that one is kept whatever the policy says. Its
    /// time comes from this machine's clock; if that clock stepped back, older checkpoints carry later times,
    /// and `--keep-last` would otherwise forget each new checkpoint as it is made.
    pub(crate) fn retain_path(
        &self,
        policy: &Policy,
        key: &str,
        host: Option<&str>,
        just_made: &str,
    ) -> Result<Vec<Checkpoint>> {
        let scope = RetentionScope { paths: vec![key.to_string()], across_paths: host.is_none(), ..Default::default() };
        let mut plan = self.plan_retention(policy, &scope)?;
        if let Some(host) = host {
            // Another host's checkpoints of the same path are its own series, not this one's to forget.
            plan.forget.retain(|d| d.host == host);
        }
        if let Some(i) = plan.forget.iter().position(|d| d.id == just_made) {
            let mut d = plan.forget.remove(i);
            d.reasons.push("just made".into());
            plan.keep.push(d);
            plan.sort();
        }
        self.apply_retention(&plan)
    }

    /// Forgets what a plan from [`Repository::plan_retention`] says to forget, and returns what it forgot.
    /// What changed since the plan was made is honoured: a checkpoint tagged meanwhile with a tag the policy
    /// keeps stays, and one forgotten meanwhile is skipped. A plan that would forget every checkpoint of a
    /// path forgets nothing ([`Error::PolicyEmptiesPath`]).
    pub fn apply_retention(&self, plan: &Plan) -> Result<Vec<Checkpoint>> {
        self.refuse_another_users()?;
        plan.refuse_emptying()?;
        let mut catalog = self.open_catalog()?;
        let mut found = Vec::with_capacity(plan.forget.len());
        for d in &plan.forget {
            match catalog.resolve(&d.id) {
                Ok(c) => found.push(c),
                Err(Error::CheckpointNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // A plan is plain data: one made by hand must not take a part out of its group either.
        for c in &found {
            if let Some((group, part)) = catalog.part_of(&c.id)? {
                return Err(Error::PartOfGroup { id: c.short_id().to_string(), group, part });
            }
        }
        let kept: Vec<&str> = plan.keep.iter().map(|d| d.id.as_str()).collect();
        self.delete(&mut catalog, found, &plan.keep_tags, &plan.scope_tags, &kept)
    }

    /// Reclaims space: drops chunks and metadata no checkpoint uses, deletes packs with no live chunk and
    /// rewrites packs mostly unused. Safe while commits run in other threads or processes (see
    /// docs/format.md); a second GC at the same time gets [`Error::GcRunning`].
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let mut x = 88172645463325252u64;
    /// let old: Vec<u8> = (0..2_000_000).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
    /// let a = repo.commit_reader("s", &mut &old[..], &Default::default()).unwrap();
    /// let b = repo.commit_reader("s", &mut &b"new state"[..], &Default::default()).unwrap();
    /// repo.forget(&[&a.id]).unwrap();
    /// let g = repo.gc(&Default::default()).unwrap();
    /// assert!(g.chunks_swept > 0 && g.bytes_freed > 1_000_000);
    /// assert_eq!(repo.stats().unwrap().catalog.packs, 1);
    /// # let out = dir.path().join("out");
    /// repo.checkout(&b.id, &out, &Default::default()).unwrap();
    /// ```
    pub fn gc(&self, opts: &GcOptions) -> Result<GcSummary> {
        self.refuse_another_users()?;
        let mut s = gc::gc(
            &self.catalog_path,
            self.backend.clone(),
            self.remote.as_deref(),
            self.params.pack_target_size,
            opts,
        )?;
        if !opts.dry_run {
            s.orphans_deleted += Catalog::remove_abandoned_inits(&self.root);
        }
        Ok(s)
    }

    /// What a checkpoint's commit left out (unreadable, vanished while it ran, special files), with why.
    pub fn skipped(&self, id: &str) -> Result<Vec<Skipped>> {
        let catalog = self.open_catalog()?;
        let cp = catalog.resolve(id)?;
        let rows = catalog.skipped(&cp.id)?.into_iter();
        Ok(rows.map(|(p, reason)| Skipped { path: PathBuf::from(OsStr::from_bytes(&p)), reason }).collect())
    }

    /// Repository-wide figures: logical and stored bytes, dedup and compression ratios, chunk and pack counts.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
    /// let zeros = vec![0u8; 1 << 20];
    /// repo.commit_reader("a", &mut &zeros[..], &Default::default()).unwrap();
    /// repo.commit_reader("b", &mut &zeros[..], &Default::default()).unwrap();
    /// let st = repo.stats().unwrap();
    /// assert_eq!(st.catalog.checkpoints, 2);
    /// assert_eq!(st.catalog.chunks, 1); // four maximal zero chunks, one stored chunk
    /// assert!(st.dedup_ratio > 7.9 && st.compression_ratio > 100.0);
    /// ```
    pub fn stats(&self) -> Result<RepoStats> {
        let catalog = self.open_catalog()?.stats()?;
        let file_len = |name: &str| std::fs::metadata(self.root.join(name)).map(|m| m.len()).unwrap_or(0);
        let catalog_bytes = file_len(CATALOG_FILE) + file_len("catalog.db-wal");
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(RepoStats {
            dedup_ratio: ratio(catalog.logical_bytes, catalog.unique_bytes),
            compression_ratio: ratio(catalog.unique_bytes, catalog.stored_chunk_bytes),
            catalog,
            catalog_bytes,
        })
    }

    /// Compares two checkpoints from the catalog alone (no chunk data is read): calls `f` for every file,
    /// directory or symlink added, removed or modified from `a` to `b`, in path order, and returns the totals.
    pub fn diff(&self, a: &str, b: &str, mut f: impl FnMut(&Change) -> Result<()>) -> Result<DiffSummary> {
        let catalog = self.open_catalog()?;
        let (a, b) = (catalog.resolve(a)?, catalog.resolve(b)?);
        diff::diff(&catalog, &a.id, &b.id, &mut f)
    }

    /// What checkpoint `id` holds, every entry reported as added, for a path's first checkpoint, which has
    /// none before it to [`Repository::diff`] with (as `git show` tells a root commit's changes). The
    /// summary's `from` is empty.
    pub fn diff_added(&self, id: &str, mut f: impl FnMut(&Change) -> Result<()>) -> Result<DiffSummary> {
        let catalog = self.open_catalog()?;
        let b = catalog.resolve(id)?;
        diff::added(&catalog, &b.id, &mut f)
    }

    /// Checks the catalog against the chunk store: every chunk a checkpoint references has a location inside
    /// an existing pack, and pack indexes agree with the catalog; with [`VerifyOptions::read_data`], also
    /// decompresses and rehashes chunks. Damage is reported in the [`VerifyReport`], not as an error.
    pub fn verify(&self, opts: &VerifyOptions) -> Result<VerifyReport> {
        self.reader(|synced| {
            let mut report = verify::verify(&self.catalog_path, self.backend.clone(), opts)?;
            report.records_missing = synced.map(|s| s.records_missing.clone()).unwrap_or_default();
            if let Some(remote) = &self.remote
                && !report.marks_disproved.is_empty()
            {
                remote.withdraw_marks(&self.open_catalog()?, &report.marks_disproved);
            }
            Ok(report)
        })
    }

    /// Rebuilds the catalog's chunk index from the packs' own indexes, and reports which checkpoints are
    /// whole again. Use when `verify` finds index damage.
    pub fn repair_index(&self) -> Result<RepairReport> {
        if self.remote.is_some() {
            return Err(not_repairable());
        }
        self.refuse_another_users()?;
        repair::repair_index(&self.root, self.backend.clone(), None)
    }

    /// Like [`Repository::repair_index`], for a repository directory that may have lost its catalog (which
    /// [`Repository::open`] refuses): a new catalog is created and the chunk index rebuilt into it, but no
    /// checkpoint survives the loss of the catalog.
    pub fn repair_index_at(path: impl AsRef<Path>) -> Result<RepairReport> {
        Self::repair_local(path.as_ref(), None)
    }

    /// [`Repository::repair_index_at`], then every indexed chunk read and checked as [`Repository::verify`]
    /// does with `opts.read_data`, and the blobs whose bytes are wrong left out of the index. Each chunk left
    /// out is stored afresh by the next commit that meets it (commit the original data again: until GC finds
    /// every chunk in use indexed, a commit reads each file whose previous content holds a chunk the index
    /// lacks, whatever its stat), and from then on every checkpoint that uses it is whole again.
    pub fn repair_index_reading_data(path: impl AsRef<Path>, opts: &VerifyOptions) -> Result<RepairReport> {
        Self::repair_local(path.as_ref(), Some(opts))
    }

    /// `repair index` of the repository directory `root`, which may have lost its catalog.
    fn repair_local(root: &Path, read_data: Option<&VerifyOptions>) -> Result<RepairReport> {
        if remote_url(root).is_some() {
            return Err(not_repairable());
        }
        refuse_url_typo(root)?;
        if let Ok(md) = std::fs::metadata(root) {
            check_owner(root, &md)?;
        }
        repair::repair_index(root, Arc::new(LocalBackend::new(root)), read_data)
    }

    fn context<'a>(&'a self, journal: Option<catalog::Journal<'a>>) -> commit::Context<'a> {
        commit::Context {
            catalog_path: &self.catalog_path,
            repo_root: &self.root,
            backend: self.backend.clone(),
            params: &self.params,
            journal,
        }
    }
}

/// What [`Repository::tag`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tagged {
    /// The checkpoint as it is after the change.
    pub checkpoint: Checkpoint,
    /// The tags given to add that it lacked.
    pub added: Vec<String>,
    /// The tags given to remove that it had; one given that it lacked is not an error, and not here.
    pub removed: Vec<String>,
}

/// Refuses a repository (`md`: its catalog or directory) owned by another user. Checked before anything is
/// written: a pack or catalog file created by another user would be unreadable to the owner, even when that
/// other user is root.
fn check_owner(root: &Path, md: &std::fs::Metadata) -> Result<()> {
    let (owner, me) = (std::os::unix::fs::MetadataExt::uid(md), rustix::process::geteuid().as_raw());
    if owner != me {
        return Err(Error::NotOwner { path: root.to_path_buf(), owner, me });
    }
    Ok(())
}

/// Calls `f` on each entry of `stack` (popped from the end) and, with `recursive`, on everything below the
/// directories among them, depth first in name order.
fn walk_entries(
    catalog: &Catalog,
    mut stack: Vec<(Entry, PathBuf)>,
    recursive: bool,
    f: &mut dyn FnMut(&FileInfo) -> Result<()>,
) -> Result<()> {
    while let Some((entry, path)) = stack.pop() {
        validate_name(&entry.name)?;
        f(&FileInfo {
            path: path.clone(),
            kind: entry.kind,
            size: entry.size,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            owner: entry.owner,
            link_target: (entry.kind == EntryKind::Symlink).then(|| PathBuf::from(OsStr::from_bytes(&entry.target))),
            xattrs: entry.xattrs.iter().map(|x| String::from_utf8_lossy(&x.name).into_owned()).collect(),
        })?;
        if recursive && entry.kind == EntryKind::Dir {
            let tree = entry.object()?.expect("dir has a tree");
            for child in catalog.tree(&tree)?.into_iter().rev() {
                let p = path.join(OsStr::from_bytes(&child.name));
                stack.push((child, p));
            }
        }
    }
    Ok(())
}
