//! Reading a repository on a read-only mount (a filesystem snapshot, an archive disk, a read-only export or
//! bind mount), or one that belongs to another user (root restoring a user's checkpoint).
//!
//! Another user's repository is opened the same way, so that reading it leaves nothing behind that its owner
//! could not read or write: no catalog migration, no checkout record, no lock file.
//!
//! SQLite cannot open a WAL-mode catalog there the usual way (it must create the log's shared-memory file), so
//! the catalog is opened for reading only: `immutable` when no write-ahead log is beside it (the file alone
//! is then the whole catalog), and with the log when one is (which SQLite can read only with its
//! shared-memory file beside it). Neither takes locks. The mount being read-only does not make the files so:
//! the same filesystem may be written through another mount (a container's read-only volume of a live
//! repository, an NFS export its server writes). So what the catalog files looked like at open is kept
//! ([`Fingerprint`]), and a change seen later makes the read fail as "changed while read, run again" instead
//! of returning a mix of two states, or reporting the catalog damaged.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use crate::{Error, Result};

/// Whether `path` (a catalog file) is on a filesystem mounted read-only.
pub(crate) fn on_read_only_fs(path: &Path) -> bool {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    rustix::fs::statvfs(dir).is_ok_and(|v| v.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// The owner of the catalog `path`, if that is another user than this process's: its repository is only
/// read, and writes are refused ([`crate::Error::NotOwner`]). `None` where it cannot be looked at either.
pub(crate) fn another_users(path: &Path) -> Option<u32> {
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(path).ok()?);
    (owner != rustix::process::geteuid().as_raw()).then_some(owner)
}

/// Whether this process may not write the catalog `path`, or create the files SQLite keeps beside it: an
/// owner's own repository made read-only (`chmod -R a-w`, an archived copy), which is then read as one on a
/// read-only mount is. A file or directory that is not there is no refusal.
pub(crate) fn not_writable(path: &Path) -> bool {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let refused = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK) == Err(rustix::io::Errno::ACCESS);
    refused(path) || refused(dir)
}

/// Whether the catalog `path` is opened for reading only: on a read-only mount, another user's, or one this
/// process may not write.
pub(crate) fn reads_only(path: &Path) -> bool {
    on_read_only_fs(path) || another_users(path).is_some() || not_writable(path)
}

/// For a local repository opened for reading only (on a read-only mount, or another user's): what its
/// catalog's files look like now. Two that differ tell that it was written between them (through another
/// mount, or by its owner); `None` for any other repository.
pub fn catalog_fingerprint(repo: &Path) -> Option<Fingerprint> {
    let path = repo.join(crate::CATALOG_FILE);
    reads_only(&path).then(|| Fingerprint::of(&path))
}

/// What the files of a catalog opened for reading only looked like: the catalog's identity, size, mtime and
/// ctime; its write-ahead log's identity, size and mtime, with the log header's checkpoint sequence number and
/// salts, which change when a writer starts the log over in place at the same size, within one tick of a
/// coarse file clock (an empty log, which any reader elsewhere creates, counts as none). A writer elsewhere
/// changes one of them with every transaction. Not the log's ctime: SQLite run as root gives the log its
/// catalog's owner at every open, even a reader's, which moves the ctime of another user's log without a
/// write. Each file is opened, not only looked up: an NFS client checks its cached
/// attributes with the server on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    db: Option<FileState>,
    wal: Option<(FileState, [u8; 12])>,
}

/// A file's identity, size, mtime and ctime.
type FileState = (u64, u64, u64, i64, i64, i64, i64);

impl Fingerprint {
    /// The fingerprint of the catalog `path` now.
    pub(crate) fn of(path: &Path) -> Fingerprint {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let state = |f: &std::fs::File| -> Option<FileState> {
            let m = f.metadata().ok()?;
            Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
        };
        let db = std::fs::File::open(path).ok().and_then(|f| state(&f));
        let wal = std::fs::File::open(sibling(path, "-wal")).ok().and_then(|mut f| {
            let s =
                state(&f).filter(|s| s.2 > 0).map(|(dev, ino, size, m, m_ns, _, _)| (dev, ino, size, m, m_ns, 0, 0))?;
            let mut header = [0u8; 24];
            f.read_exact(&mut header).ok()?;
            Some((s, header[12..24].try_into().ok()?))
        });
        Fingerprint { db, wal }
    }

