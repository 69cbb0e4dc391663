//! End-to-end tests of `verify` and `repair index`, through the library and the `snapstore` binary.
//!
//! Each corruption test builds a small repository (three checkpoints over a directory with a text file, a
//! 300 KB file in a subdirectory and a 2 MB file, plus a stream; packs of 256 KiB so there are several), injects
//! one kind of damage next to the subdirectory's file, and checks that verify reports it, names that file in
//! exactly the checkpoints that hold it, and makes the binary exit with 3.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use snapstore::{Catalog, CheckoutOptions, DataSubset, EntryKind, ObjectId, RepoParams, Repository, VerifyOptions};

use crate::util::{all_entries, copy_dir, edit_trees, fast_tempdir, pseudo_random, run, succeeded, text};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: Repository,
    /// The two directory checkpoints (both hold `run/sub/b.bin`), then the stream's.
    ids: [String; 3],
    /// Where each checkpoint's content was, for comparing checkouts.
    src: PathBuf,
}

fn fixture() -> Fixture {
    let dir = fast_tempdir("snapstore-verify-");
    let src = dir.path().join("run");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), b"alpha\n").unwrap();
    fs::write(src.join("sub/b.bin"), pseudo_random(300_000, 2)).unwrap();
    fs::write(src.join("big.bin"), pseudo_random(2_000_000, 1)).unwrap();
    let root = dir.path().join("repo");
    let params = RepoParams { pack_target_size: 256 << 10, ..RepoParams::default() };
    let repo = Repository::init_with(&root, params).unwrap();
    let c1 = repo.commit(&src, &Default::default()).unwrap().id;
    fs::write(src.join("a.txt"), b"alpha, changed\n").unwrap();
    let c2 = repo.commit(&src, &Default::default()).unwrap().id;
    let c3 = repo.commit_reader("stream.bin", &mut &pseudo_random(100_000, 7)[..], &Default::default()).unwrap().id;
    Fixture { _dir: dir, root, repo, ids: [c1, c2, c3], src }
}

/// The content id a tree entry named `name` points at (unique in the fixture).
fn content_of(cat: &Catalog, name: &str) -> Vec<u8> {
    entry_target(cat, name, EntryKind::File)
}

/// The target of the (first) tree entry named `name` of this kind.
fn entry_target(cat: &Catalog, name: &str, kind: EntryKind) -> Vec<u8> {
    all_entries(cat.connection())
        .into_iter()
        .find(|(_, e)| e.name == name.as_bytes() && e.kind == kind)
        .map(|(_, e)| e.target)
        .unwrap_or_else(|| panic!("no entry named {name}"))
}

/// The first chunk of the file named `name`.
fn first_chunk(cat: &Catalog, name: &str) -> ObjectId {
    let content = content_of(cat, name);
    let Ok(segs) = cat
        .connection()
        .query_row("SELECT segments FROM contents WHERE id = ?1", [&content], |r| r.get::<_, Vec<u8>>(0))
    else {
        // A file of one chunk names the chunk as its content.
        return ObjectId::from_slice(&content).unwrap();
    };
    let data: Vec<u8> =
        cat.connection().query_row("SELECT data FROM segments WHERE id = ?1", [&segs[..32]], |r| r.get(0)).unwrap();
    ObjectId::from_slice(&data[..32]).unwrap()
}

impl Fixture {
    /// The chunk of `sub/b.bin` that damage is injected next to, and the path of its pack file.
    fn target(&self) -> (ObjectId, PathBuf, snapstore::ChunkLocation) {
        let cat = crate::util::catalog_rw(&self.repo).unwrap();
        let id = first_chunk(&cat, "b.bin");
        let loc = cat.chunk_location(&id).unwrap().unwrap();
        (id, self.root.join(&loc.pack), loc)
    }

    fn verify(&self, read_data: DataSubset) -> snapstore::VerifyReport {
        self.repo.verify(&VerifyOptions { read_data, ..Default::default() }).unwrap()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        run(&self.root, args)
    }

    fn catalog(&self) -> Catalog {
        crate::util::catalog_rw(&self.repo).unwrap()
    }
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

/// Asserts the report and the binary's output name `run/sub/b.bin` as affected in exactly the two directory
/// checkpoints, and that the binary exits with 3.
fn assert_b_affected(f: &Fixture, report: &snapstore::VerifyReport, cli_args: &[&str]) {
    assert!(!report.is_clean());
    let affected: BTreeSet<(String, String)> =
        report.affected_files.iter().map(|a| (a.checkpoint.clone(), a.path.to_str().unwrap().to_owned())).collect();
    for id in &f.ids[..2] {
        assert!(affected.contains(&(id.clone(), "run/sub/b.bin".to_string())), "{affected:?}");
    }
    let cps: BTreeSet<&str> = report.affected_checkpoints.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(cps, f.ids[..2].iter().map(String::as_str).collect(), "the stream is untouched: {report:#?}");
    let o = f.cli(cli_args);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "{out}\n{}", text(&o.stderr));
    for id in &f.ids[..2] {
        assert!(out.contains(&format!("affected: {} run/sub/b.bin", &id[..8])), "{out}");
    }
    assert!(!out.contains(&format!("affected: {}", &f.ids[2][..8])), "{out}");
    assert!(out.contains("damage found:"), "{out}");
}

#[test]
fn a_sound_repository_verifies_clean() {
    let f = fixture();
    let r = f.verify(DataSubset::None);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.checkpoints, 3);
    assert!(r.packs >= 4, "small packs: {}", r.packs);
    assert_eq!((r.packs_read, r.chunks_read), (0, 0));
    let r = f.verify(DataSubset::All);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!((r.packs_read, r.chunks_read), (r.packs, r.chunks));
    let out = succeeded(&f.cli(&["verify"]), "verify");
    assert!(out.starts_with("no damage found: 3 checkpoints"), "{out}");
    let out = succeeded(&f.cli(&["verify", "--read-data"]), "verify --read-data");
    assert!(out.contains(&format!("{} chunks checked; read", r.chunks)), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&succeeded(&f.cli(&["--json", "verify", "--read-data"]), "json")).unwrap();
    assert_eq!(json["packs_read"], r.packs);
    assert_eq!(json["affected_files"].as_array().unwrap().len(), 0);
}

