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
}
