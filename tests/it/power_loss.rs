//! Power loss, modelled. A process kill leaves the page cache to be written out; a power cut does not, so
//! what survives is only what was made durable: a pack once `publish` returned (write → fsync → rename →
//! fsync of the directory, in `LocalBackend`), the catalog as of its last committed transaction (WAL with
//! `synchronous = FULL`: SQLite fsyncs the WAL before a commit returns), and none of a pack still being
//! written. A removal is not made durable by itself (no directory fsync follows an unlink), so a pack removed
//! before the cut may come back.
//!
//! `PowerCut` is a chunk-store backend over the repository's own directory that counts the operations that
//! change it, and at a chosen one takes the durable state: the catalog's committed state (`VACUUM INTO` from
//! a second connection, which sees exactly the committed transactions), the published packs, removed packs
//! brought back at random, and unfinished temporaries cut short at random. That state, opened as a repository,
//! must verify clean with its data read, hold every checkpoint reported committed before the cut
//! byte-identical, and take the next commit and GC.
//!
//! `SNAPSTORE_POWER_CUTS` sets the number of cuts (default 30).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapstore::backend::ObjectWriter;
use snapstore::{Backend, Catalog, GcOptions, LocalBackend, Repository, VerifyOptions};

use crate::util::{Rng, env_num, pseudo_random};

/// The durable state taken at the cut, and what the cut was.
struct Cut {
    dir: PathBuf,
    op: u64,
    what: String,
    /// Removed packs put back, as an undone unlink.
    revived: usize,
}

struct PowerCut {
    root: PathBuf,
    inner: LocalBackend,
    catalog: Mutex<Catalog>,
    /// Counts operations that change the store (create, publish, remove) and step boundaries.
    ops: AtomicU64,
    cut_at: u64,
    /// Removed packs, moved aside so the cut can bring some back.
    graveyard: PathBuf,
    rng: Mutex<Rng>,
    cut: Mutex<Option<Cut>>,
    /// Published and not yet removed, by name: the durable packs.
    published: Mutex<BTreeMap<String, ()>>,
    done: AtomicBool,
    /// What each operation was, in order.
    log: Mutex<Vec<&'static str>>,
    /// Models a catalog that may lose committed transactions (`synchronous = NORMAL`): the catalog found
    /// after the cut is the one committed at this earlier operation, and no removal is undone.
    catalog_from: Option<u64>,
}

impl PowerCut {
    fn new(root: &Path, cut_at: u64, seed: u64, catalog_from: Option<u64>) -> PowerCut {
        let graveyard = root.with_extension("graveyard");
        fs::create_dir_all(&graveyard).unwrap();
        PowerCut {
            root: root.to_path_buf(),
            inner: LocalBackend::new(root),
            catalog: Mutex::new(crate::util::catalog_rw(&Repository::open(root).unwrap()).unwrap()),
            ops: AtomicU64::new(0),
            cut_at,
            graveyard,
            rng: Mutex::new(Rng(seed)),
            cut: Mutex::new(None),
            published: Mutex::new(BTreeMap::new()),
            done: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            catalog_from,
        }
    }

    fn lagged(&self) -> PathBuf {
        self.root.with_extension("lagged.db")
    }

    /// One operation that changes the store; at the chosen one, the power goes.
    fn op(&self, what: &'static str) {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(what);
        if Some(n) == self.catalog_from {
            let _held = self.published.lock().unwrap();
            let to = self.lagged();
            self.catalog.lock().unwrap().connection().execute("VACUUM INTO ?1", [to.to_str().unwrap()]).unwrap();
        }
        if n == self.cut_at {
            self.take(n, what);
        }
    }

    /// Builds, beside the repository, what a disk would hold after the power failed now.
    fn take(&self, op: u64, what: &str) {
        // Nothing is published or removed while the state is taken: those go through this lock too.
        let published = self.published.lock().unwrap();
        let mut rng = self.rng.lock().unwrap();
        let dir = self.root.with_extension(format!("cut{op}"));
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::create_dir_all(dir.join("packs")).unwrap();
        let mut revived = 0;
        let db = dir.join("catalog.db");
        match self.catalog_from {
            Some(_) => drop(fs::copy(self.lagged(), &db).unwrap()),
            None => drop(
                self.catalog.lock().unwrap().connection().execute("VACUUM INTO ?1", [db.to_str().unwrap()]).unwrap(),
            ),
        }
        for name in published.keys() {
            let dest = dir.join(name);
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(self.root.join(name), dest).unwrap();
        }
        // An unlink that no fsync of its directory followed may be undone.
        for e in fs::read_dir(&self.graveyard).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().replace('+', "/");
            let name = name.rsplit_once('#').unwrap().0.to_string();
            let dest = dir.join(&name);
            if self.catalog_from.is_none() && rng.next().is_multiple_of(2) && !dest.exists() {
                fs::create_dir_all(dest.parent().unwrap()).unwrap();
                fs::copy(e.path(), dest).unwrap();
                revived += 1;
            }
        }
        // A pack being written: whatever part of it reached the disk. (No `tmp/` before the first pack.)
        for e in fs::read_dir(self.root.join("tmp")).into_iter().flatten() {
            let e = e.unwrap();
            let bytes = fs::read(e.path()).unwrap_or_default();
            let keep = if bytes.is_empty() { 0 } else { rng.range(0, bytes.len() + 1) };
            fs::write(dir.join("tmp").join(e.file_name()), &bytes[..keep]).unwrap();
        }
        *self.cut.lock().unwrap() = Some(Cut { dir, op, what: what.to_string(), revived });
        self.done.store(true, Ordering::SeqCst);
    }
}