#[test]
fn a_flipped_byte_in_a_chunk_is_found_by_reading_data() {
    let f = fixture();
    let (id, pack, loc) = f.target();
    flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    assert!(f.verify(DataSubset::None).is_clean(), "structure alone cannot see it");
    let r = f.verify(DataSubset::All);
    assert_eq!(r.damaged_chunks_total, 1, "{r:?}");
    assert_eq!(r.damaged_chunks[0].id, id.to_hex());
    assert_eq!(r.damaged_chunks[0].pack.as_deref(), Some(loc.pack.as_str()));
    assert_b_affected(&f, &r, &["verify", "--read-data"]);
    let out = text(&f.cli(&["verify", "--read-data"]).stdout);
    assert!(out.contains(&format!("damaged chunk {}", id.to_hex())), "{out}");
    // The read marked it: from then on a verify that reads no data knows of it too.
    let o = f.cli(&["verify"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stdout).contains("marked damaged by an earlier read"), "{}", text(&o.stdout));

    // The byte put back (a pack restored from a copy): a read that finds the blob sound drops the mark, which
    // no commit could otherwise clear once the original data is gone.
    flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    assert_eq!(marked(&f), vec![id]);
    assert!(f.verify(DataSubset::All).is_clean());
    assert!(marked(&f).is_empty());
    assert!(f.verify(DataSubset::None).is_clean());
}

#[test]
fn a_damaged_chunk_is_left_out_by_repair_with_read_data_and_healed_by_committing_again() {
    let f = fixture();
    let (id, pack, loc) = f.target();
    flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    // Plain repair reads no chunk data: it cannot see the damage, and says how far its "whole" goes.
    let o = f.cli(&["repair", "index"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("3 of 3 checkpoints whole (as far as the index shows"), "{}", text(&o.stdout));
    // verify points to the repair that helps.
    let out = text(&f.cli(&["verify", "--read-data"]).stdout);
    assert!(out.contains("repair index --read-data"), "{out}");

    let o = f.cli(&["repair", "index", "--read-data"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "damage remains until the chunk is stored again:\n{out}");
    assert!(out.contains(&format!("damaged chunk {} in {}", id.to_hex(), loc.pack)), "{out}");
    assert!(out.contains("1 of 3 checkpoints whole") && out.contains("commit the original data again"), "{out}");
    for old in &f.ids[..2] {
        assert!(out.contains(&format!("damaged  {}", &old[..8])), "{out}");
    }
    assert!(f.catalog().chunk_location(&id).unwrap().is_none(), "the damaged blob is out of the index");

    // The original data committed again, as a cron job would, without --reread: the file holding the chunk,
    // unchanged by stat, is read all the same (round 35 review, F2: it was taken by stat, and the checkpoint
    // made referenced the chunk the index lacked), the chunk is stored afresh, and the old checkpoints are whole.
    let c = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!((c.files_reread_for_damage, c.files_unchanged), (1, 3), "{c:?}");
    assert!(c.bytes_new >= 1, "the chunk was stored again: {c:?}");
    let fresh = f.catalog().chunk_location(&id).unwrap().unwrap();
    assert_ne!((fresh.pack.as_str(), fresh.offset), (loc.pack.as_str(), loc.offset));
    assert!(f.verify(DataSubset::All).is_clean());
    assert_checkouts_identical(&f);
    // A later repair with --read-data keeps the sound copy.
    assert_eq!(f.cli(&["repair", "index", "--read-data"]).status.code(), Some(0));
    assert_eq!(f.catalog().chunk_location(&id).unwrap().unwrap().pack, fresh.pack);
    // Once GC finds every chunk in use indexed, commits go back to trusting stat alone.
    let flagged = |f: &Fixture| -> bool {
        f.catalog()
            .connection()
            .query_row("SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'chunks_unindexed')", [], |r| r.get(0))
            .unwrap()
    };
    assert!(flagged(&f));
    f.repo.gc(&Default::default()).unwrap();
    assert!(!flagged(&f));
    let c = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!((c.files_reread_for_damage, c.bytes_read), (0, 0), "{c:?}");
}

/// A commit that starts while `repair index --read-data` reads (which may take hours) does not throw the
/// reading away: the rebuild after it waits for the commit to end.
#[test]
fn repair_with_read_data_waits_for_a_commit_that_started_during_the_read() {
    const COMMIT_RUNS_ON: std::time::Duration = std::time::Duration::from_millis(300);
    /// A commit (a session of PID 1, always alive) that starts when the read starts and ends a little after
    /// the read has ended, so that it is certainly running when the rebuild after the read begins.
    struct CommitDuringRead {
        catalog: Mutex<Option<Catalog>>,
        ended: Mutex<Option<(std::time::Instant, std::thread::JoinHandle<()>)>>,
    }
    impl snapstore::Progress for CommitDuringRead {
        fn start(&self, _: &str, _: Option<u64>) {
            let cat = self.catalog.lock().unwrap();
            let Some(cat) = cat.as_ref() else { return };
            let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
            let host = if host.is_empty() { "unknown".to_string() } else { host };
            let (process, pidns) = crate::util::process_record(1);
            cat.connection()
                .execute(
                    "INSERT INTO sessions (kind, host, pid, started_ns, heartbeat_ns, start_epoch, process, pidns)
                     SELECT 'commit', ?1, 1, 0, 0, 1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE pid = 1)",
                    [host, process, pidns],
                )
                .unwrap();
        }
        fn finish(&self) {
            let Some(cat) = self.catalog.lock().unwrap().take() else { return };
            let ends = std::thread::spawn(move || {
                std::thread::sleep(COMMIT_RUNS_ON);
                cat.connection().execute("DELETE FROM sessions WHERE pid = 1", []).unwrap();
            });
            *self.ended.lock().unwrap() = Some((std::time::Instant::now(), ends));
        }
    }
    let f = fixture();
    let (id, pack, loc) = f.target();
    flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    let hook = Arc::new(CommitDuringRead { catalog: Mutex::new(Some(f.catalog())), ended: Mutex::new(None) });
    let opts = VerifyOptions { read_data: DataSubset::All, progress: hook.clone(), ..Default::default() };
    let rep = snapstore::Repository::repair_index_reading_data(&f.root, &opts).unwrap();
    let (read_ended, commit) = hook.ended.lock().unwrap().take().expect("the read ended");
    assert!(read_ended.elapsed() >= COMMIT_RUNS_ON, "the rebuild did not wait for the commit");
    commit.join().unwrap();
    assert_eq!(rep.damaged_chunks.len(), 1, "{rep:?}");
    assert!(f.catalog().chunk_location(&id).unwrap().is_none(), "the damaged blob is out of the index");
}

#[test]
fn a_truncated_pack_is_reported() {
    let f = fixture();
    let (_, pack, _) = f.target();
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len / 2).unwrap();
    let r = f.verify(DataSubset::None);
    assert_eq!(r.damaged_packs.len(), 1, "{r:?}");
    assert!(r.damaged_packs[0].problem.contains("bytes but the catalog recorded"), "{r:?}");
    assert_b_affected(&f, &r, &["verify"]);
}

