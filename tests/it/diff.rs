//! `diff` against a brute-force comparison of the two trees on disk.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use snapstore::{Change, ChangeKind, EntryKind, Repository};

use crate::util::{fast_tempdir, pseudo_random, run, succeeded};

/// Every path under `root` (relative), with its kind, bytes (files) or target (symlinks), and mode.
fn scan(root: &Path) -> BTreeMap<PathBuf, (EntryKind, Vec<u8>, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let mode = md.permissions().mode() & 0o7777;
            let mtime = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            if md.is_dir() {
                stack.push(p.clone());
                out.insert(rel, (EntryKind::Dir, Vec::new(), mode, mtime));
            } else if md.is_symlink() {
                out.insert(
                    rel,
                    (EntryKind::Symlink, fs::read_link(&p).unwrap().into_os_string().into_vec(), mode, mtime),
                );
            } else {
                out.insert(rel, (EntryKind::File, fs::read(&p).unwrap(), mode, mtime));
            }
        }
    }
    out
}

/// A tree of `n` files under a few directories, varied by `seed`.
fn tree(root: &Path, seed: u64, n: u64) {
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 4));
        fs::create_dir_all(&dir).unwrap();
        let len = [0usize, 100, 70_000, 900_000][(i % 4) as usize];
        fs::write(dir.join(format!("f{i}")), pseudo_random(len, seed + i)).unwrap();
    }
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
}

/// Applies seeded random edits to a copy of the tree: overwrite ranges, append, truncate, delete, add, chmod,
/// retarget the symlink, turn a file into a directory.
fn mutate(root: &Path, seed: u64) {
    let mut x = seed | 1;
    let mut rnd = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let mut files: Vec<PathBuf> =
        scan(root).into_iter().filter(|(_, v)| v.0 == EntryKind::File).map(|(p, _)| p).collect();
    files.sort();
    for p in files {
        let path = root.join(&p);
        let mut data = fs::read(&path).unwrap();
        match rnd(9) {
            0 if !data.is_empty() => {
                let at = rnd(data.len() as u64) as usize;
                let len = (rnd(5000) as usize + 1).min(data.len() - at);
                data[at..at + len].copy_from_slice(&pseudo_random(len, rnd(1000)));
                fs::write(&path, &data).unwrap();
            }
            1 => {
                data.extend(pseudo_random(rnd(100_000) as usize + 1, rnd(1000)));
                fs::write(&path, &data).unwrap();
            }
            2 if !data.is_empty() => {
                data.truncate(rnd(data.len() as u64) as usize);
                fs::write(&path, &data).unwrap();
            }
            3 => fs::remove_file(&path).unwrap(),
            4 => fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap(),
            5 => {
                fs::remove_file(&path).unwrap();
                fs::create_dir(&path).unwrap();
                fs::write(path.join("inner"), b"now a directory").unwrap();
            }
            _ => {}
        }
    }
    fs::write(root.join(format!("d{}/added-{seed}", rnd(4))), pseudo_random(5000, seed)).unwrap();
    fs::create_dir_all(root.join("newdir/sub")).unwrap();
    fs::write(root.join("newdir/sub/x"), b"x").unwrap();
    fs::remove_file(root.join("link")).unwrap();
    std::os::unix::fs::symlink("d1/f1", root.join("link")).unwrap();
}

fn copy_tree(from: &Path, to: &Path) {
    let o = std::process::Command::new("cp").arg("-a").arg(from).arg(to).output().unwrap();
    assert!(o.status.success());
}

