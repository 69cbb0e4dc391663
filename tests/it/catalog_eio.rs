//! I/O errors (EIO) from the catalog's own file. SQLite does its I/O inside the binary, out of reach of a
//! backend wrapper, so an `LD_PRELOAD` shim (`eio_shim.c`, built with `cc` here) fails the reads or the writes
//! and fsyncs of `catalog.db` and its WAL from the k-th on, as a failing disk does. Each failure must be one
//! clear error with a hint, never a panic or a claim of damage; afterwards, with the disk healed,
//! `verify --read-data` is clean, every checkpoint kept checks out identical, and the same command succeeds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::util::{assert_same_tree, bin, copy_dir, listed, p, pseudo_random, run, succeeded, text};

/// The shim, built once per test run; `None` (with a message) where no C compiler is installed, except under
/// CI, where a skipped test would hide a regression.
fn shim() -> Option<&'static Path> {
    static SHIM: OnceLock<Option<(tempfile::TempDir, PathBuf)>> = OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let so = dir.path().join("eio_shim.so");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/eio_shim.c");
        let built = Command::new("cc").args(["-shared", "-fPIC", "-O1", "-o", p(&so), p(&src), "-ldl"]).output();
        match built {
            Ok(o) if o.status.success() => Some((dir, so)),
            other => {
                let why = match other {
                    Ok(o) => text(&o.stderr),
                    Err(e) => e.to_string(),
                };
                assert!(std::env::var_os("CI").is_none(), "cannot build the EIO shim under CI: {why}");
                eprintln!("SKIPPED: catalog EIO tests need a C compiler (cc): {why}");
                None
            }
        }
    })
    .as_ref()
    .map(|(_, so)| so.as_path())
}

/// Runs the binary with the catalog's `ops` ("read" or "write") failing from the `from`-th call on.
fn run_failing(shim: &Path, repo: &Path, args: &[&str], ops: &str, from: usize) -> Output {
    Command::new(bin())
        .arg("--repo")
        .arg(repo)
        .args(args)
        .env("LD_PRELOAD", shim)
        .env("SNAPSTORE_EIO_PATH", "catalog.db")
        .env("SNAPSTORE_EIO_OPS", ops)
        .env("SNAPSTORE_EIO_FROM", from.to_string())
        .output()
        .unwrap()
}

/// A failure a user can act on: exit 1, one `error:` line naming the I/O error, and a hint; no panic and no
/// claim that the repository is damaged.
fn assert_clear(o: &Output, what: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    // SQLite's own words, or (where SQLite took the failed read for damage) the error of reading the file again.
    let io = err.contains("disk I/O error") || err.contains("Input/output error");
    assert!(err.starts_with("error: ") && io, "{what}: {err}");
    assert!(err.contains("\nhint: "), "{what}: no hint: {err}");
    assert!(!err.contains("panicked") && !err.contains("damaged"), "{what}: {err}");
}

/// A directory at version `v`: three files, two rewritten per version.
fn version(dir: &Path, v: u64) {
    fs::create_dir_all(dir).unwrap();
    for k in 0..3u64 {
        let generation = (v + k) / 2;
        fs::write(dir.join(format!("f{k}")), pseudo_random(400_000 * (k as usize + 1), (k << 32) | (generation << 1)))
            .unwrap();
    }
}

/// A repository with checkpoints of versions 0 and 1 (1 MiB packs, so GC rewrites and deletes), version 0
/// forgotten so that GC has work, and the directory at version 2 for the next commit.
struct Prepared {
    root: tempfile::TempDir,
    ids: Vec<String>,
}

impl Prepared {
    fn new() -> Prepared {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("repo");
        let params = snapstore::RepoParams { pack_target_size: 1 << 20, ..Default::default() };
        drop(snapstore::Repository::init_with(&repo, params).unwrap());
        let mut ids = Vec::new();
        for v in 0..3 {
            version(&root.path().join(format!("v{v}")), v);
        }
        for v in 0..2 {
            let state = root.path().join("state");
            let _ = fs::remove_dir_all(&state);
            copy_dir(&root.path().join(format!("v{v}")), &state);
            ids.push(succeeded(&run(&repo, &["-q", "commit", p(&state)]), "commit").trim().to_string());
        }
        let state = root.path().join("state");
        fs::remove_dir_all(&state).unwrap();
        copy_dir(&root.path().join("v2"), &state);
        // One more checkpoint to forget, of version 2's directory under another path.
        ids.push(succeeded(&run(&repo, &["-q", "commit", p(&root.path().join("v2"))]), "commit").trim().to_string());
        succeeded(&run(&repo, &["-q", "forget", &ids[0]]), "forget");
        Prepared { root, ids }
    }