#[test]
fn a_deleted_pack_is_reported() {
    let f = fixture();
    let (_, pack, loc) = f.target();
    fs::remove_file(&pack).unwrap();
    let r = f.verify(DataSubset::None);
    assert_eq!(r.damaged_packs.len(), 1, "{r:?}");
    // Every damaged chunk is in the missing pack, whose line stands for them.
    assert!(r.damaged_chunks_total > 0 && r.damaged_chunks_in_damaged_packs == r.damaged_chunks_total, "{r:?}");
    assert_eq!(r.damaged_packs[0].pack, loc.pack);
    assert!(r.damaged_packs[0].problem.contains("missing"), "{r:?}");
    assert_b_affected(&f, &r, &["verify"]);
    let out = text(&f.cli(&["verify"]).stdout);
    assert!(out.contains(&format!("damaged pack {}", loc.pack)), "{out}");
    // Its chunks are in the report, but the text says the pack once rather than a line per chunk.
    assert!(r.damaged_chunks.len() > 1 && !out.contains("damaged chunk "), "{out}");
    // Its chunks are marked, for the next commit to store afresh; repair may find copies in other packs.
    assert_eq!(r.damaged_chunks_marked, r.damaged_chunks_total, "{r:?}");
    assert!(out.contains("damaged chunks marked: the next commit"), "{out}");
    assert!(out.contains("`snapstore repair index --read-data` moves them"), "{out}");
    let healed = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert!(healed.bytes_new > 0, "{healed:?}");
    let r = f.verify(DataSubset::All);
    assert!(r.is_clean(), "{r:#?}");
    assert_checkouts_identical(&f);
    // GC drops the gone pack's row, and counts nothing freed for a file that was not there.
    let packs = r.packs;
    let g = f.repo.gc(&Default::default()).unwrap();
    assert_eq!((g.packs_deleted, g.bytes_freed), (1, 0), "{g:?}");
    assert_eq!(f.verify(DataSubset::None).packs, packs - 1);
}

/// Damage met by a read is marked in the catalog (`damaged_chunks`).
fn marked(f: &Fixture) -> Vec<ObjectId> {
    let cat = f.catalog();
    let mut stmt = cat.connection().prepare("SELECT id FROM damaged_chunks ORDER BY id").unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|id| ObjectId::from_slice(&id.unwrap()).unwrap())
        .collect()
}

/// The chunks of the (first) file named `name`, in order, with where each is stored.
fn chunks_of(f: &Fixture, name: &str) -> Vec<(ObjectId, snapstore::ChunkLocation)> {
    let cat = f.catalog();
    let content = content_of(&cat, name);
    let segs: Vec<u8> = cat
        .connection()
        .query_row("SELECT segments FROM contents WHERE id = ?1", [&content], |r| r.get(0))
        .expect("a file of several chunks");
    let mut out = Vec::new();
    for seg in segs.chunks(32) {
        let data: Vec<u8> =
            cat.connection().query_row("SELECT data FROM segments WHERE id = ?1", [seg], |r| r.get(0)).unwrap();
        // A segment is 36-byte references: the id, then the length.
        for r in data.chunks(36) {
            let id = ObjectId::from_slice(&r[..32]).unwrap();
            out.push((id, cat.chunk_location(&id).unwrap().unwrap()));
        }
    }
    out
}

/// A checkout that meets damaged chunks marks them, every damaged one of the run it read, not only the first;
/// the next commit of the same data reads the file that holds them though its stat is unchanged (and only
/// it), stores them afresh, and every checkpoint using them is whole again. The commit after that is back to
/// skipping unchanged files. A mark dated before the commit that reused its chunk heals all the same.
#[test]
fn a_chunk_a_checkout_finds_damaged_is_stored_afresh_by_the_next_commit() {
    let f = fixture();
    let chunks = chunks_of(&f, "b.bin");
    // Two chunks one after the other in one pack, which a checkout reads in one run.
    let pair = chunks.windows(2).find(|w| w[0].1.pack == w[1].1.pack).expect("two chunks of b.bin in one pack");
    let (first, second) = (&pair[0], &pair[1]);
    let pack = f.root.join(&first.1.pack);
    for (_, loc) in [first, second] {
        flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    }
    assert!(marked(&f).is_empty());
    let err =
        f.repo.checkout(&f.ids[0], f.root.parent().unwrap().join("bad"), &CheckoutOptions::default()).unwrap_err();
    assert!(err.is_corruption() && err.to_string().contains(&first.0.to_hex()), "{err}");
    let mut both = vec![first.0, second.0];
    both.sort();
    assert_eq!(marked(&f), both, "the checkout marked both damaged chunks");
    // As if the mark came while a commit that reused the chunk ran, which then published after it.
    f.catalog().connection().execute("UPDATE damaged_chunks SET found_ns = 0", []).unwrap();
    let (id, loc) = (first.0, first.1.clone());

    // Nothing changed by stat, and with skip_unchanged the tree is the parent's: still a checkpoint, since it
    // is what records the chunk stored afresh.
    let opts = snapstore::CommitOptions { skip_unchanged: true, ..Default::default() };
    let c = f.repo.commit(&f.src, &opts).unwrap();
    assert!(!c.unchanged, "{c:?}");
    assert_eq!((c.bytes_read, c.files_reread_for_damage, c.chunks_new), (300_000, 1, 2), "{c:?}");
    assert_eq!(c.files_unchanged, 3, "{c:?}");
    let fresh = f.catalog().chunk_location(&id).unwrap().unwrap();
    assert_ne!((fresh.pack.as_str(), fresh.offset), (loc.pack.as_str(), loc.offset));
    assert!(marked(&f).is_empty(), "the mark goes with the fresh copy");
    assert!(f.verify(DataSubset::All).is_clean());
    assert_checkouts_identical(&f);

    let again = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!((again.files_unchanged, again.bytes_read), (3, 0), "{again:?}");
}

