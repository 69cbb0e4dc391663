//! Checkout: rebuild a checkpoint's tree at a destination, verifying every chunk and writing only what differs.
//!
//! The caller's thread walks the checkpoint's trees, creates directories and symlinks, decides for each file
//! what must be written, and hands the chunks to workers in batches. Workers read, verify and write chunks at
//! their offsets; the worker finishing a file's last batch sets its mode and mtime (and renames it into
//! place). A directory's mode and mtime are set by whichever thread puts its last entry in place, so children
//! come before parents (a read-only directory does not stop its own checkout) and the directories' metadata is
//! spread over the workers instead of being a serial pass at the end.
//!
//! A file whose name is free is created under it and written; until it is whole its mtime is the time of
//! writing, not the checkpoint's, and a checkout that fails removes it. A file that replaces another is written
//! into a temporary file beside it and renamed over it, so it is old or new. With `in_place`, a file already at the destination is
//! compared first: one whose size and mtime match the checkpoint's is left alone; one whose size and mtime
//! match what a previous checkpoint recorded there (the last checkpoint checked out whole at that
//! destination, or the last committed from it) is known to hold that checkpoint's chunks, so only the chunks
//! that differ by position are written; any other file is read and hashed at the new chunk offsets, and only
//! mismatching chunks are written. Large files are patched in place (a crash leaves such a file with the mtime
//! of the crash, which matches neither version, so the next checkout hashes and finishes it); small files
//! are rewritten through a temporary file.

use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, bounded};
use rustix::fs::{AtFlags, Mode, OFlags};

use crate::backend::Backend;
use crate::catalog::{Catalog, host_name};
use crate::content;
use crate::dirfd;
use crate::error::{Error, Result};
use crate::fileclock::{Boundary, ctime_ns, mtime_ns};
use crate::id::ObjectId;
use crate::progress::{NoProgress, Progress};
use crate::sparse::is_zero;
use crate::store::ChunkReader;
use crate::tally::Tally;
use crate::tree::{self, ChunkRef, Entry, EntryKind, Owner, Xattr};
use crate::xattrs::On;

/// How to check out.
#[derive(Clone)]
pub struct CheckoutOptions {
    /// Update a destination that exists and is not empty, writing only what differs from the checkpoint.
    /// Without it, such a destination is refused. A file whose content turns out damaged while it is patched
    /// is left partly patched (some chunks the checkpoint's, others as they were), and the checkout fails
    /// saying so: restore another checkpoint over it.
    pub in_place: bool,
    /// With `in_place`, also remove what the destination holds and the checkpoint lacks.
    pub delete: bool,
    /// With `in_place`, read and hash every existing file instead of trusting a matching size and mtime.
    pub checksum: bool,
    /// Restore only these paths of the checkpoint (relative to the committed directory); empty: all of it.
    pub paths: Vec<PathBuf>,
    /// Give each entry the owner and group it was committed with (numeric ids). Only a checkout run as root
    /// can, and only it does; otherwise, or with this off, what it creates belongs to the user running it.
    pub owners: bool,
    /// Give each file and directory the extended attributes it was committed with (ACLs among them), removing
    /// others from what is kept in place. Those only root may set (`trusted.*`, `security.*`) are counted as
    /// not restored for anyone else; see [`CheckoutSummary::xattrs_not_restored`].
    pub xattrs: bool,
    /// Worker threads; 0 means two per core, at most 32.
    pub threads: usize,
    /// Receives progress.
    pub progress: Arc<dyn Progress>,
}

impl Default for CheckoutOptions {
    fn default() -> Self {
        CheckoutOptions {
            in_place: false,
            delete: false,
            checksum: false,
            paths: Vec::new(),
            owners: true,
            xattrs: true,
            threads: 0,
            progress: Arc::new(NoProgress),
        }
    }
}

/// What a checkout did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckoutSummary {
    /// The checkpoint checked out.
    pub id: String,
    /// Regular files restored or found up to date.
    pub files: u64,
    /// Of those, files whose bytes already matched (by the record of an earlier checkout, or hashed): none
    /// written, though a mode or mtime that differed is set back.
    pub files_unchanged: u64,
    /// Of those, files updated in place by writing only the chunks that differ (at least a byte written, a hole
    /// punched or the size changed).
    pub files_patched: u64,
    /// Of those, names linked to another name of the same file, as they were when committed (hard links).
    pub files_linked: u64,
    /// Of those, files written whole: new at the destination, or replaced (`files` less the three above).
    pub files_written: u64,
    /// Directories created or reused.
    pub dirs: u64,
    /// Symbolic links created or found up to date.
    pub symlinks: u64,
    /// Files, directories and symlinks removed from the destination (`delete`).
    pub removed: u64,
    /// Bytes of file content the checkpoint holds at the restored paths (the checkpoint's `logical_bytes`
    /// for a whole checkout).
    pub logical_bytes: u64,
    /// Bytes actually written into files (runs of zeros are left as holes, not written).
    pub bytes_written: u64,
    /// Entries whose recorded owner could not be given them (run as root; see the warning).
    pub owners_not_restored: u64,
    /// Extended attributes that could not be set or removed (see the warning).
    pub xattrs_not_restored: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The attribute that holds a directory's default ACL, which what is made in it inherits.
const ACL_DEFAULT: &str = "system.posix_acl_default";
/// Chunks handed to a worker at once: big enough to amortise, small enough to spread a large file.
const BATCH_BYTES: u64 = 4 << 20;
/// Files smaller than this are rewritten whole through a temporary file rather than patched: the write is
/// cheap, and the file is then either old or new after a crash.
const PATCH_MIN: u64 = 1 << 20;
/// The most workers a checkout starts unless told otherwise (see `checkout`).
const DEFAULT_MAX_THREADS: usize = 32;
/// Files whose jobs travel to a worker together at most (fewer when they reach [`BATCH_BYTES`]).
const BATCH_FILES: usize = 32;
/// Files the walker looks up per read transaction.
const READ_BATCH: usize = 256;
/// The unit a patched file is compared and written in: a page.
const BLOCK: u64 = 4096;
/// The set-uid and set-gid bits.
const SET_ID: u32 = 0o6000;
/// Hard-linked files whose first name a checkout remembers at most, to link their later names to (about
/// 540 bytes each, as measured); the later names of files beyond them are written as files of their own.
const LINK_GROUPS_MAX: usize = 1 << 16;

/// How a file reaches its name.
enum Target {
    /// Written under this temporary name and renamed into place when whole: over what is there (`replace`),
    /// or onto a name that must still be free.
    Temp { path: PathBuf, replace: bool },
    /// Created under its own name, where nothing was; removed again if the checkout fails.
    Created,
    /// Patched in place.
    Patched,
}

struct FileTask {
    /// The file and how it reaches its name. Set by the walker, except for a new file of one batch, which the
    /// worker writing it creates: creating files is most of a small-file checkout's kernel time, and on the
    /// walker alone it kept the workers waiting.
    opened: OnceLock<(File, Target)>,
    /// The file's directory, opened by the walker when it made or entered it: the file is created, renamed
    /// and removed in that directory whatever its path leads to by then (a later entry of the checkpoint may
    /// replace a parent by a symlink on a case-insensitive filesystem, before a worker creates the file).
    dir: Arc<OwnedFd>,
    /// Serializes the creation in `opened`.
    creating: Mutex<()>,
    dest: PathBuf,
    rel: PathBuf,
    mode: u32,
    mtime_ns: i64,
    size: u64,
    /// Where the last byte written so far ends: a new file is sized only if runs of zeros at its end left it
    /// short, since most files reach their size by their own writes and a truncate per file costs.
    end: AtomicU64,
    /// Batches not yet written, plus one held by the walker until it has sent them all.
    remaining: AtomicUsize,
    failed: AtomicBool,
    /// Finished; until then, dropping the task removes what it created.
    placed: AtomicBool,
    /// For a file patched in place: whether a byte of it changed (written, a hole punched, its size), and
    /// where to count it, placed with none changed, as unchanged rather than patched (round 35 review, F8).
    changed: AtomicBool,
    untouched: Option<Arc<AtomicU64>>,
    /// Created with its final mode, so no `chmod` is needed once it is whole (see [`NewFiles`]).
    create_mode: Option<u32>,
    /// The owner to give the file once it is whole, if it will not have it already (see [`Owners`]).
    chown: Option<(Owner, Arc<Owners>)>,
    /// The owner it was committed with, which its set-id bits depend on, and where their fate is counted.
    owner: Option<Owner>,
    owners: Arc<Owners>,
    xattrs: Vec<Xattr>,
    /// Made in a directory with a default ACL, a new file has an ACL of its own, which its entry may lack.
    acl_inherited: bool,
    /// Later names of this file (hard links), made once it is in place; `None` once it is.
    links: Mutex<Option<Vec<PendingLink>>>,
    /// The directory this file is an entry of, released once the file is in place.
    parent: Option<Arc<DirTask>>,
}

/// A later name of a hard-linked file, waiting for the file's first name to be in place.
struct PendingLink {
    /// The name's directory.
    dir: LinkDir,
    path: PathBuf,
    /// Something is at the name already (in place): replaced, unless it is this very file.
    replace: bool,
    /// For a copy, where the filesystem cannot link: the entry's mode, mtime, owner and attributes.
    mode: u32,
    mtime_ns: i64,
    chown: Option<(Owner, Arc<Owners>)>,
    owner: Option<Owner>,
    owners: Arc<Owners>,
    xattrs: Vec<Xattr>,
    parent: Option<Arc<DirTask>>,
}

/// Where a later name's directory is.
enum LinkDir {
    /// Open: the walker makes the link at once (see [`FileTask::dir`]).
    Open(Arc<OwnedFd>),
    /// Below the destination (its handle, and the path from it), found again when the link is made: a link
    /// that waits holds no handle of its own, since thousands can wait on one file.
    Below(Arc<OwnedFd>, PathBuf),
}

impl PendingLink {
    /// Links the name to `from` in `from_dir` (the file's first name, whole), or copies it where the
    /// filesystem cannot link it (no hard links, another filesystem below an existing destination, too many
    /// links); then releases the name's place in its directory. Over a name that is taken (`replace`), through
    /// a temporary name and a rename, so the name is old or new.
    fn make(&self, from_dir: &OwnedFd, from: &OsStr) -> Result<()> {
        use rustix::io::Errno;
        let io = |e: Errno| Error::io(&self.path, e.into());
        let name = self.path.file_name().unwrap_or_default();
        let dir = match &self.dir {
            LinkDir::Open(dir) => dir.clone(),
            LinkDir::Below(root, rel) => {
                Arc::new(dirfd::open_below(root, rel, None).map_err(|e| Error::io(&self.path, e))?)
            }
        };
        if self.replace {
            let there = rustix::fs::statat(&*dir, name, AtFlags::SYMLINK_NOFOLLOW);
            let file = rustix::fs::statat(from_dir, from, AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
            if there.is_ok_and(|t| (t.st_dev, t.st_ino) == (file.st_dev, file.st_ino)) {
                return entry_done(self.parent.as_ref());
            }
        }
        let temp = temp_path(parent_dir(&self.path));
        let at = if self.replace { temp.file_name().unwrap_or_default() } else { name };
        match rustix::fs::linkat(from_dir, from, &*dir, at, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::XDEV | Errno::PERM | Errno::OPNOTSUPP | Errno::MLINK | Errno::NOSYS) => {
                self.copy(&dir, from_dir, from, at)?
            }
            Err(e) if self.replace => return Err(io(e)),
            Err(e) => return Err(name_error(&self.path, e.into())),
        }
        if self.replace
            && let Err(e) = rustix::fs::renameat(&*dir, at, &*dir, name)
        {
            let _ = rustix::fs::unlinkat(&*dir, at, AtFlags::empty());
            return Err(io(e));
        }
        entry_done(self.parent.as_ref())
    }

    /// A copy of `from` created at `at` with the entry's owner, attributes, mode and mtime; removed again if it
    /// fails.
    fn copy(&self, dir: &OwnedFd, from_dir: &OwnedFd, from: &OsStr, at: &OsStr) -> Result<()> {
        let io = |e: std::io::Error| Error::io(&self.path, e);
        let read = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let src = File::from(rustix::fs::openat(from_dir, from, read, Mode::empty()).map_err(|e| io(e.into()))?);
        let create = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(dir, at, create, Mode::from_raw_mode(0o600));
        let dst = File::from(fd.map_err(|e| name_error(&self.path, e.into()))?);
        let copied = std::io::copy(&mut &src, &mut &dst).map(|_| ()).and_then(|()| {
            let chowned = self
                .chown
                .as_ref()
                .map(|(o, owners)| owners.note(&self.path, rustix::fs::fchown(&dst, o.uid(), o.gid())));
            let fresh = !self.parent.as_ref().is_some_and(|p| p.acl_default);
            self.owners.restore_xattrs(On::Fd(dst.as_fd()), &self.path, &self.xattrs, fresh);
            dst.set_permissions(fs::Permissions::from_mode(
                self.owners.mode_for(self.mode, self.owner, chowned, &dst),
            ))?;
            dst.set_modified(mtime(self.mtime_ns))
        });
        copied.map_err(|e| {
            let _ = rustix::fs::unlinkat(dir, at, AtFlags::empty());
            io(e)
        })
    }
}

