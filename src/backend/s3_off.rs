//! Built without the `s3` feature: `s3://` repositories are refused with an explanation; nothing else changes.

use std::io;

use super::{Replaced, Versioned};
use std::path::PathBuf;
use std::sync::Arc;

/// An S3 bucket; this build cannot connect to one.
pub enum Bucket {}

/// An object in a bucket.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// Its name, relative to the repository's prefix.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written, by the server's clock, in nanoseconds since the Unix epoch.
    pub modified_ns: i64,
}

impl Bucket {
    /// Fails: this build has no S3 client.
    pub fn connect(url: &str) -> io::Result<Bucket> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{url}: this snapstore was built without S3 support (cargo feature `s3`)"),
        ))
    }
    /// Unreachable: no bucket exists.
    pub fn url(&self) -> &str {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn requests(&self) -> u64 {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn get(&self, _: &str) -> io::Result<Vec<u8>> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn get_all(&self, _: &[&str]) -> Vec<io::Result<Vec<u8>>> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn put(&self, _: &str, _: Vec<u8>) -> io::Result<()> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn create(&self, _: &str, _: Vec<u8>) -> io::Result<bool> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn get_versioned(&self, _: &str) -> io::Result<Option<Versioned>> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn replace(&self, _: &str, _: Vec<u8>, _: Option<&str>) -> io::Result<Replaced> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn head(&self, _: &str) -> io::Result<Option<ObjectMeta>> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn list(&self, _: &str) -> io::Result<Vec<ObjectMeta>> {
        match *self {}
    }
    /// Unreachable: no bucket exists.
    pub fn delete(&self, _: &str) -> io::Result<()> {
        match *self {}
    }
}

/// Pack files in a bucket; this build cannot have one.
pub struct S3Backend(Arc<Bucket>);

impl S3Backend {
    /// Unreachable: no bucket exists.
    pub fn new(bucket: Arc<Bucket>, _: PathBuf) -> Self {
        S3Backend(bucket)
    }
}

impl super::Backend for S3Backend {
    fn create(&self) -> io::Result<Box<dyn super::ObjectWriter>> {
        match *self.0 {}
    }
    fn read_at(&self, _: &str, _: u64, _: &mut [u8]) -> io::Result<()> {
        match *self.0 {}
    }
    fn size(&self, _: &str) -> io::Result<u64> {
        match *self.0 {}
    }
    fn list(&self, _: &str) -> io::Result<Vec<String>> {
        match *self.0 {}
    }
    fn remove(&self, _: &str) -> io::Result<()> {
        match *self.0 {}
    }
}
