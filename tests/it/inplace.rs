//! In-place checkout (rollback and roll-forward), partial checkout, sparse files, and reading files of a
//! checkpoint without restoring them.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use snapstore::{CheckoutOptions, CheckoutSummary, Repository};

use crate::util::{Hooked, assert_same_tree, fast_tempdir, pseudo_random, run, spawn, succeeded, text};

fn in_place() -> CheckoutOptions {
    CheckoutOptions { in_place: true, delete: true, ..Default::default() }
}

/// Overwrites `count` 4 KiB blocks spread evenly over the file, in place.
fn scatter_writes(path: &Path, count: u64, seed: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    for i in 0..count {
        let at = (len / count) * i + (seed * 4096) % (len / count).max(1);
        f.write_all_at(&pseudo_random(4096, seed * 1000 + i), at.min(len - 4096)).unwrap();
    }
}

/// Version `v` of a tree: a large file patched a little per version, small files added, changed and removed,
/// a mode change and a symlink that moves.
fn version(dir: &Path, v: u64) {
    if dir.exists() {
        fs::remove_dir_all(dir).unwrap();
    }
    fs::create_dir_all(dir.join("data/deep")).unwrap();
    fs::write(dir.join("data/image.bin"), pseudo_random(6 << 20, 1)).unwrap();
    for k in 1..=v {
        scatter_writes(&dir.join("data/image.bin"), 8, k);
    }
    if v == 3 {
        // Grow the image: the tail is new.
        let f = fs::OpenOptions::new().append(true).open(dir.join("data/image.bin")).unwrap();
        f.write_all_at(&pseudo_random(300_000, 99), 6 << 20).unwrap();
    }
    fs::write(dir.join("config.txt"), format!("version {v}\n")).unwrap();
    fs::write(dir.join("data/deep/constant"), b"never changes").unwrap();
    if v != 2 {
        fs::write(dir.join(format!("only-in-{v}.txt")), pseudo_random(1000 * v as usize, v)).unwrap();
    }
    if v == 2 {
        fs::create_dir(dir.join("dir-in-2")).unwrap();
        fs::write(dir.join("dir-in-2/x"), b"x").unwrap();
    } else {
        // In version 2 the same name is a directory: kinds swap on the way.
        fs::write(dir.join("dir-in-2"), b"a file elsewhere").unwrap();
    }
    fs::set_permissions(dir.join("config.txt"), fs::Permissions::from_mode(if v == 1 { 0o600 } else { 0o640 }))
        .unwrap();
    std::os::unix::fs::symlink(format!("target-{v}"), dir.join("link")).unwrap();
}

#[test]
fn rollback_and_roll_forward_of_a_tree_write_only_what_differs() {
    let t = fast_tempdir("inplace");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let mut ids = Vec::new();
    for v in 1..=3 {
        let dir = t.path().join(format!("v{v}"));
        version(&dir, v);
        ids.push(repo.commit(&dir, &Default::default()).unwrap().id);
    }
    let dest = t.path().join("dest");
    let first = repo.checkout(&ids[0], &dest, &Default::default()).unwrap();
    assert_same_tree(&t.path().join("v1"), &dest, true);
    assert_eq!(first.bytes_written, first.logical_bytes, "a fresh checkout writes everything (no zeros here)");
    assert_eq!((first.files_written, first.files_unchanged, first.files_patched), (first.files, 0, 0), "{first:?}");
    let image = 6u64 << 20;
    let ino = fs::metadata(dest.join("data/image.bin")).unwrap().ino();
    // Forward two versions, back to the first, then to the middle: each ends identical to its source.
    for (step, v) in [(0, 3), (1, 1), (2, 2), (3, 3), (4, 2)] {
        let s: CheckoutSummary = repo.checkout(&ids[v - 1], &dest, &in_place()).unwrap();
        assert_same_tree(&t.path().join(format!("v{v}")), &dest, true);
        assert_eq!(s.files_patched, 1, "step {step}: the image is patched in place: {s:?}");
        assert!(s.files_unchanged >= 1, "step {step}: data/deep/constant is left alone: {s:?}");
        assert_eq!(s.files_unchanged + s.files_patched + s.files_written, s.files, "step {step}: {s:?}");
        // 16 changed 4 KiB blocks touch at most 32 chunks of at most 256 KiB; the grown tail is 300 KB.
        assert!(s.bytes_written < image / 3, "step {step}: wrote {} of {}", s.bytes_written, s.logical_bytes);
        assert_eq!(fs::metadata(dest.join("data/image.bin")).unwrap().ino(), ino, "step {step}: not patched in place");
    }
    // Checking out what is already there writes nothing.
    let s = repo.checkout(&ids[1], &dest, &in_place()).unwrap();
    assert_eq!((s.bytes_written, s.files_patched, s.removed), (0, 0, 0), "{s:?}");
}