/// A directory of the checkpoint whose mode and mtime wait for its entries to be in place.
struct DirTask {
    path: PathBuf,
    /// The directory holding this one, open, and this one's name in it: its mtime and mode are set through
    /// them, one lookup of one name rather than of the whole path twice (and never through a symlink put in
    /// its place). None where a walk starts, whose parent may be anything the caller named.
    at: Option<(Arc<OwnedFd>, std::ffi::OsString)>,
    mode: u32,
    mtime_ns: i64,
    /// The owner to give the directory, if it does not have it already.
    chown: Option<(Owner, Arc<Owners>)>,
    /// Its attributes, and where what failed of them is counted.
    xattrs: Vec<Xattr>,
    owners: Arc<Owners>,
    /// The attributes it had when the walk entered it (none for one the checkout made in a directory without a
    /// default ACL), compared with its entry's at the end; `None` where they could not be read then.
    have: Option<Vec<Xattr>>,
    /// It had a default ACL when the walk entered it, which files made in it inherit (restoring attributes).
    acl_default: bool,
    /// Its device and inode: its metadata is set only on this very directory, never on one put in its place.
    id: (u64, u64),
    /// Entries not yet in place, plus one the walker holds while it lists them (so that the count cannot reach
    /// zero before every entry is counted).
    remaining: AtomicUsize,
    /// The directory this one is an entry of (none for where a walk starts).
    parent: Option<Arc<DirTask>>,
}

impl DirTask {
    /// Called once per entry and once by the walker. The last caller sets the directory's mtime and mode
    /// (nothing changes it after that), then releases the directory's own place in its parent.
    fn release(&self) -> Result<()> {
        let mut dir = self;
        while dir.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            dir.set_metadata()?;
            match &dir.parent {
                Some(parent) => dir = parent,
                None => break,
            }
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Sets the directory's owner, attributes, mtime and mode, on this very directory: a handle on its name
    /// (never through a symlink, and for the start of a walk as named), checked to be the directory walked,
    /// then, through [`dirfd::proc_path`], the handle itself. Without `/proc`, the owner, mtime and mode by the
    /// name in its directory, the attributes through a readable handle reopened from the checked one.
    fn set_metadata(&self) -> Result<()> {
        let io = |e: rustix::io::Errno| Error::io(&self.path, e.into());
        let handle = match &self.at {
            Some((parent, name)) => {
                dirfd::open(parent, name, OFlags::PATH | OFlags::DIRECTORY).map_err(|e| Error::io(&self.path, e))?
            }
            None => {
                let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                rustix::fs::open(&self.path, flags, Mode::empty()).map_err(io)?
            }
        };
        let st = rustix::fs::fstat(&handle).map_err(io)?;
        if (st.st_dev, st.st_ino) != self.id {
            let e = std::io::Error::other("replaced by another while the checkout ran; run it again");
            return Err(Error::io(&self.path, e));
        }
        let nofollow = AtFlags::SYMLINK_NOFOLLOW;
        let proc = dirfd::proc_path(&handle);
        with_dir_xattrs(&handle, |on| match (&proc, &self.at) {
            (Some(proc), _) => self.apply(rustix::fs::CWD, proc, AtFlags::empty(), on, st.st_mode),
            (None, Some((parent, name))) => self.apply(parent.as_fd(), Path::new(name), nofollow, on, st.st_mode),
            (None, None) => self.apply(rustix::fs::CWD, &self.path, nofollow, on, st.st_mode),
        })
    }

    /// Sets owner, attributes (`on`, or why they cannot be reached), mtime and mode at `name` (below `dir`; its
    /// mode now `current`): the owner before the mode, since a change of owner clears set-id bits; attributes
    /// before the mode, which may forbid the owner to write them; the mtime before the mode, since setting it by
    /// name looks the directory up, which its final mode may forbid.
    fn apply(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &Path,
        flags: AtFlags,
        on: std::io::Result<On<'_>>,
        current: u32,
    ) -> Result<()> {
        let io = |e: rustix::io::Errno| Error::io(&self.path, e.into());
        if let Some((owner, owners)) = &self.chown {
            let _ = owners.note(&self.path, rustix::fs::chownat(dir, name, owner.uid(), owner.gid(), flags));
        }
        if self.owners.xattrs.is_some() && current & 0o200 == 0 && !rustix::process::geteuid().is_root() {
            // An existing directory of the user's without the owner's write bit: its user.* attributes could
            // not be set. Its mode is set below anyway.
            let _ = rustix::fs::chmodat(dir, name, Mode::from_raw_mode(current & 0o7777 | 0o200), AtFlags::empty());
        }
        match on {
            Ok(on) => self.owners.restore_xattrs_from(on, &self.path, &self.xattrs, self.have.as_deref()),
            Err(e) => self.owners.xattrs_unreachable(&self.path, &e),
        }
        rustix::fs::utimensat(dir, name, &mtime_only(self.mtime_ns), flags).map_err(io)?;
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(self.mode), AtFlags::empty()).map_err(io)
    }
}

/// Calls `f` with what a directory's attributes are reached through, given a handle on it (`O_PATH` too): its
/// `/proc/self/fd` path, or without `/proc` a readable handle on it ([`dirfd::readable`]); never its path, which
/// a directory swapped on the way could redirect.
fn with_dir_xattrs<R>(handle: &OwnedFd, f: impl FnOnce(std::io::Result<On<'_>>) -> R) -> R {
    if let Some(proc) = dirfd::proc_path(handle) {
        return f(Ok(On::Followed(&proc)));
    }
    match dirfd::readable(handle) {
        Ok(fd) => f(Ok(On::Fd(fd.as_fd()))),
        Err(e) => f(Err(e)),
    }
}

/// Releases an entry's place in its directory, if it has one of the checkpoint's.
fn entry_done(parent: Option<&Arc<DirTask>>) -> Result<()> {
    parent.map_or(Ok(()), |p| p.release())
}

/// What a file the checkout creates gets from the kernel, seen once by a probe file into a new or empty
/// destination (every directory below it is made by the checkout and inherits what the probe saw), so that
/// most files need neither a `chmod` nor a `chown` of their own:
/// - its mode: the kernel masks the mode asked for with the umask, or, where the directory has a default ACL,
///   with that ACL instead (and a network filesystem's server may apply ACLs of its own);
/// - its owner: the user running the checkout, and its group, or the directory's where that has the set-group-id
///   bit (and directories made below it inherit the bit, and the group, until the checkout sets their owner
///   once their entries are in place).
#[derive(Clone, Copy)]
struct NewFiles {
    umask: Option<u32>,
    owner: Option<Owner>,
}

impl NewFiles {
    fn probe(dest: &Path, in_place: bool) -> NewFiles {
        if in_place {
            return NewFiles { umask: None, owner: None };
        }
        let at = if dest.is_dir() { dest } else { parent_dir(dest) };
        // The widest mode the umask allows: an ACL that leaves it whole leaves every narrower mode whole too.
        let umask = current_umask();
        let seen = Self::created(at, umask.map_or(0o600, |u| 0o777 & !u));
        NewFiles {
            umask: umask.filter(|&u| seen.is_some_and(|(mode, _)| mode == 0o777 & !u)),
            owner: seen.map(|(_, owner)| owner),
        }
    }

    /// The mode and owner a file created in `dir` with `mode` gets: what the kernel (or a network filesystem's
    /// server, whose ACLs no xattr shows) does, seen rather than guessed.
    fn created(dir: &Path, mode: u32) -> Option<(u32, Owner)> {
        let probe = temp_path(dir);
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::open(&probe, flags, Mode::from_raw_mode(mode)).ok()?;
        let got = rustix::fs::fstat(&fd);
        let _ = rustix::fs::unlink(&probe);
        got.ok().map(|st| (st.st_mode & 0o7777, stat_owner(&st)))
    }

    /// The mode to create a file of final mode `mode` with, if it then needs no `chmod`: permission bits
    /// the umask leaves alone, and no set-id or sticky bit (writing clears those).
    fn create_mode(self, mode: u32) -> Option<u32> {
        let umask = self.umask?;
        (mode & !0o777 == 0 && mode & umask == 0).then_some(mode)
    }
}

/// Restoring owners, and what failed of it. A checkout that cannot set an owner (a filesystem without owners,
/// an NFS export that maps root to nobody) still restores every byte: it warns once at the end instead of
/// failing, as `tar` does.
#[derive(Default)]
struct Owners {
    /// Run as root and not told otherwise: owners are set.
    restoring: bool,
    /// Owners that could not be set.
    failed: crate::tally::Tally,
    /// Files whose set-uid or set-gid bits were left off (see [`Owners::mode_for`]).
    set_id_dropped: AtomicU64,
    /// Restoring extended attributes (not told otherwise), and those that failed.
    xattrs: Option<crate::xattrs::Failures>,
}

impl Owners {
    /// Gives the file or directory at `on` (the entry at `path`) the attributes `want`, if restoring them:
    /// `fresh` for a file just made, taken to have none, else what it has is read first and left alone where
    /// it is what the entry records (so that a kept file's ctime stays as it was).
    fn restore_xattrs(&self, on: On<'_>, path: &Path, want: &[Xattr], fresh: bool) {
        match &self.xattrs {
            Some(failures) if fresh => crate::xattrs::apply(on, path, want, None, failures),
            _ => self.restore_xattrs_from(on, path, want, None),
        }
    }

    /// [`Owners::restore_xattrs`] for an entry whose attributes were read already (`have`; `None`: not yet, or
    /// they could not be, and are read now).
    fn restore_xattrs_from(&self, on: On<'_>, path: &Path, want: &[Xattr], have: Option<&[Xattr]>) {
        let Some(failures) = &self.xattrs else { return };
        let read;
        let have = match have {
            Some(have) => have,
            None => {
                // Unreadable, it is taken to have none: each recorded attribute is set, and nothing can be
                // removed, which is counted, so that no record vouches for its attributes.
                read = crate::xattrs::read(on).unwrap_or_else(|e| {
                    failures.note_io(path, &e);
                    Vec::new()
                });
                &read
            }
        };
        if have != want {
            crate::xattrs::apply(on, path, want, Some(have), failures);
        }
    }

    /// Counts an entry whose attributes could not be reached at all (`e`), if restoring them.
    fn xattrs_unreachable(&self, path: &Path, e: &std::io::Error) {
        if let Some(failures) = &self.xattrs {
            failures.note_io(path, e);
        }
    }

    /// Whether the file at `on` has the attributes `want`, or they are not being restored.
    fn xattrs_as_recorded(&self, on: On<'_>, want: &[Xattr]) -> bool {
        self.xattrs.is_none() || crate::xattrs::read(on).is_ok_and(|have| have == want)
    }

    /// Records the outcome of setting the owner of `path`; returns whether it was set. Where it was not, a
    /// caller leaves set-uid and set-gid bits off: a program of another user's must not become one of the
    /// user running the checkout.
    fn note(&self, path: &Path, r: rustix::io::Result<()>) -> bool {
        let Err(e) = r else { return true };
        self.failed.note(|| format!("{}: {}", path.display(), std::io::Error::from(e)));
        false
    }

    /// The mode to give a file whose entry has `mode`: without set-uid and set-gid bits unless the file belongs
    /// to the owner it was committed with (`recorded`), as `chowned` made it (`Some(true)`) or as it was
    /// (`file` then says). Else root restoring another user's set-uid program without its owner (`--no-owners`,
    /// a checkpoint from before owners were recorded, a failed `chown`) would make it a set-uid root program.
    fn mode_for(&self, mode: u32, recorded: Option<Owner>, chowned: Option<bool>, file: &File) -> u32 {
        if mode & SET_ID == 0 {
            return mode;
        }
        // Set-uid goes with the user, set-gid with the group.
        let (user, group) = match (recorded, chowned) {
            (None, _) => (false, false),
            (Some(_), Some(done)) => (done, done),
            (Some(owner), None) => {
                file.metadata().map_or((false, false), |md| (md.uid() == owner.uid, md.gid() == owner.gid))
            }
        };
        let kept = mode & !(if user { 0 } else { 0o4000 }) & !(if group { 0 } else { 0o2000 });
        if kept != mode {
            self.set_id_dropped.fetch_add(1, Ordering::Relaxed);
        }
        kept
    }

    /// The warning for files whose set-id bits were left off, if any were.
    fn set_id_warning(&self) -> Option<String> {
        let n = self.set_id_dropped.load(Ordering::Relaxed);
        (n > 0).then(|| {
            format!(
                "left set-uid or set-gid bits off {n} {}: {} not belong to the user or group {} committed with, or \
                 {} committed without an owner (restoring owners needs a checkout run as root, without --no-owners)",
                if n == 1 { "file" } else { "files" },
                if n == 1 { "it does" } else { "they do" },
                if n == 1 { "it was" } else { "they were" },
                if n == 1 { "was" } else { "were" }
            )
        })
    }

    /// The warning for what failed, if anything did.
    fn warning(&self) -> Option<String> {
        let (n, first) = self.failed.summary()?;
        let (what, they) = if n == 1 { ("entry", "it belongs") } else { ("entries", "they belong") };
        Some(format!(
            "could not restore the owner of {n} {what} ({}{first}); {they} to the user running the checkout \
             (--no-owners: do not try)",
            if n == 1 { "" } else { "first: " }
        ))
    }
}

impl Owner {
    /// The user id to set; `None` for the id -1, which `chown` reads as "leave as is" (a damaged catalog's).
    fn uid(self) -> Option<rustix::fs::Uid> {
        (self.uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(self.uid))
    }

    fn gid(self) -> Option<rustix::fs::Gid> {
        (self.gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(self.gid))
    }
}

/// The calling thread's umask, read without setting it (which would race with other threads creating files).
fn current_umask() -> Option<u32> {
    let status =
        fs::read_to_string("/proc/thread-self/status").or_else(|_| fs::read_to_string("/proc/self/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

impl Drop for FileTask {
    fn drop(&mut self) {
        // Reached when the last job holding the task is done or discarded (a checkout that stopped early).
        if !self.placed.load(Ordering::Acquire) {
            self.discard();
        }
    }
}

struct Job {
    task: Arc<FileTask>,
    /// Chunks and the offsets they go to.
    chunks: Vec<(u64, ChunkRef)>,
    /// Hash what the file holds at each chunk's place first, and write only the chunks that differ.
    compare: bool,
}

fn mtime(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn timespec(ns: i64) -> rustix::fs::Timespec {
    rustix::fs::Timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) }
}

const TEMP_PREFIX: &str = ".snapstore-tmp-";

fn temp_path(dir: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!("{TEMP_PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Whether `name` in `dir` is a temporary file left by a checkout whose process is gone: its pid is not
/// running here, and no process holds its lock (a checkout in another PID namespace sharing the directory has
/// a pid this one cannot see, but its lock shows).
fn stale_temp(dir: &OwnedFd, name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(TEMP_PREFIX.as_bytes()) else { return false };
    let pid = rest.split(|&b| b == b'-').next().and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok());
    pid.is_some_and(crate::catalog::process_gone) && !locked(dir, OsStr::from_bytes(name))
}

/// Locks a temporary for as long as `fd` is open, so that no other checkout takes it for a dead one's.
/// Filesystems without locks fall back to the pid alone.
fn lock_temp(fd: &OwnedFd) {
    let _ = rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockExclusive);
}

/// Whether another process holds the lock of the temporary `name` in `dir`, or it cannot be told. Probed with a
/// shared lock: it conflicts with the writer's exclusive one and, unlike an exclusive probe, needs only read
/// access (NFS emulates `flock` with byte-range locks, and an exclusive one there needs the file open for
/// writing).
fn locked(dir: &OwnedFd, name: &OsStr) -> bool {
    let fd = match dirfd::open(dir, name, OFlags::RDONLY | OFlags::NONBLOCK) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(rustix::io::Errno::WOULDBLOCK) => true,
        // No locks on this filesystem: the pid, already found dead, decides.
        Err(_) => false,
    }
}

/// The error for a name that should have been free; says why it may not be when it was taken.
fn name_error(path: &Path, e: std::io::Error) -> Error {
    if e.kind() != std::io::ErrorKind::AlreadyExists {
        return Error::io(path, e);
    }
    let why = "the name is taken, most likely by another entry of the checkpoint whose name this filesystem \
               takes for the same one (it ignores case, or normalizes Unicode): check out to a filesystem that \
               tells the names apart, or the colliding paths one at a time with --path";
    Error::io(path, std::io::Error::new(std::io::ErrorKind::AlreadyExists, why))
}

fn remove_stale_temps(dir: &OwnedFd) {
    for name in dirfd::names(dir).into_iter().flatten() {
        if stale_temp(dir, name.as_bytes()) {
            let _ = rustix::fs::unlinkat(dir, &name, AtFlags::empty());
        }
    }
}

fn file_error(rel: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt { what } => Error::corrupt(format!("{}: {what}", rel.display())),
        other => other,
    }
}

/// The directory `path` is in; "." for a bare name.
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Creates the file for `dest` in `dir`, its directory: under its own name if it is free and the file small
/// (`staged` false), else under a temporary name beside it, renamed into place when whole. Never through a
/// symlink. A file created under its own name gets `create_mode` if given, else (and a temporary always)
/// 0600.
fn create_in(
    dir: &OwnedFd,
    dest: &Path,
    exists: bool,
    staged: bool,
    create_mode: Option<u32>,
) -> Result<(File, Target)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o600);
    if !exists && !staged {
        let own = Mode::from_raw_mode(create_mode.unwrap_or(0o600));
        match rustix::fs::openat(dir, dest.file_name().unwrap_or_default(), flags, own) {
            Ok(fd) => return Ok((File::from(fd), Target::Created)),
            Err(e) => return Err(name_error(dest, e.into())),
        }
    }
    let temp = temp_path(parent_dir(dest));
    let fd = rustix::fs::openat(dir, temp.file_name().unwrap_or_default(), flags, mode)
        .map_err(|e| Error::io(&temp, e.into()))?;
    lock_temp(&fd);
    Ok((File::from(fd), Target::Temp { path: temp, replace: exists }))
}