    /// Fails if the catalog `path` no longer looks as it did.
    pub(crate) fn check(&self, path: &Path) -> Result<()> {
        if Fingerprint::of(path) == *self {
            return Ok(());
        }
        Err(Error::ChangedWhileRead(path.parent().unwrap_or(path).to_path_buf()))
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Opens the catalog `path` (of a read-only mount, or another user's) for reading only, and returns it with its schema version
/// and its fingerprint as it was before the open and still was after that first read.
pub(crate) fn open(path: &Path) -> Result<(Connection, u32, Fingerprint)> {
    let before = Fingerprint::of(path);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let has_wal = before.wal.is_some();
    let opened = if has_wal {
        Connection::open_with_flags(path, flags)
    } else {
        Connection::open_with_flags(immutable_uri(path)?, flags)
    };
    let read = opened.and_then(|conn| Ok((conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))?, conn)));
    // Whatever went wrong, a writer elsewhere changing the files under the open is the first explanation.
    before.check(path)?;
    let (version, conn) = read.map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::CannotOpen) if before.db.is_none() => {
            Error::NoRepository(path.parent().unwrap_or(path).to_path_buf())
        }
        Some(rusqlite::ErrorCode::CannotOpen) if has_wal && !sibling(path, "-shm").exists() => {
            Error::ReadOnlyWal(path.parent().unwrap_or(path).to_path_buf())
        }
        _ => e.into(),
    })?;
    Ok((conn, version, before))
}

/// An SQLite URI opening `path` as immutable: `file://` and the absolute path (one leading slash, or SQLite
/// would take what follows `//` for a host), every byte but unreserved ones percent-encoded so that `?`, `#`,
/// `%` and bytes that are not UTF-8 stay the path's.
fn immutable_uri(path: &Path) -> Result<std::ffi::OsString> {
    use std::os::unix::ffi::OsStringExt;
    let absolute = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let bytes = absolute.as_os_str().as_encoded_bytes();
    let trimmed = &bytes[bytes.iter().take_while(|&&b| b == b'/').count().saturating_sub(1)..];
    let mut uri = b"file://".to_vec();
    for &b in trimmed {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(b);
        } else {
            uri.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    uri.extend_from_slice(b"?immutable=1");
    Ok(std::ffi::OsString::from_vec(uri))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Characters a URI gives meaning to, bytes that are not UTF-8, a relative path and leading slashes all
    /// still name the file.
    #[test]
    fn the_uri_names_the_file_whatever_its_path() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"we?ird #%20 \xff&immutable=0"));
        std::fs::create_dir(&odd).unwrap();
        let path = odd.join("catalog.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 7").unwrap();
        let mut slashes = std::ffi::OsString::from("/");
        slashes.push(path.as_os_str());
        let slashes = PathBuf::from(slashes);
        for p in [path.clone(), slashes] {
            let uri = immutable_uri(&p).unwrap();
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
            let conn = Connection::open_with_flags(&uri, flags).unwrap();
            assert_eq!(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0)).unwrap(), 7, "{uri:?}");
        }
    }

    /// A transaction written elsewhere changes the fingerprint; a reader elsewhere, which only creates an
    /// empty log, does not.
    #[test]
    fn a_write_elsewhere_changes_the_fingerprint_a_read_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let writer = Connection::open(&path).unwrap();
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x); PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        let before = Fingerprint::of(&path);
        let reader = Connection::open(&path).unwrap();
        reader.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap();
        before.check(&path).unwrap();
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        assert!(matches!(before.check(&path), Err(Error::ChangedWhileRead(_))));
    }
}