struct Writer {
    inner: Box<dyn ObjectWriter>,
    store: &'static PowerCut,
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for Writer {
    fn publish(self: Box<Self>, name: &str) -> io::Result<()> {
        let store = self.store;
        store.op("before a publish");
        {
            let mut published = store.published.lock().unwrap();
            self.inner.publish(name)?;
            published.insert(name.to_string(), ());
        }
        store.op("after a publish");
        Ok(())
    }
}

/// The backend handed to the repository: a `'static` reference, so writers can report their publish.
struct Shim(&'static PowerCut);

impl Backend for Shim {
    fn create(&self) -> io::Result<Box<dyn ObjectWriter>> {
        self.0.op("a pack started");
        Ok(Box::new(Writer { inner: self.0.inner.create()?, store: self.0 }))
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.inner.read_at(name, offset, buf)
    }
    fn size(&self, name: &str) -> io::Result<u64> {
        self.0.inner.size(name)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.0.inner.list(prefix)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let s = self.0;
        s.op("before a removal");
        {
            let mut published = s.published.lock().unwrap();
            let n = s.ops.load(Ordering::SeqCst);
            let grave = s.graveyard.join(format!("{}#{n}", name.replace('/', "+")));
            match fs::rename(s.root.join(name), grave) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            published.remove(name);
        }
        s.op("after a removal");
        Ok(())
    }
}

/// Version `v` of a 2 MiB state: 512 KiB blocks, each kept from the version before with probability ½, so
/// versions share chunks and GC has packs to rewrite as well as to delete.
fn state(v: u64) -> Vec<u8> {
    (0..4u64).flat_map(|b| pseudo_random(512 * 1024, (b << 32) | (((v + b) / 2) << 1))).collect()
}

enum Step {
    Commit(u64),
    Forget(usize),
    Gc,
}

const STEPS: &[Step] = &[
    Step::Commit(0),
    Step::Commit(1),
    Step::Commit(2),
    Step::Forget(0),
    Step::Gc,
    Step::Commit(3),
    Step::Forget(1),
    Step::Commit(4),
    Step::Gc,
    Step::Commit(5),
];

/// What the steps were told before the power went.
#[derive(Default)]
struct Told {
    /// Each version's checkpoint id as reported, in order.
    committed: Vec<(u64, String)>,
    /// Checkpoints whose forget returned.
    forgotten: Vec<String>,
    /// A checkpoint whose forget the cut caught: it may be either way.
    forgetting: Option<String>,
}

/// Runs the steps on a new repository whose store loses power at operation `cut_at` (never, if beyond the
/// end); returns the store and what the steps were told.
fn run_steps(dir: &Path, cut_at: u64, seed: u64, catalog_from: Option<u64>) -> (&'static PowerCut, Told) {
    let root = dir.join("repo");
    let params = snapstore::RepoParams { pack_target_size: 256 * 1024, ..Default::default() };
    drop(Repository::init_with(&root, params).unwrap());
    // Leaked: each trial's store is small, and writers need it for as long as the repository lives.
    let store: &'static PowerCut = Box::leak(Box::new(PowerCut::new(&root, cut_at, seed, catalog_from)));
    let repo = Repository::open_with(&root, std::sync::Arc::new(Shim(store))).unwrap();
    let mut told = Told::default();
    for step in STEPS {
        // Told only if the power was still on when the call returned.
        let on = || !store.done.load(Ordering::SeqCst);
        match *step {
            Step::Commit(v) => {
                let id = repo.commit_reader("state", &mut &state(v)[..], &Default::default()).unwrap().id;
                if on() {
                    told.committed.push((v, id));
                }
            }
            Step::Forget(i) => {
                let id = told.committed[i].1.clone();
                repo.forget(&[&id]).unwrap();
                if on() {
                    told.forgotten.push(id);
                } else {
                    told.forgetting = Some(id);
                }
            }
            Step::Gc => {
                repo.gc(&GcOptions::default()).unwrap();
            }
        }
        store.op("between steps");
        if store.done.load(Ordering::SeqCst) {
            break;
        }
    }
    (store, told)
}

fn check(cut: &Cut, told: &Told) -> Result<(), String> {
    let repo = Repository::open(&cut.dir).map_err(|e| format!("open: {e}"))?;
    // The power comes back as a new boot. This test's process lives on, so the boot id its sessions and GC
    // lease recorded is made an earlier one, last heard from before this boot: what a reboot does to them.
    crate::util::catalog_rw(&repo)
        .unwrap()
        .connection()
        .execute_batch(
            "UPDATE sessions SET process = 'an-earlier-boot/' || pid, heartbeat_ns = 0;
             UPDATE gc_lease SET process = 'an-earlier-boot/1', heartbeat_ns = 0;",
        )
        .unwrap();
    let whole = |when: &str| -> Result<(), String> {
        let opts = VerifyOptions { read_data: snapstore::DataSubset::All, ..Default::default() };
        let report = repo.verify(&opts).map_err(|e| format!("verify {when}: {e}"))?;
        if !report.is_clean() {
            return Err(format!("verify {when}: {report:#?}"));
        }
        Ok(())
    };
    whole("after the cut")?;
    let listed: Vec<String> = repo.checkpoints().unwrap().into_iter().map(|c| c.id).collect();
    for (v, id) in &told.committed {
        let forgotten = told.forgotten.contains(id);
        if forgotten && listed.contains(id) {
            return Err(format!("checkpoint of version {v} ({id}), reported forgotten, is back"));
        }
        if !forgotten && told.forgetting.as_ref() != Some(id) && !listed.contains(id) {
            return Err(format!("checkpoint of version {v} ({id}), reported committed, is gone"));
        }
    }
    // Every listed checkpoint, reported or caught in flight, holds exactly one of the versions.
    for id in &listed {
        let mut back = Vec::new();
        io::Read::read_to_end(&mut repo.open_file(id, "").unwrap(), &mut back).map_err(|e| format!("{id}: {e}"))?;
        if !(0..6).any(|v| back == state(v)) {
            return Err(format!("checkpoint {id} holds bytes of no version"));
        }
    }
    // And the repository goes on: a commit, then a GC that may collect what the cut left behind.
    repo.commit_reader("state", &mut &state(9)[..], &Default::default()).map_err(|e| format!("commit: {e}"))?;
    repo.gc(&GcOptions::default()).map_err(|e| format!("gc: {e}"))?;
    whole("after a commit and a GC")
}

#[test]
fn a_power_cut_at_any_store_operation_loses_no_reported_checkpoint() {
    let started = std::time::Instant::now();
    let cuts = env_num("SNAPSTORE_POWER_CUTS", 30);
    let tmp = crate::util::fast_tempdir("power");
    // A run without a cut counts the operations.
    let (full, _) = run_steps(&tmp.path().join("count"), u64::MAX, 1, None);
    let total = full.ops.load(Ordering::SeqCst);
    assert!(total > 40, "only {total} store operations: the steps do too little to cut between");
    let mut rng = Rng(0x90e4_c0de);
    let mut failures = Vec::new();
    let mut brought_back = 0;
    for trial in 0..cuts {
        // Spread over the whole run, jittered.
        let at = ((trial as f64 + rng.unit()) / cuts as f64 * total as f64) as u64;
        let dir = tmp.path().join(format!("t{trial}"));
        let (store, told) = run_steps(&dir, at, rng.next(), None);
        let cut = store.cut.lock().unwrap().take().expect("the cut happened");
        brought_back += cut.revived;
        if let Err(e) = check(&cut, &told) {
            let n = told.committed.len();
            failures.push(format!("cut at operation {} ({}), {n} commits reported: {e}", cut.op, cut.what));
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    assert!(failures.is_empty(), "power cuts lost data:\n{}", failures.join("\n"));
    eprintln!(
        "power loss: {cuts} cuts over {total} store operations in {:.1} s; {brought_back} removed packs came \
         back; every reported checkpoint whole after each",
        started.elapsed().as_secs_f64()
    );
}

/// The model can fail: were the catalog allowed to lose its last committed transactions, as WAL with
/// `synchronous = NORMAL` is after a power loss, a cut after a GC would find the catalog of before it, still
/// naming packs the GC deleted. That is why the catalog runs `synchronous = FULL`.
#[test]
fn a_catalog_that_loses_committed_transactions_would_lose_data() {
    let tmp = crate::util::fast_tempdir("power-normal");
    let (full, _) = run_steps(&tmp.path().join("count"), u64::MAX, 1, None);
    // The step boundaries around the first GC (the fifth step).
    let boundaries: Vec<u64> = full
        .log
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, w)| **w == "between steps")
        .map(|(i, _)| i as u64)
        .collect();
    let (before_gc, after_gc) = (boundaries[3], boundaries[4]);
    let (store, told) = run_steps(&tmp.path().join("lagged"), after_gc, 2, Some(before_gc));
    let cut = store.cut.lock().unwrap().take().expect("the cut happened");
    let err = check(&cut, &told).expect_err("a catalog from before the GC with the GC's deletions done");
    assert!(err.contains("verify after the cut") && err.contains("the pack file is missing"), "{err}");
}