/// Renames `from` to `to` in `dir`, failing with `AlreadyExists` if `to` is taken. Where the filesystem
/// cannot rename that way (NFS, some FUSE), a hard link does the same atomically; only where it has no hard
/// links either is the name checked first, leaving a window in which a name taken meanwhile is replaced.
fn rename_noreplace(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
    use rustix::io::Errno;
    match rustix::fs::renameat_with(dir, from, dir, to, rustix::fs::RenameFlags::NOREPLACE) {
        Err(Errno::INVAL | Errno::NOSYS) => move_noreplace(dir, from, to),
        r => Ok(r?),
    }
}

/// `rename_noreplace` for filesystems whose rename cannot refuse a taken name.
fn move_noreplace(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
    use rustix::io::Errno;
    match rustix::fs::linkat(dir, from, dir, to, AtFlags::empty()) {
        Ok(()) => Ok(rustix::fs::unlinkat(dir, from, AtFlags::empty())?),
        // No hard links here (some FUSE filesystems answer ENOSYS).
        Err(Errno::PERM | Errno::OPNOTSUPP | Errno::MLINK | Errno::NOSYS) => rename_if_absent(dir, from, to),
        Err(e) => Err(e.into()),
    }
}

/// The last resort of `rename_noreplace`: checks the name, then renames.
fn rename_if_absent(dir: &OwnedFd, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
    use rustix::io::Errno;
    match rustix::fs::statat(dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EXIST.into()),
        Err(Errno::NOENT) => Ok(rustix::fs::renameat(dir, from, dir, to)?),
        Err(e) => Err(e.into()),
    }
}

impl FileTask {
    /// The file, created now if the walker left that to the worker.
    fn opened(&self) -> Result<(&File, &Target)> {
        if let Some((file, target)) = self.opened.get() {
            return Ok((file, target));
        }
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((file, target)) = self.opened.get() {
            return Ok((file, target));
        }
        let created = create_in(&self.dir, &self.dest, false, false, self.create_mode)?;
        let (file, target) = self.opened.get_or_init(|| created);
        Ok((file, target))
    }

    /// Removes `path` (the destination or a temporary beside it) from the task's directory.
    fn remove(&self, path: &Path) {
        let _ = rustix::fs::unlinkat(&self.dir, path.file_name().unwrap_or_default(), AtFlags::empty());
    }

    /// Called once per batch and once by the walker; the last caller finishes the file.
    fn release(&self) -> Result<()> {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 || self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let io = |e| Error::io(&self.dest, e);
        let (file, target) = self.opened()?;
        if !matches!(target, Target::Patched) && self.end.load(Ordering::Acquire) < self.size {
            file.set_len(self.size).map_err(io)?;
        }
        // The owner before the mode: a change of owner clears set-id bits.
        let chowned =
            self.chown.as_ref().map(|(o, owners)| owners.note(&self.dest, rustix::fs::fchown(file, o.uid(), o.gid())));
        // Attributes after the owner (a change of owner clears `security.capability`) and after the last
        // write (which clears it too), before the mode, which may forbid the owner to write them.
        let fresh = !matches!(target, Target::Patched) && !self.acl_inherited;
        self.owners.restore_xattrs(On::Fd(file.as_fd()), &self.dest, &self.xattrs, fresh);
        // A patched file that needed no byte and has its mode and mtime keeps its ctime, so that the record of
        // this checkout vouches for it next time (on a filesystem of 1 s timestamps it would not, changed now).
        let now = if matches!(target, Target::Patched) && chowned.is_none() { file.metadata().ok() } else { None };
        if !(matches!(target, Target::Created) && self.create_mode.is_some()) {
            let mode = self.owners.mode_for(self.mode, self.owner, chowned, file);
            if now.as_ref().is_none_or(|md| md.permissions().mode() & 0o7777 != mode) {
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io)?;
            }
        }
        // The mtime last: a patched file carries the checkpoint's mtime only once it is whole.
        if now.as_ref().is_none_or(|md| mtime_ns(md) != self.mtime_ns) {
            file.set_modified(mtime(self.mtime_ns)).map_err(io)?;
        }
        if let Target::Temp { path, replace } = target {
            crate::fault::point("checkout-temp");
            let (from, to) = (path.file_name().unwrap_or_default(), self.dest.file_name().unwrap_or_default());
            if *replace {
                rustix::fs::renameat(&self.dir, from, &self.dir, to).map_err(|e| io(e.into()))?;
            } else {
                rename_noreplace(&self.dir, from, to).map_err(|e| name_error(&self.dest, e))?;
            }
        }
        self.placed.store(true, Ordering::Release);
        if let Some(untouched) = &self.untouched
            && !self.changed.load(Ordering::Acquire)
        {
            untouched.fetch_add(1, Ordering::Relaxed);
        }
        crate::fault::point("checkout-file");
        let waiting = self.links.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        for link in waiting {
            link.make(&self.dir, self.dest.file_name().unwrap_or_default())?;
        }
        entry_done(self.parent.as_ref())
    }

    /// Gives the file up because its content is damaged, while the checkout goes on with the other files:
    /// removes what it created, counts it in `damaged`, and releases its directory (and those of its later
    /// names, which are not made), so that directories still get their metadata. Once per file, whichever of
    /// its batches meets the damage first.
    fn give_up_damaged(&self, damaged: &Tally, e: &Error) -> Result<()> {
        if self.failed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.placed.load(Ordering::Acquire) {
            self.discard();
        }
        let what = || match e {
            Error::Corrupt { what } => what.clone(),
            other => other.to_string(),
        };
        damaged.note(what);
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        for link in links {
            damaged.note(what);
            entry_done(link.parent.as_ref())?;
        }
        entry_done(self.parent.as_ref())
    }

    /// Gives the file up: removes what it created, unless it is already finished and in place.
    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) && !self.placed.load(Ordering::Acquire) {
            self.discard();
        }
    }

    /// Removes what this task created and did not finish. A patched file stays: its mtime marks it unfinished.
    fn discard(&self) {
        match self.opened.get() {
            Some((_, Target::Temp { path, .. })) => self.remove(path),
            Some((_, Target::Created)) => self.remove(&self.dest),
            Some((_, Target::Patched)) | None => {}
        }
    }

    /// Writes a verified chunk at `at`; returns the bytes written. Into a new file, runs of zeros are skipped
    /// (they stay holes). Into a patched file, only the 4 KiB blocks whose bytes differ are written (a small
    /// edit costs its blocks, not its whole chunk), and zeros over data are punched out as holes.
    fn write(&self, at: u64, data: &[u8], old: &mut Vec<u8>) -> Result<u64> {
        let io = |e| Error::io(&self.dest, e);
        let (file, target) = self.opened()?;
        if !matches!(target, Target::Patched) {
            if is_zero(data) {
                return Ok(0);
            }
            file.write_all_at(data, at).map_err(io)?;
            self.end.fetch_max(at + data.len() as u64, Ordering::AcqRel);
            return Ok(data.len() as u64);
        }
        old.resize(data.len(), 0);
        // The file was sized to the checkpoint's length first, so the range exists.
        file.read_exact_at(old, at).map_err(io)?;
        if is_zero(data) {
            if is_zero(old) {
                return Ok(0);
            }
            let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            if rustix::fs::fallocate(file, punch, at, data.len() as u64).is_ok() {
                self.changed.store(true, Ordering::Relaxed);
                return Ok(0);
            }
        }
        let mut written = 0;
        let mut i = 0;
        while i < data.len() {
            // Blocks aligned to file offsets, so that a write covers whole pages.
            let block_end = |i: usize| (((at + i as u64) / BLOCK + 1) * BLOCK - at).min(data.len() as u64) as usize;
            let mut end = block_end(i);
            if data[i..end] == old[i..end] {
                i = end;
                continue;
            }
            let start = i;
            while end < data.len() {
                let next = block_end(end);
                if data[end..next] == old[end..next] {
                    break;
                }
                end = next;
            }
            file.write_all_at(&data[start..end], at + start as u64).map_err(io)?;
            written += (end - start) as u64;
            i = end;
        }
        if written > 0 {
            self.changed.store(true, Ordering::Relaxed);
        }
        Ok(written)
    }
}

/// Removes whatever is at `name` in `dir` (never following a symlink), so the checkout can put its own entry
/// there; `path` is where that is, for errors. Never the repository's directory (`spare`, its device and
/// inode), met however deep: through a bind mount its path says nothing.
fn clear(dir: &OwnedFd, name: &OsStr, path: &Path, spare: &[(u64, u64)]) -> Result<()> {
    match dirfd::remove(dir, name, spare) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.get_ref().is_some_and(|e| e.is::<dirfd::Spared>()) => Err(Error::InvalidInput(format!(
            "refusing to remove {}: the repository is in it (mounted or linked there); nothing in the repository \
             was removed. Unmount it, or check out elsewhere",
            path.display()
        ))),
        r => r.map_err(|e| Error::io(path, e)),
    }
}

