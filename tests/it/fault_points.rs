//! The crash harness over every operation that writes: `commit`, `forget`, `gc` and in-place `checkout` are
//! killed at each named fault point (`SNAPSTORE_FAULT`, see src/fault.rs) and at random instants. After every
//! kill `verify --read-data` is clean, every checkpoint committed before the kill checks out byte-identical,
//! and the same command run again succeeds with no unlocking or repair.
//!
//! Each point is hit up to `SNAPSTORE_POINT_HITS` times per operation (default 3: the first, second and third
//! pack published, ...), and each operation is killed at `SNAPSTORE_CRASH_ITERATIONS / 8` random instants
//! (default 5). The long mode (`SNAPSTORE_CRASH_ITERATIONS=1500 SNAPSTORE_POINT_HITS=50`) makes about 700.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use snapstore::fault::POINTS;

use crate::util::{Rng, assert_same_tree, copy_dir, env_num, listed, p, pseudo_random, run, succeeded, text};

/// Version `v` of the checkpointed directory: four files, two rewritten per version, and a note whose name
/// changes, so an in-place checkout both rewrites and deletes.
fn write_version(dir: &Path, v: u64) {
    fs::create_dir_all(dir).unwrap();
    for k in 0..4u64 {
        let generation = (v + 1 + k % 2) / 2;
        let len = 256 * 1024 * (1 + k as usize);
        fs::write(dir.join(format!("f{k}.bin")), pseudo_random(len, (k << 32) | (generation << 1))).unwrap();
    }
    fs::write(dir.join(format!("note{v}.txt")), format!("version {v}\n")).unwrap();
}

/// What every trial starts from, built once.
struct Prepared {
    root: tempfile::TempDir,
    /// Checkpoint ids of versions 0..=3; version 0 is already forgotten (garbage for GC).
    ids: Vec<String>,
}

impl Prepared {
    fn repo(&self) -> PathBuf {
        self.root.path().join("repo")
    }
    fn version(&self, v: usize) -> PathBuf {
        self.root.path().join(format!("v{v}"))
    }
    /// Holds a checkout of version 1: the in-place checkout moves it to version 3.
    fn dest(&self) -> PathBuf {
        self.root.path().join("dest")
    }

    fn new() -> Prepared {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("repo");
        // Small packs, so that a commit and a GC publish several.
        let params = snapstore::RepoParams { pack_target_size: 256 * 1024, ..Default::default() };
        drop(snapstore::Repository::init_with(&repo, params).unwrap());
        let mut ids = Vec::new();
        let state = root.path().join("state");
        for v in 0..=4u64 {
            write_version(&root.path().join(format!("v{v}")), v);
        }
        for v in 0..=3 {
            // One path for every version, so each commit's parent is the previous one.
            let _ = fs::remove_dir_all(&state);
            copy_dir(&root.path().join(format!("v{v}")), &state);
            ids.push(succeeded(&run(&repo, &["-q", "commit", p(&state)]), "commit").trim().to_string());
        }
        let _ = fs::remove_dir_all(&state);
        copy_dir(&root.path().join("v4"), &state);
        succeeded(&run(&repo, &["-q", "forget", &ids[0]]), "forget");
        succeeded(&run(&repo, &["-q", "checkout", &ids[1], p(&root.path().join("dest"))]), "checkout");
        Prepared { root, ids }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Commit,
    Forget,
    Gc,
    Checkout,
}

impl Op {
    fn args(self, prep: &Prepared, dest: &Path) -> Vec<String> {
        let state = prep.root.path().join("state");
        let a: Vec<&str> = match self {
            Op::Commit => vec!["-q", "commit", p(&state)],
            Op::Forget => vec!["-q", "forget", &prep.ids[1]],
            Op::Gc => vec!["-q", "gc"],
            Op::Checkout => vec!["-q", "checkout", &prep.ids[3], p(dest), "--in-place", "--delete"],
        };
        a.into_iter().map(String::from).collect()
    }