#[test]
fn diff_matches_a_brute_force_comparison() {
    for seed in [1u64, 2, 3] {
        let t = fast_tempdir("diff");
        let repo = Repository::init(t.path().join("repo")).unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        tree(&a, seed * 100, 40);
        copy_tree(&a, &b);
        mutate(&b, seed);
        let ida = repo.commit(&a, &Default::default()).unwrap().id;
        let idb = repo.commit(&b, &Default::default()).unwrap().id;
        let mut changes: Vec<Change> = Vec::new();
        let summary = repo
            .diff(&ida, &idb, |c| {
                changes.push(c.clone());
                Ok(())
            })
            .unwrap();

        let (before, after) = (scan(&a), scan(&b));
        let mut expected: BTreeMap<PathBuf, ChangeKind> = BTreeMap::new();
        for (p, va) in &before {
            match after.get(p) {
                None => {
                    expected.insert(p.clone(), ChangeKind::Removed);
                }
                Some(vb) if vb.0 != va.0 => {
                    // A kind change is the old entry removed and the new one added, at the same path.
                    expected.insert(p.clone(), ChangeKind::Removed);
                }
                // A directory's mtime moves with its entries: only a mode change is reported.
                Some(vb) if vb.0 == EntryKind::Dir && vb.2 != va.2 => {
                    expected.insert(p.clone(), ChangeKind::Modified);
                }
                Some(vb) if vb.0 != EntryKind::Dir && (vb.1 != va.1 || vb.2 != va.2 || vb.3 != va.3) => {
                    expected.insert(p.clone(), ChangeKind::Modified);
                }
                _ => {}
            }
        }
        let mut added_after_kind_change = Vec::new();
        for (p, vb) in &after {
            match before.get(p) {
                None => {
                    expected.insert(p.clone(), ChangeKind::Added);
                }
                Some(va) if va.0 != vb.0 => added_after_kind_change.push(p.clone()),
                _ => {}
            }
        }
        let mut got: BTreeMap<PathBuf, ChangeKind> = BTreeMap::new();
        for c in &changes {
            if c.change == ChangeKind::Added && added_after_kind_change.contains(&c.path) {
                continue;
            }
            assert!(got.insert(c.path.clone(), c.change).is_none(), "seed {seed}: {} reported twice", c.path.display());
        }
        assert_eq!(got, expected, "seed {seed}");
        for p in &added_after_kind_change {
            assert!(
                changes.iter().any(|c| &c.path == p && c.change == ChangeKind::Added),
                "seed {seed}: {} changed kind but was not reported added",
                p.display()
            );
        }
        assert!(summary.modified >= 3 && summary.added >= 3 && summary.removed >= 1, "{summary:?}");

        // The reported ranges cover every byte that differs, and nothing outside the new file.
        for c in changes.iter().filter(|c| c.change == ChangeKind::Modified && c.kind == EntryKind::File) {
            let (old, new) = (&before[&c.path].1, &after[&c.path].1);
            assert_eq!((c.size_before, c.size_after), (old.len() as u64, new.len() as u64));
            assert_eq!(c.content_changed, old != new, "{}", c.path.display());
            let covered = |i: u64| c.ranges.iter().any(|&(s, e)| (s..e).contains(&i));
            for (i, byte) in new.iter().enumerate() {
                if old.get(i) != Some(byte) {
                    assert!(
                        covered(i as u64),
                        "seed {seed}: {} byte {i} differs but is not reported",
                        c.path.display()
                    );
                }
            }
            assert!(c.ranges.iter().all(|&(s, e)| s < e && e <= new.len() as u64));
            assert!(c.ranges.windows(2).all(|w| w[0].1 < w[1].0), "ranges unsorted or not merged: {:?}", c.ranges);
            assert_eq!(c.bytes_changed, c.ranges.iter().map(|(s, e)| e - s).sum::<u64>());
            // Chunk granularity: a local edit costs at most a few chunks, not the whole file.
            if old.len() == new.len() && new.len() > 800_000 {
                assert!(c.bytes_changed < new.len() as u64 / 2, "{}: {:?}", c.path.display(), c.ranges);
            }
        }
    }
}

