//! Helpers for the unit tests.

use std::io;

use crate::backend::{Backend, LocalBackend, ObjectWriter};

/// A local store that calls a hook before each read (with the object's name and the read's length) and
/// after each size query, for tests that act at those moments or count what was read. With `requests` it
/// says its reads are requests, as a bucket does, so that readers stream ranges from it.
pub(crate) struct Hooked {
    pub inner: LocalBackend,
    pub on_read: Box<ReadHook>,
    pub after_size: Box<SizeHook>,
    pub requests: bool,
}

/// Called with an object's name and the length of the read about to be made.
pub(crate) type ReadHook = dyn Fn(&str, usize) + Send + Sync;
/// Called with the store and an object's name once its size has been read.
pub(crate) type SizeHook = dyn Fn(&LocalBackend, &str) -> io::Result<()> + Send + Sync;

impl Hooked {
    pub fn new(root: &std::path::Path) -> Self {
        Hooked {
            inner: LocalBackend::new(root),
            on_read: Box::new(|_, _| {}),
            after_size: Box::new(|_, _| Ok(())),
            requests: false,
        }
    }
}

impl Backend for Hooked {
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>> {
        self.inner.create()
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (self.on_read)(name, buf.len());
        self.inner.read_at(name, offset, buf)
    }
    fn size(&self, name: &str) -> io::Result<u64> {
        let size = self.inner.size(name)?;
        (self.after_size)(&self.inner, name)?;
        Ok(size)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn reads_are_requests(&self) -> bool {
        self.requests
    }
}

/// Deterministic pseudo-random bytes (xorshift64), so failures reproduce.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The seed inputs kept in `tests/corpus/KIND/` for fuzzing the decoder of KIND, sorted by name.
pub(crate) fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(kind);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} holds no seeds", dir.display());
    seeds
}

/// Checks that `tests/corpus/KIND/` holds each of `seeds` (the inputs its writer makes today), so that a
/// format change cannot leave the fuzzers mutating bytes no longer written; with `SNAPSTORE_WRITE_CORPUS=1`
/// it writes them instead.
pub(crate) fn check_seeds(kind: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(kind);
    let write = std::env::var_os("SNAPSTORE_WRITE_CORPUS").is_some_and(|v| v == "1");
    for (name, bytes) in seeds {
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        let kept = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(&kept == bytes, "{} is stale: rerun with SNAPSTORE_WRITE_CORPUS=1", path.display());
    }
}

/// One way of damaging stored bytes, at positions taken modulo their length.
#[derive(Debug, Clone)]
pub(crate) enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Overwrite(usize, Vec<u8>),
}

impl Damage {
    pub fn apply(&self, b: &mut Vec<u8>) {
        let at = |i: usize, b: &Vec<u8>| i % (b.len() + 1);
        match self {
            Damage::Flip(i, mask) if !b.is_empty() => {
                let i = i % b.len();
                b[i] ^= mask | 1;
            }
            Damage::Flip(..) => {}
            Damage::Truncate(i) => b.truncate(at(*i, b)),
            Damage::Insert(i, bytes) => {
                let i = at(*i, b);
                b.splice(i..i, bytes.iter().copied());
            }
            Damage::Remove(i, n) => {
                let i = at(*i, b);
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Damage::Overwrite(i, bytes) => {
                let i = at(*i, b);
                for (k, v) in bytes.iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *v;
                    }
                }
            }
        }
    }
}

/// Any one damage, small enough to leave most of the input as it was.
pub(crate) fn damage() -> impl proptest::strategy::Strategy<Value = Damage> {
    use proptest::prelude::*;
    let bytes = || proptest::collection::vec(any::<u8>(), 1..16);
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, m)| Damage::Flip(i, m)),
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), bytes()).prop_map(|(i, b)| Damage::Insert(i, b)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Damage::Remove(i, n)),
        (any::<usize>(), bytes()).prop_map(|(i, b)| Damage::Overwrite(i, b)),
    ]
}

/// Seed `which` of `tests/corpus/KIND/`, with `damages` applied in order.
pub(crate) fn damaged_seed(kind: &str, which: proptest::sample::Index, damages: &[Damage]) -> Vec<u8> {
    let seeds = corpus(kind);
    let mut bytes = seeds[which.index(seeds.len())].1.clone();
    for d in damages {
        d.apply(&mut bytes);
    }
    bytes
}