/// [`clear`], unless `path` is a directory holding the repository (`protect`, canonical): an entry of the
/// checkpoint that is not a directory where the destination has one would otherwise take the repository with it.
/// (A guard against a mistake, so looked up by path; the removal itself goes through `dir`.) Nor, without
/// `delete`, a directory that holds anything: what it holds is not the checkpoint's, and a checkout keeps
/// what the checkpoint lacks unless told otherwise (round 35 review, F4: it was removed whole, and not
/// counted). Returns whether it removed such a directory, with `delete`.
fn clear_sparing(
    dir: &OwnedFd,
    name: &OsStr,
    path: &Path,
    protect: Option<&Path>,
    spare: &[(u64, u64)],
    delete: bool,
) -> Result<bool> {
    let is_dir = dirfd::lstat(dir, name).is_ok_and(|md| md.is_dir());
    if let Some(repo) = protect
        && is_dir
        && fs::canonicalize(path).is_ok_and(|c| repo.starts_with(c))
    {
        return Err(Error::InvalidInput(format!(
            "refusing to replace {} by the checkpoint's entry: the repository {} is there",
            path.display(),
            repo.display()
        )));
    }
    let holds = is_dir && dirfd::has_entries(dir, name).map_err(|e| Error::io(path, e))?;
    if holds && !delete {
        return Err(Error::InvalidInput(format!(
            "refusing to replace the directory {} by the checkpoint's entry of that name: it holds files the \
             checkpoint does not have, which a checkout keeps unless --delete is given. Move it away, or run again \
             with --delete; what was checked out so far stays, and running the checkout again goes on from there",
            path.display()
        )));
    }
    clear(dir, name, path, spare)?;
    Ok(holds)
}

/// Refuses a destination that is the repository or lies inside it (`repo`, canonical), where a checkout
/// would overwrite, and with `--delete` remove, the repository's own files. Compared canonically, through
/// symlinks, as far as the destination exists, and by device and inode, which a bind mount of the repository
/// keeps.
fn refuse_repository(dest: &Path, repo: &Path, spare: &[(u64, u64)]) -> Result<()> {
    let abs = std::path::absolute(dest).map_err(|e| Error::io(dest, e))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    let canonical = loop {
        match fs::canonicalize(existing) {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name);
                    existing = parent;
                }
                _ => return Ok(()),
            },
        }
    };
    let mounted = canonical.ancestors().any(|a| fs::metadata(a).is_ok_and(|m| spare.contains(&(m.dev(), m.ino()))));
    let full = rest.iter().rev().fold(canonical, |p, name| p.join(name));
    if full.starts_with(repo) || mounted {
        let what = if full == repo {
            "the repository".to_string()
        } else {
            format!("inside the repository {}", repo.display())
        };
        return Err(Error::InvalidInput(format!(
            "refusing to check out into {}: it is {what}, whose files a checkout there would overwrite; choose a \
             destination outside it",
            dest.display(),
        )));
    }
    Ok(())
}

/// What an earlier checkpoint recorded at a path of the destination, trusted for a file whose metadata
/// still matches.
#[derive(Clone)]
struct Prior {
    entry: Entry,
    /// Who recorded it, which says what else must match.
    by: Recorder,
}

#[derive(Clone, Copy)]
enum Recorder {
    /// A commit of this very file: ctime and inode must match too, as commit itself requires.
    Commit,
    /// A whole checkout into the destination, which ended at this time (a [`Boundary`]): a file changed since
    /// has a ctime at or after it, even where its size and mtime were put back (`touch -r`, a copy keeping
    /// times). The boundary holds for the destination's filesystem (the device given), whose timestamp
    /// granularity it was drawn for: files on another mounted below are not trusted by it. The flag: that
    /// checkout gave every entry its recorded extended attributes.
    Checkout(i64, u64, bool),
}

impl Prior {
    /// The content the file on disk holds, if this record vouches for it.
    fn vouches(&self, md: &Metadata) -> Option<ObjectId> {
        let e = &self.entry;
        let ctime_ns = ctime_ns(md);
        let same = e.kind == EntryKind::File
            && e.size == md.len()
            && e.mtime_ns == mtime_ns(md)
            && match self.by {
                Recorder::Commit => e.ctime_ns == ctime_ns && e.ino == md.ino(),
                Recorder::Checkout(ended_ns, dev, _) => ctime_ns < ended_ns && md.dev() == dev,
            };
        same.then(|| e.object().ok().flatten()).flatten()
    }

    /// Whether a file this record vouches for has the extended attributes of its entry here too: as a commit
    /// read them (an attribute set since would have changed the ctime), or as a checkout that restored them
    /// all set them.
    fn vouches_xattrs(&self) -> bool {
        match self.by {
            Recorder::Commit => true,
            Recorder::Checkout(_, _, restored) => restored,
        }
    }
}

/// Everything checkout needs from the repository.
pub(crate) struct Source<'a> {
    pub catalog_path: &'a Path,
    pub repo_root: &'a Path,
    pub backend: Arc<dyn Backend>,
}

pub(crate) fn checkout(src: &Source<'_>, id: &str, dest: &Path, opts: &CheckoutOptions) -> Result<CheckoutSummary> {
    crate::params::check_threads(opts.threads)?;
    let started = Instant::now();
    let catalog = Catalog::open(src.catalog_path)?;
    let root = content::root_entry(&catalog, id)?;
    let protect = fs::canonicalize(src.repo_root).ok();
    let spare = repository_dirs(src.repo_root);
    if let Some(repo) = &protect {
        refuse_repository(dest, repo, &spare)?;
    }
    let in_place = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dest, e)),
        Ok(md) if md.is_dir() && root.kind != EntryKind::Dir => {
            // Never replace a whole directory by a file: that is almost surely a typo.
            return Err(Error::InvalidInput(format!(
                "{} is a directory, but the checkpoint holds a {}: give the path it should have, e.g. {}",
                dest.display(),
                if root.kind == EntryKind::File { "file" } else { "symlink" },
                dest.join(OsStr::from_bytes(&root.name)).display()
            )));
        }
        Ok(md) if md.is_file() && root.kind == EntryKind::Dir => {
            // Nor a file by a whole directory, even with --in-place: that too is almost surely a typo.
            return Err(Error::InvalidInput(format!(
                "{} is a file, but the checkpoint holds a directory: give a new path, or an existing directory \
                 to update with --in-place",
                dest.display()
            )));
        }
        Ok(md) if md.is_symlink() && !opts.in_place => {
            // Not followed, as no entry of a checkout is; "not empty" sent users looking into an empty
            // directory (round 35 review, F6).
            let to = fs::read_link(dest).map(|t| format!(" (to {})", t.display())).unwrap_or_default();
            return Err(Error::InvalidInput(format!(
                "destination {} is a symbolic link{to}, which a checkout does not follow: give the directory it \
                 points to, or a new path",
                dest.display()
            )));
        }
        Ok(md) => {
            let empty_dir = md.is_dir() && fs::read_dir(dest).map_err(|e| Error::io(dest, e))?.next().is_none();
            if !empty_dir && !opts.in_place {
                return Err(Error::DestinationNotEmpty(dest.to_path_buf()));
            }
            !empty_dir
        }
    };
    // Like `mkdir -p`: a destination in directories not made yet is what the user asked for.
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // Keyed as commits key their paths, so that a commit of `run/` vouches for a checkout into `run`.
    let dest_key = crate::commit::path_key(dest)?;
    let priors = if in_place && !opts.checksum { priors(&catalog, &dest_key, dest) } else { Vec::new() };
    // Files placed by this checkout carry its checkpoint's sizes and mtimes; were it cut short under the old
    // record, that record could vouch for a replaced file whose size and mtime happen to match its own.
    if catalog.last_checkout(&dest_key)?.is_some() {
        if catalog.read_only().is_some() {
            // Left in place, the record would vouch later for files this checkout replaced.
            return Err(Error::InvalidInput(format!(
                "the catalog records an earlier checkout into {}, which a read-only repository cannot clear; \
                 check out into another directory",
                dest.display()
            )));
        }
        catalog.clear_checkout(&dest_key)?;
    }

    // What to restore: the whole tree, or the named parts, each with its destination path and priors. Paths
    // in errors and progress start with the committed name, as `show` prints them.
    let root_name = PathBuf::from(OsStr::from_bytes(&root.name));
    let mut starts = Vec::new();
    // Made here for a `--path`: given the root directory's metadata once every walk is done.
    let mut dest_made = false;
    if opts.paths.is_empty() {
        let whole =
            Start { entry: root.clone(), path: dest.to_path_buf(), rel: root_name.clone(), priors, ancestors: vec![] };
        starts.push(whole);
    } else {
        let mut found = Vec::new();
        for p in &opts.paths {
            let (entry, rel) = content::lookup(&catalog, &root, p)?.ok_or_else(|| Error::PathNotFound {
                checkpoint: id[..crate::SHORT_ID_LEN].to_string(),
                path: p.clone(),
            })?;
            found.push((entry, rel));
        }
        // A path named twice, or inside another named path, is restored by the outer one's walk. Walked again it
        // would write into directories whose final mode and mtime may already be set (see `DirTask`).
        found.sort_by_key(|(_, rel)| rel.components().count());
        let mut kept: Vec<PathBuf> = Vec::new();
        for (entry, rel) in found {
            if kept.iter().any(|k| rel.starts_with(k)) {
                continue;
            }
            kept.push(rel.clone());
            let path = if rel.as_os_str().is_empty() { dest.to_path_buf() } else { dest.join(&rel) };
            let mut ancestors = Vec::new();
            if path != dest {
                // The directories below it are made by the walk, never through a symlink (see `walk`).
                if fs::symlink_metadata(dest).is_err() {
                    fs::create_dir(dest).map_err(|e| Error::io(dest, e))?;
                    dest_made = true;
                }
                let mut prefix = PathBuf::new();
                for part in rel.parent().unwrap_or(Path::new("")).components() {
                    prefix.push(part);
                    match content::lookup_relative(&catalog, &root, &prefix)? {
                        Some((e, _)) if e.kind == EntryKind::Dir => ancestors.push(e),
                        _ => break,
                    }
                }
            }
            let priors = priors
                .iter()
                .filter_map(|p| {
                    let (entry, _) = content::lookup_relative(&catalog, &p.entry, &rel).ok()??;
                    Some(Prior { entry, by: p.by })
                })
                .collect();
            let rel = if rel.as_os_str().is_empty() { root_name.clone() } else { root_name.join(rel) };
            starts.push(Start { entry, path, rel, priors, ancestors });
        }
    }
    // A killed checkout of a large file leaves its temporary beside it, in a directory no walk tidies.
    let file_dirs: std::collections::BTreeSet<&Path> =
        starts.iter().filter(|s| s.entry.kind == EntryKind::File).map(|s| parent_dir(&s.path)).collect();
    for dir in file_dirs {
        if let Ok(fd) = dirfd::open_dir(dir) {
            remove_stale_temps(&fd);
        }
    }
    // The whole checkpoint's size is on its row; only a partial checkout walks its parts to learn theirs.
    let total = if opts.paths.is_empty() {
        catalog.resolve(id)?.logical_bytes
    } else {
        starts.iter().map(|s| total_bytes(&catalog, &s.entry)).sum::<Result<u64>>()?
    };
    opts.progress.start("checkout", Some(total));

    // Twice the cores: workers spend much of their time in the kernel writing pages, often waiting on the
    // file's lock, and measured throughput keeps rising up to about two per core. Capped because each worker
    // holds about 1 MiB (catalog connection, decoder): 64 took a checkout of one file to 79 MiB.
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).min(DEFAULT_MAX_THREADS))
    } else {
        opts.threads
    };
    let (tx, rx) = bounded::<Vec<Job>>(threads * 2);
    let max_read = crate::store::read_share(src.backend.reads_are_requests(), threads);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    // Files given up because their content is damaged; the rest of the checkout goes on.
    let damaged = Tally::default();
    let abort = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let mut summary = CheckoutSummary { id: id.to_string(), ..Default::default() };
    let new_files = NewFiles::probe(dest, in_place);
    let owners = Arc::new(Owners {
        restoring: opts.owners && rustix::process::geteuid().is_root(),
        xattrs: opts.xattrs.then(Default::default),
        ..Default::default()
    });
    let patched_untouched = Arc::new(AtomicU64::new(0));
    let mut roots = Vec::new();
    let mut made = Vec::new();

    let walked = std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (backend, first_error, abort, written) = (src.backend.clone(), &first_error, &abort, &written);
            let (progress, damaged) = (opts.progress.clone(), &damaged);
            s.spawn(move || {
                if let Err(e) = worker(src.catalog_path, backend, max_read, rx, &*progress, abort, written, damaged) {
                    abort.store(true, Ordering::SeqCst);
                    first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            });
        }
        drop(rx);
        let mut walker = Walker {
            catalog: &catalog,
            damaged: &damaged,
            outbox: Outbox { tx: &tx, jobs: Vec::new(), bytes: 0 },
            abort: &abort,
            opts,
            in_place,
            protect: protect.as_deref(),
            protect_id: protect.as_ref().and_then(|p| fs::metadata(p).ok()).map(|md| (md.dev(), md.ino())),
            spare: &spare,
            summary: &mut summary,
            in_read: 0,
            new_files,
            owners: owners.clone(),
            patched_untouched: patched_untouched.clone(),
            roots: &mut roots,
            made: &mut made,
            dest,
            links: std::collections::HashMap::new(),
            links_full: false,
            dest_fd: None,
            taken: std::collections::HashSet::new(),
        };
        let r = (if dest_made { walker.made_dir(None, dest, &root) } else { Ok(()) })
            .and_then(|()| starts.iter().try_for_each(|s| walker.walk(s)))
            .and_then(|()| walker.outbox.send());
        walker.end_read();
        if walker.links_full {
            opts.progress.warn(&format!(
                "more than {LINK_GROUPS_MAX} hard-linked files: the later names of some came back as files of their \
                 own, not as links"
            ));
        }
        drop(tx);
        r
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    walked?;
    // Every entry was released once it was in place, so each start's directory has had its metadata set.
    if let Some(root) = roots.iter().find(|r| !r.done()) {
        return Err(Error::Internal(format!("{}: directory metadata was never set", root.path.display())));
    }
    // Innermost first: each after everything made inside it.
    for dir in made.iter().rev() {
        dir.set_metadata()?;
    }
    summary.owners_not_restored = owners.failed.count();
    summary.xattrs_not_restored = owners.xattrs.as_ref().map_or(0, |f| f.count());
    let xattrs_warning = owners.xattrs.as_ref().and_then(|f| f.warning());
    for warning in [owners.warning(), owners.set_id_warning(), xattrs_warning].into_iter().flatten() {
        opts.progress.warn(&warning);
    }
    if let Some((n, first)) = damaged.summary() {
        // No record: it would vouch for a destination that lacks these files.
        // In place, a file being patched is neither version any more: said, so that no program resumes from it
        // (round 37 review, F1).
        let patched = if in_place {
            "; a file that was being patched in place is left partly patched (some of its chunks the checkpoint's, \
             others as they were): restore another checkpoint over it, or this one once healed"
        } else {
            ""
        };
        return Err(Error::corrupt(format!(
            "{n} file{} of checkpoint {} could not be restored, {} content is damaged (first: {first}); every other \
             file is in {}{patched}",
            if n == 1 { "" } else { "s" },
            &id[..crate::SHORT_ID_LEN.min(id.len())],
            if n == 1 { "its" } else { "their" },
            dest.display()
        )));
    }
    if opts.paths.is_empty() && catalog.read_only().is_none() {
        // Every file is in place: each has a ctime before the boundary, and any change from here on one at or
        // after it, which is what lets the record vouch only for files left as the checkout put them. The
        // destination's own ctime is moved first, so that one rolled back to a snapshot from before this
        // checkout shows an older one than the record names.
        let named = mark_destination(dest);
        let ended = Boundary::after_now(dest);
        let recorded = named.map(|dest| crate::catalog::CheckoutRecord {
            ended_ns: ended.at,
            xattrs: owners.xattrs.as_ref().is_some_and(|f| f.count() == 0),
            dest,
        });
        let stored = match &recorded {
            Some(r) => catalog.record_checkout(&dest_key, id, r),
            None => Ok(()),
        };
        if let Err(e) = stored {
            // The files are in place; without the record the next in-place checkout hashes instead of trusting.
            opts.progress.warn(&format!("could not record the checkout in the catalog: {e}"));
        }
        ended.wait();
    }
    summary.bytes_written = written.into_inner();
    let untouched = patched_untouched.load(Ordering::Relaxed);
    summary.files_patched -= untouched;
    summary.files_unchanged += untouched;
    summary.files_written =
        summary.files.saturating_sub(summary.files_unchanged + summary.files_patched + summary.files_linked);
    summary.seconds = started.elapsed().as_secs_f64();
    opts.progress.finish();
    Ok(summary)
}

