//! Where pack files live: a small synchronous storage trait, so nothing above it knows it is a filesystem.
//!
//! Objects are immutable once published. Publishing is atomic and durable: after [`ObjectWriter::publish`]
//! returns, the object is complete under its name and survives a crash; before, it is invisible.

mod local;
mod memory;
#[cfg(feature = "s3")]
mod s3;
#[cfg(not(feature = "s3"))]
mod s3_off;

use std::io::{self, Read, Write};

pub use local::LocalBackend;
pub use memory::MemoryBackend;
#[cfg(all(test, feature = "s3"))]
pub(crate) use s3::test_bucket;
#[cfg(feature = "s3")]
pub use s3::{
    Bucket, Credentials, ObjectMeta, RangeReader, S3Backend, Settings, create_test_bucket, parse_s3_url, test_endpoint,
};
#[cfg(not(feature = "s3"))]
pub use s3_off::{Bucket, ObjectMeta, S3Backend};

/// Items [`overlapped`] looks up at once where each read is a request.
const LOOKUPS_AT_ONCE: usize = 16;

/// `look` over `items`, each item with its result, in order. Where each of `backend`'s reads is a request (a
/// bucket), the items of each group of 16 are looked up on threads of their own, so that their requests'
/// latency overlaps instead of adding up (a verify of 200 packs through 20 ms of latency a request took 24 s
/// one pack at a time); elsewhere one at a time on the caller's thread. A group's results are held until the
/// caller has taken them, so memory stays that of 16 results.
pub(crate) fn overlapped<'a, T: Sync, R: Send + 'a>(
    backend: &dyn Backend,
    items: &'a [T],
    look: impl Fn(&T) -> R + Sync + 'a,
) -> impl Iterator<Item = (&'a T, R)> + 'a {
    let at_once = if backend.reads_are_requests() { LOOKUPS_AT_ONCE } else { 1 };
    items.chunks(at_once).flat_map(move |group| {
        let results: Vec<R> = match group {
            [one] => vec![look(one)],
            _ => std::thread::scope(|s| {
                let look = &look;
                let running: Vec<_> = group.iter().map(|item| s.spawn(move || look(item))).collect();
                running.into_iter().map(|t| t.join().expect("a lookup panicked")).collect()
            }),
        };
        group.iter().zip(results)
    })
}

/// A small object of a bucket as [`Bucket::get_versioned`] read it.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The object's bytes.
    pub body: Vec<u8>,
    /// When it was last written, by the server's clock, in nanoseconds since the Unix epoch.
    pub modified_ns: i64,
    /// The server's name for this version of the object, which [`Bucket::replace`] is conditional on.
    pub e_tag: Option<String>,
}

/// What a [`Bucket::replace`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    /// Written over the version given.
    Done,
    /// Not written: another writer replaced or deleted that version first.
    Changed,
    /// Not written: the server does not do conditional writes, or named the version with no ETag.
    Unsupported,
}

/// A store of named, immutable objects (pack files).
pub trait Backend: Send + Sync {
    /// Starts writing a new object; its name is given only when it is published.
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>>;
    /// Fills `buf` with the object's bytes starting at `offset`; fails if the object is shorter.
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The `len` bytes from `offset` as a stream, for a reader that takes them in order. Opening fails with
    /// [`io::ErrorKind::NotFound`] if the object is missing; reading fails with
    /// [`io::ErrorKind::UnexpectedEof`] where the object ends short of `offset + len`.
    ///
    /// A backend whose reads are requests sends one request and hands its body on as it arrives, so that a
    /// reader of many blobs holds one blob at a time, not the whole range. The default reads through
    /// [`read_at`](Self::read_at), one call per read.
    fn read_range(&self, name: &str, offset: u64, len: u64) -> io::Result<Box<dyn Read + '_>> {
        let size = self.size(name)?;
        if len == 0 && offset > size {
            let why = format!("{name}: an empty read at {offset}, past the end of the object ({size} bytes)");
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, why));
        }
        Ok(Box::new(AtReader { backend: self, name: name.to_string(), pos: offset, end: offset.saturating_add(len) }))
    }
    /// The object's size in bytes.
    fn size(&self, name: &str) -> io::Result<u64>;
    /// Names of all objects whose names start with `prefix`.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Deletes an object; deleting a missing object is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Whether publishing is slow enough (an upload) that a writer should publish a full pack on a thread of
    /// its own while it fills the next.
    fn concurrent_publish(&self) -> bool {
        false
    }
    /// Whether each read is a request of its own (a bucket's ranged GET), which makes fewer, larger reads
    /// worth the memory their buffers hold.
    fn reads_are_requests(&self) -> bool {
        false
    }
    /// The most memory this backend's own writing may hold at once (a bucket's upload parts), beside what
    /// its callers hand it: a caller working to a memory bound leaves this much of it to the backend.
    fn write_memory(&self) -> u64 {
        0
    }
}