/// A large file with another name (a backup made with `ln`) is written anew rather than patched, so that
/// the other name keeps its bytes; one without is patched as usual.
#[test]
fn a_hard_linked_file_is_replaced_not_patched_so_its_other_names_keep_their_bytes() {
    let t = fast_tempdir("hardlink");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let image = |seed| {
        let mut bytes = pseudo_random(3 << 20, 7);
        bytes[1 << 20..(1 << 20) + 4096].copy_from_slice(&pseudo_random(4096, seed));
        bytes
    };
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("vm.img"), image(1)).unwrap();
    let v1 = repo.commit(&src, &Default::default()).unwrap().id;
    fs::write(src.join("vm.img"), image(2)).unwrap();
    let v2 = repo.commit(&src, &Default::default()).unwrap().id;

    let dest = t.path().join("dest");
    repo.checkout(&v2, &dest, &Default::default()).unwrap();
    let backup = t.path().join("vm.bak");
    fs::hard_link(dest.join("vm.img"), &backup).unwrap();
    let s = repo.checkout(&v1, &dest, &in_place()).unwrap();
    assert_eq!((s.files_patched, s.files_written), (0, 1), "{s:?}");
    assert!(fs::read(dest.join("vm.img")).unwrap() == image(1), "the rollback did not restore v1");
    assert!(fs::read(&backup).unwrap() == image(2), "the rollback changed the file's other name");

    // Without another name it is patched in place again.
    let s = repo.checkout(&v2, &dest, &in_place()).unwrap();
    assert_eq!(s.files_patched, 1, "{s:?}");
    assert!(fs::read(dest.join("vm.img")).unwrap() == image(2));
}

#[test]
fn without_delete_extra_files_stay_and_the_repository_is_never_deleted() {
    let t = fast_tempdir("inplace");
    let src = t.path().join("work");
    version(&src, 1);
    // The repository inside the committed directory: commit skips it, and --delete must not remove it.
    let repo = Repository::init(src.join(".snapstore")).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    fs::write(src.join("scratch.tmp"), b"made after the checkpoint").unwrap();
    let keep = CheckoutOptions { in_place: true, ..Default::default() };
    repo.checkout(&id, &src, &keep).unwrap();
    assert_eq!(fs::read(src.join("scratch.tmp")).unwrap(), b"made after the checkpoint");
    let s = repo.checkout(&id, &src, &in_place()).unwrap();
    assert_eq!(s.removed, 1, "{s:?}");
    assert!(!src.join("scratch.tmp").exists());
    assert!(src.join(".snapstore/catalog.db").exists(), "--delete removed the repository");
    assert_eq!(repo.checkpoints().unwrap().len(), 1);
}

