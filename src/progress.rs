//! Progress reporting: a trait the caller implements. The library never draws anything itself.

use std::path::Path;

/// Receives progress from long operations. Every method has a default that does nothing, and all may be
/// called from several threads at once.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// struct Count(AtomicU64);
/// impl snapstore::Progress for Count {
///     fn bytes(&self, n: u64) { self.0.fetch_add(n, Ordering::Relaxed); }
/// }
/// ```
pub trait Progress: Send + Sync {
    /// An operation starts; `total_bytes` is known for single files and checkouts.
    fn start(&self, _operation: &str, _total_bytes: Option<u64>) {}
    /// `n` more bytes were processed.
    fn bytes(&self, _n: u64) {}
    /// Work moved on to this file (relative to the committed or checked-out root).
    fn file(&self, _path: &Path) {}
    /// Something was skipped or is worth telling the user, without failing the operation.
    fn warn(&self, _message: &str) {}
    /// The operation ended.
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
