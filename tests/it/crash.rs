//! Crash and concurrency tests of the real binary: `snapstore commit` processes are killed with SIGKILL at
//! random (seeded) moments, or run side by side, and the repository must stay consistent and usable.
//!
//! `SNAPSTORE_CRASH_ITERATIONS` sets how many kills the main test makes (default 40: with the 10 killed GCs of
//! `gc.rs` and the killed checkout of `inplace.rs`, a plain `cargo test` makes over 50 kills).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::util::{Rng, env_num, listed, p, pseudo_random, run, spawn, succeeded, text};

/// What a checkpoint should hold: file name → (seed, length) of its `pseudo_random` content.
type Manifest = BTreeMap<String, (u64, usize)>;

/// Brings `dir` to exactly the manifest's files, rewriting only those whose (seed, length) changed.
fn apply(dir: &Path, old: &Manifest, new: &Manifest) {
    fs::create_dir_all(dir).unwrap();
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        fs::remove_file(dir.join(name)).unwrap();
    }
    for (name, &(seed, len)) in new {
        if old.get(name) != Some(&(seed, len)) {
            fs::write(dir.join(name), pseudo_random(len, seed)).unwrap();
        }
    }
}

/// Checks checkpoint `id` out into a fresh directory under `scratch` and compares it with the manifest.
fn verify(repo: &Path, id: &str, want: &Manifest, scratch: &Path) -> Result<(), String> {
    let dest = scratch.join(format!("verify-{}", &id[..12]));
    let _ = fs::remove_dir_all(&dest);
    let o = run(repo, &["-q", "checkout", id, p(&dest)]);
    if !o.status.success() {
        return Err(format!("checkout {id} failed: {:?}: {}", o.status, text(&o.stderr)));
    }
    let mut names: Vec<String> =
        fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let expected: Vec<String> = want.keys().cloned().collect();
    if names != expected {
        return Err(format!("checkpoint {id} holds {names:?}, expected {expected:?}"));
    }
    for (name, &(seed, len)) in want {
        let got = fs::read(dest.join(name)).unwrap();
        if got != pseudo_random(len, seed) {
            return Err(format!("checkpoint {id}: {name} differs ({} bytes, expected {len})", got.len()));
        }
    }
    fs::remove_dir_all(&dest).unwrap();
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 }
    })
    .sum()
}

fn iterations() -> usize {
    env_num("SNAPSTORE_CRASH_ITERATIONS", 40) as usize
}

/// The next state of the checkpointed directory: about half the data rewritten, one small file replaced.
fn mutate(m: &Manifest, i: usize, rng: &mut Rng) -> Manifest {
    let mut next = m.clone();
    for k in 0..6 {
        if (k + i).is_multiple_of(2) {
            next.insert(format!("data{k}.bin"), (rng.next() | 1, rng.range(1 << 20, 4 << 20)));
        }
    }
    next.retain(|n, _| !n.starts_with("note"));
    next.insert(format!("note{i:03}.txt"), (rng.next() | 1, rng.range(1, 5000)));
    next
}