    fn copy(&self, name: &str) -> PathBuf {
        let to = self.root.path().join(name);
        let _ = fs::remove_dir_all(&to);
        copy_dir(&self.root.path().join("repo"), &to);
        to
    }

    /// Versions 1 and 2 check out identical, unless the checkpoint of version 2's own path may be gone.
    fn check_kept(&self, repo: &Path, may_be_forgotten: bool, what: &str) {
        succeeded(&run(repo, &["-q", "verify", "--read-data"]), &format!("{what}: verify"));
        let ids = listed(repo);
        for (i, v) in [(1, 1), (2, 2)] {
            if !ids.contains(&self.ids[i]) {
                assert!(may_be_forgotten && i == 2, "{what}: checkpoint {i} is gone");
                continue;
            }
            let dest = self.root.path().join("check");
            let _ = fs::remove_dir_all(&dest);
            succeeded(&run(repo, &["-q", "checkout", &self.ids[i], p(&dest)]), &format!("{what}: checkout"));
            assert_same_tree(&self.root.path().join(format!("v{v}")), &dest, false);
        }
    }
}

#[test]
fn catalog_write_errors_fail_each_command_clearly_and_lose_nothing() {
    let Some(shim) = shim() else { return };
    let prep = Prepared::new();
    let state = prep.root.path().join("state");
    let ops: [(&str, Vec<&str>); 3] = [
        ("commit", vec!["-q", "commit", p(&state)]),
        ("forget", vec!["-q", "forget", &prep.ids[2]]),
        ("gc", vec!["-q", "gc"]),
    ];
    let (mut failed, mut finished) = (0, 0);
    for (name, args) in &ops {
        for k in [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610] {
            let repo = prep.copy("trial");
            let what = format!("{name} with catalog writes failing from the {k}-th");
            let o = run_failing(shim, &repo, args, "write", k);
            let done = o.status.success();
            if done {
                finished += 1;
            } else {
                assert_clear(&o, &what);
                failed += 1;
            }
            prep.check_kept(&repo, *name == "forget", &what);
            // Healed, the same command succeeds (a forget that went through has nothing left to do).
            if !(done && *name == "forget") {
                succeeded(&run(&repo, args), &format!("{what}: run again"));
                prep.check_kept(&repo, true, &format!("{what}, run again"));
            }
            if done {
                break;
            }
        }
    }
    assert!(finished == ops.len(), "an operation failed even with 610 catalog writes allowed");
    eprintln!("catalog write EIO: {failed} runs failed clearly, {finished} finished; nothing lost after any");
}

#[test]
fn catalog_read_errors_fail_each_command_clearly_and_write_nothing_wrong() {
    let Some(shim) = shim() else { return };
    let prep = Prepared::new();
    let repo = prep.root.path().join("repo");
    let dest = prep.root.path().join("dest");
    let (mut failed, mut finished) = (0, 0);
    for (name, args) in [
        ("log", vec!["log"]),
        ("checkout", vec!["-q", "checkout", &prep.ids[1], p(&dest)]),
        ("verify", vec!["-q", "verify"]),
    ] {
        for k in [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233] {
            let _ = fs::remove_dir_all(&dest);
            let what = format!("{name} with catalog reads failing from the {k}-th");
            let o = run_failing(shim, &repo, &args, "read", k);
            if o.status.success() {
                finished += 1;
                if name == "checkout" {
                    assert_same_tree(&prep.root.path().join("v1"), &dest, false);
                }
                break;
            }
            assert_clear(&o, &what);
            failed += 1;
            // A checkout cut short leaves no file with wrong bytes: each one there is whole and right.
            if dest.exists() {
                for e in
                    walkdir::WalkDir::new(&dest).into_iter().map(Result::unwrap).filter(|e| e.file_type().is_file())
                {
                    let rel = e.path().strip_prefix(&dest).unwrap();
                    let want = fs::read(prep.root.path().join("v1").join(rel)).unwrap();
                    assert!(fs::read(e.path()).unwrap() == want, "{what}: {} has wrong bytes", rel.display());
                }
            }
        }
    }
    prep.check_kept(&repo, false, "after the read errors");
    eprintln!("catalog read EIO: {failed} runs failed clearly, {finished} finished");
}