/// The device and inode of the repository's directory and of every directory below it (`packs/` and its
/// 256 subdirectories, `tmp/`, `locks/`): a bind mount of any of them inside the destination shows them under
/// another path, so a removal recognises them by these.
fn repository_dirs(root: &Path) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(md) = fs::metadata(&dir) else { continue };
        out.push((md.dev(), md.ino()));
        if depth < 2
            && let Ok(entries) = fs::read_dir(&dir)
        {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    out
}

/// Gives a directory destination of a whole checkout a ctime of this moment (its mode set to what it is),
/// and returns the destination's device, inode and ctime for the checkout's record; `None` (nothing
/// recorded, nothing vouched for later) for a symlink, or where that fails. A file destination keeps its
/// ctime: one the checkout changed has a new one anyway, one it left alone held this content before (so a
/// rollback to then is no lie), and moving it would make the next commit of that file read it whole.
fn mark_destination(dest: &Path) -> Option<(u64, u64, i64)> {
    let md = fs::symlink_metadata(dest).ok().filter(|md| !md.file_type().is_symlink())?;
    if md.is_dir() {
        fs::set_permissions(dest, md.permissions()).ok()?;
    }
    let md = fs::symlink_metadata(dest).ok()?;
    Some((md.dev(), md.ino(), ctime_ns(&md)))
}

/// Whether the destination is still the one a checkout's record names (`recorded`): the same directory or
/// file, not rolled back to before it. A later change only moves its ctime forward.
fn same_destination(dest: &Path, recorded: (u64, u64, i64)) -> bool {
    fs::symlink_metadata(dest)
        .is_ok_and(|md| (md.dev(), md.ino()) == (recorded.0, recorded.1) && ctime_ns(&md) >= recorded.2)
}

/// The records an in-place checkout at `dest` may trust: the checkpoint last checked out there whole, and
/// the last one committed from there. A record that cannot be read (its checkpoint was just collected) is
/// skipped: files it would have vouched for are hashed instead.
fn priors(catalog: &Catalog, key: &str, dest: &Path) -> Vec<Prior> {
    let mut out = Vec::new();
    // Another directory moved to `dest`, or `dest` rolled back to a snapshot: its files may have kept the
    // sizes, mtimes and old ctimes that the record would vouch for.
    if let Ok(Some((id, record))) = catalog.last_checkout(key)
        && same_destination(dest, record.dest)
        && let Ok(entry) = content::root_entry(catalog, &id)
    {
        out.push(Prior { entry, by: Recorder::Checkout(record.ended_ns, record.dest.0, record.xattrs) });
    }
    if let Ok(Some(cp)) = catalog.latest_of_path(&host_name(), key)
        && let Ok(entry) = content::root_entry(catalog, &cp.id)
    {
        out.push(Prior { entry, by: Recorder::Commit });
    }
    out
}

fn total_bytes(catalog: &Catalog, entry: &Entry) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![entry.clone()];
    while let Some(e) = stack.pop() {
        match e.kind {
            EntryKind::File => total += e.size,
            EntryKind::Dir => stack.extend(catalog.tree(&e.object()?.expect("dir has a tree"))?),
            EntryKind::Symlink => {}
        }
    }
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
fn worker(
    catalog_path: &Path,
    backend: Arc<dyn Backend>,
    max_read: u64,
    batches: Receiver<Vec<Job>>,
    progress: &dyn Progress,
    abort: &AtomicBool,
    written: &AtomicU64,
    damaged: &Tally,
) -> Result<()> {
    let catalog = Catalog::open_for_worker(catalog_path)?;
    let mut reader = ChunkReader::with_max_read(backend, max_read)?;
    let mut existing = Vec::new();
    let mut old = Vec::new();
    // The chunks to fetch for the whole batch, and for each the job it belongs to and its offset: read in one
    // go, blobs of files committed together are read back with one `pread`.
    let mut refs = Vec::new();
    let mut needed: Vec<(usize, u64)> = Vec::new();
    // On an error other than damage the checkout stops, so every file of the batch is given up, as those of
    // queued batches are; the error names the file of job `n`.
    let fail_all = |batch: &[Job]| batch.iter().for_each(|j| j.task.fail());
    let give_up = |batch: &[Job], n: usize, e: Error| {
        fail_all(batch);
        file_error(&batch[n].task.rel, e)
    };
    for batch in batches {
        if abort.load(Ordering::Relaxed) {
            fail_all(&batch);
            continue;
        }
        refs.clear();
        needed.clear();
        for (n, job) in batch.iter().enumerate() {
            let task = &job.task;
            if task.failed.load(Ordering::Relaxed) {
                continue;
            }
            for &(at, r) in &job.chunks {
                if job.compare {
                    existing.resize(r.len as usize, 0);
                    let file = match task.opened() {
                        Ok((file, _)) => file,
                        Err(e) => return Err(give_up(&batch, n, e)),
                    };
                    if file.read_exact_at(&mut existing, at).is_ok() && ObjectId::of(&existing) == r.id {
                        progress.bytes(r.len as u64);
                        continue;
                    }
                }
                refs.push(r);
                needed.push((n, at));
            }
        }
        // A file whose chunk is damaged is given up alone (restic and borg restore the rest too): the chunks
        // before the damaged one are in, and reading goes on after it with the other files' chunks.
        loop {
            let read = reader.read_chunks_indexed(&catalog, &refs, |i, data| {
                let (n, at) = needed[i];
                written.fetch_add(batch[n].task.write(at, data, &mut old)?, Ordering::Relaxed);
                progress.bytes(data.len() as u64);
                Ok(())
            });
            let Err((i, e)) = read else { break };
            let n = needed[i].0;
            if !e.is_corruption() {
                return Err(give_up(&batch, n, e));
            }
            let e = file_error(&batch[n].task.rel, e);
            if let Err(e) = batch[n].task.give_up_damaged(damaged, &e) {
                return Err(give_up(&batch, n, e));
            }
            let rest: Vec<usize> =
                (i..refs.len()).filter(|&k| !batch[needed[k].0].task.failed.load(Ordering::Relaxed)).collect();
            refs = rest.iter().map(|&k| refs[k]).collect();
            needed = rest.iter().map(|&k| needed[k]).collect();
        }
        for (n, job) in batch.iter().enumerate() {
            if job.task.failed.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = job.task.release() {
                return Err(give_up(&batch, n, e));
            }
        }
    }
    Ok(())
}

/// Where a walk starts: an entry of the checkpoint, where it goes, and what was recorded there before.
struct Start {
    entry: Entry,
    path: PathBuf,
    rel: PathBuf,
    priors: Vec<Prior>,
    /// For a `--path` below the destination, the checkpoint's directories on the way there, outermost first:
    /// those the checkout has to make get their recorded metadata once every walk is done.
    ancestors: Vec<Entry>,
}

struct Walker<'a> {
    catalog: &'a Catalog,
    /// Files given up as damaged (see `FileTask::give_up_damaged`).
    damaged: &'a Tally,
    outbox: Outbox<'a>,
    abort: &'a AtomicBool,
    opts: &'a CheckoutOptions,
    in_place: bool,
    /// The repository's own directory, never removed by `delete`.
    protect: Option<&'a Path>,
    /// The repository's device and inode, to know it when the walk comes to it.
    protect_id: Option<(u64, u64)>,
    /// The repository's directories (see [`repository_dirs`]), which no removal enters.
    spare: &'a [(u64, u64)],
    summary: &'a mut CheckoutSummary,
    /// Files looked up in the current read transaction (0: none open).
    in_read: usize,
    new_files: NewFiles,
    /// Whether owners are restored, and what came of it.
    owners: Arc<Owners>,
    /// Files patched in place that needed no byte (see [`FileTask::untouched`]).
    patched_untouched: Arc<AtomicU64>,
    /// The directories walks started at, checked when all is done.
    roots: &'a mut Vec<Arc<DirTask>>,
    /// Directories made on the way to a `--path` (the destination first, if made), outermost first.
    made: &'a mut Vec<Arc<DirTask>>,
    /// Where the checkout goes; the paths of [`LinkFirst`] are relative to it.
    dest: &'a Path,
    /// The first name met of each hard-linked file, by link group, to link its later names to.
    links: std::collections::HashMap<u64, LinkFirst>,
    /// Whether a hard-linked file went unremembered, [`LINK_GROUPS_MAX`] being reached.
    links_full: bool,
    /// The destination, open, once something below it needs finding again ([`Walker::dest_dir`]).
    dest_fd: Option<Arc<OwnedFd>>,
    /// Files at the destination left in place as the first name of a link group (device, inode).
    taken: std::collections::HashSet<(u64, u64)>,
}

/// The first name of a hard-linked file the checkout has met, and what a later name must match to be linked
/// to it: two names of one file committed while it changed between their reads record different contents,
/// and are restored as two files.
struct LinkFirst {
    rel: PathBuf,
    target: Vec<u8>,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    owner: Option<Owner>,
    xattrs: Vec<Xattr>,
    /// The file's task while it is being written; `None` where the file was already in place.
    task: Option<std::sync::Weak<FileTask>>,
}

impl LinkFirst {
    fn matches(&self, e: &Entry) -> bool {
        e.kind == EntryKind::File
            && (&e.target, e.size, e.mode, e.mtime_ns, e.owner, &e.xattrs)
                == (&self.target, self.size, self.mode, self.mtime_ns, self.owner, &self.xattrs)
    }
}

fn stat_owner(st: &rustix::fs::Stat) -> Owner {
    Owner { uid: st.st_uid, gid: st.st_gid }
}

/// Fails unless `file`, just opened by name, is the file `md` describes: a name swapped meanwhile is not acted on.
fn same_file(path: &Path, file: &File, md: &Metadata) -> Result<()> {
    let now = file.metadata().map_err(|e| Error::io(path, e))?;
    if (now.dev(), now.ino()) != (md.dev(), md.ino()) {
        let e = std::io::Error::other("replaced by another file while the checkout ran; run it again");
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Times that set an mtime and leave the atime as it is.
fn mtime_only(ns: i64) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        last_modification: timespec(ns),
    }
}

/// The name an entry has in its directory.
fn entry_name(path: &Path) -> Result<&OsStr> {
    path.file_name()
        .ok_or_else(|| Error::InvalidInput(format!("{} names no file: give the path it should have", path.display())))
}