    /// The fault points this operation must pass; a point it never reaches fails the test, so the list cannot
    /// silently rot.
    fn points(self) -> &'static [&'static str] {
        match self {
            Op::Commit => {
                &["pack-written", "pack-synced", "pack-renamed", "pack-published", "catalog-batch", "commit-published"]
            }
            Op::Forget => &["forget-chosen", "forget-done"],
            Op::Gc => &[
                "gc-marked",
                "gc-swept",
                "pack-written",
                "pack-synced",
                "pack-renamed",
                "pack-published",
                "gc-moved",
                "gc-dropped",
                "gc-removed",
            ],
            Op::Checkout => &["checkout-temp", "checkout-file", "checkout-entry"],
        }
    }
}

/// How a trial ends its operation.
#[derive(Clone, Debug)]
enum Kill {
    At(&'static str, usize),
    After(Duration),
}

/// A fresh copy of the prepared repository and destination for one trial.
struct Trial {
    dir: PathBuf,
    label: String,
}

impl Trial {
    fn repo(&self) -> PathBuf {
        self.dir.join("repo")
    }
    fn dest(&self) -> PathBuf {
        self.dir.join("dest")
    }
}

fn start(prep: &Prepared, scratch: &Path, label: String) -> Trial {
    let dir = scratch.join(&label);
    copy_dir(&prep.repo(), &dir.join("repo"));
    copy_dir(&prep.dest(), &dir.join("dest"));
    Trial { dir, label }
}

fn launch(op: Op, prep: &Prepared, t: &Trial, kill: &Kill) -> Output {
    let mut cmd = Command::new(crate::util::bin());
    cmd.arg("--repo").arg(t.repo()).args(op.args(prep, &t.dest()));
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    match kill {
        Kill::At(point, n) => {
            cmd.env("SNAPSTORE_FAULT", format!("{point}:{n}"));
            cmd.output().unwrap()
        }
        Kill::After(delay) => {
            let mut child = cmd.spawn().unwrap();
            std::thread::sleep(*delay);
            let _ = child.kill();
            child.wait_with_output().unwrap()
        }
    }
}

/// Checks out `id` fresh and compares it with version `v`'s directory.
fn checks_out(repo: &Path, id: &str, v: &Path, scratch: &Path, what: &str) {
    let out = scratch.join(format!("check-{}", &id[..8]));
    let _ = fs::remove_dir_all(&out);
    succeeded(&run(repo, &["-q", "checkout", id, p(&out)]), what);
    assert_same_tree(v, &out, false);
    fs::remove_dir_all(&out).unwrap();
}

/// Everything that must hold after the kill, and again after the operation is run to the end.
fn check(prep: &Prepared, t: &Trial, op: Op, after_rerun: bool) {
    let repo = t.repo();
    let stage = if after_rerun { "after the rerun" } else { "after the kill" };
    let what = format!("{}: verify --read-data {stage}", t.label);
    succeeded(&run(&repo, &["-q", "verify", "--read-data"]), &what);
    let ids = listed(&repo);
    for v in 1..=3 {
        let id = &prep.ids[v];
        let gone = !ids.contains(id);
        // Only the forget being killed may have removed version 1, and once rerun it must have.
        let may_go = op == Op::Forget && v == 1;
        assert!(!gone || may_go, "{}: checkpoint of version {v} lost {stage}", t.label);
        assert!(!(may_go && after_rerun && !gone), "{}: the rerun forget left version 1", t.label);
        if !gone {
            checks_out(&repo, id, &prep.version(v), &t.dir, &format!("{}: version {v} {stage}", t.label));
        }
    }
    // Anything else listed is the killed or rerun commit's, holding exactly version 4.
    let new: Vec<&String> = ids.iter().filter(|id| !prep.ids.contains(id)).collect();
    assert!(op == Op::Commit || new.is_empty(), "{}: unexpected checkpoints {new:?}", t.label);
    assert!(new.len() <= 2, "{}: more checkpoints than commits: {new:?}", t.label);
    assert!(!(after_rerun && op == Op::Commit && new.is_empty()), "{}: the rerun commit is not listed", t.label);
    for id in new {
        checks_out(&repo, id, &prep.version(4), &t.dir, &format!("{}: the new checkpoint {stage}", t.label));
    }
    if after_rerun && op == Op::Checkout {
        assert_same_tree(&prep.version(3), &t.dest(), false);
    }
}

/// Runs one trial; returns whether the operation was killed (false: it finished first).
fn trial(prep: &Prepared, scratch: &Path, op: Op, kill: Kill, label: String) -> bool {
    let t = start(prep, scratch, label);
    let out = launch(op, prep, &t, &kill);
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{}: {stderr}", t.label);
    let killed = !out.status.success();
    if killed {
        assert_eq!(out.status.signal(), Some(9), "{}: failed by itself: {stderr}", t.label);
    }
    check(prep, &t, op, false);
    // The same command again, as an operator or a cron job would: it must just work.
    let rerun = op.args(prep, &t.dest());
    let forgotten = op == Op::Forget && !listed(&t.repo()).contains(&prep.ids[1]);
    if !forgotten {
        let args: Vec<&str> = rerun.iter().map(String::as_str).collect();
        succeeded(&run(&t.repo(), &args), &format!("{}: the rerun", t.label));
    }
    check(prep, &t, op, true);
    fs::remove_dir_all(&t.dir).unwrap();
    killed
}

#[test]
fn every_operation_killed_at_every_fault_point_and_at_random_loses_nothing() {
    let started = Instant::now();
    let hits = env_num("SNAPSTORE_POINT_HITS", 3) as usize;
    let random = env_num("SNAPSTORE_CRASH_ITERATIONS", 40) as usize / 8;
    let prep = Prepared::new();
    let scratch = prep.root.path().join("trials");
    fs::create_dir(&scratch).unwrap();
    let mut rng = Rng(0xfa17_9017_0000_0001);
    let ops = [Op::Commit, Op::Forget, Op::Gc, Op::Checkout];
    let mut reached = std::collections::BTreeSet::new();
    let (mut point_kills, mut random_kills, mut finished) = (0, 0, 0);
    for op in ops {
        for &point in op.points() {
            for n in 1..=hits {
                let label = format!("{op:?}-{point}-{n}").to_lowercase();
                if !trial(&prep, &scratch, op, Kill::At(point, n), label) {
                    assert!(n > 1, "{op:?} never reached fault point {point}");
                    break;
                }
                reached.insert(point);
                point_kills += 1;
            }
        }
        // Random instants over the operation's own duration, measured on a copy.
        let t = start(&prep, &scratch, format!("{op:?}-timing").to_lowercase());
        let began = Instant::now();
        let args = op.args(&prep, &t.dest());
        succeeded(&run(&t.repo(), &args.iter().map(String::as_str).collect::<Vec<_>>()), "timing run");
        let window = began.elapsed().mul_f64(1.1);
        fs::remove_dir_all(&t.dir).unwrap();
        for i in 0..random {
            let delay = window.mul_f64((i as f64 + rng.unit()) / random as f64);
            let label = format!("{op:?}-random-{i}").to_lowercase();
            if trial(&prep, &scratch, op, Kill::After(delay), label) {
                random_kills += 1;
            } else {
                finished += 1;
            }
        }
    }
    // `record-written` and `forget-synced` are a remote repository's: tests/it/s3.rs kills a commit at the
    // first and stops a forget at the second.
    let remote_only = ["record-written", "forget-synced"];
    let unreached: Vec<&&str> = POINTS.iter().filter(|p| !reached.contains(*p) && !remote_only.contains(p)).collect();
    assert!(unreached.is_empty(), "fault points no operation reached: {unreached:?}");
    eprintln!(
        "fault points: {point_kills} kills at {} named points (up to {hits} hits each), {random_kills} at random \
         instants ({finished} more finished first) in {:.1} s; verify --read-data clean and every checkpoint \
         byte-identical after each, and after each rerun",
        reached.len(),
        started.elapsed().as_secs_f64()
    );
}
