//! Extended attributes (POSIX ACLs among them, as `system.posix_acl_*`): read at commit, made as recorded at
//! checkout.
//!
//! The kernel lists a file's names NUL-separated and gives each value by name, in separate calls between
//! which either may change: a name gone meanwhile is left out, a list or value grown past the buffer is
//! fetched again with a larger one.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use rustix::fs::XattrFlags;
use rustix::io::Errno;

use crate::tally::Tally;
use crate::tree::{XATTR_VALUE_MAX, XATTRS_MAX_BYTES, Xattr};

/// The kernel's limit on the list of names (`XATTR_LIST_MAX`).
const LIST_MAX: usize = 65536;

/// What a file's attributes are reached through.
#[derive(Clone, Copy)]
pub(crate) enum On<'a> {
    /// A handle opened for reading or writing (not `O_PATH`, which the kernel refuses here).
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed.
    Path(&'a Path),
    /// A path followed to its end: `/proc/self/fd/N`, which names the very object a handle is on.
    Followed(&'a Path),
}

impl On<'_> {
    fn list(self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            On::Fd(fd) => rustix::fs::flistxattr(fd, buf),
            On::Path(p) => rustix::fs::llistxattr(p, buf),
            On::Followed(p) => rustix::fs::listxattr(p, buf),
        }
    }

    fn get(self, name: &[u8], buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            On::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
            On::Path(p) => rustix::fs::lgetxattr(p, name, buf),
            On::Followed(p) => rustix::fs::getxattr(p, name, buf),
        }
    }

    fn set(self, name: &[u8], value: &[u8]) -> rustix::io::Result<()> {
        match self {
            On::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            On::Path(p) => rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()),
            On::Followed(p) => rustix::fs::setxattr(p, name, value, XattrFlags::empty()),
        }
    }

    fn remove(self, name: &[u8]) -> rustix::io::Result<()> {
        match self {
            On::Fd(fd) => rustix::fs::fremovexattr(fd, name),
            On::Path(p) => rustix::fs::lremovexattr(p, name),
            On::Followed(p) => rustix::fs::removexattr(p, name),
        }
    }
}

/// The attributes at `on`, sorted by name: none on a filesystem without them. More than
/// [`XATTRS_MAX_BYTES`] in all is an error, which a commit treats as it treats an unreadable file.
pub(crate) fn read(on: On<'_>) -> io::Result<Vec<Xattr>> {
    let Some(names) = fetch(|buf| on.list(buf), 256, LIST_MAX)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut total = 0;
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Some(value) = fetch(|buf| on.get(name, buf), 256, XATTR_VALUE_MAX)? else {
            continue;
        };
        total += name.len() + value.len();
        if total > XATTRS_MAX_BYTES {
            let e = format!("its extended attributes hold more than {} KiB, the most recorded", XATTRS_MAX_BYTES >> 10);
            return Err(io::Error::other(e));
        }
        out.push(Xattr { name: name.to_vec(), value });
    }
    out.sort();
    Ok(out)
}

/// What `call` fetches into a buffer grown until it fits (at most `max` bytes); `None` where there is
/// nothing to fetch: the name is gone (`ENODATA`) or the filesystem keeps no attributes (`ENOTSUP`).
fn fetch(
    call: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    start: usize,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; start];
    loop {
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::RANGE) if buf.len() < max => {
                // A zero-sized call asks for the size; it may grow again before the next call.
                let need = call(&mut [])?;
                buf.resize(need.max(buf.len() * 2).min(max), 0);
            }
            Err(Errno::NODATA | Errno::NOTSUP) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Makes the attributes at `on` (the entry at `path`) those `want` records: sets each that `have` lacks or
/// holds with another value, then removes the names `want` lacks (except a security module's label, see
/// `is_label`). `have` is `None` for a file the checkout
/// has just made, taken to have none. A refusal (an attribute only root may set, a filesystem without them,
/// a label the security module rejects) is counted in `failures` and the rest go on: the file's content and
/// the other attributes are still restored.
pub(crate) fn apply(on: On<'_>, path: &Path, want: &[Xattr], have: Option<&[Xattr]>, failures: &Failures) {
    let have = have.unwrap_or_default();
    for x in want {
        if !have.iter().any(|h| h == x)
            && let Err(e) = on.set(&x.name, &x.value)
        {
            failures.note(path, &x.name, e);
        }
    }
    for h in have.iter().filter(|h| !is_label(&h.name)) {
        if !want.iter().any(|x| x.name == h.name)
            && let Err(e) = on.remove(&h.name)
            && e != Errno::NODATA
        {
            failures.note(path, &h.name, e);
        }
    }
}