impl Walker<'_> {
    /// Gives a file the checkout leaves in place (`md`: what it found there) its entry's owner, attributes, mode
    /// and mtime, through a handle on the file itself, opened by name in its directory without following a
    /// symlink, so that a name swapped meanwhile changes nothing elsewhere; a file that is not the one found is an
    /// error. Its attributes are read first unless a record vouches for them (`xattrs_known`).
    fn fix_metadata(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        path: &Path,
        md: &Metadata,
        entry: &Entry,
        xattrs_known: bool,
    ) -> Result<()> {
        let (chown, owners) = (self.chown(entry, Some(Owner::of(md))), &*self.owners);
        let io = |e: std::io::Error| Error::io(path, e);
        let mode_differs = md.permissions().mode() & 0o7777 != entry.mode;
        let by_name = dirfd::name_path(dir, name);
        let by_name = by_name.as_deref().unwrap_or(path);
        let xattrs_differ = !xattrs_known && !owners.xattrs_as_recorded(On::Path(by_name), &entry.xattrs);
        if chown.is_none() && !mode_differs && !xattrs_differ && mtime_ns(md) == entry.mtime_ns {
            return Ok(());
        }
        let file = match dirfd::open(dir, name, OFlags::RDONLY | OFlags::NONBLOCK) {
            Ok(fd) => File::from(fd),
            // A user's own file without read permission: by name, which for anyone but root can reach nothing
            // it could not change anyway (root opens any file).
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !rustix::process::geteuid().is_root() => {
                if xattrs_differ {
                    // Writable by its owner first, or its user.* attributes could not be set.
                    let writable = Mode::from_raw_mode(md.permissions().mode() & 0o7777 | 0o200);
                    let _ = rustix::fs::chmodat(dir, name, writable, AtFlags::empty());
                    owners.restore_xattrs(On::Path(by_name), path, &entry.xattrs, false);
                }
                rustix::fs::chmodat(dir, name, Mode::from_raw_mode(entry.mode), AtFlags::empty())
                    .map_err(|e| io(e.into()))?;
                let times = mtime_only(entry.mtime_ns);
                return rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(e.into()));
            }
            Err(e) => return Err(io(e)),
        };
        same_file(path, &file, md)?;
        // The owner before the mode: a change of owner clears set-id bits.
        let chowned = chown.as_ref().map(|(o, owners)| owners.note(path, rustix::fs::fchown(&file, o.uid(), o.gid())));
        // A change of owner clears `security.capability`: the attributes are looked at again after it.
        let mut made_writable = false;
        if xattrs_differ || chown.is_some() {
            let current = md.permissions().mode() & 0o7777;
            if current & 0o200 == 0 && !rustix::process::geteuid().is_root() {
                // The user's own read-only file: writable by its owner first, or its user.* attributes could
                // not be set; its mode is set below.
                made_writable = file.set_permissions(fs::Permissions::from_mode(current | 0o200)).is_ok();
            }
            owners.restore_xattrs(On::Fd(file.as_fd()), path, &entry.xattrs, false);
        }
        if chown.is_some() || mode_differs || made_writable {
            let mode = owners.mode_for(entry.mode, entry.owner, chowned, &file);
            file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io)?;
        }
        if mtime_ns(md) != entry.mtime_ns {
            file.set_modified(mtime(entry.mtime_ns)).map_err(io)?;
        }
        Ok(())
    }

    /// The owner to give an entry the checkout puts in place: the one it was committed with, when restoring
    /// owners, unless it has that already (`current`: what it has, where known).
    fn chown(&self, entry: &Entry, current: Option<Owner>) -> Option<(Owner, Arc<Owners>)> {
        let owner = entry.owner.filter(|_| self.owners.restoring)?;
        (current != Some(owner)).then(|| (owner, self.owners.clone()))
    }

    /// The walker's lookups run in read transactions of [`READ_BATCH`] files each: one per query cost four
    /// `fcntl` locks apiece. Trees and contents of the checkpoint being checked out cannot go while its
    /// session lives, so a snapshot shows them as a fresh read would; the transaction is renewed so that it
    /// never holds the WAL back for long.
    fn read_in_batches(&mut self) -> Result<()> {
        if self.in_read == 0 {
            self.catalog.connection().execute_batch("BEGIN DEFERRED")?;
        }
        self.in_read += 1;
        if self.in_read == READ_BATCH {
            self.end_read();
        }
        Ok(())
    }

    fn end_read(&mut self) {
        if self.in_read > 0 {
            let _ = self.catalog.connection().execute_batch("COMMIT");
            self.in_read = 0;
        }
    }

    /// Walks the checkpoint's trees depth first from `start`, creating directories and symlinks and queueing
    /// file batches.
    fn walk(&mut self, start: &Start) -> Result<()> {
        // Each item carries the directory it is in, open, where its file is created (see `FileTask`). The
        // destination's is its parent as the caller named it, symlinks and all; a `--path` start's is found
        // below the destination without following a symlink (made where missing), as every name below it.
        let below = start.path != self.dest;
        let start_dir = Arc::new(if below {
            let rel = start.path.strip_prefix(self.dest).unwrap_or(&start.path).parent().unwrap_or(Path::new(""));
            let root = self.dest_dir()?;
            let mut made = Vec::new();
            let mut note = |i: usize, parent: &OwnedFd, name: &OsStr| {
                made.push((i, parent.try_clone().map(Arc::new), name.to_owned()));
            };
            let dir = dirfd::open_below(&root, rel, Some(&mut note)).map_err(|e| Error::io(self.dest.join(rel), e))?;
            for (i, parent, name) in made {
                let parent = parent.map_err(|e| Error::io(self.dest.join(rel), e))?;
                let path: PathBuf = self.dest.join(rel.components().take(i + 1).collect::<PathBuf>());
                if let Some(entry) = start.ancestors.get(i) {
                    self.made_dir(Some((parent, name)), &path, entry)?;
                }
            }
            dir
        } else {
            let parent = parent_dir(&start.path);
            dirfd::open_dir(parent).map_err(|e| Error::io(parent, e))?
        });
        let mut stack =
            vec![(start.entry.clone(), start.path.clone(), start.rel.clone(), start.priors.clone(), start_dir, None)];
        while let Some((entry, path, rel, priors, dir, parent)) = stack.pop() {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            match entry.kind {
                EntryKind::Dir => {
                    // Below the destination, through its directory's handle; the destination as the caller
                    // named it.
                    let at = (parent.is_some() || below).then(|| path.file_name()).flatten();
                    let existed = match at {
                        Some(name) => self.make_dir_at(&dir, name, &path)?,
                        None => self.make_dir(&path)?,
                    };
                    self.summary.dirs += 1;
                    // Never a symlink: the name was just made a directory, or found to be one.
                    let flags = OFlags::PATH | OFlags::DIRECTORY;
                    let this_dir = Arc::new(match at {
                        Some(name) => dirfd::open(&dir, name, flags).map_err(|e| Error::io(&path, e))?,
                        None => rustix::fs::open(&path, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                            .map_err(|e| Error::io(&path, e.into()))?,
                    });
                    let st = rustix::fs::fstat(&*this_dir).map_err(|e| Error::io(&path, e.into()))?;
                    // A directory made in one without a default ACL has no attributes but a security label;
                    // any other is read now, once, for its end and for what files made in it inherit.
                    let made_bare = !existed && parent.as_ref().is_some_and(|p: &Arc<DirTask>| !p.acl_default);
                    let have = if self.owners.xattrs.is_none() || made_bare {
                        Some(Vec::new())
                    } else {
                        with_dir_xattrs(&this_dir, |on| on.and_then(crate::xattrs::read).ok())
                    };
                    let current_owner = if !existed { self.new_files.owner } else { Some(stat_owner(&st)) };
                    let chown = self.chown(&entry, current_owner);
                    if existed && let Some(repo) = self.protect_id {
                        // A directory of the checkpoint where the repository is (put inside the destination):
                        // its files would be written over the repository's own.
                        if repo == (st.st_dev, st.st_ino) {
                            return Err(Error::InvalidInput(format!(
                                "refusing to check out into {}: it is the repository; the checkpoint has a \
                                 directory there. Move the repository out of the destination, or check out \
                                 elsewhere",
                                path.display()
                            )));
                        }
                    }
                    let tree_id = entry.object()?.expect("dir has a tree");
                    let children = self.catalog.tree(&tree_id)?;
                    if self.in_place && existed {
                        self.tidy(&this_dir, &path, &children)?;
                    }
                    // What each prior recorded in this directory, to pair with the children by name.
                    let prior_dirs: Vec<(Recorder, Vec<Entry>)> = priors
                        .iter()
                        .filter(|p| p.entry.kind == EntryKind::Dir)
                        .filter_map(|p| {
                            let id = p.entry.object().ok()??;
                            Some((p.by, self.catalog.tree(&id).ok()?))
                        })
                        .collect();
                    let task = Arc::new(DirTask {
                        path: path.clone(),
                        at: at.map(|name| (dir.clone(), name.to_owned())),
                        mode: entry.mode,
                        mtime_ns: entry.mtime_ns,
                        chown,
                        xattrs: entry.xattrs.clone(),
                        owners: self.owners.clone(),
                        acl_default: have.as_ref().is_none_or(|h| h.iter().any(|x| x.name == ACL_DEFAULT.as_bytes())),
                        have,
                        id: (st.st_dev, st.st_ino),
                        remaining: AtomicUsize::new(children.len() + 1),
                        parent,
                    });
                    if task.parent.is_none() {
                        self.roots.push(task.clone());
                    }
                    for child in children.into_iter().rev() {
                        tree::validate_name(&child.name)?;
                        let child_priors = prior_dirs
                            .iter()
                            .filter_map(|(by, entries)| {
                                let i = entries.binary_search_by(|e| e.name.cmp(&child.name)).ok()?;
                                Some(Prior { entry: entries[i].clone(), by: *by })
                            })
                            .collect();
                        let name = OsStr::from_bytes(&child.name);
                        let (p, r) = (path.join(name), rel.join(name));
                        stack.push((child, p, r, child_priors, this_dir.clone(), Some(task.clone())));
                    }
                    task.release()?;
                }
                EntryKind::Symlink => {
                    let name = entry_name(&path)?;
                    let target = OsStr::from_bytes(&entry.target);
                    let same = self.in_place
                        && rustix::fs::readlinkat(&*dir, name, Vec::new())
                            .is_ok_and(|t| t.as_bytes() == target.as_bytes());
                    let current_owner = if !same {
                        // Into an empty destination whatever has this name came from this checkout: never
                        // cleared away (see `make_dir_at`).
                        if self.in_place || parent.is_none() {
                            self.summary.removed +=
                                clear_sparing(&dir, name, &path, self.protect, self.spare, self.opts.delete)? as u64;
                        }
                        rustix::fs::symlinkat(target, &*dir, name).map_err(|e| name_error(&path, e.into()))?;
                        self.new_files.owner
                    } else if self.owners.restoring {
                        dirfd::lstat(&dir, name).ok().map(|md| Owner::of(&md))
                    } else {
                        None
                    };
                    if let Some((owner, owners)) = self.chown(&entry, current_owner) {
                        let r = rustix::fs::chownat(&*dir, name, owner.uid(), owner.gid(), AtFlags::SYMLINK_NOFOLLOW);
                        let _ = owners.note(&path, r);
                    }
                    let t = timespec(entry.mtime_ns);
                    let times = rustix::fs::Timestamps { last_access: t, last_modification: t };
                    rustix::fs::utimensat(&*dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| Error::io(&path, e.into()))?;
                    self.summary.symlinks += 1;
                    entry_done(parent.as_ref())?;
                }
                EntryKind::File => {
                    crate::fault::point("checkout-entry");
                    self.read_in_batches()?;
                    self.summary.files += 1;
                    self.summary.logical_bytes += entry.size;
                    self.opts.progress.file(&rel);
                    let first = entry.link.and_then(|group| self.links.get(&group)).filter(|f| f.matches(&entry));
                    match first.map(|f| (f.rel.clone(), f.task.as_ref().and_then(std::sync::Weak::upgrade))) {
                        Some((first, task)) => {
                            if let Some((dir, parent)) = self.link(&entry, &path, &first, task, dir, parent)? {
                                self.file(&entry, &path, rel, &priors, dir, parent)?;
                            }
                        }
                        None => {
                            let task = self.file(&entry, &path, rel, &priors, dir, parent)?;
                            if let Some(group) = entry.link {
                                self.remember(group, &entry, &path, task);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the directory where a walk starts, `path` as the caller named it, or finds one there; returns
    /// whether it existed. Anything else there goes.
    fn make_dir(&self, path: &Path) -> Result<bool> {
        let mkdir = |path: &Path| fs::DirBuilder::new().mode(0o700).create(path);
        match fs::symlink_metadata(path) {
            Ok(md) if md.is_dir() => return Ok(true),
            Ok(_) => {
                let parent = parent_dir(path);
                let dir = dirfd::open_dir(parent).map_err(|e| Error::io(parent, e))?;
                clear(&dir, path.file_name().unwrap_or_default(), path, self.spare)?
            }
            Err(_) => {}
        }
        mkdir(path).map_err(|e| Error::io(path, e))?;
        Ok(false)
    }

    /// Makes directory `name` in `dir` (at `path`), or finds one there; returns whether it existed. Into an
    /// empty destination the name must be free, unless another entry of the checkpoint already took it: on a
    /// case-insensitive filesystem `A` and `a` are one name, and reusing or clearing what the other entry put
    /// there would merge or lose it.
    fn make_dir_at(&self, dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<bool> {
        let mkdir = || rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700));
        // Into an empty destination the name is free: no `stat` first (mkdir still refuses a taken one).
        if !self.in_place {
            return match mkdir() {
                Ok(()) => Ok(false),
                Err(e) => Err(name_error(path, e.into())),
            };
        }
        match dirfd::lstat(dir, name) {
            Ok(md) if md.is_dir() => return Ok(true),
            Ok(_) => clear(dir, name, path, self.spare)?,
            Err(_) => {}
        }
        mkdir().map_err(|e| Error::io(path, e.into()))?;
        Ok(false)
    }

    /// In a directory that already existed (`fd`, at `dir`): removes temporaries of crashed checkouts, and with
    /// `delete` whatever the checkpoint lacks (never the repository itself).
    fn tidy(&mut self, fd: &OwnedFd, dir: &Path, children: &[Entry]) -> Result<()> {
        let canonical = if self.opts.delete { fs::canonicalize(dir).ok() } else { None };
        for name in dirfd::names(fd).map_err(|e| Error::io(dir, e))? {
            let name_os = name.as_os_str();
            let name = name_os.as_bytes();
            if stale_temp(fd, name) {
                let _ = rustix::fs::unlinkat(fd, name_os, AtFlags::empty());
                continue;
            }
            if !self.opts.delete
                || name.starts_with(TEMP_PREFIX.as_bytes())
                || children.binary_search_by(|e| e.name.as_slice().cmp(name)).is_ok()
            {
                continue;
            }
            let holds_repo = match (&canonical, self.protect) {
                (Some(c), Some(repo)) => repo.starts_with(c.join(OsStr::from_bytes(name))),
                _ => false,
            };
            if !holds_repo {
                clear(fd, name_os, &dir.join(name_os), self.spare)?;
                self.summary.removed += 1;
            }
        }
        Ok(())
    }

    /// Whether the directory `fd` (at `path`) has a default ACL, when restoring attributes: one `getxattr`.
    /// Where that fails otherwise than by saying there is none, it is taken to have one: files made in it then
    /// have their attributes read, which costs a syscall each and is never wrong.
    fn has_default_acl(&self, fd: &OwnedFd, path: &Path) -> bool {
        if self.owners.xattrs.is_none() {
            return false;
        }
        let got = match dirfd::proc_path(fd) {
            Some(proc) => rustix::fs::getxattr_query(&proc, ACL_DEFAULT),
            None => rustix::fs::lgetxattr_query(path, ACL_DEFAULT),
        };
        !matches!(got, Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP))
    }

    /// Whether an existing file with other names may be this entry, the first name of its link group, left as
    /// it is: it has the entry's mode, mtime and (when restored) owner and attributes already (`name` in `dir`),
    /// so nothing done to it changes
    /// names outside the group; and no other group's first name is this same file (two groups that were one
    /// file at the destination are separated). Remembers the file as taken.
    fn may_stay_linked(&mut self, md: &Metadata, entry: &Entry, dir: &OwnedFd, name: &OsStr, path: &Path) -> bool {
        // Without `/proc`, by its path: a read, which at worst has the file written anew.
        let by_name = dirfd::name_path(dir, name);
        let as_recorded = md.permissions().mode() & 0o7777 == entry.mode
            && mtime_ns(md) == entry.mtime_ns
            && (!self.owners.restoring || entry.owner.is_none_or(|o| o == Owner::of(md)))
            && self.owners.xattrs_as_recorded(On::Path(by_name.as_deref().unwrap_or(path)), &entry.xattrs);
        entry.link.is_some()
            && as_recorded
            && self.taken.len() < LINK_GROUPS_MAX
            && self.taken.insert((md.dev(), md.ino()))
    }

    /// Notes the first name of a hard-linked file, for its later names.
    fn remember(&mut self, group: u64, entry: &Entry, path: &Path, task: Option<std::sync::Weak<FileTask>>) {
        if self.links.contains_key(&group) {
            return;
        }
        if self.links.len() >= LINK_GROUPS_MAX {
            self.links_full = true;
            return;
        }
        let first = LinkFirst {
            rel: path.strip_prefix(self.dest).unwrap_or(path).to_path_buf(),
            target: entry.target.clone(),
            size: entry.size,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            owner: entry.owner,
            xattrs: entry.xattrs.clone(),
            task,
        };
        self.links.insert(group, first);
    }

    /// Puts a later name of a hard-linked file in place as a link to its first name (`first`, relative to the
    /// destination), once that is whole: now if it is, else when the worker finishing it gets there. Gives
    /// back its directory and parent where the first name, already in place, cannot be reached (a directory
    /// whose final mode shuts out the user running the checkout): the name is then restored as a file.
    #[allow(clippy::type_complexity)]
    fn link(
        &mut self,
        entry: &Entry,
        path: &Path,
        first: &Path,
        task: Option<Arc<FileTask>>,
        dir: Arc<OwnedFd>,
        parent: Option<Arc<DirTask>>,
    ) -> Result<Option<(Arc<OwnedFd>, Option<Arc<DirTask>>)>> {
        self.summary.files_linked += 1;
        self.opts.progress.bytes(entry.size);
        let mut replace = false;
        if self.in_place {
            let name = entry_name(path)?;
            match dirfd::lstat(&dir, name) {
                Ok(md) if md.is_dir() => {
                    self.summary.removed +=
                        clear_sparing(&dir, name, path, self.protect, self.spare, self.opts.delete)? as u64;
                }
                Ok(_) => replace = true,
                Err(_) => {}
            }
        }
        let mut link = PendingLink {
            dir: LinkDir::Open(dir),
            path: path.to_path_buf(),
            replace,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            chown: self.chown(entry, None),
            owner: entry.owner,
            owners: self.owners.clone(),
            xattrs: entry.xattrs.clone(),
            parent,
        };
        if let Some(task) = task {
            let root = self.dest_dir()?;
            let mut waiting = task.links.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(list) = waiting.as_mut() {
                // It waits: found again below the destination when made, holding no handle meanwhile.
                let rel = path.strip_prefix(self.dest).unwrap_or(path).parent().unwrap_or(Path::new(""));
                link.dir = LinkDir::Below(root, rel.to_path_buf());
                list.push(link);
                return Ok(None);
            }
            drop(waiting);
            if task.failed.load(Ordering::Acquire) {
                // Its first name was given up (damaged content): this name is not made either.
                self.damaged.note(|| format!("{}: its first name's content is damaged", path.display()));
                entry_done(link.parent.as_ref())?;
                return Ok(None);
            }
            let made = link.make(&task.dir, task.dest.file_name().unwrap_or_default());
            return self.linked_or_file(made, link);
        }
        let from_dir = self.open_beneath(first.parent().unwrap_or(Path::new("")))?;
        let made = link.make(&from_dir, first.file_name().unwrap_or_default());
        self.linked_or_file(made, link)
    }

    /// What came of making `link` at once: done, or refused for want of permission, which gives its directory
    /// and parent back to restore the name as a file (see [`Walker::link`]).
    #[allow(clippy::type_complexity)]
    fn linked_or_file(
        &mut self,
        made: Result<()>,
        link: PendingLink,
    ) -> Result<Option<(Arc<OwnedFd>, Option<Arc<DirTask>>)>> {
        match (made, link.dir) {
            (Err(Error::Io { source, .. }), LinkDir::Open(dir))
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                self.summary.files_linked -= 1;
                Ok(Some((dir, link.parent)))
            }
            (made, _) => made.map(|()| None),
        }
    }

    /// The directory at `rel` below the destination, opened without following a symlink anywhere below it: a
    /// later entry that replaced a directory by a symlink (on a filesystem that ignores case) cannot make a link
    /// to a file outside.
    fn open_beneath(&mut self, rel: &Path) -> Result<OwnedFd> {
        dirfd::open_below(&*self.dest_dir()?, rel, None).map_err(|e| Error::io(self.dest.join(rel), e))
    }

    /// Notes a directory this checkout made on the way to a `--path` (named in `at`, or the destination itself),
    /// to be given `entry`'s owner, attributes, mtime and mode once every walk is done.
    fn made_dir(&mut self, at: Option<(Arc<OwnedFd>, std::ffi::OsString)>, path: &Path, entry: &Entry) -> Result<()> {
        let fd = match &at {
            Some((parent, name)) => dirfd::open(parent, name, OFlags::PATH | OFlags::DIRECTORY),
            None => dirfd::open_dir(path),
        };
        let st = rustix::fs::fstat(fd.map_err(|e| Error::io(path, e))?).map_err(|e| Error::io(path, e.into()))?;
        self.made.push(Arc::new(DirTask {
            path: path.to_path_buf(),
            at,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            chown: self.chown(entry, self.new_files.owner),
            xattrs: entry.xattrs.clone(),
            owners: self.owners.clone(),
            have: None,
            acl_default: false,
            id: (st.st_dev, st.st_ino),
            remaining: AtomicUsize::new(0),
            parent: None,
        }));
        Ok(())
    }

    /// The destination, open (once it exists).
    fn dest_dir(&mut self) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = &self.dest_fd {
            return Ok(fd.clone());
        }
        let fd = Arc::new(dirfd::open_dir(self.dest).map_err(|e| Error::io(self.dest, e))?);
        self.dest_fd = Some(fd.clone());
        Ok(fd)
    }

    /// Restores one file; `parent` is released once it is in place. Returns the file's task, if it is not
    /// already in place.
    fn file(
        &mut self,
        entry: &Entry,
        dest: &Path,
        rel: PathBuf,
        priors: &[Prior],
        dir: Arc<OwnedFd>,
        parent: Option<Arc<DirTask>>,
    ) -> Result<Option<std::sync::Weak<FileTask>>> {
        let content = entry.object()?.expect("file has content");
        let name = entry_name(dest)?;
        let mut patch = None;
        // Into an empty directory there is nothing to look at (`create_new` still refuses to overwrite).
        let existing = if self.in_place { dirfd::lstat(&dir, name) } else { Err(std::io::ErrorKind::NotFound.into()) };
        let exists = existing.is_ok();
        // A file with other names that the checkpoint does not link it to (another entry, which would change
        // with it, or a backup made with `ln`): written anew, so that they keep their content and this name
        // gets its own mode and mtime. The first name of a link group may stay as it is, other names and all,
        // but only once per file and only if none of its metadata has to change.
        let linked_elsewhere = self.in_place
            && existing
                .as_ref()
                .is_ok_and(|md| md.is_file() && md.nlink() > 1 && !self.may_stay_linked(md, entry, &dir, name, dest));
        if linked_elsewhere && entry.size >= PATCH_MIN {
            self.opts.progress.warn(&format!(
                "{} has other hard links: written anew instead of patched in place, so that they keep their content",
                dest.display()
            ));
        }
        match existing {
            Ok(md) if md.is_file() && self.in_place && !linked_elsewhere => {
                // Only a record of what was put here vouches for a file's bytes. The checkpoint's own size and
                // mtime do not: another version can share both (files restored with fixed mtimes, or two
                // writes within one tick of the file clock), and trusting them would leave the wrong bytes.
                let vouched =
                    if self.opts.checksum { None } else { priors.iter().find_map(|p| Some((p.vouches(&md)?, p))) };
                // Its attributes need no look where the record vouches for them and they are the entry's.
                let xattrs_known =
                    vouched.is_some_and(|(c, p)| c == content && p.vouches_xattrs() && p.entry.xattrs == entry.xattrs);
                let trusted = vouched.map(|(c, _)| c);
                // A small file nothing vouches for is cheap to hash whole: left alone if it already matches.
                let trusted = if trusted != Some(content)
                    && md.len() == entry.size
                    && entry.size < PATCH_MIN
                    && holds(self.catalog, &dir, name, dest, &content)?
                {
                    Some(content)
                } else {
                    trusted
                };
                if trusted == Some(content) {
                    self.fix_metadata(&dir, name, dest, &md, entry, xattrs_known)?;
                    self.summary.files_unchanged += 1;
                    self.opts.progress.bytes(entry.size);
                    return entry_done(parent.as_ref()).map(|()| None);
                }
                // Patched, the file's other names would change with it: written anew, its names in the
                // checkpoint are linked to the new file, and names outside it keep their content.
                if entry.size >= PATCH_MIN && md.nlink() == 1 {
                    patch = Some((md, trusted));
                }
            }
            Ok(md) if md.is_dir() => {
                self.summary.removed +=
                    clear_sparing(&dir, name, dest, self.protect, self.spare, self.opts.delete)? as u64;
            }
            _ => {}
        }
        // A directory cleared away leaves the name free.
        let exists = exists && dirfd::lstat(&dir, name).is_ok();
        // A file created read-only could not be given its attributes by its owner.
        let create_mode = if entry.xattrs.is_empty() { self.new_files.create_mode(entry.mode) } else { None };
        let chown = match &patch {
            Some((md, _)) => self.chown(entry, Some(Owner::of(md))),
            None => self.chown(entry, self.new_files.owner),
        };
        // A patched file's size set to the checkpoint's is a change of it, as any byte written.
        let mut resized = false;
        let opened = match &patch {
            Some((md, _)) => {
                let open = || dirfd::open(&dir, name, OFlags::RDWR | OFlags::NONBLOCK);
                let fd = match open() {
                    // A user's own file without the owner's read and write bits: given them by name (see
                    // `fix_metadata`); the checkpoint's mode is set when done.
                    Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                        let mode = Mode::from_raw_mode(md.permissions().mode() & 0o7777 | 0o600);
                        rustix::fs::chmodat(&*dir, name, mode, AtFlags::empty())
                            .map_err(|e| Error::io(dest, e.into()))?;
                        open()
                    }
                    r => r,
                };
                let f = File::from(fd.map_err(|e| Error::io(dest, e))?);
                same_file(dest, &f, md)?;
                f.set_len(entry.size).map_err(|e| Error::io(dest, e))?;
                resized = md.len() != entry.size;
                OnceLock::from((f, Target::Patched))
            }
            // Nothing there: a small file is written under its own name (a rename per file costs as much as
            // the create on ext4). Until it is whole its mtime is not the checkpoint's, and a failed checkout
            // removes it. A file of one batch is created by the worker that writes it, in the directory
            // opened here. A larger one is staged under a temporary name, so that a checkout killed while
            // writing a disk image leaves no file that looks restored; one rename per 4 MiB costs nothing.
            None if !exists && entry.size > 0 && entry.size < BATCH_BYTES => OnceLock::new(),
            None => OnceLock::from(create_in(&dir, dest, exists, entry.size >= BATCH_BYTES, create_mode)?),
        };
        let acl_inherited = match &parent {
            Some(p) => p.acl_default,
            None => self.has_default_acl(&dir, parent_dir(dest)),
        };
        let task = Arc::new(FileTask {
            opened,
            dir,
            creating: Mutex::new(()),
            dest: dest.to_path_buf(),
            rel,
            mode: entry.mode,
            mtime_ns: entry.mtime_ns,
            size: entry.size,
            end: AtomicU64::new(0),
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            placed: AtomicBool::new(false),
            changed: AtomicBool::new(resized),
            untouched: patch.is_some().then(|| self.patched_untouched.clone()),
            create_mode,
            chown,
            owner: entry.owner,
            owners: self.owners.clone(),
            xattrs: entry.xattrs.clone(),
            acl_inherited,
            links: Mutex::new(Some(Vec::new())),
            parent,
        });
        let mut batcher = Batcher { outbox: &mut self.outbox, task: &task, chunks: Vec::new(), bytes: 0 };
        let queued = match patch {
            Some((_, Some(held))) => {
                self.summary.files_patched += 1;
                // Only positions where the held content differs; if its record cannot be read (collected
                // meanwhile), hash the whole file instead: rewriting a chunk twice is harmless.
                let r = content::compare(self.catalog, &held, &content, |at, r, same| {
                    if same {
                        self.opts.progress.bytes(r.len as u64);
                        Ok(())
                    } else {
                        batcher.push(at, r, false)
                    }
                });
                r.and_then(|()| batcher.flush(false)).or_else(|e| match e {
                    Error::Corrupt { .. } => queue_all(self.catalog, &content, entry.size, &mut batcher, true),
                    other => Err(other),
                })
            }
            Some((_, None)) => {
                self.summary.files_patched += 1;
                queue_all(self.catalog, &content, entry.size, &mut batcher, true)
            }
            None => queue_all(self.catalog, &content, entry.size, &mut batcher, false),
        };
        if let Err(e) = queued {
            task.fail();
            return Err(file_error(&task.rel, e));
        }
        task.release().map_err(|e| file_error(&task.rel, e))?;
        Ok(Some(Arc::downgrade(&task)))
    }
}

/// Whether the file `name` in `dir` (at `path`) holds exactly the chunks of `content` at their offsets (its
/// size is checked by the caller).
fn holds(catalog: &Catalog, dir: &OwnedFd, name: &OsStr, path: &Path, content: &ObjectId) -> Result<bool> {
    let file = File::from(dirfd::open(dir, name, OFlags::RDONLY | OFlags::NONBLOCK).map_err(|e| Error::io(path, e))?);
    let mut cursor = content::ChunkCursor::new(catalog, content)?;
    let mut buf = Vec::new();
    while let Some((at, r)) = cursor.next_chunk()? {
        buf.resize(r.len as usize, 0);
        if file.read_exact_at(&mut buf, at).is_err() || ObjectId::of(&buf) != r.id {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Queues every chunk of `content`; `compare` has workers skip chunks the file already holds.
fn queue_all(
    catalog: &Catalog,
    content: &ObjectId,
    size: u64,
    batcher: &mut Batcher<'_, '_>,
    compare: bool,
) -> Result<()> {
    let mut cursor = content::ChunkCursor::of_size(catalog, content, Some(size))?;
    // The tree entry's size decides how the file is written (one batch or several); a content of another
    // size is damage, not a file to write.
    if cursor.size() != size {
        return Err(Error::corrupt(format!("content {content} holds {} bytes, its entry says {size}", cursor.size())));
    }
    while let Some((at, r)) = cursor.next_chunk()? {
        batcher.push(at, r, compare)?;
    }
    batcher.flush(compare)
}

/// Jobs on their way to the workers, sent together up to [`BATCH_BYTES`] or [`BATCH_FILES`]: a message per
/// small file cost a channel hand-off, often a wake-up, and a `pread` of its own.
struct Outbox<'a> {
    tx: &'a Sender<Vec<Job>>,
    jobs: Vec<Job>,
    bytes: u64,
}

impl Outbox<'_> {
    fn push(&mut self, job: Job) -> Result<()> {
        self.bytes += job.chunks.iter().map(|(_, r)| r.len as u64).sum::<u64>();
        self.jobs.push(job);
        if self.bytes >= BATCH_BYTES || self.jobs.len() >= BATCH_FILES { self.send() } else { Ok(()) }
    }

    fn send(&mut self) -> Result<()> {
        if self.jobs.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        self.tx.send(std::mem::take(&mut self.jobs)).map_err(|_| Error::Internal("checkout workers stopped".into()))
    }
}

/// Groups a file's chunks into jobs of about [`BATCH_BYTES`].
struct Batcher<'a, 'b> {
    outbox: &'b mut Outbox<'a>,
    task: &'b Arc<FileTask>,
    chunks: Vec<(u64, ChunkRef)>,
    bytes: u64,
}

impl Batcher<'_, '_> {
    fn push(&mut self, at: u64, r: ChunkRef, compare: bool) -> Result<()> {
        self.chunks.push((at, r));
        self.bytes += r.len as u64;
        if self.bytes >= BATCH_BYTES { self.flush(compare) } else { Ok(()) }
    }

    fn flush(&mut self, compare: bool) -> Result<()> {
        if self.chunks.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        self.task.remaining.fetch_add(1, Ordering::AcqRel);
        let job = Job { task: self.task.clone(), chunks: std::mem::take(&mut self.chunks), compare };
        self.outbox.push(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;

    fn task(file: File, dest: &Path, target: Target) -> FileTask {
        let task = deferred(dest.parent().unwrap(), dest.file_name().unwrap().to_str().unwrap());
        task.opened.set((file, target)).unwrap_or_else(|_| unreachable!());
        task
    }

    /// A task whose file the worker creates, in directory `dir` (opened as the walker opens it).
    fn deferred(dir: &Path, name: &str) -> FileTask {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        FileTask {
            opened: OnceLock::new(),
            dir: Arc::new(rustix::fs::open(dir, flags, Mode::empty()).unwrap()),
            creating: Mutex::new(()),
            dest: dir.join(name),
            rel: PathBuf::from(name),
            mode: 0o600,
            mtime_ns: 0,
            size: 0,
            end: AtomicU64::new(0),
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            placed: AtomicBool::new(false),
            changed: AtomicBool::new(false),
            untouched: None,
            create_mode: None,
            chown: None,
            owner: None,
            owners: Arc::default(),
            xattrs: Vec::new(),
            acl_inherited: false,
            links: Mutex::new(Some(Vec::new())),
            parent: None,
        }
    }

    #[test]
    fn patching_writes_only_the_blocks_that_differ() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let old = pseudo_random(200_000, 1);
        fs::write(&path, &old).unwrap();
        let t = task(fs::OpenOptions::new().read(true).write(true).open(&path).unwrap(), &path, Target::Patched);
        // A chunk at an unaligned offset with two separate one-byte edits: two blocks written, no more.
        let (at, len) = (10_000u64, 100_000usize);
        let mut chunk = old[at as usize..at as usize + len].to_vec();
        chunk[5] ^= 1;
        chunk[50_000] ^= 1;
        let mut scratch = Vec::new();
        let written = t.write(at, &chunk, &mut scratch).unwrap();
        assert!(written > 0 && written <= 2 * BLOCK, "wrote {written}");
        let mut want = old.clone();
        want[at as usize..at as usize + len].copy_from_slice(&chunk);
        assert_eq!(fs::read(&path).unwrap(), want);
        assert_eq!(t.write(at, &chunk, &mut scratch).unwrap(), 0, "nothing differs the second time");
        // Zeros over data: punched (or written where the filesystem cannot punch), and read back as zeros.
        t.write(0, &vec![0u8; 8192], &mut scratch).unwrap();
        assert!(fs::read(&path).unwrap()[..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_deferred_file_is_created_once_however_many_ask_and_removed_on_failure() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let t = deferred(dir.path(), "f");
            let barrier = std::sync::Barrier::new(3);
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        barrier.wait();
                        t.opened().unwrap();
                    });
                }
            });
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "created more than once");
            t.fail();
            drop(t);
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "a failed task left its file");
        }
    }

    /// A parent replaced by a symlink after the walker opened it (two entries whose names collide on a
    /// case-insensitive filesystem can do that) does not lead the file out of the destination.
    #[test]
    fn a_deferred_file_stays_in_its_directory_when_the_path_to_it_changes() {
        let root = tempfile::tempdir().unwrap();
        let (d, outside, moved) = (root.path().join("d"), root.path().join("outside"), root.path().join("moved"));
        fs::create_dir(&d).unwrap();
        fs::create_dir(&outside).unwrap();
        let t = deferred(&d, "f");
        fs::rename(&d, &moved).unwrap();
        std::os::unix::fs::symlink(&outside, &d).unwrap();
        t.write(0, b"0123456789", &mut Vec::new()).unwrap();
        t.remaining.store(1, Ordering::SeqCst);
        t.release().unwrap();
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "written through the symlink");
        assert_eq!(fs::read(moved.join("f")).unwrap(), b"0123456789");
    }

    #[test]
    fn an_entry_whose_size_disagrees_with_its_content_is_refused() {
        use crate::tree::{decode_tree, encode_tree};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("big"), pseudo_random(5 << 20, 5)).unwrap();
        let repo = crate::Repository::init(dir.path().join("repo")).unwrap();
        let s = repo.commit(&src, &Default::default()).unwrap();
        // A damaged tree says the 5 MiB file has 100 bytes: one batch by its size, two by its content.
        let conn = rusqlite::Connection::open(dir.path().join("repo").join(crate::CATALOG_FILE)).unwrap();
        let rows: Vec<(Vec<u8>, Vec<u8>)> = conn
            .prepare("SELECT id, data FROM trees")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        for (id, data) in rows {
            let mut entries = decode_tree(&data).unwrap();
            if let Some(e) = entries.iter_mut().find(|e| e.name == b"big") {
                e.size = 100;
                conn.execute("UPDATE trees SET data = ?1 WHERE id = ?2", rusqlite::params![encode_tree(&entries), id])
                    .unwrap();
            }
        }
        for i in 0..5 {
            let dest = dir.path().join(format!("out{i}"));
            let err = repo.checkout(&s.id, &dest, &CheckoutOptions { threads: 4, ..Default::default() }).unwrap_err();
            assert!(err.is_corruption(), "{err:?}");
            assert_eq!(fs::read_dir(&dest).unwrap().count(), 0, "a refused file was left");
        }
    }

    #[test]
    fn only_temporaries_of_dead_processes_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let d = &dirfd::open_dir(dir.path()).unwrap();
        assert!(!stale_temp(d, format!("{TEMP_PREFIX}{}-3", std::process::id()).as_bytes()));
        assert!(!stale_temp(d, b".snapstore-tmp-1-0"), "pid 1 is alive");
        assert!(stale_temp(d, b".snapstore-tmp-4000000000-7"));
        assert!(!stale_temp(d, b".snapstore-tmp-x-7") && !stale_temp(d, b"data.bin"));
    }

    /// A pid this process cannot see (another PID namespace) with its temporary locked is alive.
    #[test]
    fn a_locked_temporary_is_not_stale_whatever_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let name = ".snapstore-tmp-4000000000-7";
        let held = OwnedFd::from(File::create(dir.path().join(name)).unwrap());
        lock_temp(&held);
        let d = &dirfd::open_dir(dir.path()).unwrap();
        assert!(!stale_temp(d, name.as_bytes()));
        remove_stale_temps(d);
        assert!(dir.path().join(name).exists());
        drop(held);
        assert!(stale_temp(d, name.as_bytes()));
        remove_stale_temps(d);
        assert!(!dir.path().join(name).exists());
    }

    /// Renaming into a taken name (a file, or a symlink to nothing) is refused: by the kernel's flag, or where
    /// it has none by a hard link, or where there are none by checking the name first.
    #[test]
    fn rename_noreplace_never_replaces() {
        for rename in [rename_noreplace, move_noreplace, rename_if_absent] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("a"), b"new").unwrap();
            fs::write(dir.path().join("b"), b"old").unwrap();
            std::os::unix::fs::symlink("nowhere", dir.path().join("l")).unwrap();
            let fd = OwnedFd::from(File::open(dir.path()).unwrap());
            for taken in ["b", "l"] {
                let err = rename(&fd, OsStr::new("a"), OsStr::new(taken)).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
            }
            assert_eq!(fs::read(dir.path().join("b")).unwrap(), b"old");
            assert_eq!(fs::read_link(dir.path().join("l")).unwrap(), Path::new("nowhere"));
            rename(&fd, OsStr::new("a"), OsStr::new("c")).unwrap();
            assert_eq!(fs::read(dir.path().join("c")).unwrap(), b"new");
            assert!(!dir.path().join("a").exists());
        }
    }
}
