//! One machine's processes sharing the local copy of a bucket's catalog while one of them builds it again.
//!
//! Building the copy again moves its files aside (`catalog.db`, `-wal`, `-shm`) and creates new ones. A
//! process with the copy open meanwhile would go on writing to files no longer in place (what it wrote, a
//! damage mark for one, gone with them), and one opening it between two renames could pair a new
//! `catalog.db` with the old one's log, which SQLite would replay into it. So every [`crate::catalog::Catalog`]
//! open on a copy holds the copy's directory locked shared ([`hold_shared`]), and a rebuild (or a discard)
//! holds it exclusively ([`exclusive`]): it waits for the others' catalogs to close, up to
//! `SNAPSTORE_COPY_WAIT` seconds, and a catalog opening meanwhile waits for the rebuild. `flock` ends with the
//! process, however it ends. The file `copy.lock` there says the directory is a bucket's copy; the lock is on
//! the directory itself, which no one recreates while the copy is in use: on the file, a process that found it
//! deleted by hand and made it again locked a new file, and a rebuild went ahead under the holders of the old
//! one (round 27 review). A local repository has no such file, and takes no lock.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

use crate::error::{Error, Result};

/// The lock file, in the copy's directory.
const LOCK_FILE: &str = "copy.lock";

/// How long a rebuild waits for the other catalogs open on the copy (`SNAPSTORE_COPY_WAIT`, seconds).
const COPY_WAIT: Duration = Duration::from_secs(60);

thread_local! {
    /// Whether this thread holds its copy exclusively: the catalogs the rebuild itself opens take no lock.
    static EXCLUSIVE: Cell<bool> = const { Cell::new(false) };
}

/// Creates the lock file of the copy in `root`, from which on every catalog opened there takes it.
pub(crate) fn create(root: &Path) -> Result<()> {
    crate::backend::local_dir(root).map_err(|e| Error::io(root, e))?;
    open_lock_file(&root.join(LOCK_FILE)).map(drop)
}

/// Opens (creating, owner-only) a file that is only ever locked with `flock`.
pub(crate) fn open_lock_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// For a catalog at `catalog` in a copy's directory: the lock held shared for as long as the catalog is open,
/// once any rebuild under way has ended. `None` for a catalog anywhere else, within a rebuild, or on a
/// filesystem without locks (nothing to keep apart with, as before the lock).
pub(crate) fn hold_shared(catalog: &Path) -> Result<Option<File>> {
    let Some(dir) = catalog.parent() else { return Ok(None) };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    if EXCLUSIVE.get() || !dir.join(LOCK_FILE).exists() {
        return Ok(None);
    }
    let file = File::open(dir).map_err(|e| Error::io(dir, e))?;
    match rustix::fs::flock(&file, FlockOperation::LockShared) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::INTR) => Err(Error::io(dir, std::io::ErrorKind::Interrupted.into())),
        Err(_) => Ok(None),
    }
}

/// Runs `f` holding the copy in `root` exclusively: once every catalog other threads and processes have open
/// on it has closed. Fails ([`Error::CopyInUse`]) if they stay open for longer than `SNAPSTORE_COPY_WAIT`.
/// The calling thread must have none open, or it waits for itself.
pub(crate) fn exclusive<T>(root: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let wait =
        match std::env::var("SNAPSTORE_COPY_WAIT") {
            Err(_) => COPY_WAIT,
            Ok(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
                Error::InvalidInput(format!("SNAPSTORE_COPY_WAIT={v:?}: give a whole number of seconds"))
            })?),
        };
    exclusive_within(root, wait, f)
}

fn exclusive_within<T>(root: &Path, wait: Duration, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if EXCLUSIVE.get() {
        return f();
    }
    create(root)?;
    let file = File::open(root).map_err(|e| Error::io(root, e))?;
    let started = Instant::now();
    loop {
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break,
            Err(rustix::io::Errno::WOULDBLOCK) if started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(Error::CopyInUse { path: root.to_path_buf(), waited_secs: wait.as_secs() });
            }
            Err(rustix::io::Errno::INTR) => continue,
            // No locks here.
            Err(_) => break,
        }
    }
    struct Held;
    impl Drop for Held {
        fn drop(&mut self) {
            EXCLUSIVE.set(false);
        }
    }
    EXCLUSIVE.set(true);
    let held = Held;
    let out = f();
    drop(held);
    drop(file);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuild_waits_for_open_catalogs_and_catalogs_wait_for_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join(crate::CATALOG_FILE);
        assert!(hold_shared(&catalog).unwrap().is_none(), "no lock file: not a copy of a bucket's catalog");
        create(dir.path()).unwrap();
        let (one, other) = (hold_shared(&catalog).unwrap(), hold_shared(&catalog).unwrap());
        assert!(one.is_some() && other.is_some());
        let held = exclusive_within(dir.path(), Duration::ZERO, || Ok(()));
        assert!(matches!(held, Err(Error::CopyInUse { .. })), "{held:?}");
        drop(one);
        assert!(matches!(
            exclusive_within(dir.path(), Duration::from_millis(250), || Ok(())),
            Err(Error::CopyInUse { .. })
        ));
        drop(other);
        let waiter = std::thread::scope(|s| {
            exclusive_within(dir.path(), Duration::ZERO, || {
                // Within the rebuild, its own catalogs take no lock; another thread's wait for it.
                assert!(hold_shared(&catalog).unwrap().is_none());
                let waiter = s.spawn(|| {
                    let started = Instant::now();
                    let held = hold_shared(&catalog).unwrap();
                    (held.is_some(), started.elapsed())
                });
                std::thread::sleep(Duration::from_millis(300));
                Ok(waiter)
            })
            .unwrap()
            .join()
            .unwrap()
        });
        assert!(waiter.0 && waiter.1 >= Duration::from_millis(250), "{waiter:?}");
        assert!(!EXCLUSIVE.get());
        exclusive_within(dir.path(), Duration::ZERO, || Ok(())).unwrap();
    }
}
