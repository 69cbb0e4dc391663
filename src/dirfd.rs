//! Names looked at, opened and removed inside an open directory, never through a symlink.
//!
//! An in-place checkout works in a tree that someone else may be changing: a user whose home directory root
//! restores can swap a directory on the way for a symlink between two steps. Every step on an existing name
//! therefore goes through a handle on its directory, opened when the walk entered it, and follows no symlink
//! at the name itself: a swap redirects nothing outside the tree the handle was opened on.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// What is at `name` in `dir`, as `lstat` sees it (a symlink as a symlink): one `lstat` of the name below
/// [`proc_path`] of the directory, or where there is no `/proc`, a handle on the name and its `fstat`.
pub(crate) fn lstat(dir: &OwnedFd, name: &OsStr) -> io::Result<Metadata> {
    if let Some(at) = name_path(dir, name) {
        return std::fs::symlink_metadata(at);
    }
    let fd = rustix::fs::openat(dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    File::from(fd).metadata()
}

/// A handle on the directory at `path`, as the caller named it (symlinks on the way followed): where a walk
/// starts, before any handle below it exists.
pub(crate) fn open_dir(path: &std::path::Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Opens the regular file or directory at `name` in `dir` with `flags`, failing on a symlink (`ELOOP`).
pub(crate) fn open(dir: &OwnedFd, name: &OsStr, flags: OFlags) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())?)
}

/// A path naming the very object `fd` is a handle on (`O_PATH` included), whatever happened to its name
/// since: `/proc/self/fd/N`, a link the kernel resolves to the object itself, never through a symlink put in
/// its place. `None` without `/proc`.
pub(crate) fn proc_path(fd: &OwnedFd) -> Option<std::path::PathBuf> {
    use std::os::fd::AsRawFd;
    static HAS_PROC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    HAS_PROC
        .get_or_init(|| std::path::Path::new("/proc/self/fd").is_dir())
        .then(|| std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
}

/// Told of each directory [`open_below`] makes: its index among the path's components, the directory it was
/// made in, and its name.
pub(crate) type MadeDir<'a> = dyn FnMut(usize, &OwnedFd, &OsStr) + 'a;

/// A path naming `name` in `dir` that no symlink put on the way can redirect: the name below [`proc_path`] of
/// the directory. A call that does not follow a symlink at the name itself (`lstat`, `llistxattr`) reaches
/// whatever is there. `None` without `/proc`.
pub(crate) fn name_path(dir: &OwnedFd, name: &OsStr) -> Option<std::path::PathBuf> {
    proc_path(dir).map(|p| p.join(name))
}

/// The directory at `rel` below `root`, every step opened without following a symlink, so that nothing put
/// in a directory's place redirects it out of the tree below `root`; with `made`, directories missing on
/// the way are made (with the umask's mode), as `mkdir -p` would, each one reported to it.
pub(crate) fn open_below(
    root: &OwnedFd,
    rel: &std::path::Path,
    mut made: Option<&mut MadeDir<'_>>,
) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY;
    let mut dir = rustix::fs::openat(root, ".", flags | OFlags::CLOEXEC, Mode::empty())?;
    for (i, part) in rel.components().enumerate() {
        let std::path::Component::Normal(name) = part else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a path below the destination"));
        };
        dir = match (open(&dir, name, flags), made.as_mut()) {
            (Err(e), Some(report)) if e.kind() == io::ErrorKind::NotFound => {
                let fresh = match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o777)) {
                    Ok(()) => true,
                    Err(rustix::io::Errno::EXIST) => false,
                    Err(e) => return Err(e.into()),
                };
                if fresh {
                    report(i, &dir, name);
                }
                open(&dir, name, flags)?
            }
            (r, _) => r?,
        };
    }
    Ok(dir)
}

/// A readable handle on the very directory `dir` is a handle on (`O_PATH` included), through its ".": for
/// what the kernel refuses an `O_PATH` handle (listing it, its extended attributes).
pub(crate) fn readable(dir: &OwnedFd) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// The names in directory `dir` (a handle of any kind, `O_PATH` included), without `.` and `..`.
pub(crate) fn names(dir: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let fd = readable(dir)?;
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::new(fd)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(std::ffi::OsString::from(OsStr::from_bytes(&name)));
        }
    }
    Ok(out)
}