/// [`Backend::read_range`] over [`Backend::read_at`].
struct AtReader<'a, B: ?Sized> {
    backend: &'a B,
    name: String,
    pos: u64,
    end: u64,
}

impl<B: Backend + ?Sized> Read for AtReader<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.backend.read_at(&self.name, self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// An object being written. Dropping it without publishing discards it.
pub trait ObjectWriter: Write + Send {
    /// Makes the written bytes durable, then visible under `name`, atomically.
    fn publish(self: Box<Self>, name: &str) -> io::Result<()>;
}

/// Rejects object names that could address something outside the store.
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad object name {name:?}"))) }
}

pub(crate) use local::sync_dir;

/// Creates a local repository directory, owner-only, durably.
pub(crate) fn local_dir(root: &std::path::Path) -> io::Result<()> {
    local::create_dir_durable(root)
}

/// fsyncs a local directory, making a rename inside it durable.
pub(crate) fn sync_local_dir(dir: &std::path::Path) -> io::Result<()> {
    local::sync_dir(dir)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The contract every backend must keep.
    pub(crate) fn exercise(backend: &dyn Backend) {
        let mut w = backend.create().unwrap();
        w.write_all(b"hello world").unwrap();
        // Not visible before publish.
        assert!(backend.list("packs/").unwrap().is_empty());
        w.publish("packs/ab/abc.pack").unwrap();
        assert_eq!(backend.list("packs/").unwrap(), vec!["packs/ab/abc.pack".to_string()]);
        assert_eq!(backend.size("packs/ab/abc.pack").unwrap(), 11);
        let mut buf = [0u8; 5];
        backend.read_at("packs/ab/abc.pack", 6, &mut buf).unwrap();
        assert_eq!(&buf, b"world");
        let mut long = [0u8; 6];
        assert!(backend.read_at("packs/ab/abc.pack", 6, &mut long).is_err());
        let mut streamed = Vec::new();
        backend.read_range("packs/ab/abc.pack", 2, 7).unwrap().read_to_end(&mut streamed).unwrap();
        assert_eq!(streamed, b"llo wor");
        let mut short = vec![0u8; 6];
        let err = backend.read_range("packs/ab/abc.pack", 6, 6).unwrap().read_exact(&mut short).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let err = backend.read_range("packs/ab/none.pack", 0, 1).err().expect("a missing object cannot be read");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = backend.read_range("packs/ab/abc.pack", 12, 0).err().expect("an empty read past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // An abandoned writer leaves nothing.
        let mut w = backend.create().unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(backend.list("").unwrap().len(), 1);
        backend.remove("packs/ab/abc.pack").unwrap();
        backend.remove("packs/ab/abc.pack").unwrap();
        assert!(backend.list("packs/").unwrap().is_empty());
        assert!(backend.read_at("../etc/passwd", 0, &mut buf).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("packs/00/0a.pack").is_ok());
        for bad in ["", "/etc/passwd", "packs/../x", "a//b", "a/./b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// Results come back in order whatever order the lookups end in; a backend whose reads are requests gets
    /// them on threads of their own, at most 16 at a time, and any other on the caller's thread.
    #[test]
    fn overlapped_lookups_keep_order_and_run_at_once_only_where_reads_are_requests() {
        let items: Vec<u64> = (0..40).collect();
        for requests in [false, true] {
            let backend = MemoryBackend::new();
            backend.set_reads_are_requests(requests);
            let caller = std::thread::current().id();
            let running = std::sync::atomic::AtomicUsize::new(0);
            let most = std::sync::atomic::AtomicUsize::new(0);
            let out: Vec<(u64, bool)> = overlapped(&backend, &items, |&i| {
                let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                // Later items of a group end first.
                std::thread::sleep(std::time::Duration::from_millis(20 - i % 16));
                running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                (i * 10, std::thread::current().id() == caller)
            })
            .map(|(&i, r)| {
                assert_eq!(r.0, i * 10);
                (i, r.1)
            })
            .collect();
            assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), items, "requests: {requests}");
            let on_caller = out.iter().filter(|o| o.1).count();
            let most = most.load(std::sync::atomic::Ordering::SeqCst);
            if requests {
                assert_eq!(on_caller, 0);
                assert!((2..=LOOKUPS_AT_ONCE).contains(&most), "{most} at once");
            } else {
                assert_eq!((on_caller, most), (40, 1));
            }
        }
    }
}