/// Whether `name` is a security module's label (`security.selinux`, `security.SMACK64`, `security.ima`, ...),
/// which the kernel gives a file whether or not a checkpoint recorded one: never removed. A file capability
/// (`security.capability`) is an attribute like any other.
fn is_label(name: &[u8]) -> bool {
    name.starts_with(b"security.") && name != b"security.capability"
}

/// Attributes a checkout could not restore: counted, and named once in a warning at its end.
#[derive(Default)]
pub(crate) struct Failures(Tally);

impl Failures {
    fn note(&self, path: &Path, name: &[u8], e: Errno) {
        self.0.note(|| format!("{} {}: {}", path.display(), String::from_utf8_lossy(name), io::Error::from(e)));
    }

    /// Counts an entry whose attributes could not be read or reached at all.
    pub(crate) fn note_io(&self, path: &Path, e: &io::Error) {
        self.0.note(|| format!("{}: {e}", path.display()));
    }

    /// How many were not restored.
    pub(crate) fn count(&self) -> u64 {
        self.0.count()
    }

    /// The warning for the end of the checkout, if any failed.
    pub(crate) fn warning(&self) -> Option<String> {
        let (n, first) = self.0.summary()?;
        Some(format!(
            "{n} extended attribute{} not restored (first: {first}); trusted.* and most security.* attributes \
             need root, and some filesystems keep none. --no-xattrs skips them",
            if n == 1 { " was" } else { "s were" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn attr(name: &str, value: &[u8]) -> Xattr {
        Xattr { name: name.as_bytes().to_vec(), value: value.to_vec() }
    }

    /// A file in a new temporary directory whose filesystem keeps user.* attributes (tmpfs since Linux 6.6,
    /// ext4, xfs, btrfs); `None`, said, where it does not.
    fn scratch_file() -> Option<(tempfile::TempDir, std::path::PathBuf)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        if rustix::fs::lsetxattr(&path, "user.probe", b"1", XattrFlags::empty()).is_err() {
            eprintln!("skipped: {} keeps no user.* attributes", dir.path().display());
            return None;
        }
        rustix::fs::lremovexattr(&path, "user.probe").unwrap();
        Some((dir, path))
    }

    #[test]
    fn attributes_are_read_sorted_and_made_as_recorded() {
        let Some((_dir, path)) = scratch_file() else { return };
        assert_eq!(read(On::Path(&path)).unwrap(), vec![]);
        let big = vec![7u8; 3000];
        for (n, v) in [("user.b", &b"2"[..]), ("user.a", &b""[..]), ("user.big", &big[..])] {
            rustix::fs::lsetxattr(&path, n, v, XattrFlags::empty()).unwrap();
        }
        let got = read(On::Path(&path)).unwrap();
        assert_eq!(got, vec![attr("user.a", b""), attr("user.b", b"2"), attr("user.big", &big)]);
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(read(On::Fd(file.as_fd())).unwrap(), got);

        // Made as another list records: one changed, one removed, one added, one kept.
        let want = vec![attr("user.a", b""), attr("user.b", b"3"), attr("user.c", b"new")];
        let failures = Failures::default();
        apply(On::Path(&path), &path, &want, Some(&got), &failures);
        assert_eq!(failures.count(), 0);
        assert_eq!(read(On::Path(&path)).unwrap(), want);
        assert!(failures.warning().is_none());
    }

    #[test]
    fn a_refused_attribute_is_counted_and_the_rest_are_made() {
        let Some((_dir, path)) = scratch_file() else { return };
        // A namespace the kernel does not know is refused to root too (EOPNOTSUPP).
        let want = vec![attr("bogus.t", b"1"), attr("user.u", b"2")];
        let failures = Failures::default();
        apply(On::Path(&path), &path, &want, None, &failures);
        assert_eq!(failures.count(), 1);
        assert_eq!(read(On::Path(&path)).unwrap(), vec![attr("user.u", b"2")]);
        let warning = failures.warning().unwrap();
        assert!(warning.contains("1 extended attribute was not restored") && warning.contains("bogus.t"), "{warning}");
    }
}
