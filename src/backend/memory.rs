//! An in-memory backend for tests, with a switch that makes every operation fail (to test error paths).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::{Backend, ObjectWriter, check_name};

/// Objects held in a map in memory.
#[derive(Default, Clone)]
pub struct MemoryBackend {
    objects: Arc<RwLock<BTreeMap<String, Arc<Vec<u8>>>>>,
    failing: Arc<AtomicBool>,
    write_memory: Arc<AtomicU64>,
    reads_are_requests: Arc<AtomicBool>,
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on every operation fails with an I/O error (or, with `false`, works again).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// From now on [`Backend::write_memory`] reports `bytes`, as a bucket reports its upload parts.
    pub fn set_write_memory(&self, bytes: u64) {
        self.write_memory.store(bytes, Ordering::SeqCst);
    }

    /// From now on [`Backend::reads_are_requests`] says `yes`, as a bucket does.
    pub fn set_reads_are_requests(&self, yes: bool) {
        self.reads_are_requests.store(yes, Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) { Err(io::Error::other("injected I/O failure")) } else { Ok(()) }
    }

    fn get(&self, name: &str) -> io::Result<Arc<Vec<u8>>> {
        self.check()?;
        check_name(name)?;
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such object")))
    }
}

struct MemoryWriter {
    store: MemoryBackend,
    data: Vec<u8>,
}

impl Write for MemoryWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.store.check()?;
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for MemoryWriter {
    fn publish(self: Box<Self>, name: &str) -> io::Result<()> {
        self.store.check()?;
        check_name(name)?;
        let me = *self;
        me.store.objects.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), Arc::new(me.data));
        Ok(())
    }
}

impl Backend for MemoryBackend {
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>> {
        self.check()?;
        Ok(Box::new(MemoryWriter { store: self.clone(), data: Vec::new() }))
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.get(name)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let src = data
            .get(start..start.saturating_add(buf.len()))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of object"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn size(&self, name: &str) -> io::Result<u64> {
        Ok(self.get(name)?.len() as u64)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.check()?;
        let map = self.objects.read().unwrap_or_else(|e| e.into_inner());
        Ok(map.keys().filter(|k| k.starts_with(prefix)).cloned().collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.check()?;
        check_name(name)?;
        self.objects.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        Ok(())
    }

    fn write_memory(&self) -> u64 {
        self.write_memory.load(Ordering::SeqCst)
    }
    fn reads_are_requests(&self) -> bool {
        self.reads_are_requests.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_backend_contract() {
        super::super::tests::exercise(&MemoryBackend::new());
    }

    #[test]
    fn injected_failures_fail() {
        let b = MemoryBackend::new();
        b.set_failing(true);
        assert!(b.create().is_err());
        assert!(b.list("").is_err());
    }
}