/// A mark for bytes no file holds any more (a chunk of an old version) makes no commit read anything: with
/// `--skip-unchanged` nothing is committed, run after run. The mark goes once GC collects the chunk.
#[test]
fn a_mark_for_bytes_no_file_holds_costs_later_commits_nothing() {
    let f = fixture();
    let cat = f.catalog();
    // The first version of a.txt, a file of one chunk.
    let old = ObjectId::of(b"alpha\n");
    let loc = cat.chunk_location(&old).unwrap().unwrap();
    flip_byte(&f.root.join(&loc.pack), loc.offset + loc.stored_len as u64 / 2);
    let out = f.root.parent().unwrap().join("first");
    assert!(f.repo.checkout(&f.ids[0], &out, &CheckoutOptions::default()).unwrap_err().is_corruption());
    assert_eq!(marked(&f), vec![old]);
    let opts = snapstore::CommitOptions { skip_unchanged: true, ..Default::default() };
    for _ in 0..2 {
        let c = f.repo.commit(&f.src, &opts).unwrap();
        assert!(c.unchanged && c.bytes_read == 0 && c.files_reread_for_damage == 0, "{c:?}");
    }
    f.repo.forget(&[&f.ids[0]]).unwrap();
    f.repo.gc(&Default::default()).unwrap();
    assert!(marked(&f).is_empty(), "the mark went with its chunk");
}

/// A directory tree of the latest checkpoint altered in the catalog (bit rot) does not stop the next commit of
/// the path: it reads what is below as new, and its checkpoint is whole. The tree it records has the damaged
/// row's id (the same entries), so the row is mended, and the older checkpoints are whole again too.
#[test]
fn a_damaged_tree_of_the_parent_does_not_stop_the_next_commit() {
    let f = fixture();
    let n = edit_trees(f.catalog().connection(), |_, entries| {
        entries.iter_mut().find(|e| e.name == b"b.bin").map(|e| e.mode += 1).is_some()
    });
    assert_eq!(n, 1);
    let c = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!((c.files_new, c.files_unchanged), (1, 2), "b.bin read as new: {c:?}");
    let out = f.root.parent().unwrap().join("after");
    f.repo.checkout(&c.id, &out, &CheckoutOptions::default()).unwrap();
    for name in ["a.txt", "sub/b.bin", "big.bin"] {
        assert_eq!(fs::read(out.join(name)).unwrap(), fs::read(f.src.join(name)).unwrap(), "{name}");
    }
    assert_eq!(f.verify(DataSubset::None).affected_checkpoints.len(), 0);
    assert_checkouts_identical(&f);
}

