//! I/O errors (EIO) injected into the chunk store at each step of a commit and of a GC: reads, writes and
//! removals, from the k-th operation of a kind on, as a failing disk does. Each failure must be an error, not a
//! panic; afterwards, with the store healed, `verify --read-data` is clean, every checkpoint that was kept checks
//! out identical, and the same command succeeds with no repair.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use snapstore::backend::ObjectWriter;
use snapstore::{Backend, GcOptions, LocalBackend, RepoParams, Repository};

use crate::util::{self, pseudo_random, three_shared_versions};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Read,
    Write,
    Remove,
}

/// The repository's own store, failing every `op` from the `after`-th on.
struct Faulty {
    inner: LocalBackend,
    op: Op,
    left: Arc<AtomicI64>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

impl Faulty {
    fn hit(&self, op: Op) -> io::Result<()> {
        if op == self.op && self.left.fetch_sub(1, Ordering::SeqCst) <= 0 { Err(eio()) } else { Ok(()) }
    }
}

struct FaultyWriter {
    inner: Box<dyn ObjectWriter>,
    left: Arc<AtomicI64>,
}

impl Write for FaultyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(eio());
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for FaultyWriter {
    fn publish(self: Box<Self>, name: &str) -> io::Result<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(eio());
        }
        self.inner.publish(name)
    }
}

impl Backend for Faulty {
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>> {
        self.hit(Op::Write)?;
        let inner = self.inner.create()?;
        if self.op == Op::Write {
            return Ok(Box::new(FaultyWriter { inner, left: self.left.clone() }));
        }
        Ok(inner)
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.hit(Op::Read)?;
        self.inner.read_at(name, offset, buf)
    }
    fn size(&self, name: &str) -> io::Result<u64> {
        self.inner.size(name)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.hit(Op::Remove)?;
        self.inner.remove(name)
    }
}

fn faulty(dir: &Path, op: Op, after: i64) -> Repository {
    let backend = Faulty { inner: LocalBackend::new(dir), op, left: Arc::new(AtomicI64::new(after)) };
    Repository::open_with(dir, Arc::new(backend)).unwrap()
}

/// A repository of small packs holding three versions of a state stream.
fn three_versions(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let params = RepoParams { pack_target_size: 256 << 10, ..RepoParams::default() };
    three_shared_versions(&Repository::init_with(dir, params).unwrap(), 20, 5)
}

fn assert_whole(dir: &Path, kept: &[(String, Vec<u8>)], what: &str) {
    util::assert_whole(&Repository::open(dir).unwrap(), kept, "", what);
}

fn gc_all(repo: &Repository) -> snapstore::Result<()> {
    // Twice: the first condemns, the second sweeps what no session can still use; rewrite every sparse pack.
    let opts = GcOptions { max_unused: 0.0, ..Default::default() };
    repo.gc(&opts)?;
    repo.gc(&opts).map(|_| ())
}

#[test]
fn io_errors_during_gc_fail_it_and_lose_nothing_kept() {
    let (mut injected, mut failed) = (0, 0);
    for op in [Op::Read, Op::Write, Op::Remove] {
        for after in [0, 1, 2, 4, 8, 16] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("repo");
            let versions = three_versions(&dir);
            let kept = &versions[2..];
            Repository::open(&dir).unwrap().forget(&[&versions[0].0, &versions[1].0]).unwrap();
            let what = format!("{op:?} failing from the {after}th on");
            injected += 1;
            match gc_all(&faulty(&dir, op, after)) {
                Ok(()) => {}
                Err(e) => {
                    assert!(e.to_string().contains("Input/output error"), "{what}: {e}");
                    failed += 1;
                }
            }
            assert_whole(&dir, kept, &what);
            gc_all(&Repository::open(&dir).unwrap()).unwrap_or_else(|e| panic!("{what}: gc after healing: {e}"));
            assert_whole(&dir, kept, &what);
        }
    }
    eprintln!("gc: {injected} runs with EIO injected, {failed} failed with it, all kept checkpoints whole");
    assert!(failed * 2 >= injected, "most injections must hit an operation GC makes: {failed} of {injected}");
}

#[test]
fn io_errors_during_commit_fail_it_and_publish_nothing() {
    let (mut injected, mut failed) = (0, 0);
    // A commit only writes to the chunk store (it finds chunks in the catalog), so writes are what fail.
    let op = Op::Write;
    for after in [0, 1, 2, 3, 5, 8, 13, 21, 34] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("repo");
        let versions = three_versions(&dir);
        let what = format!("{op:?} failing from the {after}th on");
        let next = pseudo_random(3 << 20, 99);
        injected += 1;
        match faulty(&dir, op, after).commit_reader("state", &mut &next[..], &Default::default()) {
            Ok(s) => assert_whole(&dir, &[(s.id, next.clone())], &what),
            Err(e) => {
                assert!(e.to_string().contains("Input/output error"), "{what}: {e}");
                assert_eq!(Repository::open(&dir).unwrap().checkpoints().unwrap().len(), 3, "{what}");
                failed += 1;
            }
        }
        assert_whole(&dir, &versions, &what);
        let s = Repository::open(&dir).unwrap().commit_reader("state", &mut &next[..], &Default::default());
        let s = s.unwrap_or_else(|e| panic!("{what}: commit after healing: {e}"));
        assert_whole(&dir, &[(s.id, next)], &what);
    }
    eprintln!("commit: {injected} runs with EIO injected, {failed} failed with it, all earlier checkpoints whole");
    assert!(failed * 2 >= injected, "most injections must hit an operation a commit makes: {failed} of {injected}");
}
