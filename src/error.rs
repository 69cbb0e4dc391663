//! The library's typed errors.
//!
//! Each variant names what failed and on what, so that the CLI can print one line and pick an exit code
//! without parsing strings, and a program linking the library can act on the kind of failure.

use std::path::PathBuf;

/// Everything that can go wrong in snapstore's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a file of the checkpointed tree or of a checkout destination.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error in the repository's chunk store.
    #[error("{}", backend_message(name, source))]
    Backend {
        /// The object (pack) name inside the store.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog database failed.
    #[error("catalog: {0}")]
    Catalog(#[from] rusqlite::Error),
    /// No repository exists at the given place.
    #[error("no snapstore repository at {0}")]
    NoRepository(PathBuf),
    /// The catalog file is empty, or holds no repository parameters: it was emptied, or is not a catalog
    /// snapstore made. The packs may be whole.
    #[error("the catalog {0} records no repository: it is empty, or not a snapstore catalog")]
    CatalogEmpty(PathBuf),
    /// No group checkpoint has this name.
    #[error("no group checkpoint named '{0}'")]
    GroupNotFound(String),
    /// `init` was asked to create a repository where one already is.
    #[error("a snapstore repository already exists at {0}")]
    RepositoryExists(PathBuf),
    /// The repository was written by a newer snapstore, or is not a snapstore repository at all.
    #[error("repository format: {0}")]
    Format(String),
    /// No checkpoint matches the given id or prefix.
    #[error("no checkpoint matches '{0}'")]
    CheckpointNotFound(String),
    /// A group checkpoint whose parts are not all in yet: no restore point.
    #[error("group '{name}' is incomplete: {have} of {parts} parts are in")]
    GroupIncomplete {
        /// The group.
        name: String,
        /// Parts in.
        have: u32,
        /// Parts it needs.
        parts: u32,
    },
    /// A part given to a group that is already complete.
    #[error("group '{0}' is complete; a new group checkpoint needs a new name (e.g. with the step in it)")]
    GroupComplete(String),
    /// A part that does not fit its group: another part count, or an index beyond it.
    #[error("group '{name}': part {part}/{parts} does not fit a group of {expected} parts")]
    PartMismatch {
        /// The group.
        name: String,
        /// The part's index.
        part: u32,
        /// The part count the part gave.
        parts: u32,
        /// The group's part count.
        expected: u32,
    },
    /// A checkpoint that is a group's part, asked to be forgotten alone.
    #[error("checkpoint {id} is part {part} of group '{group}': forget the whole group instead")]
    PartOfGroup {
        /// The checkpoint (short id).
        id: String,
        /// Its group.
        group: String,
        /// Its index.
        part: u32,
    },
    /// The checkpoint was forgotten (and its data collected) while it was being read.
    #[error("checkpoint {0} was forgotten while it was being read")]
    Forgotten(String),
    /// The checkpoint to tag was forgotten by another process (another machine, in a bucket) between naming
    /// it and tagging it; nothing was tagged.
    #[error("checkpoint {0} was forgotten by another process before it could be tagged; nothing was tagged")]
    ForgottenBeforeTagged(String),
    /// Several checkpoints match the given id prefix.
    #[error("checkpoint prefix '{prefix}' is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousId {
        /// The prefix given.
        prefix: String,
        /// Short ids of some of the matching checkpoints.
        candidates: Vec<String>,
    },
    /// The path given to commit (or watch) does not exist.
    #[error("{}: No such file or directory", .0.display())]
    SourceNotFound(PathBuf),
    /// A checkpoint holds nothing at the given path.
    #[error("checkpoint {checkpoint} has no path {}", path.display())]
    PathNotFound {
        /// The checkpoint's short id.
        checkpoint: String,
        /// The path looked for.
        path: PathBuf,
    },
    /// An id or prefix that is not 4 to 64 hex digits (nor `latest`), with or without `~N`.
    #[error("'{0}' is not a checkpoint id: use 4 to 64 hex digits or 'latest', optionally followed by ~N (N back)")]
    InvalidId(String),
    /// Stored data does not match its hash, or a stored structure is malformed.
    #[error("corruption: {what}")]
    Corrupt {
        /// What was found to be damaged, naming the file or object affected.
        what: String,
    },
    /// The catalog holds a name that would escape the checkout destination.
    #[error("refusing unsafe name {name:?} in checkpoint tree (it could write outside the destination)")]
    UnsafeName {
        /// The offending name, lossily decoded.
        name: String,
    },
    /// The checkout destination exists and is not empty.
    #[error("destination {0} exists and is not empty")]
    DestinationNotEmpty(PathBuf),
    /// A file could not be read during commit (and `skip_unreadable` was not set).
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file kept changing while it was being read, so no consistent copy could be taken.
    #[error("{0} changed while it was being read, on every attempt")]
    FileChanged(PathBuf),
    /// An argument is not acceptable.
    #[error("{0}")]
    InvalidInput(String),
    /// Garbage collection expired this writer's session (it looked dead), so its commit cannot publish safely.
    #[error("this commit's session was expired by garbage collection (it looked stalled); nothing was published")]
    SessionExpired,
    /// Another garbage collection holds the repository's GC lease.
    #[error("another gc is running on this repository (pid {pid} on {host}, started {started})")]
    GcRunning {
        /// Its process id.
        pid: u32,
        /// Its host.
        host: String,
        /// When it started, UTC.
        started: String,
    },
    /// A repository on a read-only filesystem whose catalog has a write-ahead log but not the shared-memory
    /// file SQLite needs to read it there (it was copied while a process had it open, without that file).
    #[error(
        "{} is on a read-only filesystem and its catalog has an unfinished write-ahead log (catalog.db-wal) without \
         the shared-memory file (catalog.db-shm) SQLite needs to read it there",
        .0.display()
    )]
    ReadOnlyWal(PathBuf),
    /// A retention plan would forget every checkpoint of a path; nothing was forgotten.
    #[error(
        "the policy would forget every checkpoint of {path} on {host}{}; refusing",
        match others { 0 => String::new(), 1 => " (and of 1 other path)".into(), n => format!(" (and of {n} other paths)") }
    )]
    PolicyEmptiesPath {
        /// The host of the checkpoints it would forget (empty when planned across hosts and paths).
        host: String,
        /// Their committed path (empty when planned across paths).
        path: String,
        /// How many other (host, path) pairs it would empty.
        others: usize,
    },
    /// A repository opened for reading only (through a read-only mount, or another user's) was written
    /// meanwhile, through another mount or by its owner: what was read may mix two states of it.
    #[error("{} changed while it was read (another process wrote it meanwhile, through another mount or as its owner)", .0.display())]
    ChangedWhileRead(PathBuf),
    /// A bucket lock this process held (GC's, its sweep lock, or a forget's) was taken over by another
    /// process, which took this one for stalled (no heartbeat for 10 minutes); it stopped before changing
    /// anything more.
    #[error("another process took over {0}, taking this one for stalled; it stopped before changing anything more")]
    LockLost(String),
    /// A GC deleting from a bucket (holding its sweep lock) for longer than a commit or reader would wait for
    /// it (`SNAPSTORE_SWEEP_WAIT`).
    #[error(
        "a gc is deleting from this repository's bucket (pid {pid} on {host}, started {started}); this command \
         waited {waited_secs} s for it to end"
    )]
    SweepRunning {
        /// Its process id.
        pid: u32,
        /// Its host.
        host: String,
        /// When it started, UTC.
        started: String,
        /// How long this command waited.
        waited_secs: u64,
    },
    /// Another forget, retention run or tag change held a bucket's forget lock for longer than this one would
    /// wait.
    #[error(
        "another forget, retention run or tag change is running on this repository (pid {pid} on {host}, started {started})"
    )]
    ForgetRunning {
        /// Its process id.
        pid: u32,
        /// Its host.
        host: String,
        /// When it started, UTC.
        started: String,
    },
    /// A repository in a bucket: this machine's copy of its catalog must be built again, and other snapstore
    /// processes on this machine kept it open for longer than the rebuild waits (`SNAPSTORE_COPY_WAIT`).
    #[error(
        "this machine's copy of the bucket's catalog must be built again from the bucket, and other snapstore \
         processes on this machine have it open ({}; waited {waited_secs} s): run this again once they end",
        path.display()
    )]
    CopyInUse {
        /// The copy's directory, which holds the lock.
        path: PathBuf,
        /// How long this process waited.
        waited_secs: u64,
    },
    /// Another [`crate::Checkpointer`] (of this or another process) holds the series this one was to take:
    /// the same name, in this repository. It ends with its process; a program restarted while the old one
    /// still runs can wait and try again.
    #[error(
        "another Checkpointer ({}) is checkpointing {key} in this repository; give this one another \
         CheckpointerOptions::name, or stop the other first (one without CommitOptions::host takes every host's \
         checkpoints of the name for its series, so it cannot run beside one pinned to a host)",
        pid.map_or("pid unknown".to_string(), |p| format!("pid {p}"))
    )]
    SeriesBusy {
        /// The series' key (`stdin:NAME`, or a committed path).
        key: String,
        /// The holder's process id, as it recorded it.
        pid: Option<u32>,
    },
    /// Commits are running, and the operation (`repair index`) must not race them.
    #[error("{count} commit{} running on this repository", if *count == 1 { " is" } else { "s are" })]
    CommitsRunning {
        /// How many commit sessions are alive.
        count: u64,
    },
    /// A retention plan met checkpoints changed since it was made: one it keeps was forgotten meanwhile (by
    /// another `forget` or `watch`), so what it would forget may no longer leave what the policy keeps.
    /// Nothing was forgotten.
    #[error(
        "checkpoint {kept} that the policy keeps was forgotten by another process while it ran; nothing was forgotten"
    )]
    RetentionRaced {
        /// The short id of a kept checkpoint found gone.
        kept: String,
    },
    /// A change asked of a repository that belongs to another user: it is opened for reading only, since
    /// files written there (packs, a catalog log, locks) would belong to this user and could be unreadable to
    /// the owner afterwards, even when this user is root.
    #[error(
        "{path} belongs to user id {owner}, not to this user (id {me}): it can be read (log, ls, show, diff, cat, \
         checkout, verify) but not changed"
    )]
    NotOwner {
        /// The repository.
        path: PathBuf,
        /// Its owner's user id.
        owner: u32,
        /// This process's effective user id.
        me: u32,
    },
    /// A retention policy with no rule would forget everything.
    #[error("no retention rule given: forget needs checkpoint ids or at least one --keep-* option")]
    EmptyPolicy,
    /// A repository in a bucket: this machine's copy of the catalog can only be brought up to date by building
    /// it again from the bucket's records, in order (a record that removes arrived after records numbered above
    /// it). `sync`, a commit, checkout or verify, and the next opening of the repository build it again.
    #[error("{0}")]
    RebuildNeeded(String),
    /// A repository in a bucket: records that remove wait, unapplied, on this machine's copy of the catalog
    /// ([`crate::SyncSummary::records_waiting`]), which therefore still lists what they removed; a commit could
    /// reuse chunks a GC elsewhere deleted, and a forget keep or drop the wrong checkpoints. The message names
    /// the way out.
    #[error("{0}")]
    RecordsWaiting(String),
    /// A worker thread of a pipeline failed without an error (it panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A bucket's client names the object in its errors already (as its URL); a local store's do not.