/// `verify --read-data` marks what it finds, says so, and the next commit heals it.
#[test]
fn verify_marks_the_damaged_chunks_it_finds() {
    let f = fixture();
    let (id, pack, loc) = f.target();
    flip_byte(&pack, loc.offset + loc.stored_len as u64 / 2);
    let o = f.cli(&["--json", "verify", "--read-data"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["damaged_chunks_marked"], 1, "{json}");
    assert_eq!(marked(&f), vec![id]);
    let out = text(&f.cli(&["verify", "--read-data"]).stdout);
    assert!(out.contains("hint: 1 damaged chunk marked: the next commit of the original data"), "{out}");

    let out = succeeded(&f.cli(&["commit", f.src.to_str().unwrap()]), "commit after verify");
    assert!(out.contains("1 file unchanged but read again: it holds chunks marked damaged"), "{out}");
    assert!(out.contains("(1 new of "), "the marked chunk is stored afresh: {out}");
    let out = succeeded(&f.cli(&["verify", "--read-data"]), "verify after the commit");
    assert!(out.starts_with("no damage found"), "{out}");
    assert_checkouts_identical(&f);
}

#[test]
fn a_catalog_row_pointing_past_its_packs_end_is_reported() {
    let f = fixture();
    let (id, pack, _) = f.target();
    let size = fs::metadata(&pack).unwrap().len() as i64;
    f.catalog().connection().execute("UPDATE chunks SET offset = ?1 WHERE id = ?2", (size + 100, &id.0[..])).unwrap();
    let r = f.verify(DataSubset::None);
    assert!(r.damaged_packs.is_empty());
    assert_eq!(r.damaged_chunks_total, 1, "{r:?}");
    assert!(r.damaged_chunks[0].problem.contains("outside the pack's blob area"), "{r:?}");
    assert_b_affected(&f, &r, &["verify"]);
}

#[test]
fn a_damaged_pack_index_is_reported() {
    let f = fixture();
    let (_, pack, _) = f.target();
    let len = fs::metadata(&pack).unwrap().len();
    flip_byte(&pack, len - 40 - 10);
    let r = f.verify(DataSubset::None);
    assert_eq!(r.damaged_packs.len(), 1, "{r:?}");
    assert!(r.damaged_packs[0].problem.contains("index checksum"), "{r:?}");
    assert_b_affected(&f, &r, &["verify"]);
}

#[test]
fn missing_catalog_objects_are_reported_per_checkpoint() {
    let f = fixture();
    let cat = f.catalog();
    // The content rows of the stream and of big.bin, and the `sub` directory's tree.
    for name in ["stream.bin", "big.bin"] {
        cat.connection().execute("DELETE FROM contents WHERE id = ?1", [content_of(&cat, name)]).unwrap();
    }
    let sub = entry_target(&cat, "sub", EntryKind::Dir);
    assert_eq!(cat.connection().execute("DELETE FROM trees WHERE id = ?1", [&sub]).unwrap(), 1);
    let r = f.verify(DataSubset::None);
    // big.bin is larger than any chunk, so its content row is missing. The 100 kB stream could have been one
    // chunk, named by that chunk with no content row: without the row, verify looks for that chunk and reports
    // it missing from the index (a file's damage either way).
    assert_eq!((r.damaged_objects_total, r.damaged_chunks_total), (2, 1), "{r:?}");
    assert_eq!(r.damaged_chunks[0].id, ObjectId::from_slice(&content_of(&cat, "stream.bin")).unwrap().to_hex());
    let affected: BTreeSet<(String, String)> =
        r.affected_files.iter().map(|a| (a.checkpoint.clone(), a.path.to_str().unwrap().to_owned())).collect();
    let expected: BTreeSet<(String, String)> = [
        (f.ids[0].clone(), "run/sub".to_string()),
        (f.ids[1].clone(), "run/sub".to_string()),
        (f.ids[0].clone(), "run/big.bin".to_string()),
        (f.ids[1].clone(), "run/big.bin".to_string()),
        (f.ids[2].clone(), "stream.bin".to_string()),
    ]
    .into();
    assert_eq!(affected, expected);
    assert_eq!(r.affected_checkpoints.len(), 3, "one damaged checkpoint does not hide another");
    let o = f.cli(&["verify"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stdout).contains(&format!("affected: {} stream.bin", &f.ids[2][..8])));
}

#[test]
fn data_subset_parts_read_every_pack_once() {
    let f = fixture();
    let (id, pack, loc) = f.target();
    flip_byte(&pack, loc.offset + 3);
    let total = f.verify(DataSubset::None).packs;
    let mut read = 0;
    let mut found = 0;
    for n in 1..=3 {
        let r = f.verify(DataSubset::Part { n, of: 3 });
        read += r.packs_read;
        // Found by reading, not from the mark a part before it left.
        if r.damaged_chunks.iter().any(|c| c.id == id.to_hex() && c.problem.contains("hash")) {
            found += 1;
        }
    }
    assert_eq!(read, total, "parts 1/3, 2/3 and 3/3 read every pack exactly once");
    assert_eq!(found, 1, "the damage is found by exactly the part holding its pack");
    // Each part as the first to look (the mark a part leaves makes every later one report the chunk).
    let unmark = || f.catalog().connection().execute("DELETE FROM damaged_chunks", []).unwrap();
    let codes: Vec<Option<i32>> = ["1/3", "2/3", "3/3"]
        .iter()
        .map(|s| {
            unmark();
            f.cli(&["verify", "--read-data-subset", s]).status.code()
        })
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == Some(3)).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == Some(0)).count(), 2, "{codes:?}");
    let finder = ["1/3", "2/3", "3/3"][codes.iter().position(|c| *c == Some(3)).unwrap()];
    unmark();
    f.cli(&["verify", "--read-data-subset", finder]);
    let other = if finder == "1/3" { "2/3" } else { "1/3" };
    assert_eq!(f.cli(&["verify", "--read-data-subset", other]).status.code(), Some(3), "marked by {finder}");
    assert_eq!(f.cli(&["verify", "--read-data-subset", "100%"]).status.code(), Some(3));
    assert!(matches!(f.cli(&["verify", "--read-data-subset", "5%"]).status.code(), Some(0 | 3)));
    for bad in ["0/3", "4/3", "150%", "half"] {
        let o = f.cli(&["verify", "--read-data-subset", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o.stderr));
    }
}

fn assert_checkouts_identical(f: &Fixture) {
    let out = f.root.parent().unwrap().join("out");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).unwrap();
    // The second checkpoint holds the directory as it is now; the stream is regenerated.
    f.repo.checkout(&f.ids[1], out.join("dir"), &CheckoutOptions::default()).unwrap();
    for name in ["a.txt", "sub/b.bin", "big.bin"] {
        assert_eq!(fs::read(out.join("dir").join(name)).unwrap(), fs::read(f.src.join(name)).unwrap(), "{name}");
    }
    f.repo.checkout(&f.ids[2], out.join("stream.bin"), &CheckoutOptions::default()).unwrap();
    assert_eq!(fs::read(out.join("stream.bin")).unwrap(), pseudo_random(100_000, 7));
    f.repo.checkout(&f.ids[0], out.join("first"), &CheckoutOptions::default()).unwrap();
    assert_eq!(fs::read(out.join("first/a.txt")).unwrap(), b"alpha\n");
}

#[test]
fn repair_index_rebuilds_a_lost_chunk_index() {
    let f = fixture();
    let chunks = f.verify(DataSubset::None).chunks;
    f.catalog().connection().execute_batch("DELETE FROM chunks; DELETE FROM packs;").unwrap();
    let r = f.verify(DataSubset::None);
    assert!(!r.is_clean());
    assert_eq!(r.affected_checkpoints.len(), 3);
    let o = f.cli(&["verify"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stdout).contains("snapstore repair index"), "the hint names the repair");

    let out = succeeded(&f.cli(&["repair", "index"]), "repair index");
    assert!(out.contains("3 of 3 checkpoints whole"), "{out}");
    assert!(out.contains(&format!("whole    {}", &f.ids[0][..8])), "{out}");
    let r = f.verify(DataSubset::All);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.chunks, chunks);
    assert_checkouts_identical(&f);
    // A second repair of a sound index changes nothing.
    let again = f.repo.repair_index().unwrap();
    assert_eq!((again.chunks_added, again.chunks_repointed, again.chunks_removed), (0, 0, 0));
    assert!(again.is_whole());
}

