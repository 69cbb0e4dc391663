//! Coarse timestamps, for real: an ext4 of 128-byte inodes, whose timestamps are whole seconds, is
//! loop-mounted (root only, with `mkfs.ext4`; elsewhere the test says it was skipped). A file changed within
//! the second a commit saw it keeps size, mtime and ctime: the commit's stat must not vouch for it later.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use snapstore::{CheckoutOptions, Repository};

/// An ext4 of 1 s timestamps mounted for the life of the value.
struct SecondsDisk {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SecondsDisk {
    fn mount() -> Option<SecondsDisk> {
        let dir = tempfile::tempdir().unwrap();
        let (img, mnt) = (dir.path().join("fs.img"), dir.path().join("mnt"));
        fs::create_dir(&mnt).unwrap();
        fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
        let quiet = |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        let ok = quiet(Command::new("mkfs.ext4").args(["-q", "-F", "-I", "128", "-O", "^has_journal"]).arg(&img))
            && quiet(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt));
        if !ok {
            eprintln!("SKIPPED: cannot make and mount an ext4 of 1 s timestamps here (needs root and mkfs.ext4)");
            return None;
        }
        Some(SecondsDisk { _dir: dir, mnt })
    }
}

impl Drop for SecondsDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Waits until just after the clock's second turns, so that what follows has most of a second.
fn start_of_a_second() {
    let into = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    std::thread::sleep(Duration::from_nanos(u64::from(1_000_000_000 - into) + 20_000_000));
}

/// Writes `first` to `file`, commits, and rewrites it in place with `then` (the same size) within the second
/// the commit saw it in, so that its stat stays as the commit saw it; returns the commit's id.
fn commit_then_rewrite_unseen(repo: &Repository, src: &Path, file: &Path, first: u8, then: u8) -> String {
    for _ in 0..5 {
        start_of_a_second();
        fs::write(file, vec![first; 100_000]).unwrap();
        let id = repo.commit(src, &Default::default()).unwrap().id;
        let seen = fs::metadata(file).unwrap();
        fs::OpenOptions::new().write(true).open(file).unwrap().write_all_at(&[then; 100_000], 0).unwrap();
        let now = fs::metadata(file).unwrap();
        if (now.len(), now.mtime(), now.ctime(), now.ino()) == (seen.len(), seen.mtime(), seen.ctime(), seen.ino()) {
            return id;
        }
    }
    panic!("the rewrite kept falling into the next second");
}

#[test]
fn a_file_changed_in_the_second_a_commit_saw_it_is_not_vouched_for_by_that_commit() {
    let Some(disk) = SecondsDisk::mount() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let repo = Repository::init(scratch.path().join("repo")).unwrap();
    let src = disk.mnt.join("src");
    fs::create_dir(&src).unwrap();
    let file = src.join("state.bin");
    fs::write(src.join("other"), b"settled").unwrap();
    std::thread::sleep(Duration::from_millis(2100));

    // The next commit reads it again, and holds its bytes.
    commit_then_rewrite_unseen(&repo, &src, &file, b'A', b'B');
    std::thread::sleep(Duration::from_millis(2100));
    let next = repo.commit(&src, &Default::default()).unwrap();
    assert_eq!((next.files_changed, next.bytes_read), (1, 100_000), "{next:?}");
    let mut held = Vec::new();
    std::io::Read::read_to_end(&mut repo.open_file(&next.id, "state.bin").unwrap(), &mut held).unwrap();
    assert!(held == vec![b'B'; 100_000], "the latest checkpoint holds the file's earlier bytes");
    // The other file, settled long before, is still taken as unchanged by its stat.
    assert_eq!(next.files_unchanged, 1, "{next:?}");

    // Nor does an in-place checkout back to that commit take the file as what the commit read.
    let id = commit_then_rewrite_unseen(&repo, &src, &file, b'C', b'D');
    let s = repo.checkout(&id, &src, &CheckoutOptions { in_place: true, ..Default::default() }).unwrap();
    assert!(fs::read(&file).unwrap() == vec![b'C'; 100_000], "the checkout kept the rewritten file: {s:?}");
}