/// Removes whatever is at `name` in `dir`: a file or symlink (never what it points to), or a directory with
/// everything in it, each level through a handle on it. A directory in `spare` (by device and inode: the
/// repository's own, reached through a bind mount or a second mount of its disk, where a path says nothing)
/// stops the removal with a [`Spared`] error, before anything in it goes.
pub(crate) fn remove(dir: &OwnedFd, name: &OsStr, spare: &[(u64, u64)]) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) if lstat(dir, name)?.is_dir() => {
            remove_tree(dir, name, spare)
        }
        r => Ok(r?),
    }
}

/// Whether the directory `name` in `dir` holds any entry.
pub(crate) fn has_entries(dir: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    let sub = open(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)?;
    for entry in rustix::fs::Dir::read_from(&sub)? {
        let entry = entry?;
        if !matches!(entry.file_name().to_bytes(), b"." | b"..") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Why [`remove`] stopped: the directory it met is the one to spare.
#[derive(Debug)]
pub(crate) struct Spared;

impl std::fmt::Display for Spared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the repository is there")
    }
}

impl std::error::Error for Spared {}

fn remove_tree(dir: &OwnedFd, name: &OsStr, spare: &[(u64, u64)]) -> io::Result<()> {
    let sub = open(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)?;
    if !spare.is_empty() {
        let st = rustix::fs::fstat(&sub)?;
        if spare.contains(&(st.st_dev, st.st_ino)) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, Spared));
        }
    }
    for entry in rustix::fs::Dir::read_from(&sub)? {
        let entry = entry?;
        let child = OsStr::from_bytes(entry.file_name().to_bytes());
        if child == "." || child == ".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => lstat(&sub, child)?.is_dir(),
            _ => false,
        };
        if is_dir { remove_tree(&sub, child, spare)? } else { rustix::fs::unlinkat(&sub, child, AtFlags::empty())? }
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The directory to spare stops a removal before anything in it goes, however deep it is met.
    #[test]
    fn remove_stops_at_the_directory_to_spare() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("tree/a/repo")).unwrap();
        fs::write(t.path().join("tree/a/repo/catalog.db"), b"precious").unwrap();
        let md = fs::metadata(t.path().join("tree/a/repo")).unwrap();
        let dir = open_dir(t.path()).unwrap();
        let err = remove(&dir, OsStr::new("tree"), &[(md.dev(), md.ino())]).unwrap_err();
        assert!(err.get_ref().is_some_and(|e| e.is::<Spared>()), "{err:?}");
        assert_eq!(fs::read(t.path().join("tree/a/repo/catalog.db")).unwrap(), b"precious");
    }

    /// A tree is removed whole; a symlink is removed, never followed, whether to a file or a directory.
    #[test]
    fn remove_takes_trees_and_links_but_never_follows_them() {
        let t = tempfile::tempdir().unwrap();
        let (inside, outside) = (t.path().join("in"), t.path().join("out"));
        fs::create_dir_all(inside.join("tree/deep/er")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(inside.join("tree/deep/er/f"), b"x").unwrap();
        fs::write(inside.join("tree/g"), b"y").unwrap();
        fs::write(outside.join("keep"), b"kept").unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("tree/link-dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), inside.join("link-file")).unwrap();
        fs::write(inside.join("plain"), b"z").unwrap();
        let dir = open_dir(&inside).unwrap();
        let mut listed = names(&dir).unwrap();
        listed.sort();
        assert_eq!(listed, ["link-file", "plain", "tree"]);
        assert!(lstat(&dir, OsStr::new("link-file")).unwrap().file_type().is_symlink());
        assert!(open(&dir, OsStr::new("link-file"), OFlags::RDONLY).is_err(), "a symlink is not opened");
        for name in ["tree", "link-file", "plain"] {
            remove(&dir, OsStr::new(name), &[]).unwrap();
        }
        assert!(names(&dir).unwrap().is_empty());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"kept");
    }
}