#[test]
fn diff_through_the_binary() {
    let t = fast_tempdir("diff");
    let repo = t.path().join("repo");
    let img = t.path().join("disk.img");
    fs::write(&img, pseudo_random(8 << 20, 4)).unwrap();
    let a = succeeded(&run(&repo, &["-q", "commit", img.to_str().unwrap()]), "commit").trim().to_string();
    let mut data = fs::read(&img).unwrap();
    data[5_000_000..5_004_096].copy_from_slice(&[7u8; 4096]);
    fs::write(&img, &data).unwrap();
    let b = succeeded(&run(&repo, &["-q", "commit", img.to_str().unwrap()]), "commit").trim().to_string();
    let text = succeeded(&run(&repo, &["diff", &a[..8], &b[..8]]), "diff");
    assert!(text.starts_with("M disk.img"), "{text}");
    assert!(text.contains("0 added") && text.contains("1 modified"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeded(&run(&repo, &["--json", "diff", &a, &b]), "diff --json")).unwrap();
    let c = &json["changes"][0];
    assert_eq!(c["path"], "disk.img");
    assert_eq!(c["change"], "modified");
    let (s, e) = (c["ranges"][0][0].as_u64().unwrap(), c["ranges"][0][1].as_u64().unwrap());
    assert!(s <= 5_000_000 && e >= 5_004_096 && e - s <= 1 << 20, "{c}");
    assert_eq!(json["summary"]["modified"], 1);
    // Same checkpoint: no changes.
    let same = succeeded(&run(&repo, &["diff", &b, "latest"]), "diff");
    assert!(same.starts_with("0 added"), "{same}");
    let o = run(&repo, &["diff", &a, "ffff"]);
    assert_eq!(o.status.code(), Some(4));
}

/// A symlink pointed elsewhere, one added and one removed: diff names their targets, the old one too for the
/// retargeted link, in text and JSON; with -q, only the marks and paths.
#[test]
fn diff_shows_where_symlinks_point() {
    let t = fast_tempdir("diff");
    let (repo, src) = (t.path().join("repo"), t.path().join("src"));
    fs::create_dir_all(&src).unwrap();
    std::os::unix::fs::symlink("v1", src.join("current")).unwrap();
    std::os::unix::fs::symlink("gone", src.join("old")).unwrap();
    let a = succeeded(&run(&repo, &["-q", "commit", src.to_str().unwrap()]), "commit").trim().to_string();
    fs::remove_file(src.join("current")).unwrap();
    std::os::unix::fs::symlink("v2", src.join("current")).unwrap();
    fs::remove_file(src.join("old")).unwrap();
    std::os::unix::fs::symlink("there", src.join("new")).unwrap();
    let b = succeeded(&run(&repo, &["-q", "commit", src.to_str().unwrap()]), "commit").trim().to_string();
    let text = succeeded(&run(&repo, &["diff", &a[..8], &b[..8]]), "diff");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["M current -> v2  (was -> v1)", "+ new -> there", "- old -> gone"], "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeded(&run(&repo, &["--json", "diff", &a, &b]), "diff --json")).unwrap();
    let c = &json["changes"][0];
    assert_eq!((c["path"].as_str(), c["link_target"].as_str()), (Some("current"), Some("v2")), "{c}");
    assert_eq!(c["link_target_before"], "v1", "{c}");
    assert!(json["changes"][1].get("link_target_before").is_none(), "{json}");
    // -q: the paths alone, for scripts.
    let quiet = succeeded(&run(&repo, &["-q", "diff", &a[..8], &b[..8]]), "diff -q");
    assert_eq!(quiet, "M current\n+ new\n- old\n");
}

/// Data written into a run of zeros moves where the run's maximum chunks start: no zero chunk of the new
/// version then sits where one of the old version does, yet those bytes are zeros in both.
#[test]
fn zeros_out_of_phase_are_not_reported_as_changed() {
    let t = fast_tempdir("diff");
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let mut image = pseudo_random(1 << 20, 8);
    image.resize(6 << 20, 0);
    let a = repo.commit_reader("disk.img", &mut &image[..], &Default::default()).unwrap().id;
    image[(1 << 20)..(1 << 20) + 100_000].copy_from_slice(&pseudo_random(100_000, 9));
    let b = repo.commit_reader("disk.img", &mut &image[..], &Default::default()).unwrap().id;
    let mut changes = Vec::new();
    repo.diff(&a, &b, |c| {
        changes.push(c.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let c = &changes[0];
    let covered = |i: u64| c.ranges.iter().any(|&(s, e)| (s..e).contains(&i));
    assert!(((1 << 20)..(1 << 20) + 100_000).all(covered), "{:?}", c.ranges);
    // The written bytes, plus the chunks they share with data or zeros around them: not the 5 MiB of zeros.
    assert!(c.bytes_changed < 1 << 20, "{} bytes reported changed: {:?}", c.bytes_changed, c.ranges);
}

/// A path's first checkpoint has nothing before it: `diff_added` reports every entry the tree on disk holds as
/// added, named as `diff` names them, with the bytes of its files (round 35 review, F5).
#[test]
fn a_first_checkpoint_shows_everything_as_added() {
    let t = fast_tempdir("diff");
    let src = t.path().join("src");
    tree(&src, 5, 40);
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let id = repo.commit(&src, &Default::default()).unwrap().id;
    let mut seen = BTreeMap::new();
    let s = repo
        .diff_added(&id, |c| {
            assert_eq!(c.change, ChangeKind::Added);
            seen.insert(PathBuf::from(&c.path), c.size_after);
            Ok(())
        })
        .unwrap();
    let disk = scan(&src);
    let expected: BTreeMap<PathBuf, u64> = disk
        .iter()
        .map(|(p, (kind, data, ..))| (p.clone(), if *kind == EntryKind::File { data.len() as u64 } else { 0 }))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(s.added, disk.len() as u64);
    assert_eq!(s.bytes_added, expected.values().sum::<u64>());
}