#[test]
fn killed_commits_never_damage_the_repository() {
    let n = iterations();
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let data = tmp.path().join("state");
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    // Small packs: every commit publishes many packs and writes many catalog batches before its checkpoint,
    // so kills land in all of those phases. The binary reads the parameters from the catalog.
    let params = snapstore::RepoParams { pack_target_size: 1 << 20, ..Default::default() };
    drop(snapstore::Repository::init_with(&repo, params).unwrap());

    let mut rng = Rng(0x5eed_c4a5_4b1d_0001);
    // Every checkpoint that must exist, with what it holds.
    let mut completed: BTreeMap<String, Manifest> = BTreeMap::new();
    let commit = |completed: &mut BTreeMap<String, Manifest>, m: &Manifest| {
        let t = Instant::now();
        let out = succeeded(&run(&repo, &["-q", "commit", p(&data)]), "commit");
        let id = out.trim().to_string();
        assert_eq!(id.len(), 64, "{out}");
        completed.insert(id.clone(), m.clone());
        (id, t.elapsed())
    };

    // Two completed commits; the second, typical of the loop's, sets the kill window.
    let mut manifest = mutate(&Manifest::new(), 0, &mut rng);
    let mut all: Manifest =
        (0..6).map(|k| (format!("data{k}.bin"), (rng.next() | 1, rng.range(1 << 20, 4 << 20)))).collect();
    all.extend(manifest.clone());
    apply(&data, &Manifest::new(), &all);
    manifest = all;
    commit(&mut completed, &manifest);
    let next = mutate(&manifest, 1, &mut rng);
    apply(&data, &manifest, &next);
    manifest = next;
    let (_, typical) = commit(&mut completed, &manifest);
    let window = typical.mul_f64(1.1);

    let (mut killed, mut finished_first, mut published_anyway) = (0, 0, 0);
    for i in 0..n {
        let next = mutate(&manifest, i + 2, &mut rng);
        apply(&data, &manifest, &next);
        manifest = next;

        // Kill at a moment spread evenly over the window across iterations, jittered.
        let delay = window.mul_f64((i as f64 + rng.unit()) / n as f64);
        let mut child = spawn(&repo, &["-q", "commit", p(&data)]);
        std::thread::sleep(delay);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if out.status.success() {
            // It finished before the kill and reported its id: it must be there.
            finished_first += 1;
            let id = text(&out.stdout).trim().to_string();
            assert_eq!(id.len(), 64, "iteration {i}: exit 0 without an id: {:?}", text(&out.stdout));
            completed.insert(id, manifest.clone());
        } else {
            assert_eq!(out.status.signal(), Some(9), "iteration {i}: commit failed by itself: {stderr}");
            killed += 1;
        }

        // The catalog lists every completed checkpoint, and nothing else but possibly the killed one.
        let ids = listed(&repo);
        let set: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(set.len(), ids.len(), "iteration {i}: duplicate ids in log");
        for id in completed.keys() {
            assert!(set.contains(id), "iteration {i} (kill after {delay:?}): completed checkpoint {id} is gone");
        }
        let unknown: Vec<&String> = ids.iter().filter(|id| !completed.contains_key(*id)).collect();
        assert!(unknown.len() <= 1, "iteration {i}: unexpected checkpoints {unknown:?}");
        if let Some(id) = unknown.first() {
            // The killed commit published before it died: it must hold exactly what it was committing.
            let id = id.to_string();
            verify(&repo, &id, &manifest, &scratch)
                .unwrap_or_else(|e| panic!("iteration {i}: killed commit's checkpoint is wrong: {e}"));
            published_anyway += 1;
            completed.insert(id, manifest.clone());
        }

        // The next commit just works: no lock to clear, no repair to run.
        let (id, _) = commit(&mut completed, &manifest);
        verify(&repo, &id, &manifest, &scratch).unwrap_or_else(|e| panic!("iteration {i}: commit after kill: {e}"));
        // And an older checkpoint, in rotation, still checks out.
        let older: Vec<&String> = completed.keys().collect();
        let pick = older[rng.range(0, older.len())].clone();
        verify(&repo, &pick, &completed[&pick], &scratch).unwrap_or_else(|e| panic!("iteration {i}: {e}"));
        succeeded(&run(&repo, &["stats"]), "stats after a kill");
        // verify: the whole structure and every byte of data, after every kill.
        succeeded(&run(&repo, &["-q", "verify", "--read-data"]), "verify after a kill");
    }

    // At the end: exactly the completed checkpoints, each byte-identical.
    let ids: BTreeSet<String> = listed(&repo).into_iter().collect();
    assert_eq!(ids, completed.keys().cloned().collect::<BTreeSet<_>>());
    let mut bad = Vec::new();
    for (id, m) in &completed {
        if let Err(e) = verify(&repo, id, m, &scratch) {
            bad.push(e);
        }
    }
    assert!(bad.is_empty(), "checkpoints damaged by killed commits:\n{}", bad.join("\n"));
    let stats = succeeded(&run(&repo, &["--json", "stats"]), "stats");
    eprintln!(
        "crash test: {n} iterations in {:.1} s; kill window {window:?}; {killed} killed ({published_anyway} of them \
         had published), {finished_first} finished first; {} checkpoints; {} pack files on disk, {} temp files \
         left in tmp/; stats: {}",
        started.elapsed().as_secs_f64(),
        completed.len(),
        count_files(&repo.join("packs")),
        count_files(&repo.join("tmp")),
        stats.split_whitespace().collect::<Vec<_>>().join(" ")
    );
}