/// Round 35 review, F4: where the checkpoint has a file and the destination a directory of that name holding
/// the user's files, a checkout in place without --delete refuses (exit 2) and removes nothing; with --delete
/// the directory goes, counted as removed. An empty directory in the way is replaced either way.
#[test]
fn without_delete_a_directory_holding_files_is_not_replaced_by_a_file() {
    let t = fast_tempdir("inplace");
    let (src, dest) = (t.path().join("work"), t.path().join("dest"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("top"), b"the checkpoint's file").unwrap();
    fs::write(src.join("keep"), b"kept").unwrap();
    let repo_dir = t.path().join("repo");
    let repo = Repository::init(&repo_dir).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    fs::create_dir_all(dest.join("top/deeper")).unwrap();
    fs::write(dest.join("top/userfile"), b"precious").unwrap();
    fs::write(dest.join("top/deeper/f2"), b"x").unwrap();
    let o = run(&repo_dir, &["checkout", &id, dest.to_str().unwrap(), "--in-place"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--delete"), "{}", text(&o.stderr));
    assert_eq!(fs::read(dest.join("top/userfile")).unwrap(), b"precious");
    assert_eq!(fs::read(dest.join("top/deeper/f2")).unwrap(), b"x");
    let s = repo.checkout(&id, &dest, &in_place()).unwrap();
    assert_eq!(s.removed, 1, "{s:?}");
    assert_same_tree(&src, &dest, true);
    fs::remove_file(dest.join("top")).unwrap();
    fs::create_dir(dest.join("top")).unwrap();
    repo.checkout(&id, &dest, &CheckoutOptions { in_place: true, ..Default::default() }).unwrap();
    assert_same_tree(&src, &dest, true);
}

/// Round 35 review, F8: a large file whose bytes already match, its mtime only touched, is hashed and found
/// the same: counted unchanged (its mtime set back), not "patched" with nothing written. One with a byte
/// changed is patched, as before.
#[test]
fn a_file_whose_bytes_match_is_unchanged_not_patched() {
    let t = fast_tempdir("inplace");
    let (src, dest) = (t.path().join("work"), t.path().join("dest"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big.bin"), pseudo_random(3 << 20, 11)).unwrap();
    fs::write(src.join("a.txt"), b"small").unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    repo.checkout(&id, &dest, &Default::default()).unwrap();
    let touch =
        |p: &Path| fs::File::options().write(true).open(p).unwrap().set_modified(std::time::SystemTime::now()).unwrap();
    touch(&dest.join("big.bin"));
    touch(&dest.join("a.txt"));
    let keep = CheckoutOptions { in_place: true, ..Default::default() };
    let s = repo.checkout(&id, &dest, &keep).unwrap();
    assert_eq!((s.files_unchanged, s.files_patched, s.bytes_written), (2, 0, 0), "{s:?}");
    assert_same_tree(&src, &dest, true);
    let f = fs::File::options().write(true).open(dest.join("big.bin")).unwrap();
    f.write_all_at(b"x", 1 << 20).unwrap();
    drop(f);
    let s = repo.checkout(&id, &dest, &keep).unwrap();
    assert_eq!((s.files_unchanged, s.files_patched), (1, 1), "{s:?}");
    assert!(s.bytes_written > 0, "{s:?}");
    assert_same_tree(&src, &dest, true);
}

/// Round 37 review, F1: a file whose content turns out damaged while it is patched in place is neither
/// version any more; the error says it is left partly patched, so that no program resumes from it.
#[test]
fn a_damaged_chunk_met_while_patching_is_told_as_a_partly_patched_file() {
    let t = fast_tempdir("inplace");
    let (src, dest) = (t.path().join("state.bin"), t.path().join("dest.bin"));
    fs::write(&src, pseudo_random(3 << 20, 13)).unwrap();
    let root = t.path().join("repo");
    let repo = Repository::init(&root).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    repo.checkout(&id, &dest, &Default::default()).unwrap();
    // Every block differs, so every chunk is written; one of them is damaged in its pack.
    fs::write(&dest, pseudo_random(3 << 20, 15)).unwrap();
    let pack = walk_files(&root.join("packs")).into_iter().next().unwrap();
    let mut bytes = fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&pack, bytes).unwrap();
    let err = repo.checkout(&id, &dest, &CheckoutOptions { in_place: true, ..Default::default() }).unwrap_err();
    assert!(err.is_corruption() && err.to_string().contains("left partly patched"), "{err}");
}

/// A checkout's record vouches only for the destination it was made in: another directory moved to that path,
/// holding another checkpoint's file of the same size and mtime (kept times, a reproducible build), is
/// hashed, not taken as what the record says.
#[test]
fn a_directory_moved_to_the_destination_is_not_vouched_for_by_its_record() {
    let t = fast_tempdir("inplace");
    let (src, repo_dir) = (t.path().join("src"), t.path().join("repo"));
    fs::create_dir(&src).unwrap();
    let repo = Repository::init(&repo_dir).unwrap();
    let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_577_836_800);
    let mut ids = Vec::new();
    for byte in [b'A', b'B'] {
        fs::write(src.join("f"), vec![byte; 100_000]).unwrap();
        fs::File::options().write(true).open(src.join("f")).unwrap().set_modified(when).unwrap();
        ids.push(repo.commit(&src, &Default::default()).unwrap().id);
    }
    let (d, d2) = (t.path().join("d"), t.path().join("d2"));
    repo.checkout(&ids[0], &d2, &Default::default()).unwrap();
    repo.checkout(&ids[1], &d, &Default::default()).unwrap();
    fs::remove_dir_all(&d).unwrap();
    fs::rename(&d2, &d).unwrap();
    let s = repo.checkout(&ids[1], &d, &in_place()).unwrap();
    assert!(fs::read(d.join("f")).unwrap() == vec![b'B'; 100_000], "the moved-in file was trusted: {s:?}");
    // Made right there, it is left alone next time.
    let again = repo.checkout(&ids[1], &d, &in_place()).unwrap();
    assert_eq!((again.files_unchanged, again.bytes_written), (1, 0), "{again:?}");
}

/// The repository bind-mounted into the destination (as a container's volume can be) has another path there,
/// but the same device and inode: `--delete` must not remove it through the mount, and a checkout into that
/// view of it is refused as one into the repository is. Root only; elsewhere the test says it was skipped.
#[test]
fn the_repository_mounted_inside_the_destination_is_never_removed() {
    struct Bound(std::path::PathBuf);
    impl Drop for Bound {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let t = fast_tempdir("inplace");
    let (src, dest, repo_dir) = (t.path().join("work"), t.path().join("app"), t.path().join("repo"));
    version(&src, 1);
    let repo = Repository::init(&repo_dir).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    repo.checkout(&id, &dest, &Default::default()).unwrap();
    let view = dest.join("backup");
    fs::create_dir(&view).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["--bind", repo_dir.to_str().unwrap(), view.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot bind-mount here (needs root); the mounted-repository test did not run");
        return;
    }
    let bound = Bound(view.clone());
    let err = repo.checkout(&id, &dest, &in_place()).unwrap_err();
    assert!(err.to_string().contains("the repository is in it"), "{err}");
    let err = repo.checkout(&id, view.join("restored"), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("refusing to check out into"), "{err}");
    // Nor a directory of the repository's own (its packs) mounted there.
    drop(bound);
    let mounted = std::process::Command::new("mount")
        .args(["--bind", repo_dir.join("packs").to_str().unwrap(), view.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted);
    let _bound = Bound(view.clone());
    let err = repo.checkout(&id, &dest, &in_place()).unwrap_err();
    assert!(err.to_string().contains("the repository is in it"), "{err}");
    assert!(repo_dir.join("catalog.db").exists(), "--delete removed the repository through the mount");
    let repo = Repository::open(&repo_dir).unwrap();
    assert_eq!(repo.checkpoints().unwrap().len(), 1);
    let again = t.path().join("again");
    repo.checkout(&id, &again, &Default::default()).unwrap();
    assert_same_tree(&src, &again, true);
}

/// The issue's measure: rolling a 1 % change of a large image back writes a few percent of it, in place.
#[test]
fn rolling_an_image_back_writes_a_few_percent() {
    let t = fast_tempdir("inplace");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let img = t.path().join("vm.img");
    let size = 32u64 << 20;
    fs::write(&img, pseudo_random(size as usize, 5)).unwrap();
    let original = fs::read(&img).unwrap();
    let v1 = repo.commit(&img, &Default::default()).unwrap().id;
    // 1 %: 82 blocks of 4 KiB.
    scatter_writes(&img, size / 100 / 4096, 3);
    let changed = fs::read(&img).unwrap();
    let v2 = repo.commit(&img, &Default::default()).unwrap().id;
    let ino = fs::metadata(&img).unwrap().ino();

    // Back: the file is what v2 recorded (same stat), so only the chunks that differ are fetched and written.
    let back = repo.checkout(&v1, &img, &in_place()).unwrap();
    assert!(fs::read(&img).unwrap() == original, "rollback is not byte-identical");
    assert!(back.bytes_written * 20 < size, "rollback wrote {} of {size} bytes", back.bytes_written);
    assert_eq!(fs::metadata(&img).unwrap().ino(), ino);
    // Forward again: now the checkout record vouches for the file.
    let fwd = repo.checkout(&v2, &img, &in_place()).unwrap();
    assert!(fs::read(&img).unwrap() == changed);
    assert!(fwd.bytes_written * 20 < size, "roll-forward wrote {}", fwd.bytes_written);

    // A copy nothing vouches for (fresh mtime, new inode) is hashed, and still only differing chunks written.
    let copy = t.path().join("copy.img");
    fs::write(&copy, &changed).unwrap();
    let hashed = repo.checkout(&v1, &copy, &in_place()).unwrap();
    assert!(fs::read(&copy).unwrap() == original);
    assert!(hashed.bytes_written * 20 < size, "hashed rollback wrote {}", hashed.bytes_written);
    // --checksum never trusts metadata, and finds nothing to write on a matching file.
    let checksum = CheckoutOptions { checksum: true, ..in_place() };
    let again = repo.checkout(&v1, &copy, &checksum).unwrap();
    assert_eq!(again.bytes_written, 0, "{again:?}");
}

/// A file whose bytes changed while its size and mtime were kept. Where it was committed from, the commit's
/// record also holds its ctime and inode, which moved: the change is found. In a checkout's destination, the
/// file's ctime is after the checkout's end, even changed at once: found too. A file left as the checkout put
/// it, checked out again at once, is trusted (not hashed); --checksum hashes it and finds nothing to write.
#[test]
fn a_change_that_kept_size_and_mtime_is_found() {
    let t = fast_tempdir("inplace");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let f = t.path().join("state.bin");
    fs::write(&f, pseudo_random(3 << 20, 8)).unwrap();
    let original = fs::read(&f).unwrap();
    let id = repo.commit(&f, &Default::default()).unwrap().id;
    let keep_mtime = |f: &Path| {
        let mtime = fs::metadata(f).unwrap().modified().unwrap();
        scatter_writes(f, 2, 1);
        fs::File::options().write(true).open(f).unwrap().set_modified(mtime).unwrap();
    };
    keep_mtime(&f);
    let s = repo.checkout(&id, &f, &in_place()).unwrap();
    assert!(fs::read(&f).unwrap() == original, "the commit's record vouched for a file whose ctime moved");
    assert!(s.bytes_written > 0 && s.bytes_written < 1 << 20, "{s:?}");

    let out = t.path().join("out");
    for round in 0..20 {
        repo.checkout(&id, &out, &in_place()).unwrap();
        keep_mtime(&out);
        let s = repo.checkout(&id, &out, &in_place()).unwrap();
        assert!(fs::read(&out).unwrap() == original, "round {round}: the checkout's record vouched for a changed file");
        assert!(s.bytes_written > 0 && s.bytes_written < 1 << 20, "round {round}: {s:?}");
        // Left as that checkout put it: trusted by its record at once, not hashed.
        let s = repo.checkout(&id, &out, &in_place()).unwrap();
        assert_eq!((s.files_unchanged, s.files_patched, s.bytes_written), (1, 0, 0), "round {round}: {s:?}");
    }
    // Hashed, and found to hold the checkpoint's bytes: unchanged, nothing written.
    let s = repo.checkout(&id, &out, &CheckoutOptions { checksum: true, ..in_place() }).unwrap();
    assert_eq!((s.files_unchanged, s.files_patched, s.bytes_written), (1, 0, 0), "{s:?}");
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn sparse_files_come_back_sparse_and_zeros_are_stored_cheaply() {
    let t = tempfile::tempdir().unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    // 16 MiB: data, a 12 MiB run of zeros, data.
    let size = 16usize << 20;
    let mut bytes = vec![0u8; size];
    bytes[..1 << 20].copy_from_slice(&pseudo_random(1 << 20, 1));
    bytes[size - (1 << 20)..].copy_from_slice(&pseudo_random(1 << 20, 2));
    let f = t.path().join("disk.img");
    fs::write(&f, &bytes).unwrap();
    let dense = repo.commit(&f, &Default::default()).unwrap();
    let zeros = repo.commit_reader("zeros.img", &mut std::io::repeat(0).take(64 << 20), &Default::default()).unwrap();
    assert!(zeros.bytes_stored < 64 << 10, "64 MiB of zeros stored as {} bytes", zeros.bytes_stored);

    let out = t.path().join("out.img");
    let s = repo.checkout(&dense.id, &out, &Default::default()).unwrap();
    assert!(fs::read(&out).unwrap() == bytes);
    assert!(s.bytes_written <= 3 << 20, "zeros were written: {s:?}");
    assert!(allocated(&out) < 6 << 20, "restored file is not sparse: {} bytes allocated", allocated(&out));

    // In place over a fully written file, zero runs are punched out rather than written.
    let full = t.path().join("full.img");
    fs::write(&full, pseudo_random(size, 3)).unwrap();
    repo.checkout(&dense.id, &full, &in_place()).unwrap();
    assert!(fs::read(&full).unwrap() == bytes);
    assert!(allocated(&full) < 6 << 20, "in-place checkout left {} bytes allocated", allocated(&full));

    let zout = t.path().join("zeros.out");
    repo.checkout(&zeros.id, &zout, &Default::default()).unwrap();
    assert_eq!(fs::metadata(&zout).unwrap().len(), 64 << 20);
    assert!(allocated(&zout) < 1 << 20);
}

#[test]
fn partial_checkout_restores_only_the_named_paths() {
    let t = fast_tempdir("inplace");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let src = t.path().join("v2");
    version(&src, 2);
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    let out = t.path().join("out");
    let opts = CheckoutOptions {
        paths: vec!["data/deep".into(), "config.txt".into(), "v2/dir-in-2/x".into()],
        ..Default::default()
    };
    let s = repo.checkout(&id, &out, &opts).unwrap();
    assert_eq!(s.files, 3, "{s:?}");
    assert_same_tree(&src.join("data/deep"), &out.join("data/deep"), true);
    assert_same_tree(&src.join("config.txt"), &out.join("config.txt"), true);
    assert_eq!(fs::read(out.join("dir-in-2/x")).unwrap(), b"x");
    assert!(!out.join("data/image.bin").exists() && !out.join("link").exists());
    // Restoring one file into a populated tree needs --in-place and touches nothing else.
    fs::write(out.join("config.txt"), b"edited").unwrap();
    let again = CheckoutOptions { paths: vec!["config.txt".into()], ..in_place() };
    repo.checkout(&id, &out, &again).unwrap();
    assert_same_tree(&src.join("config.txt"), &out.join("config.txt"), true);
    assert!(out.join("data/deep/constant").exists());
    let err = repo.checkout(&id, &out, &CheckoutOptions { paths: vec!["nope".into()], ..in_place() }).unwrap_err();
    assert!(matches!(err, snapstore::Error::PathNotFound { .. }), "{err}");
    let err = repo.checkout(&id, &out, &CheckoutOptions { paths: vec!["../x".into()], ..in_place() }).unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    // A checkpoint of one file never replaces a directory, --path or not.
    let file_id = repo.commit(src.join("config.txt"), &Default::default()).unwrap().id;
    for paths in [vec![], vec!["config.txt".into()]] {
        let err = repo.checkout(&file_id, &out, &CheckoutOptions { paths, ..in_place() }).unwrap_err();
        assert!(matches!(err, snapstore::Error::InvalidInput(_)), "{err}");
        assert!(out.join("data/deep/constant").exists());
    }
}

/// SIGKILL in the middle of an in-place rollback, at several instants: every file is then old, new, or (the
/// large one) marked incomplete by an mtime neither version has; running the checkout again ends identical.
#[test]
fn a_rollback_killed_midway_finishes_when_run_again() {
    let t = fast_tempdir("inplace");
    let repo_dir = t.path().join("repo");
    let dirs: Vec<_> = (1..=2).map(|v| t.path().join(format!("s{v}"))).collect();
    for (v, d) in dirs.iter().enumerate() {
        fs::create_dir_all(d).unwrap();
        // Different enough that a rollback has real work: most chunks of the large file differ.
        fs::write(d.join("big.bin"), pseudo_random(96 << 20, 10 + 2 * v as u64)).unwrap();
        for k in 0..20 {
            fs::write(d.join(format!("small-{k}")), format!("version {v} file {k}")).unwrap();
        }
    }
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| {
            let o = run(&repo_dir, &["-q", "commit", d.to_str().unwrap()]);
            succeeded(&o, "commit").trim().to_string()
        })
        .collect();
    let dest = t.path().join("dest");
    succeeded(&run(&repo_dir, &["checkout", &ids[1], dest.to_str().unwrap()]), "checkout");
    let mut killed = 0;
    for i in 0..8u64 {
        let target = &ids[(i % 2) as usize];
        let before = fs::metadata(dest.join("big.bin")).unwrap().modified().unwrap();
        let mut child = spawn(&repo_dir, &["checkout", target, dest.to_str().unwrap(), "--in-place", "--threads", "1"]);
        // Wait until the patch has begun (the large file's mtime moves with the first write), then a little more.
        let waited = std::time::Instant::now();
        while fs::metadata(dest.join("big.bin")).unwrap().modified().unwrap() == before
            && child.try_wait().unwrap().is_none()
            && waited.elapsed() < std::time::Duration::from_secs(20)
        {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        std::thread::sleep(std::time::Duration::from_millis(3 * i));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
            child.wait().unwrap();
        } else {
            succeeded(&child.wait_with_output().unwrap(), "checkout that was not killed");
        }
        for k in 0..20 {
            let got = fs::read_to_string(dest.join(format!("small-{k}"))).unwrap();
            assert!(got == format!("version 0 file {k}") || got == format!("version 1 file {k}"), "{got}");
        }
        let big = dest.join("big.bin");
        let m = fs::metadata(&big).unwrap().modified().unwrap();
        let matches = |d: &Path| fs::read(&big).unwrap() == fs::read(d.join("big.bin")).unwrap();
        let (m1, m2) = (fs::metadata(dirs[0].join("big.bin")).unwrap(), fs::metadata(dirs[1].join("big.bin")).unwrap());
        if m == m1.modified().unwrap() {
            assert!(matches(&dirs[0]), "kill {i}: big.bin has version 1's mtime but not its bytes");
        } else if m == m2.modified().unwrap() {
            assert!(matches(&dirs[1]), "kill {i}: big.bin has version 2's mtime but not its bytes");
        }
        succeeded(&run(&repo_dir, &["checkout", target, dest.to_str().unwrap(), "--in-place"]), "re-run");
        assert_same_tree(&dirs[(i % 2) as usize], &dest, true);
        let leftovers: Vec<_> = fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".snapstore-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    assert!(killed >= 4, "only {killed} of 8 checkouts were still running when killed; the test proves little");
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repository,
    /// Reads from the chunk store so far.
    reads: Arc<AtomicU64>,
    id: String,
    data: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        Repository::init(dir.path().join("repo")).unwrap();
        let reads = Arc::new(AtomicU64::new(0));
        let counted = reads.clone();
        let backend = Hooked {
            on_read: Box::new(move |_| {
                counted.fetch_add(1, Ordering::Relaxed);
            }),
            ..Hooked::new(&dir.path().join("repo"))
        };
        let repo = Repository::open_with(dir.path().join("repo"), Arc::new(backend)).unwrap();
        let data = pseudo_random(24 << 20, 77);
        let id = repo.commit_reader("tensors.bin", &mut &data[..], &Default::default()).unwrap().id;
        Fixture { _dir: dir, repo, reads, id, data }
    })
}

#[test]
fn a_small_read_fetches_one_or_two_chunks() {
    let f = fixture();
    let mut file = f.repo.open_file(&f.id, "tensors.bin").unwrap();
    assert_eq!(file.len(), f.data.len() as u64);
    for at in [0u64, 5_000_000, 17_123_457, f.data.len() as u64 - 4096] {
        let before = f.reads.load(Ordering::Relaxed);
        let mut buf = vec![0u8; 4096];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut buf).unwrap();
        let reads = f.reads.load(Ordering::Relaxed) - before;
        assert!((1..=2).contains(&reads), "a 4 KiB read at {at} took {reads} chunk reads");
        assert!(buf == f.data[at as usize..at as usize + 4096]);
    }
    let mut end = [0u8; 10];
    file.seek(SeekFrom::End(-3)).unwrap();
    assert_eq!(file.read(&mut end).unwrap(), 3);
    assert_eq!(file.read(&mut end).unwrap(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_range_reads_match_the_original(at in 0u64..(24 << 20), len in 0usize..300_000, back in any::<bool>()) {
        let f = fixture();
        let mut file = f.repo.open_file(&f.id, "tensors.bin").unwrap();
        if back {
            // Seek relative to the end, then read across chunk boundaries with read_exact.
            let from_end = (f.data.len() as u64 - at) as i64;
            prop_assert_eq!(file.seek(SeekFrom::End(-from_end)).unwrap(), at);
        } else {
            file.seek(SeekFrom::Start(at)).unwrap();
        }
        let want = &f.data[at as usize..(at as usize + len).min(f.data.len())];
        let mut got = vec![0u8; want.len()];
        file.read_exact(&mut got).unwrap();
        prop_assert!(got == want);
    }
}

#[test]
fn cat_and_ls_through_the_binary() {
    let t = fast_tempdir("inplace");
    let repo = t.path().join("repo");
    let src = t.path().join("v1");
    version(&src, 1);
    let id = succeeded(&run(&repo, &["-q", "commit", src.to_str().unwrap()]), "commit").trim().to_string();
    let cat = run(&repo, &["cat", &id[..8], "data/image.bin"]);
    succeeded(&cat, "cat");
    assert!(cat.stdout == fs::read(src.join("data/image.bin")).unwrap());
    // The form `show` prints (with the committed directory's name) works too.
    let cat2 = run(&repo, &["cat", "latest", "v1/config.txt"]);
    assert_eq!(succeeded(&cat2, "cat"), "version 1\n");
    let missing = run(&repo, &["cat", "latest", "nope.txt"]);
    assert_eq!(missing.status.code(), Some(4), "{}", String::from_utf8_lossy(&missing.stderr));
    let dir = run(&repo, &["cat", "latest", "data"]);
    assert_eq!(dir.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&dir.stderr).contains("is a directory"));

    let ls = succeeded(&run(&repo, &["ls", "latest"]), "ls");
    // The name is the last column; a symlink's ends with where it points.
    let names: Vec<&str> = ls.lines().map(|l| l.rsplit("  ").next().unwrap().split(" -> ").next().unwrap()).collect();
    assert_eq!(names, ["config.txt", "data", "dir-in-2", "link", "only-in-1.txt"], "{ls}");
    let deep = succeeded(&run(&repo, &["ls", "-r", "latest", "data"]), "ls -r");
    assert!(deep.contains("data/deep/constant") && deep.contains("data/image.bin"), "{deep}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeded(&run(&repo, &["--json", "ls", "latest", "data/image.bin"]), "ls --json"))
            .unwrap();
    assert_eq!(json[0]["size"], 6 << 20);
    assert_eq!(json[0]["path"], "data/image.bin");
}

/// A directory or file of the destination replaced by a symlink (to somewhere the checkout must never write)
/// is not followed: the in-place checkout puts the real one back and leaves the link's target untouched.
#[test]
fn a_symlink_in_place_of_a_directory_is_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    fs::write(src.join("sub/file"), b"belongs in dest").unwrap();
    fs::write(src.join("sub/deeper/big"), pseudo_random(3 << 20, 9)).unwrap();
    let repo = Repository::init(tmp.path().join("repo")).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    let dest = tmp.path().join("dest");
    repo.checkout(&id, &dest, &CheckoutOptions::default()).unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("file"), b"not yours").unwrap();
    for (link, target) in
        [("sub", outside.clone()), ("sub/deeper", outside.clone()), ("sub/file", outside.join("file"))]
    {
        let was_dir = fs::symlink_metadata(dest.join(link)).unwrap().is_dir();
        if was_dir {
            fs::remove_dir_all(dest.join(link)).unwrap()
        } else {
            fs::remove_file(dest.join(link)).unwrap()
        }
        std::os::unix::fs::symlink(&target, dest.join(link)).unwrap();
        repo.checkout(&id, &dest, &in_place()).unwrap();
        let now = fs::symlink_metadata(dest.join(link)).unwrap();
        assert!(!now.is_symlink() && now.is_dir() == was_dir, "{link} must be what it was again");
        assert_same_tree(&src, &dest, false);
        let left: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("file")], "{link}: the link's target was written");
        assert_eq!(fs::read(outside.join("file")).unwrap(), b"not yours");
    }
}

/// A file placed by an in-place checkout that was then killed may carry the very size and mtime of the file it
/// replaced (here set equal on purpose; on a coarse clock it happens by chance). The record of the checkout
/// before must not vouch for it: checkout forgets that record before it changes anything, so rolling back
/// hashes the file and puts the right bytes back.
#[test]
fn a_killed_checkout_leaves_no_record_that_vouches_for_what_it_replaced() {
    let t = fast_tempdir("inplace-record");
    let repo = t.path().join("repo");
    let mtime = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let dirs: Vec<_> = (0..2u64)
        .map(|v| {
            let d = t.path().join(format!("s{v}"));
            fs::create_dir_all(&d).unwrap();
            // Same size and mtime in both versions, other bytes.
            let f = fs::File::create(d.join("state.bin")).unwrap();
            f.write_all_at(&pseudo_random(100_000, 40 + 2 * v), 0).unwrap();
            f.set_modified(mtime).unwrap();
            d
        })
        .collect();
    let ids: Vec<String> = dirs
        .iter()
        .map(|d| succeeded(&run(&repo, &["-q", "commit", d.to_str().unwrap()]), "commit").trim().to_string())
        .collect();
    let dest = t.path().join("dest");
    succeeded(&run(&repo, &["-q", "checkout", &ids[0], dest.to_str().unwrap()]), "checkout");
    // Roll forward, killed right after the file is in place.
    let o = std::process::Command::new(crate::util::bin())
        .args(["--repo", repo.to_str().unwrap(), "-q", "checkout", &ids[1], dest.to_str().unwrap(), "--in-place"])
        .env("SNAPSTORE_FAULT", "checkout-file:1")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(9), "{}", text(&o.stderr));
    assert_eq!(fs::read(dest.join("state.bin")).unwrap(), pseudo_random(100_000, 42));
    // Roll back: the file must be rewritten, not trusted.
    succeeded(&run(&repo, &["-q", "checkout", &ids[0], dest.to_str().unwrap(), "--in-place"]), "rollback");
    assert_same_tree(&dirs[0], &dest, true);
}