/// A small file is one chunk, named by it, with no content row: losing that chunk's index row is a missing
/// chunk, traced to the file, which `repair index` brings back from its pack; until then GC collects nothing.
#[test]
fn a_lost_index_row_of_a_one_chunk_file_is_a_missing_chunk_and_repairable() {
    let f = fixture();
    let chunk = first_chunk(&f.catalog(), "a.txt");
    assert_eq!(chunk.0.to_vec(), content_of(&f.catalog(), "a.txt"), "a.txt is named by its one chunk");
    assert_eq!(f.catalog().connection().execute("DELETE FROM chunks WHERE id = ?1", [&chunk.0[..]]).unwrap(), 1);
    let r = f.verify(DataSubset::None);
    assert_eq!((r.damaged_chunks_total, r.damaged_objects_total), (1, 0), "{r:?}");
    assert_eq!((r.damaged_chunks[0].id.as_str(), r.damaged_chunks[0].pack.as_deref()), (chunk.to_hex().as_str(), None));
    let affected: BTreeSet<String> = r.affected_files.iter().map(|a| a.path.to_str().unwrap().to_owned()).collect();
    assert_eq!(affected, BTreeSet::from(["run/a.txt".to_string()]), "{r:?}");
    let o = f.cli(&["verify"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o.stdout).contains("snapstore repair index"), "the hint names the repair");
    // GC refuses to collect while a chunk in use is unindexed: repacking its pack would lose the blob.
    let err = f.repo.gc(&Default::default()).unwrap_err();
    assert!(err.is_corruption() && err.to_string().contains("repair index"), "{err}");
    let o = f.cli(&["gc"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    // Repair brings the row back from the pack, and GC runs again.
    succeeded(&f.cli(&["repair", "index"]), "repair index");
    f.repo.gc(&Default::default()).unwrap();
    let r = f.verify(DataSubset::All);
    assert!(r.is_clean(), "{r:?}");
    assert_checkouts_identical(&f);
}

/// Whatever left a chunk in use out of the index, once GC has refused for it a plain commit of the original data
/// reads the file holding it, though its stat is unchanged, and stores it afresh; GC then runs (round 36 review,
/// F6: the hints asked for --reread).
#[test]
fn after_gc_finds_a_chunk_in_use_unindexed_a_plain_commit_stores_it_again() {
    let f = fixture();
    // The current a.txt's one chunk (the fixture's trees hold an older a.txt too).
    let chunk = ObjectId::of(&fs::read(f.src.join("a.txt")).unwrap());
    f.catalog().connection().execute("DELETE FROM chunks WHERE id = ?1", [&chunk.0[..]]).unwrap();
    let before = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!(before.files_reread_for_damage, 0, "nothing has found the chunk missing yet: {before:?}");
    let err = f.repo.gc(&Default::default()).unwrap_err();
    assert!(err.is_corruption() && !err.to_string().contains("--reread"), "{err}");
    let c = f.repo.commit(&f.src, &Default::default()).unwrap();
    assert_eq!((c.files_reread_for_damage, c.chunks_new), (1, 1), "{c:?}");
    f.repo.gc(&Default::default()).unwrap();
    assert!(f.verify(DataSubset::All).is_clean());
    assert_checkouts_identical(&f);
}

#[test]
fn repair_index_repoints_rows_and_drops_rows_of_missing_packs() {
    let f = fixture();
    let cat = f.catalog();
    // One row moved to a wrong offset, one row pointing at a pack row that does not exist.
    let (id, _, _) = f.target();
    cat.connection().execute("UPDATE chunks SET offset = offset + 1 WHERE id = ?1", [&id.0[..]]).unwrap();
    let other = first_chunk(&cat, "big.bin");
    cat.connection().execute("UPDATE chunks SET pack = 999999 WHERE id = ?1", [&other.0[..]]).unwrap();
    assert_eq!(f.verify(DataSubset::None).damaged_chunks_total, 2);
    let rep = f.repo.repair_index().unwrap();
    assert_eq!((rep.chunks_repointed, rep.chunks_added, rep.chunks_removed), (2, 0, 0), "{rep:?}");
    assert!(rep.is_whole(), "{rep:?}");
    assert!(f.verify(DataSubset::All).is_clean());
    assert_checkouts_identical(&f);
}

#[test]
fn repair_index_recreates_a_lost_catalog() {
    let f = fixture();
    let chunks = f.verify(DataSubset::None).chunks;
    let params = f.repo.params().clone();
    let lose = |root: &Path, files: &[&str]| {
        for name in files {
            let _ = fs::remove_file(root.join(name));
        }
    };
    drop(crate::util::catalog_rw(&f.repo));
    lose(&f.root, &["catalog.db", "catalog.db-wal", "catalog.db-shm"]);
    assert!(matches!(Repository::open(&f.root), Err(snapstore::Error::NoRepository(_))));
    // A copy this build cannot use (damaged, or from a newer snapstore) stops the repair before it guesses.
    let copy = fs::read_to_string(f.root.join("params")).unwrap();
    fs::write(f.root.join("params"), copy.replace("chunk_avg=", "chunk_avg=x")).unwrap();
    let o = f.cli(&["repair", "index"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("'chunk_avg'") && text(&o.stderr).contains("move it away"), "{}", text(&o.stderr));
    assert!(!f.root.join("catalog.db").exists(), "nothing was created");
    fs::write(f.root.join("params"), copy).unwrap();
    let o = f.cli(&["repair", "index"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "a lost catalog is lost checkpoints: {out}");
    assert!(out.contains("no checkpoints survive") && out.contains("from its copy of them"), "{out}");
    let repo = Repository::open(&f.root).unwrap();
    assert!(repo.checkpoints().unwrap().is_empty());
    assert_eq!(repo.params(), &params, "the copy beside the catalog keeps them");
    let r = repo.verify(&VerifyOptions { read_data: DataSubset::All, ..Default::default() }).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.chunks, chunks, "every stored chunk is indexed again");
    // A repository from before that copy loses its parameters with the catalog: packs without byte planes
    // are taken for a format 1 repository, which the builds that made it can still read; packs with them
    // keep format 2. Either way the repair leaves a copy for next time.
    drop(repo);
    lose(&f.root, &["catalog.db", "catalog.db-wal", "catalog.db-shm", "params"]);
    assert_eq!(f.cli(&["repair", "index"]).status.code(), Some(3));
    let repo = Repository::open(&f.root).unwrap();
    assert_eq!((repo.params().format_version, repo.params().normalization), (1, 1));
    assert!(fs::read_to_string(f.root.join("params")).unwrap().contains("normalization=1"));
    let t = fast_tempdir("repair-format");
    let grouped = Repository::init(t.path().join("repo")).unwrap();
    fs::write(t.path().join("w.bin"), crate::library::float_weights(64 * 1024, 3)).unwrap();
    grouped.commit(t.path().join("w.bin"), &Default::default()).unwrap();
    drop(grouped);
    lose(&t.path().join("repo"), &["catalog.db", "catalog.db-wal", "catalog.db-shm", "params"]);
    let report = Repository::repair_index_at(t.path().join("repo")).unwrap();
    assert!(report.catalog_created && report.params_recovered.is_none());
    assert_eq!(Repository::open(t.path().join("repo")).unwrap().params().format_version, 2);
    // A directory with neither catalog nor packs is not a repository to rebuild.
    let o = run(&f.root.join("nothing-here"), &["repair", "index"]);
    assert_eq!(o.status.code(), Some(4));
}

#[test]
fn repair_index_reports_damaged_packs_and_damaged_checkpoints() {
    let f = fixture();
    let (_, pack, loc) = f.target();
    let len = fs::metadata(&pack).unwrap().len();
    flip_byte(&pack, len - 40 - 10);
    let rep = f.repo.repair_index().unwrap();
    assert_eq!(rep.damaged_packs.len(), 1);
    assert_eq!(rep.damaged_packs[0].pack, loc.pack);
    assert!(rep.chunks_removed > 0 && rep.packs_removed == 1, "{rep:?}");
    let damaged: BTreeSet<&str> = rep.checkpoints.iter().filter(|c| !c.whole).map(|c| c.id.as_str()).collect();
    assert_eq!(damaged, f.ids[..2].iter().map(String::as_str).collect());
    assert!(rep.checkpoints.iter().filter(|c| !c.whole).all(|c| c.missing_chunks > 0));
    assert!(rep.affected_files.iter().any(|a| a.path == Path::new("run/sub/b.bin")));
    // The CLI says the same, with exit code 3.
    let o = f.cli(&["repair", "index"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains(&format!("damaged  {}", &f.ids[0][..8])), "{out}");
    assert!(out.contains(&format!("whole    {}", &f.ids[2][..8])), "{out}");
    assert!(out.contains(&format!("damaged pack {}", loc.pack)), "{out}");
}

#[test]
fn repair_index_refuses_while_a_commit_runs() {
    let f = fixture();
    let host = fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "unknown".to_string() } else { host };
    let cat = f.catalog();
    // PID 1 is always alive; a session whose process is gone is expired instead.
    let ((alive, ns), (gone, _)) = (crate::util::process_record(1), crate::util::process_record(4_000_000_000));
    cat.connection()
        .execute(
            "INSERT INTO sessions (kind, host, pid, started_ns, heartbeat_ns, start_epoch, process, pidns)
             VALUES ('commit', ?1, 1, 0, 0, 1, ?2, ?4), ('commit', ?1, 4000000000, 0, 0, 1, ?3, ?4)",
            [&host, &alive, &gone, &ns],
        )
        .unwrap();
    let o = f.cli(&["repair", "index"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("commit is running"), "{}", text(&o.stderr));
    let leases: i64 = cat.connection().query_row("SELECT count(*) FROM gc_lease", [], |r| r.get(0)).unwrap();
    assert_eq!(leases, 0, "the lease is released");
    cat.connection().execute("DELETE FROM sessions WHERE pid = 1", []).unwrap();
    let rep = f.repo.repair_index().unwrap();
    assert_eq!(rep.sessions_expired, 1);
    assert!(rep.is_whole());
}

/// Catalog rows altered in place (a file's mode, a content's size, a segment's bytes): SQLite sees nothing
/// wrong, but every tree, content and segment is named by the hash of its rows, and verify recomputes it.
#[test]
fn altered_catalog_rows_are_found_by_their_ids() {
    type Alter = fn(&Catalog);
    let cases: [(&str, Alter, &str); 3] = [
        (
            "a file's mode",
            |cat| {
                let n = edit_trees(cat.connection(), |_, entries| {
                    let hit = entries.iter_mut().find(|e| e.name == b"b.bin");
                    hit.map(|e| e.mode += 1).is_some()
                });
                assert_eq!(n, 1);
            },
            "run/sub",
        ),
        (
            "a content's size",
            |cat| {
                let n = cat
                    .connection()
                    .execute("UPDATE contents SET size = size + 1 WHERE id = ?1", [content_of(cat, "b.bin")]);
                assert_eq!(n.unwrap(), 1);
            },
            "run/sub/b.bin",
        ),
        (
            "a segment's bytes",
            |cat| {
                let segs: Vec<u8> = cat
                    .connection()
                    .query_row("SELECT segments FROM contents WHERE id = ?1", [content_of(cat, "b.bin")], |r| r.get(0))
                    .unwrap();
                let mut data: Vec<u8> = cat
                    .connection()
                    .query_row("SELECT data FROM segments WHERE id = ?1", [&segs[..32]], |r| r.get(0))
                    .unwrap();
                data[3] ^= 1; // the first chunk's id
                let n = cat.connection().execute("UPDATE segments SET data = ?1 WHERE id = ?2", (&data, &segs[..32]));
                assert_eq!(n.unwrap(), 1);
            },
            "run/sub/b.bin",
        ),
    ];
    for (what, alter, path) in cases {
        let f = fixture();
        assert!(f.verify(DataSubset::None).is_clean(), "{what}: clean before");
        alter(&f.catalog());
        let r = f.verify(DataSubset::None);
        assert!(r.damaged_objects_total >= 1, "{what}: {r:#?}");
        let affected: BTreeSet<(String, String)> =
            r.affected_files.iter().map(|a| (a.checkpoint.clone(), a.path.to_str().unwrap().to_owned())).collect();
        for id in &f.ids[..2] {
            assert!(affected.contains(&(id.clone(), path.to_string())), "{what}: {affected:?}");
        }
        let o = f.cli(&["verify"]);
        assert_eq!(o.status.code(), Some(3), "{what}: {}", text(&o.stdout));
        assert!(text(&o.stdout).contains("does not match its id"), "{what}: {}", text(&o.stdout));
    }
}

/// Damage to the catalog file itself, below what verify checks: SQLite's own structure. Each kind, on a fresh
/// copy of the repository for each command: a page overwritten with random bytes, the file cut to half, its
/// 100-byte header zeroed, the whole file random. Every command fails as damage (exit 3) with one `error:` line
/// naming the catalog and a hint, no panic, and a checkout writes nothing but the checkpoint's own bytes.
#[test]
fn a_damaged_catalog_file_fails_every_command_clearly() {
    let f = fixture();
    // The page every command reads: log lists checkpoints, verify walks them, checkout resolves one, commit
    // looks up its parent, stats counts them. Damage to a page a command never reads is no failure of it.
    let checkpoints_page: u32 = f
        .catalog()
        .connection()
        .query_row("SELECT rootpage FROM sqlite_schema WHERE name = 'checkpoints'", [], |r| r.get(0))
        .unwrap();
    let wal = f.root.join("catalog.db-wal");
    assert!(fs::metadata(&wal).map_or(true, |m| m.len() == 0), "the WAL still holds transactions");
    let good = fs::read(f.root.join("catalog.db")).unwrap();
    let page = match u16::from_be_bytes([good[16], good[17]]) {
        1 => 65536,
        n => n as usize,
    };
    assert_eq!(good.len() % page, 0);
    let at = (checkpoints_page as usize - 1) * page;
    assert!(at > 0 && at + page < good.len(), "page {checkpoints_page} of {} is not in the middle", good.len() / page);
    let damages = [
        ("a page of random bytes", [&good[..at], &pseudo_random(page, 11)[..], &good[at + page..]].concat()),
        ("cut to half", good[..good.len() / 2].to_vec()),
        ("zeroed header", [&[0u8; 100][..], &good[100..]].concat()),
        ("random bytes", pseudo_random(good.len(), 13)),
    ];

    let work = f.root.parent().unwrap().join("damaged");
    let dest = f.root.parent().unwrap().join("dest");
    let (id, src, dest_arg) = (&f.ids[1], f.src.to_str().unwrap(), dest.to_str().unwrap());
    let fresh_copy = || {
        let _ = fs::remove_dir_all(&work);
        let _ = fs::remove_dir_all(&dest);
        copy_dir(&f.root, &work);
    };
    // A copy is a working repository: what fails below fails for the damage.
    fresh_copy();
    assert_eq!(crate::util::listed(&work).len(), 3);
    succeeded(&run(&work, &["checkout", id, dest_arg]), "checkout from an undamaged copy");

    let commands: [&[&str]; 5] = [&["log"], &["verify"], &["checkout", id, dest_arg], &["commit", src], &["stats"]];
    let mut observed = Vec::new();
    for (damage, bytes) in &damages {
        for args in commands {
            fresh_copy();
            fs::write(work.join("catalog.db"), bytes).unwrap();
            let o = run(&work, args);
            let (out, err) = (text(&o.stdout), text(&o.stderr));
            let what = format!("{} with the catalog's {damage}", args[0]);
            observed.push(format!("{what}: exit {:?}: {}", o.status.code(), err.trim()));
            assert!(!out.contains("panicked") && !err.contains("panicked"), "{what}: {err}");
            // Damage, exit 3, with what to do about it.
            assert_eq!(o.status.code(), Some(3), "{what}: {err}");
            assert!(err.starts_with("error: ") && err.contains("catalog"), "{what}: {err}");
            assert!(err.contains("hint: the catalog file catalog.db is damaged"), "{what}: {err}");
            // Whatever a failed checkout leaves must be the checkpoint's bytes, never others.
            for e in walkdir::WalkDir::new(&dest).into_iter().filter_map(Result::ok) {
                if e.file_type().is_file() {
                    let rel = e.path().strip_prefix(&dest).unwrap();
                    let want = fs::read(f.src.join(rel)).ok();
                    assert!(
                        want == Some(fs::read(e.path()).unwrap()),
                        "{what}: left {} with other bytes",
                        rel.display()
                    );
                }
            }
        }
    }
    eprintln!("damaged catalog:\n  {}", observed.join("\n  "));

    // The hint's last resort, as written: the damaged catalog moved aside, `repair index`, and the repository
    // takes commits and checkouts again.
    fresh_copy();
    fs::write(work.join("catalog.db"), &damages[0].1).unwrap();
    let err = text(&run(&work, &["log"]).stderr);
    assert!(err.contains("move catalog.db and catalog.db-wal aside and run `snapstore repair index`"), "{err}");
    fs::rename(work.join("catalog.db"), f.root.parent().unwrap().join("catalog.db.damaged")).unwrap();
    let _ = fs::remove_file(work.join("catalog.db-wal"));
    // Exit 3: the checkpoints recorded only in the lost catalog are reported lost; the data is indexed again.
    let o = run(&work, &["repair", "index"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("created a new catalog"), "{}", text(&o.stdout));
    let id = succeeded(&run(&work, &["-q", "commit", src]), "commit after repair").trim().to_string();
    succeeded(&run(&work, &["checkout", &id, dest_arg]), "checkout after repair");
    crate::util::assert_same_tree(&f.src, &dest, true);
}

/// An emptied catalog (or another program's SQLite file in its place) is damage too, not a version problem:
/// exit 3 with what to do, nothing written into it, and `repair index` makes a new one that works.
#[test]
fn an_empty_catalog_is_reported_as_damage_and_repair_makes_a_new_one() {
    let f = fixture();
    let work = f.root.parent().unwrap().join("emptied");
    let src = f.src.to_str().unwrap();
    for (what, foreign) in [("an empty file", false), ("a SQLite file of another program", true)] {
        let _ = fs::remove_dir_all(&work);
        copy_dir(&f.root, &work);
        let catalog = work.join("catalog.db");
        fs::remove_file(&catalog).unwrap();
        if foreign {
            rusqlite::Connection::open(&catalog).unwrap().execute_batch("CREATE TABLE notes (text TEXT)").unwrap();
        } else {
            fs::write(&catalog, b"").unwrap();
        }
        let before = fs::read(&catalog).unwrap();
        for args in [&["log"][..], &["commit", src], &["verify"]] {
            let o = run(&work, args);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(3), "{} on {what}: {err}", args[0]);
            assert!(err.contains("records no repository") && err.contains("repair index"), "{what}: {err}");
        }
        assert!(fs::read(&catalog).unwrap() == before, "{what}: the commands wrote into it");
        if !foreign {
            // Exit 3: the checkpoints, recorded only in the catalog, are gone; the data is indexed again.
            let o = run(&work, &["repair", "index"]);
            assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
            assert!(text(&o.stdout).contains("missing or empty: created a new catalog"), "{}", text(&o.stdout));
            succeeded(&run(&work, &["commit", src]), "commit after the repair");
            succeeded(&run(&work, &["verify", "--read-data"]), "verify after the repair");
        }
    }
}