fn backend_message(name: &str, source: &std::io::Error) -> String {
    let message = source.to_string();
    if message.contains(name) {
        format!("chunk store: {message}")
    } else {
        format!("chunk store object {name}: {message}")
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// An error reading the path given to commit: [`Error::SourceNotFound`] if it does not exist, else I/O.
    pub fn reading_source(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::SourceNotFound(path.to_path_buf())
        } else {
            Error::io(path, source)
        }
    }

    /// Wraps a chunk-store I/O error with the object name it concerns.
    pub fn backend(name: impl Into<String>, source: std::io::Error) -> Self {
        Error::Backend { name: name.into(), source }
    }

    /// Reports damage to stored data.
    pub fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }

    /// Whether this error can come from reading a repository while another process changed it (through
    /// another mount of a read-only one): damage, or something missing, that a consistent read would not
    /// have met. Errors of the caller's input or destination cannot.
    pub fn may_come_from_a_changing_read(&self) -> bool {
        self.is_corruption()
            || matches!(
                self,
                Error::Catalog(_)
                    | Error::Backend { .. }
                    | Error::CheckpointNotFound(_)
                    | Error::Forgotten(_)
                    | Error::GroupNotFound(_)
                    | Error::GroupIncomplete { .. }
                    | Error::PathNotFound { .. }
                    | Error::AmbiguousId { .. }
                    | Error::ReadOnlyWal(_)
            )
    }

    /// Whether this error means stored data was found damaged (as opposed to an operational failure).
    pub fn is_corruption(&self) -> bool {
        match self {
            Error::Corrupt { .. } | Error::UnsafeName { .. } | Error::CatalogEmpty(_) => true,
            Error::Catalog(e) => catalog_damaged(e),
            _ => false,
        }
    }
}

/// Whether SQLite found the catalog file's own structure damaged (as opposed to failing to read it).
pub(crate) fn catalog_damaged(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_names_its_object_once() {
        let local = Error::backend("packs/ab/ab12.pack", std::io::ErrorKind::NotFound.into());
        assert_eq!(local.to_string(), "chunk store object packs/ab/ab12.pack: entity not found");
        let url = "s3://b/p/config";
        let remote = Error::backend(url, std::io::Error::other(format!("{url}: no such object")));
        assert_eq!(remote.to_string(), "chunk store: s3://b/p/config: no such object");
    }
}