#[test]
fn a_killed_checkout_of_a_large_file_leaves_no_file_under_its_name_and_a_rerun_finishes() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let img = t.path().join("vm.img");
    let data = pseudo_random(6 << 20, 9);
    fs::write(&img, &data).unwrap();
    let id = succeeded(&run(&repo, &["-q", "commit", img.to_str().unwrap()]), "commit").trim().to_string();
    let out = t.path().join("restore");
    fs::create_dir(&out).unwrap();
    let dest = out.join("vm.img");
    // Killed with every byte written, just before the file would take its name.
    let o = std::process::Command::new(crate::util::bin())
        .args(["--repo", repo.to_str().unwrap(), "-q", "checkout", &id, dest.to_str().unwrap()])
        .env("SNAPSTORE_FAULT", "checkout-temp:1")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(9), "{}", text(&o.stderr));
    assert!(!dest.exists(), "a file that looks restored but is not");
    let left: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].to_string_lossy().starts_with(".snapstore-tmp-"), "{left:?}");
    // The same command again finishes the job and clears the dead checkout's temporary.
    succeeded(&run(&repo, &["-q", "checkout", &id, dest.to_str().unwrap()]), "checkout again");
    assert_eq!(fs::read(&dest).unwrap(), data);
    let left: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("vm.img")]);
}

