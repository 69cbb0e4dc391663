//! A full disk, for real: a small tmpfs is mounted (root only; elsewhere the tests say they were skipped) and a
//! repository on it is driven into ENOSPC by commit and by gc. Each failure must be a clear error, leave every
//! earlier checkpoint whole, and need no repair: the next command succeeds once there is room again.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use snapstore::Repository;

use crate::util::{assert_whole, pseudo_random, run, text, three_shared_versions};

/// A tmpfs of `mib` MiB mounted for the life of the value.
struct SmallDisk {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallDisk {
    fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a small tmpfs here (needs root); the full-disk tests did not run");
            return None;
        }
        Some(SmallDisk { _dir: dir, mnt })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Fills the filesystem holding `dir` with one file until a write fails; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = fs::File::create(&filler).unwrap();
    let block = vec![0x5a_u8; 64 << 10];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    filler
}

#[test]
fn a_commit_that_fills_the_disk_fails_clearly_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount(24) else { return };
    let scratch = tempfile::tempdir().unwrap();
    let repo_dir = disk.mnt.join("repo");
    let src = scratch.path().join("src");
    fs::create_dir(&src).unwrap();
    let first = pseudo_random(4 << 20, 1);
    fs::write(src.join("state"), &first).unwrap();
    let repo = Repository::init(&repo_dir).unwrap();
    let id1 = repo.commit(&src, &Default::default()).unwrap().id;

    // 40 MiB of incompressible state cannot fit in what is left.
    fs::write(src.join("state"), pseudo_random(40 << 20, 2)).unwrap();
    let o = run(&repo_dir, &["commit", src.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("error:") && err.contains("No space left on device"), "{err}");
    assert!(err.contains("hint: free some space"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(repo.checkpoints().unwrap().len(), 1, "nothing published");
    assert_eq!(fs::read_dir(repo_dir.join("tmp")).unwrap().count(), 0, "no half-written pack left behind");
    let first = (id1, first);
    assert_whole(&repo, std::slice::from_ref(&first), "state", "after the failed commit");

    // With room again, the next commit works with no repair.
    let second = pseudo_random(2 << 20, 3);
    fs::write(src.join("state"), &second).unwrap();
    let id2 = repo.commit(&src, &Default::default()).unwrap().id;
    assert_whole(&repo, &[(id2, second), first], "state", "after the next commit");
}

#[test]
fn forget_and_gc_on_a_full_disk_fail_clearly_or_succeed_and_lose_nothing_kept() {
    let Some(disk) = SmallDisk::mount(32) else { return };
    let repo_dir = disk.mnt.join("repo");
    let repo = Repository::init(&repo_dir).unwrap();
    let versions = three_shared_versions(&repo, 10, 7);
    let filler = fill(&disk.mnt);
    // Reading needs room too (SQLite's shared-memory index of its log grows a file), so `log` may fail; it must
    // fail as clearly as the writers.
    for args in [&["forget", "--keep-last", "1"][..], &["gc"], &["log"]] {
        let o = run(&repo_dir, args);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if !o.status.success() {
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains("error:") && (err.contains("No space") || err.contains("is full")), "{args:?}: {err}");
            assert!(err.contains("hint: free some space"), "{args:?}: {err}");
        }
        eprintln!("on a full disk, snapstore {}: exit {:?} {out}{err}", args.join(" "), o.status.code());
    }
    // With room again, every checkpoint is whole, forget and gc finish, and the kept one is still whole.
    fs::remove_file(filler).unwrap();
    assert_whole(&repo, &versions, "", "with room again");
    for args in [&["forget", "--keep-last", "1"][..], &["gc"]] {
        let o = run(&repo_dir, args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    }
    assert_eq!(repo.checkpoints().unwrap().len(), 1);
    assert_whole(&repo, &versions[2..], "", "after forget and gc");
}