/// `init` (and a commit's automatic init) killed part way must not leave a repository that every later
/// command refuses.
#[test]
fn killed_init_leaves_a_usable_or_absent_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("state.bin");
    fs::write(&file, pseudo_random(10_000, 3)).unwrap();
    let mut total = Duration::ZERO;
    for k in 0..3 {
        let t = Instant::now();
        succeeded(&run(&tmp.path().join(format!("timing{k}")), &["init"]), "init");
        total += t.elapsed();
    }
    let typical = total / 3;
    let mut rng = Rng(0x1417_2024);
    let trials = 24;
    let mut failures = Vec::new();
    for i in 0..trials {
        let repo = tmp.path().join(format!("r{i}"));
        let delay = typical.mul_f64(1.2 * (i as f64 + rng.unit()) / trials as f64);
        let mut child = spawn(&repo, &["init"]);
        std::thread::sleep(delay);
        let _ = child.kill();
        let killed = child.wait_with_output().unwrap().status.signal() == Some(9);
        let o = run(&repo, &["-q", "commit", p(&file)]);
        if !o.status.success() {
            failures.push(format!(
                "kill after {delay:?} (killed: {killed}): commit then exits {:?}: {}",
                o.status.code(),
                text(&o.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "a killed init left an unusable repository (typical init {typical:?}):\n{}",
        failures.join("\n")
    );
}

fn make_dir(dir: &Path, files: &[(&str, u64, usize)]) {
    fs::create_dir_all(dir).unwrap();
    for &(name, seed, len) in files {
        fs::write(dir.join(name), pseudo_random(len, seed)).unwrap();
    }
}

fn manifest_of(files: &[(&str, u64, usize)]) -> Manifest {
    files.iter().map(|&(n, s, l)| (n.to_string(), (s, l))).collect()
}

/// Starts all commits at once and returns each one's id.
fn concurrent_commits(repo: &Path, dirs: &[&Path]) -> Vec<Result<String, String>> {
    let children: Vec<Child> = dirs.iter().map(|d| spawn(repo, &["-q", "commit", p(d)])).collect();
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            let err = text(&o.stderr);
            assert!(!err.contains("panicked"), "{err}");
            if o.status.success() {
                Ok(text(&o.stdout).lines().last().unwrap_or_default().to_string())
            } else {
                Err(format!("exit {:?}: {}", o.status.code(), err.trim()))
            }
        })
        .collect()
}

#[test]
fn concurrent_commits_into_one_repository_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    succeeded(&run(&repo, &["init"]), "init");
    // Two directories sharing one file, so both commits race to store the same chunks.
    let a_files = [("shared.bin", 11, 3 << 20), ("a1.bin", 12, 5 << 20), ("a2.bin", 13, 1 << 20)];
    let b_files = [("shared.bin", 11, 3 << 20), ("b1.bin", 22, 6 << 20)];
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    make_dir(&a, &a_files);
    make_dir(&b, &b_files);
    let mut expected: BTreeMap<String, Manifest> = BTreeMap::new();
    for round in 0..3 {
        let results = concurrent_commits(&repo, &[&a, &b]);
        let ids: Vec<String> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("round {round}: a concurrent commit failed: {e}")))
            .collect();
        expected.insert(ids[0].clone(), manifest_of(&a_files));
        expected.insert(ids[1].clone(), manifest_of(&b_files));
        // Both commits of the same directory at once, too.
        let results = concurrent_commits(&repo, &[&a, &a]);
        for r in results {
            let id = r.unwrap_or_else(|e| panic!("round {round}: concurrent commit of one directory failed: {e}"));
            expected.insert(id, manifest_of(&a_files));
        }
        // Touch a file so the next round reads it again.
        fs::write(a.join("a2.bin"), pseudo_random(1 << 20, 13)).unwrap();
    }
    let ids: BTreeSet<String> = listed(&repo).into_iter().collect();
    assert_eq!(ids, expected.keys().cloned().collect::<BTreeSet<_>>());
    for (id, m) in &expected {
        verify(&repo, id, m, &scratch).unwrap();
    }
}

/// The first commits into a repository that does not exist yet each try to create it.
#[test]
fn concurrent_first_commits_both_create_or_use_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    make_dir(&a, &[("x.bin", 1, 100_000)]);
    make_dir(&b, &[("y.bin", 3, 100_000)]);
    let mut failures = Vec::new();
    for attempt in 0..4 {
        let repo: PathBuf = tmp.path().join(format!("repo{attempt}"));
        for r in concurrent_commits(&repo, &[&a, &b]) {
            if let Err(e) = r {
                failures.push(format!("attempt {attempt}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "racing first commits fail:\n{}", failures.join("\n"));
}