/// The same for one file of a directory checkpoint restored with `--path`: its temporary sits in a directory
/// that no walk of the checkout tidies, and the rerun still clears it.
#[test]
fn a_killed_checkout_of_one_large_file_by_path_is_finished_by_a_rerun() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    let data = pseudo_random(6 << 20, 11);
    fs::write(tree.join("sub/vm.img"), &data).unwrap();
    fs::write(tree.join("small"), b"small").unwrap();
    let id = succeeded(&run(&repo, &["-q", "commit", tree.to_str().unwrap()]), "commit").trim().to_string();
    let out = t.path().join("restore");
    let checkout = |fault: Option<&str>| {
        let mut c = std::process::Command::new(crate::util::bin());
        c.args(["--repo", repo.to_str().unwrap(), "-q", "checkout", &id, out.to_str().unwrap()]);
        c.args(["--path", "sub/vm.img", "--in-place"]);
        if let Some(f) = fault {
            c.env("SNAPSTORE_FAULT", f);
        }
        c.output().unwrap()
    };
    let o = checkout(Some("checkout-temp:1"));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&o.status), Some(9), "{}", text(&o.stderr));
    let names = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let left = names(&out.join("sub"));
    assert!(left.len() == 1 && left[0].starts_with(".snapstore-tmp-"), "{left:?}");
    succeeded(&checkout(None), "checkout again");
    assert_eq!(fs::read(out.join("sub/vm.img")).unwrap(), data);
    assert_eq!(names(&out.join("sub")), vec!["vm.img".to_string()]);
    assert_eq!(names(&out), vec!["sub".to_string()], "only the named path is restored");
}

/// Every file under `dir`, recursively.
fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(walk_files(&p)) } else { out.push(p) }
    }
    out
}
