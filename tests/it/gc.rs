//! End-to-end tests of garbage collection: `forget` and `gc`, through the library and the `snapstore` binary.
//!
//! What they establish:
//! - space is really reclaimed (pack bytes end near those of a fresh repository holding only what is kept),
//!   sparse packs are rewritten, and a second GC has nothing left to do;
//! - GC never loses what a checkpoint reaches, not while commits run in other processes (a stress test), not
//!   when a writer began before the mark (protocol tests), and not when GC itself is killed at any instant;
//! - two GCs exclude each other through the lease, and a dead holder's lease is taken over;
//! - the repository stays consistent: [`audit`] re-derives, independently of the library, what every
//!   checkpoint reaches and checks every catalog row and file against it and against the packs' own indexes.
//!
//! Knobs (environment): `SNAPSTORE_GC_IMAGE_MIB` (image size of the space test, default 64; 256 takes about
//! 5 s alone in a debug build and twice that beside the other tests),
//! `SNAPSTORE_GC_STRESS_SECS` (length of the concurrency stress, default 10), `SNAPSTORE_GC_KILLS` (number of
//! killed GCs, default 10).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use snapstore::{
    CheckoutOptions, CommitOptions, Error, GcOptions, GcSummary, LocalBackend, ObjectId, Progress, RepoParams,
    Repository,
};

use crate::util::{
    Hooked, Rng, chunk_ids, copy_dir, corrupt_pack_blob, env_num, listed, p, pseudo_random, run, spawn, succeeded, text,
};

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

const MIB: usize = 1 << 20;

/// A fresh temporary directory, on tmpfs when there is one (see library.rs).
fn tmp() -> tempfile::TempDir {
    super::util::fast_tempdir("snapstore-gc-")
}

/// This machine's host name, as snapstore records it in sessions and leases.
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The pid of a process that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    assert!(!Path::new("/proc").join(pid.to_string()).exists());
    pid
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// Every file under `packs/` (whatever its name) and `tmp/`, as object name → size.
fn disk_objects(repo: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for top in ["packs", "tmp"] {
        for e in walkdir::WalkDir::new(repo.join(top)).into_iter().flatten() {
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(repo).unwrap().to_string_lossy().into_owned();
                out.insert(rel, e.metadata().unwrap().len());
            }
        }
    }
    out
}

/// The names of the files under `packs/`.
fn pack_files(repo: &Path) -> Vec<String> {
    disk_objects(repo).into_keys().filter(|n| n.starts_with("packs/")).collect()
}

/// Commits `n` versions of a stream (version `i`: `len(i)` pseudo-random bytes from seed `seed(i)`), each
/// into a small pack of its own; returns each checkpoint's id with its bytes.
fn commit_states(
    repo: &Repository,
    n: u64,
    len: impl Fn(u64) -> usize,
    seed: impl Fn(u64) -> u64,
) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let data = pseudo_random(len(i), seed(i));
            let id = repo.commit_reader("state.bin", &mut &data[..], &Default::default()).unwrap().id;
            (id, data)
        })
        .collect()
}

/// How many of `held` no longer check out byte for byte.
fn not_restored(repo: &Repository, held: &[(String, Vec<u8>)], scratch: &Path) -> usize {
    held.iter().filter(|(id, data)| checkout_file(repo, id, scratch).ok().as_ref() != Some(data)).count()
}

/// Sum of the sizes of the files under `packs/`.
fn disk_pack_bytes(repo: &Path) -> u64 {
    disk_objects(repo).iter().filter(|(n, _)| n.starts_with("packs/")).map(|(_, s)| s).sum()
}

fn table_count(repo: &Path, table: &str) -> i64 {
    let cat = crate::util::catalog_rw(&Repository::open(repo).unwrap()).unwrap();
    cat.connection().query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
}

/// Checks out a single-file checkpoint (a stream commit) and returns its bytes.
fn checkout_file(repo: &Repository, id: &str, scratch: &Path) -> Result<Vec<u8>, String> {
    let dest = scratch.join(format!("out-{}", &id[..16]));
    let _ = fs::remove_file(&dest);
    repo.checkout(id, &dest, &CheckoutOptions::default()).map_err(|e| format!("checkout {}: {e}", &id[..12]))?;
    let data = fs::read(&dest).unwrap();
    fs::remove_file(&dest).unwrap();
    Ok(data)
}

fn assert_checks_out(repo: &Repository, id: &str, want: &[u8], scratch: &Path) {
    let got = checkout_file(repo, id, scratch).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        got.len() == want.len() && got == want,
        "checkpoint {} differs ({} bytes, expected {})",
        &id[..12],
        got.len(),
        want.len()
    );
}

/// Content hashes of every file below `dir`, by relative path.
fn tree_hashes(dir: &Path) -> BTreeMap<String, ObjectId> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name().into_iter() {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            out.insert(rel, ObjectId::of(&fs::read(e.path()).unwrap()));
        }
    }
    out
}

/// Checks out a directory checkpoint and returns its files' hashes.
fn checkout_tree(repo: &Repository, id: &str, scratch: &Path) -> Result<BTreeMap<String, ObjectId>, String> {
    let dest = scratch.join(format!("tree-{}", &id[..16]));
    let _ = fs::remove_dir_all(&dest);
    repo.checkout(id, &dest, &CheckoutOptions::default()).map_err(|e| format!("checkout {}: {e}", &id[..12]))?;
    let h = tree_hashes(&dest);
    fs::remove_dir_all(&dest).unwrap();
    Ok(h)
}

/// The state of a repository as found by re-deriving, outside the library, what its checkpoints reach.
#[derive(Debug, Default)]
struct Audit {
    /// Damage: what a checkpoint needs is missing or points to the wrong place. Never acceptable.
    problems: Vec<String>,
    /// Leftovers a complete GC with no writer running must have removed: unreachable rows, pack rows without
    /// chunks, files no pack row names, condemned rows, sessions, a GC lease.
    garbage: Vec<String>,
    /// Reachable objects that are condemned. Acceptable only while a writer that will claim them runs.
    condemned_reachable: usize,
    /// Chunk rows, and reachable chunks.
    chunks: usize,
    reachable_chunks: usize,
}

impl Audit {
    fn assert_sound(&self, ctx: &str) {
        assert!(self.problems.is_empty(), "{ctx}: repository damaged:\n{}", self.problems.join("\n"));
    }
    fn assert_clean(&self, ctx: &str) {
        self.assert_sound(ctx);
        assert_eq!(self.condemned_reachable, 0, "{ctx}: reachable objects are condemned");
        assert!(self.garbage.is_empty(), "{ctx}: GC left garbage behind:\n{}", self.garbage.join("\n"));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Audits a repository (no process may be writing it meanwhile).
///
/// Checks: every pack row's file exists with the recorded size and a valid index; every chunk row points to a
/// pack row and matches that pack's own index entry (offset, lengths, flags); every object a checkpoint
/// reaches (trees → contents → segments → chunks, walked here from the catalog tables) has its row. Records
/// as garbage everything a full GC should have removed.
fn audit(repo_dir: &Path) -> Audit {
    let mut a = Audit::default();
    let repo = Repository::open(repo_dir).unwrap();
    let cat = crate::util::catalog_rw(&repo).unwrap();
    let conn = cat.connection();
    let backend = LocalBackend::new(repo_dir);
    let on_disk = disk_objects(repo_dir);

    // Packs: row ↔ file ↔ index.
    let packs: Vec<(i64, String, i64, i64)> = conn
        .prepare("SELECT id, name, size, chunk_count FROM packs")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut index: BTreeMap<i64, std::collections::HashMap<ObjectId, snapstore::PackEntry>> = BTreeMap::new();
    let mut sizes = BTreeMap::new();
    for (id, name, size, count) in &packs {
        sizes.insert(*id, *size as u64);
        match on_disk.get(name) {
            None => a.problems.push(format!("pack {name} is in the catalog but missing on disk")),
            Some(&s) if s != *size as u64 => {
                a.problems.push(format!("pack {name} is {s} bytes on disk, {size} in the catalog"))
            }
            Some(_) => match snapstore::read_pack_index(&backend, name) {
                Ok(entries) => {
                    if entries.len() as i64 != *count {
                        a.problems.push(format!("pack {name}: {} index entries, catalog says {count}", entries.len()));
                    }
                    index.insert(*id, entries.into_iter().map(|e| (e.id, e)).collect());
                }
                Err(e) => a.problems.push(format!("pack {name}: {e}")),
            },
        }
    }
    let known: HashSet<&String> = packs.iter().map(|(_, n, _, _)| n).collect();
    for name in on_disk.keys() {
        if !known.contains(name) {
            a.garbage.push(format!("file {name} is not a pack the catalog knows"));
        }
    }

    // Chunk rows against the packs' own indexes.
    let chunks: Vec<(Vec<u8>, i64, i64, i64, i64, i64)> = conn
        .prepare("SELECT id, pack, offset, stored_len, raw_len, flags FROM chunks")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    a.chunks = chunks.len();
    let mut used_packs = HashSet::new();
    for (id, pack, offset, stored, raw, flags) in &chunks {
        used_packs.insert(*pack);
        let cid = ObjectId::from_slice(id).expect("32-byte chunk id");
        let Some(size) = sizes.get(pack) else {
            a.problems.push(format!("chunk {cid} points to pack row {pack}, which does not exist"));
            continue;
        };
        if (offset + stored) as u64 > *size {
            a.problems.push(format!("chunk {cid} ends at {} beyond its pack's {size} bytes", offset + stored));
        }
        if let Some(idx) = index.get(pack) {
            match idx.get(&cid) {
                None => a.problems.push(format!("chunk {cid} is not in its pack's index")),
                Some(e) => {
                    if (e.offset as i64, e.stored_len as i64, e.raw_len as i64, e.flags as i64)
                        != (*offset, *stored, *raw, *flags)
                    {
                        a.problems.push(format!("chunk {cid}: catalog row disagrees with its pack's index"));
                    }
                }
            }
        }
    }
    for (id, name, _, _) in &packs {
        if !used_packs.contains(id) {
            a.garbage.push(format!("pack {name} holds no chunk any row points to"));
        }
    }

    // Reachability, walked from the raw tables.
    let ids = |sql: &str| -> HashSet<Vec<u8>> {
        conn.prepare(sql).unwrap().query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap().map(Result::unwrap).collect()
    };
    let chunk_rows: HashSet<Vec<u8>> = chunks.iter().map(|c| c.0.clone()).collect();
    let tree_rows = ids("SELECT id FROM trees");
    let content_rows = ids("SELECT id FROM contents");
    let segment_rows = ids("SELECT id FROM segments");
    let (mut trees, mut contents, mut segments, mut reach_chunks) =
        (HashSet::new(), HashSet::new(), HashSet::new(), HashSet::new());
    let roots = crate::util::checkpoint_roots(conn);
    let mut tree_q = conn.prepare("SELECT data FROM trees WHERE id = ?1").unwrap();
    let mut content_q = conn.prepare("SELECT segments FROM contents WHERE id = ?1").unwrap();
    let mut segment_q = conn.prepare("SELECT data FROM segments WHERE id = ?1").unwrap();
    for (cp, root) in &roots {
        let mut stack = vec![root.clone()];
        while let Some(t) = stack.pop() {
            if !trees.insert(t.clone()) {
                continue;
            }
            if !tree_rows.contains(&t) {
                a.problems.push(format!("checkpoint {}: tree {} is missing", &cp[..12], hex(&t)));
                continue;
            }
            let data: Vec<u8> = tree_q.query_row([&t], |r| r.get(0)).unwrap();
            for e in snapstore::decode_tree(&data).unwrap() {
                let target = e.target;
                match e.kind {
                    snapstore::EntryKind::Dir => stack.push(target),
                    snapstore::EntryKind::File => {
                        if !contents.insert(target.clone()) {
                            continue;
                        }
                        let Ok(segs) = content_q.query_row([&target], |r| r.get::<_, Vec<u8>>(0)) else {
                            // A content of one chunk has no row: it is the chunk.
                            if chunk_rows.contains(&target) {
                                contents.remove(&target);
                                reach_chunks.insert(target);
                            } else {
                                a.problems.push(format!(
                                    "checkpoint {}: content {} is missing",
                                    &cp[..12],
                                    hex(&target)
                                ));
                            }
                            continue;
                        };
                        for s in segs.chunks(32) {
                            if !segments.insert(s.to_vec()) {
                                continue;
                            }
                            let Ok(data) = segment_q.query_row([s], |r| r.get::<_, Vec<u8>>(0)) else {
                                a.problems.push(format!("checkpoint {}: segment {} is missing", &cp[..12], hex(s)));
                                continue;
                            };
                            assert_eq!(data.len() % 36, 0, "segment encoding changed: 32-byte id + u32 length");
                            for r in data.chunks(36) {
                                let c = r[..32].to_vec();
                                if !chunk_rows.contains(&c) {
                                    a.problems.push(format!("checkpoint {}: chunk {} is missing", &cp[..12], hex(&c)));
                                }
                                reach_chunks.insert(c);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    a.reachable_chunks = reach_chunks.len();
    for (what, rows, reach) in [
        ("chunk", &chunk_rows, &reach_chunks),
        ("tree", &tree_rows, &trees),
        ("content", &content_rows, &contents),
        ("segment", &segment_rows, &segments),
    ] {
        let n = rows.difference(reach).count();
        if n > 0 {
            a.garbage.push(format!("{n} {what} rows no checkpoint reaches"));
        }
    }

    // Protocol state.
    let condemned: Vec<(i64, Vec<u8>)> = conn
        .prepare("SELECT kind, id FROM condemned")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (kind, id) in &condemned {
        let reachable = match kind {
            0 => reach_chunks.contains(id),
            1 => segments.contains(id),
            2 => contents.contains(id),
            _ => trees.contains(id),
        };
        if reachable {
            a.condemned_reachable += 1;
        }
    }
    if !condemned.is_empty() {
        a.garbage.push(format!("{} condemned rows", condemned.len()));
    }
    for table in ["sessions", "gc_lease"] {
        let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap();
        if n > 0 {
            a.garbage.push(format!("{n} rows in {table}"));
        }
    }
    a
}

/// Copies a repository directory (no process may be writing it).
/// Runs `snapstore --json gc` and returns its summary as JSON.
fn gc_cli(repo: &Path) -> serde_json::Value {
    gc_cli_args(repo, &[])
}

fn gc_cli_args(repo: &Path, args: &[&str]) -> serde_json::Value {
    let out = succeeded(&run(repo, &[&["--json", "gc"], args].concat()), "gc");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("gc --json is not JSON ({e}): {out}"))
}

fn gc(repo: &Repository) -> GcSummary {
    repo.gc(&GcOptions::default()).unwrap_or_else(|e| panic!("gc: {e}"))
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Space is reclaimed
// ---------------------------------------------------------------------------------------------------------------

/// Five versions of an image, each rewriting a different large region; once the four older are forgotten, GC
/// brings the pack bytes to those of a fresh repository holding only the last version.
#[test]
fn gc_reclaims_the_space_of_forgotten_versions() {
    let len = env_num("SNAPSTORE_GC_IMAGE_MIB", 64) as usize * MIB;
    let started = Instant::now();
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let mut image = pseudo_random(len, 0x1111);
    // Versions 2..5 each rewrite the next 3/16 of the image: the last version keeps the tail of the first.
    let region = len / 16 * 3;
    let mut ids = Vec::new();
    for v in 0..5 {
        if v > 0 {
            let at = (v - 1) * region;
            image[at..at + region].copy_from_slice(&pseudo_random(region, 0x2000 + v as u64));
        }
        let s = repo.commit_reader("image.bin", &mut &image[..], &CommitOptions::default()).unwrap();
        ids.push(s.id);
    }
    let committed = started.elapsed();
    let before = disk_pack_bytes(repo.path());
    assert!(before as f64 > 1.5 * len as f64, "five versions should take well over one image: {before}");

    let old: Vec<&str> = ids[..4].iter().map(String::as_str).collect();
    assert_eq!(repo.forget(&old).unwrap().len(), 4);
    assert_eq!(disk_pack_bytes(repo.path()), before, "forget alone must not touch packs");
    let g = gc(&repo);
    let after = disk_pack_bytes(repo.path());
    let stats = repo.stats().unwrap().catalog;
    assert_eq!(stats.pack_bytes, after, "the catalog's pack bytes must match the files on disk");
    assert!(g.chunks_condemned > 0 && g.chunks_swept == g.chunks_condemned && g.chunks_deferred == 0, "{g:?}");
    assert!(g.packs_deleted + g.packs_rewritten > 0, "{g:?}");
    assert_eq!(g.bytes_freed, before - after, "reported bytes freed vs. files on disk: {g:?}");

    // A repository that only ever held the last version.
    let fresh = Repository::init(t.path().join("fresh")).unwrap();
    fresh.commit_reader("image.bin", &mut &image[..], &CommitOptions::default()).unwrap();
    let fresh_bytes = fresh.stats().unwrap().catalog.pack_bytes;
    assert_eq!(fresh_bytes, disk_pack_bytes(fresh.path()));
    let excess = after as f64 / fresh_bytes as f64 - 1.0;
    assert!(
        excess.abs() <= 0.10,
        "after gc the repository holds {after} pack bytes, a fresh one {fresh_bytes} ({:+.1} %); before gc {before}",
        excess * 100.0
    );
    assert_eq!(stats.chunks, fresh.stats().unwrap().catalog.chunks, "same chunks as a fresh repository");

    assert_checks_out(&repo, &ids[4], &image, &scratch);
    let g2 = gc(&repo);
    assert_eq!(
        (
            g2.chunks_condemned,
            g2.chunks_swept,
            g2.packs_deleted,
            g2.packs_rewritten,
            g2.orphans_deleted,
            g2.bytes_freed
        ),
        (0, 0, 0, 0, 0, 0),
        "a second gc must find nothing to do: {g2:?}"
    );
    assert_eq!(disk_pack_bytes(repo.path()), after);
    audit(repo.path()).assert_clean("after gc");
    eprintln!(
        "space test: {} MiB image; commits {:.1} s; packs {before} → {after} bytes (fresh {fresh_bytes}, {:+.2} %); \
         gc {:.2} s: {g:?}; total {:.1} s",
        len / MIB,
        committed.as_secs_f64(),
        excess * 100.0,
        g.seconds,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Sparse packs are rewritten
// ---------------------------------------------------------------------------------------------------------------

/// Replaces 512 KiB blocks `which(block)` of `data` with fresh bytes.
fn rewrite_blocks(data: &mut [u8], seed: u64, which: impl Fn(usize) -> bool) {
    const BLOCK: usize = 512 * 1024;
    for b in 0..data.len() / BLOCK {
        if which(b) {
            data[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&pseudo_random(BLOCK, seed ^ (b as u64) << 20));
        }
    }
}

/// Per pack, the share of its blob bytes no chunk row uses.
fn pack_unused_shares(repo: &Path) -> Vec<(String, f64)> {
    let cat = crate::util::catalog_rw(&Repository::open(repo).unwrap()).unwrap();
    let mut stmt = cat
        .connection()
        .prepare(
            "SELECT p.name, p.size, p.chunk_count, coalesce(sum(c.stored_len), 0) FROM packs p
             LEFT JOIN chunks c ON c.pack = p.id GROUP BY p.id",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .map(|(name, size, count, live)| {
            let blobs = size - 16 - 41 * count - 40;
            (name, 1.0 - live as f64 / blobs as f64)
        })
        .collect()
}

/// With 4 MiB packs, the first checkpoint's packs end up holding a quarter of live chunks once older
/// checkpoints are forgotten: GC rewrites them, and every kept checkpoint still checks out.
#[test]
fn sparse_packs_are_rewritten_and_kept_checkpoints_survive() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let params = RepoParams { pack_target_size: 4 << 20, ..Default::default() };
    let repo = Repository::init_with(t.path().join("repo"), params).unwrap();
    let commit = |name: &str, data: &[u8]| repo.commit_reader(name, &mut &data[..], &CommitOptions::default()).unwrap();

    let a = pseudo_random(24 * MIB, 0xa);
    let mut b = a.clone();
    rewrite_blocks(&mut b, 0xb, |i| i % 2 == 1);
    let mut c = b.clone();
    rewrite_blocks(&mut c, 0xc, |i| i % 4 == 0);
    let mut d = c.clone();
    rewrite_blocks(&mut d, 0xd, |i| i >= 44);
    let other = pseudo_random(3 * MIB, 0xe);
    let ids: Vec<String> = [&a, &b, &c, &d].iter().map(|x| commit("state.bin", x).id).collect();
    let other_id = commit("other.bin", &other).id;

    // Before: A's packs are shared with C and D (a quarter of A is still in them).
    let packs_before = table_count(repo.path(), "packs");
    assert!(packs_before >= 10, "expected many 4 MiB packs, got {packs_before}");
    let before = disk_pack_bytes(repo.path());

    repo.forget(&[&ids[0], &ids[1]]).unwrap();
    let g = gc(&repo);
    let after = disk_pack_bytes(repo.path());
    assert!(g.packs_rewritten > 0, "packs of the forgotten A hold live chunks of C and D: {g:?}");
    assert!(after < before, "pack bytes must drop: {before} → {after}");
    assert_eq!(g.bytes_freed, before - after, "{g:?}");
    assert_eq!(repo.stats().unwrap().catalog.pack_bytes, after);
    for (name, unused) in pack_unused_shares(repo.path()) {
        assert!(unused <= 0.10 + 1e-9, "pack {name} is {:.0} % unused after gc", unused * 100.0);
    }
    let live: i64 = {
        let cat = crate::util::catalog_rw(&repo).unwrap();
        cat.connection().query_row("SELECT sum(stored_len) FROM chunks", [], |r| r.get(0)).unwrap()
    };
    assert!((after as f64) < live as f64 * 1.12 + 1e5, "packs {after} bytes for {live} live bytes");

    assert_checks_out(&repo, &ids[2], &c, &scratch);
    assert_checks_out(&repo, &ids[3], &d, &scratch);
    assert_checks_out(&repo, &other_id, &other, &scratch);
    audit(repo.path()).assert_clean("after rewriting sparse packs");
    let g2 = gc(&repo);
    assert_eq!((g2.packs_rewritten, g2.packs_deleted, g2.bytes_freed), (0, 0, 0), "{g2:?}");
    eprintln!("sparse test: {packs_before} packs, {before} → {after} bytes: {g:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 7. forget through the CLI
// ---------------------------------------------------------------------------------------------------------------

/// `forget` by id and by policy: dry runs change nothing, JSON parses, missing rules are a usage error.
#[test]
fn cli_forget_by_id_and_by_policy() {
    let t = tmp();
    let repo = t.path().join("repo");
    succeeded(&run(&repo, &["init"]), "init");
    let (f, g) = (t.path().join("f.bin"), t.path().join("g.bin"));
    let mut f_ids = Vec::new();
    let mut data = BTreeMap::new();
    for v in 0..3u64 {
        let bytes = pseudo_random(300_000 + v as usize * 1000, 0x100 + 2 * v);
        fs::write(&f, &bytes).unwrap();
        let id = succeeded(&run(&repo, &["-q", "commit", p(&f)]), "commit f").trim().to_string();
        data.insert(id.clone(), bytes);
        f_ids.push(id);
    }
    let g_bytes = pseudo_random(200_000, 0x9);
    fs::write(&g, &g_bytes).unwrap();
    let g_id = succeeded(&run(&repo, &["-q", "commit", p(&g)]), "commit g").trim().to_string();
    data.insert(g_id.clone(), g_bytes);
    let all: BTreeSet<String> = listed(&repo).into_iter().collect();
    assert_eq!(all.len(), 4);

    // No ids and no policy: a usage error, nothing forgotten.
    let o = run(&repo, &["forget"]);
    assert_eq!(o.status.code(), Some(2), "forget without ids or policy: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--keep"), "the message should say what is missing: {}", text(&o.stderr));
    let o = run(&repo, &["forget", "--tag", "x"]);
    assert_eq!(o.status.code(), Some(2), "a scope without rules: {}", text(&o.stderr));
    let o = run(&repo, &["forget", "--keep-last", "1", &f_ids[0]]);
    assert_eq!(o.status.code(), Some(2), "ids and a policy together: {}", text(&o.stderr));
    assert_eq!(listed(&repo).into_iter().collect::<BTreeSet<_>>(), all);

    // A dry run, in text and in JSON, changes nothing.
    let out = succeeded(&run(&repo, &["forget", "--keep-last", "1", "--dry-run"]), "forget --dry-run");
    assert!(out.contains("would keep 2, forget 2 checkpoints"), "{out}");
    let o = run(&repo, &["--json", "forget", "--keep-last", "1", "--dry-run"]);
    let v: serde_json::Value =
        serde_json::from_str(&succeeded(&o, "forget --json --dry-run")).expect("forget --json parses");
    assert_eq!(v["dry_run"], true);
    let ids_of = |list: &serde_json::Value| -> BTreeSet<String> {
        list.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ids_of(&v["keep"]), BTreeSet::from([f_ids[2].clone(), g_id.clone()]));
    assert_eq!(ids_of(&v["forget"]), BTreeSet::from([f_ids[0].clone(), f_ids[1].clone()]));
    let o = run(&repo, &["forget", "-n", &f_ids[0][..8]]);
    succeeded(&o, "forget -n by id");
    assert_eq!(listed(&repo).into_iter().collect::<BTreeSet<_>>(), all, "dry runs must change nothing");
    let dry = succeeded(&run(&repo, &["--json", "gc", "--dry-run"]), "gc --dry-run");
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!((dry["dry_run"].as_bool(), dry["chunks_condemned"].as_u64()), (Some(true), Some(0)), "{dry}");

    // By id: an unknown id anywhere forgets nothing; a prefix works.
    let o = run(&repo, &["forget", &f_ids[0][..8], "ffffffffffff"]);
    assert_eq!(o.status.code(), Some(4), "unknown id: {}", text(&o.stderr));
    assert_eq!(listed(&repo).len(), 4);
    let o = run(&repo, &["--json", "forget", &f_ids[0][..8]]);
    let v: serde_json::Value = serde_json::from_str(&succeeded(&o, "forget by id")).expect("forget --json parses");
    assert_eq!(v["dry_run"], false);
    assert_eq!(ids_of(&v["forget"]), BTreeSet::from([f_ids[0].clone()]));
    assert_eq!(listed(&repo).len(), 3);
    let o = run(&repo, &["forget", &f_ids[0]]);
    assert_eq!(o.status.code(), Some(4), "forgetting twice: {}", text(&o.stderr));

    // gc --dry-run reports without changing anything; then gc reclaims.
    let packs_before = disk_objects(&repo);
    let dry = succeeded(&run(&repo, &["--json", "gc", "--dry-run"]), "gc --dry-run");
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert!(dry["chunks_condemned"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(disk_objects(&repo), packs_before);
    assert_eq!(table_count(&repo, "condemned"), 0, "a dry run must not leave condemned rows");
    let s = gc_cli(&repo);
    assert!(s["chunks_swept"].as_u64().unwrap() > 0 && s["bytes_freed"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["chunks_swept"], dry["chunks_swept"], "dry run and run must agree: {dry} vs {s}");

    // By policy.
    let o = run(&repo, &["--json", "forget", "--keep-last", "1"]);
    let v: serde_json::Value = serde_json::from_str(&succeeded(&o, "forget --keep-last 1")).unwrap();
    assert_eq!(ids_of(&v["forget"]), BTreeSet::from([f_ids[1].clone()]));
    assert_eq!(listed(&repo).into_iter().collect::<BTreeSet<_>>(), BTreeSet::from([f_ids[2].clone(), g_id.clone()]));
    let out = succeeded(&run(&repo, &["gc"]), "gc");
    assert!(out.contains("freed"), "{out}");
    let r = Repository::open(&repo).unwrap();
    for id in [&f_ids[2], &g_id] {
        assert_checks_out(&r, id, &data[id], t.path());
    }
    audit(&repo).assert_clean("after forget and gc");
}

// ---------------------------------------------------------------------------------------------------------------
// 6. The protocol, at library level: writers that began before a mark, dead sessions
// ---------------------------------------------------------------------------------------------------------------

/// Serves `first`, then blocks (telling `blocked`) until it is sent the rest of the stream.
struct GatedReader {
    first: Vec<u8>,
    pos: usize,
    blocked: Option<mpsc::Sender<()>>,
    rest: mpsc::Receiver<Vec<u8>>,
    tail: Option<Vec<u8>>,
    tail_pos: usize,
}

impl Read for GatedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos < self.first.len() {
            let n = buf.len().min(self.first.len() - self.pos);
            buf[..n].copy_from_slice(&self.first[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        if self.tail.is_none() {
            if let Some(b) = self.blocked.take() {
                let _ = b.send(());
            }
            self.tail = Some(self.rest.recv().unwrap_or_default());
        }
        let tail = self.tail.as_ref().unwrap();
        let n = buf.len().min(tail.len() - self.tail_pos);
        buf[..n].copy_from_slice(&tail[self.tail_pos..self.tail_pos + n]);
        self.tail_pos += n;
        Ok(n)
    }
}

/// Blocks a commit's walker when it reaches file `name` (the files before it are already in the pipeline),
/// until released.
struct GateAt {
    name: &'static str,
    blocked: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Progress for GateAt {
    fn file(&self, path: &Path) {
        if path == Path::new(self.name)
            && let Some(tx) = self.blocked.lock().unwrap().take()
        {
            let _ = tx.send(());
            let _ = self.release.lock().unwrap().recv();
        }
    }
}

fn gate_at(name: &'static str) -> (Arc<GateAt>, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (blocked_tx, blocked_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    (
        Arc::new(GateAt { name, blocked: Mutex::new(Some(blocked_tx)), release: Mutex::new(release_rx) }),
        blocked_rx,
        release_tx,
    )
}

fn condemned_chunks(repo: &Path) -> HashSet<ObjectId> {
    let cat = crate::util::catalog_rw(&Repository::open(repo).unwrap()).unwrap();
    let mut stmt = cat.connection().prepare("SELECT id FROM condemned WHERE kind = 0").unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|b| ObjectId::from_slice(&b.unwrap()).unwrap())
        .collect()
}

/// (a) commit A; (b) a commit B that dedups against A's chunks blocks mid-stream; (c) A is forgotten and GC
/// runs (twice) while B waits: A's chunks are condemned but deferred, nothing is swept; a commit C started
/// after the mark does not count the condemned chunks as present; (d) B publishes; (e) GC sweeps only what no
/// checkpoint reaches; (f) B and C check out byte-identical.
#[test]
fn a_writer_that_began_before_the_mark_keeps_what_it_relies_on() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let a = pseudo_random(8 * MIB, 0xa1);
    let a_id = repo.commit_reader("a.bin", &mut &a[..], &CommitOptions::default()).unwrap().id;
    let a_chunks = chunk_ids(&repo, &a);

    // B = the first 6 MiB of A, then (once released) 4 MiB of its own.
    let (blocked_tx, blocked_rx) = mpsc::channel();
    let (rest_tx, rest_rx) = mpsc::channel();
    let rest = pseudo_random(4 * MIB, 0xb2);
    let mut want_b = a[..6 * MIB].to_vec();
    want_b.extend_from_slice(&rest);
    let path = repo.path().to_path_buf();
    let first = a[..6 * MIB].to_vec();
    let writer = std::thread::spawn(move || {
        let r = Repository::open(&path).unwrap();
        let mut reader =
            GatedReader { first, pos: 0, blocked: Some(blocked_tx), rest: rest_rx, tail: None, tail_pos: 0 };
        r.commit_reader("b.bin", &mut reader, &CommitOptions::default())
    });
    blocked_rx.recv_timeout(Duration::from_secs(60)).expect("writer B reached the gate");
    // Let B's workers look up the chunks read so far (they find A's).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(table_count(repo.path(), "sessions"), 1, "B's session");

    repo.forget(&[&a_id]).unwrap();
    let files_before = disk_objects(repo.path());
    let g1 = gc(&repo);
    assert_eq!((g1.sessions_alive, g1.sessions_expired), (1, 0), "{g1:?}");
    assert!(g1.chunks_condemned as usize >= a_chunks.len(), "A's chunks are unreachable: {g1:?}");
    assert_eq!(g1.chunks_swept, 0, "nothing may be swept while B, older than the mark, runs: {g1:?}");
    assert_eq!(g1.chunks_deferred, g1.chunks_condemned, "{g1:?}");
    assert_eq!((g1.packs_deleted, g1.packs_rewritten, g1.orphans_deleted), (0, 0, 0), "{g1:?}");
    assert_eq!(disk_objects(repo.path()), files_before, "no file may go while B runs");
    let condemned = condemned_chunks(repo.path());
    assert!(a_chunks.iter().all(|c| condemned.contains(c)), "every chunk of A is condemned");

    // A second GC while B still waits changes nothing either.
    let g2 = gc(&repo);
    assert_eq!((g2.chunks_swept, g2.chunks_deferred), (0, g1.chunks_deferred), "{g2:?}");
    assert_eq!(disk_objects(repo.path()), files_before);

    // C begins after the mark: A's condemned chunks are absent to it, so it stores its own copies (W1).
    let c = a[..2 * MIB].to_vec();
    let sc = repo.commit_reader("c.bin", &mut &c[..], &CommitOptions::default()).unwrap();
    assert_eq!(sc.chunks_reused, 0, "a condemned chunk must not count as present: {sc:?}");
    assert_eq!(sc.bytes_new, c.len() as u64, "{sc:?}");
    let condemned = condemned_chunks(repo.path());
    for id in chunk_ids(&repo, &c) {
        assert!(!condemned.contains(&id), "C stored chunk {id} again: it must no longer be condemned");
    }

    // B goes on and publishes.
    rest_tx.send(rest).unwrap();
    let sb = writer.join().unwrap().unwrap_or_else(|e| panic!("B failed: {e}"));
    assert!(sb.chunks_reused >= 50, "B should have deduplicated against A's chunks: {sb:?}");
    let au = audit(repo.path());
    au.assert_sound("after B published");
    assert_eq!(au.condemned_reachable, 0, "B's publication must claim back every condemned chunk it uses");

    let g3 = gc(&repo);
    assert_eq!((g3.sessions_alive, g3.chunks_deferred), (0, 0), "{g3:?}");
    assert!(g3.chunks_swept > 0, "the tail of A, used by no checkpoint, goes now: {g3:?}");
    assert_checks_out(&repo, &sb.id, &want_b, &scratch);
    assert_checks_out(&repo, &sc.id, &c, &scratch);
    audit(repo.path()).assert_clean("after the last gc");
}

/// A directory commit reuses its parent's content for an unchanged file without reading it. The parent is
/// forgotten and collected while the commit runs: the commit's publication must claim that content back (W3).
#[test]
fn an_unchanged_file_reused_from_a_forgotten_parent_survives() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let dir = t.path().join("run");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a_kept.bin"), pseudo_random(4 * MIB, 0x41)).unwrap();
    fs::write(dir.join("b_changes.bin"), pseudo_random(MIB, 0x42)).unwrap();
    let parent = repo.commit(&dir, &CommitOptions::default()).unwrap();
    fs::write(dir.join("b_changes.bin"), pseudo_random(MIB, 0x44)).unwrap();
    let want = tree_hashes(&dir);

    let (gate, blocked, release) = gate_at("b_changes.bin");
    let path = repo.path().to_path_buf();
    let d = dir.clone();
    let writer = std::thread::spawn(move || {
        let r = Repository::open(&path).unwrap();
        r.commit(&d, &CommitOptions { progress: gate, ..Default::default() })
    });
    blocked.recv_timeout(Duration::from_secs(60)).expect("the commit reached b_changes.bin");
    std::thread::sleep(Duration::from_millis(100));
    repo.forget(&[&parent.id]).unwrap();
    let g = gc(&repo);
    assert_eq!(g.sessions_alive, 1, "{g:?}");
    assert!(g.chunks_condemned > 0 && g.chunks_swept == 0, "{g:?}");
    release.send(()).unwrap();
    let s = writer.join().unwrap().unwrap_or_else(|e| panic!("commit failed: {e}"));
    assert_eq!(s.files_unchanged, 1, "a_kept.bin must have been reused from the parent: {s:?}");
    let au = audit(repo.path());
    au.assert_sound("after the commit published");
    assert_eq!(au.condemned_reachable, 0, "publication must claim back the reused content");
    let g = gc(&repo);
    assert!(g.chunks_swept > 0, "the parent's old b_changes.bin goes: {g:?}");
    assert_eq!(checkout_tree(&repo, &s.id, &scratch).unwrap(), want);
    audit(repo.path()).assert_clean("after gc");
}

fn insert_session(repo: &Path, host: &str, pid: u32, heartbeat_ns: i64) {
    let cat = crate::util::catalog_rw(&Repository::open(repo).unwrap()).unwrap();
    let c = cat.connection();
    let epoch: String = c.query_row("SELECT value FROM meta WHERE key = 'gc_epoch'", [], |r| r.get(0)).unwrap();
    let (process, pidns) = crate::util::process_record(pid);
    c.execute(
        "INSERT INTO sessions (kind, host, pid, started_ns, heartbeat_ns, start_epoch, process, pidns)
         VALUES ('commit', ?1, ?2, ?3, ?3, ?4, ?5, ?6)",
        (host, pid, heartbeat_ns, epoch.parse::<i64>().unwrap(), process, pidns),
    )
    .unwrap();
}

/// A crashed writer's session (its process is gone) is expired by the next GC, which then sweeps at once; a
/// session from another host counts as alive until its heartbeat is older than `stale_after`.
#[test]
fn dead_sessions_are_expired_and_remote_ones_by_heartbeat() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let commit =
        |seed| repo.commit_reader("s", &mut &pseudo_random(2 * MIB, seed)[..], &CommitOptions::default()).unwrap().id;
    let old = commit(1);
    commit(3);

    // A crashed local writer: expired, and it delays nothing.
    insert_session(repo.path(), &hostname(), dead_pid(), now_ns());
    repo.forget(&[&old]).unwrap();
    let g = gc(&repo);
    assert_eq!((g.sessions_expired, g.sessions_alive), (1, 0), "{g:?}");
    assert!(g.chunks_condemned > 0 && g.chunks_swept == g.chunks_condemned && g.chunks_deferred == 0, "{g:?}");
    assert_eq!(table_count(repo.path(), "sessions"), 0);

    // A writer on another host with a fresh heartbeat: alive, so what is condemned now waits for it.
    let old = commit(5);
    commit(7);
    insert_session(repo.path(), "elsewhere.invalid", std::process::id(), now_ns());
    repo.forget(&[&old]).unwrap();
    let g = gc(&repo);
    assert_eq!((g.sessions_expired, g.sessions_alive), (0, 1), "{g:?}");
    assert!(g.chunks_condemned > 0 && g.chunks_swept == 0 && g.chunks_deferred == g.chunks_condemned, "{g:?}");
    // Its heartbeat grows old: expired, and the deferred chunks go.
    std::thread::sleep(Duration::from_millis(20));
    let g = repo.gc(&GcOptions { stale_after: Duration::from_millis(10), ..Default::default() }).unwrap();
    assert_eq!((g.sessions_expired, g.sessions_alive, g.chunks_deferred), (1, 0, 0), "{g:?}");
    assert!(g.chunks_swept > 0, "{g:?}");
    audit(repo.path()).assert_clean("after expiring sessions");
}

/// A commit that records another host *name* (CommitOptions::host, a label for the checkpoint) still runs on
/// this machine: GC must judge its session by its process, which is alive, not by the heartbeat of a remote
/// host. (Documented: "On this host, a session is dead as soon as its process is gone, whatever the clocks say.")
#[test]
fn a_commit_labelled_with_another_host_is_not_taken_for_a_remote_writer() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let dir = t.path().join("run");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.bin"), pseudo_random(MIB, 0x51)).unwrap();
    fs::write(dir.join("b.bin"), pseudo_random(MIB, 0x52)).unwrap();
    let (gate, blocked, release) = gate_at("b.bin");
    let path = repo.path().to_path_buf();
    let d = dir.clone();
    let writer = std::thread::spawn(move || {
        let r = Repository::open(&path).unwrap();
        let opts = CommitOptions { host: Some("label.invalid".into()), progress: gate, ..Default::default() };
        r.commit(&d, &opts)
    });
    blocked.recv_timeout(Duration::from_secs(60)).expect("the commit reached b.bin");
    std::thread::sleep(Duration::from_millis(50));
    // As if the commit had run for longer than stale_after (an hour by default) without writing a batch.
    let g = repo.gc(&GcOptions { stale_after: Duration::from_millis(10), ..Default::default() }).unwrap();
    release.send(()).unwrap();
    let result = writer.join().unwrap();
    assert_eq!(
        (g.sessions_expired, g.sessions_alive),
        (0, 1),
        "the session of a live local commit was expired; the commit then ended with {:?}",
        result.as_ref().map(|s| &s.id).map_err(|e| e.to_string())
    );
    result.unwrap_or_else(|e| panic!("commit failed: {e}"));
}

// ---------------------------------------------------------------------------------------------------------------
// 5. The GC lease
// ---------------------------------------------------------------------------------------------------------------

fn insert_lease(repo: &Path, host: &str, pid: u32, heartbeat_ns: i64) {
    let cat = crate::util::catalog_rw(&Repository::open(repo).unwrap()).unwrap();
    let (process, pidns) = crate::util::process_record(pid);
    cat.connection()
        .execute(
            "INSERT INTO gc_lease (one, host, pid, started_ns, heartbeat_ns, process, pidns)
             VALUES (1, ?1, ?2, ?3, ?3, ?4, ?5)",
            (host, pid, heartbeat_ns, process, pidns),
        )
        .unwrap();
}

/// A lease held by a live process refuses a second GC (Error::GcRunning); a dead holder's lease is taken over.
#[test]
fn the_gc_lease_excludes_a_second_gc_and_is_taken_over_from_the_dead() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let old = repo.commit_reader("s", &mut &pseudo_random(MIB, 1)[..], &CommitOptions::default()).unwrap().id;
    repo.commit_reader("s", &mut &pseudo_random(MIB, 3)[..], &CommitOptions::default()).unwrap();
    repo.forget(&[&old]).unwrap();
    let me = hostname();

    // Held by this very process.
    insert_lease(repo.path(), &me, std::process::id(), now_ns());
    match repo.gc(&GcOptions::default()) {
        Err(Error::GcRunning { pid, host, .. }) => assert_eq!((pid, host), (std::process::id(), me.clone())),
        other => panic!("expected GcRunning, got {other:?}"),
    }
    assert_eq!(table_count(repo.path(), "gc_lease"), 1, "a refused gc must leave the holder's lease alone");
    assert_eq!(table_count(repo.path(), "condemned"), 0, "a refused gc must not mark");
    // Held by a GC on another host that is still beating.
    let cat = crate::util::catalog_rw(&repo).unwrap();
    cat.connection().execute("DELETE FROM gc_lease", []).unwrap();
    insert_lease(repo.path(), "elsewhere.invalid", 1, now_ns());
    assert!(matches!(repo.gc(&GcOptions::default()), Err(Error::GcRunning { .. })));
    // ... and once its heartbeat is stale, taken over.
    std::thread::sleep(Duration::from_millis(20));
    let g = repo.gc(&GcOptions { stale_after: Duration::from_millis(10), ..Default::default() }).unwrap();
    assert!(g.chunks_swept > 0, "{g:?}");
    assert_eq!(table_count(repo.path(), "gc_lease"), 0, "a finished gc releases its lease");

    // Held by a dead local process: taken over.
    let old = repo.checkpoints().unwrap()[0].id.clone();
    repo.commit_reader("s", &mut &pseudo_random(MIB, 5)[..], &CommitOptions::default()).unwrap();
    repo.forget(&[&old]).unwrap();
    insert_lease(repo.path(), &me, dead_pid(), now_ns());
    let g = gc(&repo);
    assert!(g.chunks_swept > 0, "{g:?}");
    assert_eq!(table_count(repo.path(), "gc_lease"), 0);
    audit(repo.path()).assert_clean("after taking over a lease");
}

/// The CLI: `snapstore gc` while a live process holds the lease exits 5 saying so; once it is gone, gc runs.
#[test]
fn cli_gc_exits_5_while_another_holds_the_lease() {
    let t = tmp();
    let repo = t.path().join("repo");
    succeeded(&run(&repo, &["init"]), "init");
    let f = t.path().join("f.bin");
    fs::write(&f, pseudo_random(MIB, 1)).unwrap();
    let old = succeeded(&run(&repo, &["-q", "commit", p(&f)]), "commit").trim().to_string();
    fs::write(&f, pseudo_random(MIB, 3)).unwrap();
    succeeded(&run(&repo, &["-q", "commit", p(&f)]), "commit");
    succeeded(&run(&repo, &["forget", &old]), "forget");
    /// A live process standing for the lease holder, killed however the test ends.
    struct Holder(Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut holder = Holder(Command::new("sleep").arg("60").spawn().expect("spawn sleep"));
    let holder_pid = holder.0.id();
    insert_lease(&repo, &hostname(), holder_pid, now_ns());
    // The holder in one of its write transactions as well, held until this gc returns: it must be told from
    // the lease it can read, not wait out the lock (which ended in "database is locked", exit 1).
    let lock = rusqlite::Connection::open(repo.join("catalog.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let o = run(&repo, &["gc"]);
    lock.execute_batch("ROLLBACK").unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "gc while the lease is held: {err}");
    assert!(err.contains("another gc is running") && err.contains(&holder_pid.to_string()), "{err}");
    assert_eq!(table_count(&repo, "condemned"), 0);
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let s = gc_cli(&repo);
    assert!(s["chunks_swept"].as_u64().unwrap() > 0, "{s}");
    audit(&repo).assert_clean("after gc took the lease over");
}

// ---------------------------------------------------------------------------------------------------------------
// 4 and 5. GC processes killed, and racing
// ---------------------------------------------------------------------------------------------------------------

/// Builds, at `dir`, a repository where GC has much to do and checkouts little: small chunks (4 KiB) in 1 MiB
/// packs; a 24 MiB image A and a version B of it are forgotten, while the kept C (every fourth 512 KiB block of
/// A, so that each of A's packs stays a quarter live and must be rewritten), D (C partly rewritten) and a
/// second path stay. Returns the kept checkpoints with their data.
fn build_gc_work(dir: &Path) -> Vec<(String, Vec<u8>)> {
    const BLOCK: usize = 512 * 1024;
    let params = RepoParams {
        pack_target_size: 1 << 20,
        chunk_min: 1024,
        chunk_avg: 4096,
        chunk_max: 16384,
        ..Default::default()
    };
    let repo = Repository::init_with(dir, params).unwrap();
    let commit =
        |name: &str, data: &[u8]| repo.commit_reader(name, &mut &data[..], &CommitOptions::default()).unwrap().id;
    let a = pseudo_random(24 * MIB, 0x1a);
    let mut b = a.clone();
    rewrite_blocks(&mut b, 0x1b, |i| i % 2 == 1);
    let c: Vec<u8> = a.chunks(BLOCK).skip(2).step_by(4).flatten().copied().collect();
    let mut d = c.clone();
    rewrite_blocks(&mut d, 0x1d, |i| i % 3 == 1);
    let other = pseudo_random(MIB, 0x1e);
    let ids: Vec<String> = [&a, &b, &c, &d].iter().map(|x| commit("image.bin", x)).collect();
    let other_id = commit("other.bin", &other);
    repo.forget(&[&ids[0], &ids[1]]).unwrap();
    vec![(ids[2].clone(), c), (ids[3].clone(), d), (other_id, other)]
}

/// `snapstore gc` is SIGKILLed at moments spread over its whole run. After each kill the kept checkpoints
/// check out, the next `snapstore gc` succeeds by itself (taking over the dead GC's lease), and leaves the
/// repository clean: no pack missing, no orphan file, nothing unreachable.
#[test]
fn gc_killed_at_any_instant_loses_nothing_and_the_next_gc_finishes() {
    let n = env_num("SNAPSTORE_GC_KILLS", 10) as usize;
    let started = Instant::now();
    let t = tmp();
    let template = t.path().join("template");
    let kept = build_gc_work(&template);
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();

    // One uninterrupted GC sets the window and the expected end state.
    let mut window = Duration::MAX;
    let timing = t.path().join("timing");
    let mut full = serde_json::Value::Null;
    for _ in 0..2 {
        let _ = fs::remove_dir_all(&timing);
        copy_dir(&template, &timing);
        let s = Instant::now();
        full = gc_cli(&timing);
        window = window.min(s.elapsed());
    }
    assert!(full["packs_rewritten"].as_u64().unwrap() > 0, "{full}");
    let end_bytes = disk_pack_bytes(&timing);
    let end_chunks = table_count(&timing, "chunks");
    audit(&timing).assert_clean("uninterrupted gc");

    let measured = window;
    let mut rng = Rng(0x6c_4b11_ed00_0001);
    let (mut killed, mut finished, mut lease_left, mut garbage_left) = (0, 0, 0, 0);
    for i in 0..n {
        let dir = t.path().join(format!("kill{i}"));
        copy_dir(&template, &dir);
        let delay = window.mul_f64(1.05 * (i as f64 + rng.unit()) / n as f64);
        let mut child = spawn(&dir, &["gc"]);
        let spawned = Instant::now();
        // Sleep in small steps: a gc that ends first tells how long a gc takes now (the machine's load
        // changes while tests run), and later kills aim at that.
        while spawned.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                window = window.min(spawned.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        if out.status.success() {
            finished += 1;
        } else {
            assert_eq!(out.status.signal(), Some(9), "kill {i}: gc failed by itself: {err}");
            killed += 1;
        }
        lease_left += table_count(&dir, "gc_lease");
        let a = audit(&dir);
        a.assert_sound(&format!("kill {i} after {delay:?}"));
        garbage_left += usize::from(!a.garbage.is_empty());
        let r = Repository::open(&dir).unwrap();
        for (id, data) in &kept {
            let got = checkout_file(&r, id, &scratch).unwrap_or_else(|e| panic!("kill {i} after {delay:?}: {e}"));
            assert!(got == *data, "kill {i} after {delay:?}: checkpoint {} differs", &id[..12]);
        }

        // The next gc needs no manual step.
        let o = run(&dir, &["--json", "gc"]);
        let next = succeeded(&o, &format!("gc after kill {i} (after {delay:?})"));
        let _: serde_json::Value = serde_json::from_str(&next).unwrap();
        let a = audit(&dir);
        a.assert_clean(&format!("gc after kill {i} (after {delay:?})"));
        assert_eq!(table_count(&dir, "chunks"), end_chunks, "kill {i}: the same chunks live as after one full gc");
        let bytes = disk_pack_bytes(&dir);
        assert!(
            bytes as f64 <= end_bytes as f64 * 1.10,
            "kill {i}: {bytes} pack bytes, one full gc leaves {end_bytes}"
        );
        let (id, data) = &kept[i % kept.len()];
        assert!(checkout_file(&r, id, &scratch).unwrap() == *data, "kill {i}: {} differs after gc", &id[..12]);
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!(
        "gc kill test: {n} kills over a {measured:?} window (at the end {window:?}); {killed} killed, {finished} \
         had finished; {lease_left} leases and {garbage_left} repositories with leftovers taken over by the next \
         gc; total {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Two `snapstore gc` started together: one runs; the other exits 5 saying another gc is running, or, if it
/// only got the lease after the first had finished, succeeds with nothing left to do.
#[test]
fn two_gcs_at_once_exclude_each_other() {
    let t = tmp();
    let template = t.path().join("template");
    let kept = build_gc_work(&template);
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let mut busy = 0;
    for round in 0..3 {
        let dir = t.path().join(format!("race{round}"));
        copy_dir(&template, &dir);
        let children = [spawn(&dir, &["--json", "gc"]), spawn(&dir, &["--json", "gc"])];
        let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let mut summaries = Vec::new();
        for o in &outs {
            let err = text(&o.stderr);
            assert!(!err.contains("panicked"), "{err}");
            match o.status.code() {
                Some(0) => summaries.push(serde_json::from_str::<serde_json::Value>(&text(&o.stdout)).unwrap()),
                Some(5) => {
                    assert!(err.contains("another gc is running"), "exit 5 must say why: {err}");
                    busy += 1;
                }
                other => panic!("round {round}: gc exited {other:?}: {err}"),
            }
        }
        assert!(!summaries.is_empty(), "round {round}: neither gc succeeded");
        if summaries.len() == 2 {
            // They cannot both have done the work: one ran after the other.
            let idle = summaries.iter().filter(|s| s["chunks_condemned"] == 0 && s["bytes_freed"] == 0).count();
            assert!(idle >= 1, "round {round}: both gcs did work at once: {summaries:?}");
        }
        audit(&dir).assert_clean(&format!("round {round}"));
        let r = Repository::open(&dir).unwrap();
        for (id, data) in &kept {
            assert!(checkout_file(&r, id, &scratch).unwrap() == *data, "round {round}: {} differs", &id[..12]);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("two gcs at once: {busy} of 3 rounds had one gc refused with exit 5");
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Commits, forgets and GCs in many processes at once
// ---------------------------------------------------------------------------------------------------------------

/// File name → hash of its content.
type Manifest = BTreeMap<String, ObjectId>;

/// Replaces a file by a new one (new inode), so a commit can never take it for unchanged.
fn replace_file(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, data).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A failed command's exit is "clear" when it is one `error:` line (and perhaps a hint) with a documented exit
/// code, no panic, no claim of damaged data, and no internal error leaking out: a raw SQLite error
/// ("catalog: UNIQUE constraint failed ...") or a chunk-store I/O error tells the user nothing they can act on.
fn clear_failure(o: &Output) -> bool {
    let err = text(&o.stderr);
    matches!(o.status.code(), Some(1 | 2 | 4 | 5))
        && err.starts_with("error: ")
        && !err.contains("panicked")
        && !err.starts_with("error: catalog:")
        && !err.starts_with("error: chunk store")
        && !err.starts_with("error: internal error")
}

/// What the reader of `commits_forgets_and_gcs_at_once_lose_nothing` saw.
#[derive(Default)]
struct ReadTally {
    /// Checkouts into a fresh directory that succeeded (and matched).
    fresh: u64,
    /// In-place checkouts into the one persistent directory that succeeded (and matched).
    in_place: u64,
    /// Checkouts refused, of checkpoints forgotten by then.
    refused: u64,
    /// `verify` runs, each clean while GC deleted packs under it.
    verified: u64,
}

#[derive(Default)]
struct GcTally {
    runs: u64,
    busy: u64,
    swept: u64,
    deferred_runs: u64,
    rewritten: u64,
    deleted: u64,
    orphans: u64,
}

/// Three `snapstore commit` processes in a loop, each on its own directory whose data changes every round
/// (with a file shared by all writers, cycling through variants, so deduplication crosses processes and
/// reaches chunks being condemned; and a file left unchanged for rounds, reused from the parent); one process
/// loop forgetting (`--keep-last 2`, and now and then the newest checkpoint of a writer, the parent of its
/// running commit); two `snapstore gc` loops. Afterwards every listed checkpoint checks out as committed, and
/// a final GC leaves nothing unreachable, no orphan file and no missing pack.
///
/// Meanwhile a reader checks out random checkpoints with `snapstore checkout`, into fresh directories and
/// (every third read) in place into one persistent directory: a checkout that succeeds holds exactly what was
/// committed, and one that fails fails clearly and only for a checkpoint forgotten by then. Every fifth time it
/// runs `verify` instead, which must find nothing wrong while GC deletes packs under it.
#[test]
fn commits_forgets_and_gcs_at_once_lose_nothing() {
    const WRITERS: usize = 3;
    const BLOCK: usize = 512 * 1024;
    let secs = env_num("SNAPSTORE_GC_STRESS_SECS", 10);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let t = tmp();
    let repo = t.path().join("repo");
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    // 1 MiB packs: each commit publishes several packs and writes a catalog batch for each.
    drop(Repository::init_with(&repo, RepoParams { pack_target_size: 1 << 20, ..Default::default() }).unwrap());
    let dirs: Vec<PathBuf> = (0..WRITERS).map(|w| t.path().join(format!("writer{w}"))).collect();

    let committed: Mutex<BTreeMap<String, (usize, Manifest)>> = Mutex::new(BTreeMap::new());
    // In commit order: most checkpoints are soon forgotten, so the reader favours the newest to read live ones.
    let recent: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let read_failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let commit_failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let other_failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let tally = Mutex::new(GcTally::default());
    let stop = AtomicBool::new(false);
    let forgets = AtomicUsize::new(0);

    let reads = std::thread::scope(|s| {
        let mut writers = Vec::new();
        for (w, dir) in dirs.iter().enumerate() {
            let (repo, committed, recent, commit_failures) = (&repo, &committed, &recent, &commit_failures);
            writers.push(s.spawn(move || {
                fs::create_dir_all(dir).unwrap();
                let mut gens = [0u64; 8];
                let mut shared_variant = u64::MAX;
                let mut manifest = Manifest::new();
                let mut round = 0u64;
                while Instant::now() < deadline {
                    // Shared by all writers: the variant follows the clock, so writers agree on it; the three
                    // variants come back, after the checkpoints holding them were forgotten and collected.
                    let variant = (started.elapsed().as_millis() / 1500) as u64 % 3;
                    if variant != shared_variant {
                        shared_variant = variant;
                        let data = pseudo_random(MIB, 0x5_0000 + variant * 2);
                        replace_file(&dir.join("shared.bin"), &data);
                        manifest.insert("shared.bin".into(), ObjectId::of(&data));
                    }
                    // Two of eight blocks rewritten each round.
                    for j in [(2 * round) % 8, (2 * round + 1) % 8] {
                        gens[j as usize] = round + 1;
                    }
                    let own: Vec<u8> = (0..8)
                        .flat_map(|j| pseudo_random(BLOCK, (w as u64) << 40 ^ (j as u64) << 32 ^ gens[j] << 1 ^ 0x77))
                        .collect();
                    replace_file(&dir.join("own.bin"), &own);
                    manifest.insert("own.bin".into(), ObjectId::of(&own));
                    // Unchanged for six rounds at a time: its content is reused from the parent checkpoint.
                    if round.is_multiple_of(6) {
                        let data = pseudo_random(2 * MIB, (w as u64) << 40 ^ round << 1 ^ 0x99);
                        replace_file(&dir.join("keep.bin"), &data);
                        manifest.insert("keep.bin".into(), ObjectId::of(&data));
                    }
                    let note = format!("writer {w} round {round}\n");
                    replace_file(&dir.join("note.txt"), note.as_bytes());
                    manifest.insert("note.txt".into(), ObjectId::of(note.as_bytes()));

                    let o = run(repo, &["-q", "commit", p(dir)]);
                    if o.status.success() {
                        let out = text(&o.stdout);
                        let id = out.lines().last().unwrap_or_default().trim().to_string();
                        assert_eq!(id.len(), 64, "commit -q printed {out:?}");
                        committed.lock().unwrap().insert(id.clone(), (w, manifest.clone()));
                        recent.lock().unwrap().push(id);
                    } else {
                        commit_failures.lock().unwrap().push(format!(
                            "writer {w} round {round}: exit {:?}{}: {}",
                            o.status.code(),
                            if clear_failure(&o) { "" } else { " (NOT a clear failure)" },
                            text(&o.stderr).trim()
                        ));
                    }
                    round += 1;
                }
            }));
        }
        for _ in 0..2 {
            let (repo, stop, tally, other_failures) = (&repo, &stop, &tally, &other_failures);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let o = run(repo, &["--json", "gc"]);
                    match o.status.code() {
                        Some(0) => {
                            let v: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
                            let n = |k: &str| v[k].as_u64().unwrap();
                            let mut t = tally.lock().unwrap();
                            t.runs += 1;
                            t.swept += n("chunks_swept");
                            t.deferred_runs += u64::from(n("chunks_deferred") > 0);
                            t.rewritten += n("packs_rewritten");
                            t.deleted += n("packs_deleted");
                            t.orphans += n("orphans_deleted");
                        }
                        Some(5) if text(&o.stderr).contains("another gc is running") => tally.lock().unwrap().busy += 1,
                        _ => other_failures.lock().unwrap().push(format!(
                            "gc: exit {:?}: {}",
                            o.status,
                            text(&o.stderr).trim()
                        )),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        {
            let (repo, stop, other_failures, forgets, dir0) = (&repo, &stop, &other_failures, &forgets, &dirs[0]);
            s.spawn(move || {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let o = run(repo, &["-q", "forget", "--keep-last", "2"]);
                    if !o.status.success() {
                        other_failures.lock().unwrap().push(format!(
                            "forget --keep-last 2: {:?}: {}",
                            o.status,
                            text(&o.stderr)
                        ));
                    }
                    if k % 3 == 2 {
                        // The newest checkpoint of writer 0: the parent its running commit started from.
                        let log: serde_json::Value =
                            serde_json::from_str(&succeeded(&run(repo, &["--json", "log"]), "log")).unwrap();
                        let newest = log
                            .as_array()
                            .unwrap()
                            .iter()
                            .find(|c| c["path"] == p(dir0))
                            .map(|c| c["id"].as_str().unwrap().to_string());
                        if let Some(id) = newest {
                            let o = run(repo, &["-q", "forget", &id]);
                            match o.status.code() {
                                Some(0) => {
                                    forgets.fetch_add(1, Ordering::Relaxed);
                                }
                                Some(4) => {}
                                _ => other_failures.lock().unwrap().push(format!(
                                    "forget {id}: {:?}: {}",
                                    o.status,
                                    text(&o.stderr)
                                )),
                            }
                        }
                    }
                    k += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let reader = {
            let (repo, committed, recent, read_failures, scratch) =
                (&repo, &committed, &recent, &read_failures, &scratch);
            s.spawn(move || read_while_writing(repo, committed, recent, read_failures, scratch, deadline))
        };
        // Stop the loops whatever the writers did, then let a writer's panic through.
        let joined: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for j in joined {
            if let Err(panic) = j {
                std::panic::resume_unwind(panic);
            }
        }
        reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    let busy_secs = started.elapsed().as_secs_f64();

    let other_failures = other_failures.into_inner().unwrap();
    assert!(other_failures.is_empty(), "gc or forget failed:\n{}", other_failures.join("\n"));
    let read_failures = read_failures.into_inner().unwrap();
    assert!(
        read_failures.is_empty(),
        "checkouts during the stress went wrong ({} fresh and {} in place matched, {} refused as forgotten):\n{}",
        reads.fresh,
        reads.in_place,
        reads.refused,
        read_failures.join("\n")
    );
    assert!(
        reads.fresh > 0 && reads.in_place > 0,
        "the reader checked out too little: {} fresh, {} in place",
        reads.fresh,
        reads.in_place
    );
    let commit_failures = commit_failures.into_inner().unwrap();
    let committed = committed.into_inner().unwrap();
    let tally = tally.into_inner().unwrap();
    for w in 0..WRITERS {
        let n = committed.values().filter(|(cw, _)| *cw == w).count();
        assert!(n >= 3, "writer {w} completed only {n} commits in {secs} s");
    }
    assert!(
        tally.runs >= 3 && tally.swept > 0,
        "the gc loops did too little: {} runs, {} chunks swept",
        tally.runs,
        tally.swept
    );

    // Every listed checkpoint was reported committed and holds what was committed.
    let r = Repository::open(&repo).unwrap();
    let verify_all = |when: &str| {
        let ids = listed(&repo);
        assert!(!ids.is_empty());
        let mut bad = Vec::new();
        for id in &ids {
            let Some((w, m)) = committed.get(id) else {
                bad.push(format!("checkpoint {id} is listed but no commit reported it"));
                continue;
            };
            match checkout_tree(&r, id, &scratch) {
                Ok(got) if got == *m => {}
                Ok(got) => bad.push(format!("writer {w}'s checkpoint {}: holds {got:?}, committed {m:?}", &id[..12])),
                Err(e) => bad.push(format!("writer {w}'s checkpoint: {e}")),
            }
        }
        assert!(bad.is_empty(), "{when}:\n{}", bad.join("\n"));
        ids.len()
    };
    let kept = verify_all("after the stress");
    let a = audit(&repo);
    a.assert_sound("after the stress");
    assert_eq!(a.condemned_reachable, 0, "with every writer finished, nothing reachable may stay condemned");

    // A final gc cleans everything; a second one finds nothing.
    let last = gc_cli(&repo);
    assert_eq!(last["sessions_alive"], 0, "{last}");
    let a = audit(&repo);
    a.assert_clean("after the final gc");
    assert_eq!(a.chunks, a.reachable_chunks);
    let again = gc_cli(&repo);
    assert_eq!((again["chunks_condemned"].as_u64(), again["bytes_freed"].as_u64()), (Some(0), Some(0)), "{again}");
    verify_all("after the final gc");

    eprintln!(
        "gc stress: {busy_secs:.1} s; {} commits reported ({} failed{}), {kept} kept; {} forgets of a running \
         commit's parent; gc: {} runs, {} refused (busy), {} swept chunks, {} runs deferring, {} packs rewritten, \
         {} deleted, {} orphans removed; checkouts: {} fresh and {} in place identical, {} of forgotten checkpoints \
         refused, {} clean verifies; final gc {last}; total {:.1} s",
        committed.len(),
        commit_failures.len(),
        if commit_failures.is_empty() {
            String::new()
        } else {
            format!(":\n  {}\n", commit_failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n  "))
        },
        forgets.load(Ordering::Relaxed),
        tally.runs,
        tally.busy,
        tally.swept,
        tally.deferred_runs,
        tally.rewritten,
        tally.deleted,
        tally.orphans,
        reads.fresh,
        reads.in_place,
        reads.refused,
        reads.verified,
        started.elapsed().as_secs_f64()
    );
    let unclear: Vec<&String> = commit_failures.iter().filter(|f| f.contains("NOT a clear failure")).collect();
    assert!(
        unclear.is_empty(),
        "{} commits failed without a clear message, first ones:\n{}",
        unclear.len(),
        unclear.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
}

/// The reader of `commits_forgets_and_gcs_at_once_lose_nothing`: until `deadline`, checks out a random
/// committed checkpoint (half the time one of the eight newest) with the CLI into a fresh directory. Every
/// third checkout instead goes in place (`--in-place --delete`) into one persistent directory, so it patches
/// whatever the checkouts before it left there, failed ones included.
fn read_while_writing(
    repo: &Path,
    committed: &Mutex<BTreeMap<String, (usize, Manifest)>>,
    recent: &Mutex<Vec<String>>,
    failures: &Mutex<Vec<String>>,
    scratch: &Path,
    deadline: Instant,
) -> ReadTally {
    let mut rng = Rng(0x7ead_e125);
    let mut tally = ReadTally::default();
    let persistent = scratch.join("in-place");
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        if n.is_multiple_of(5) {
            // Verify reads packs that GC may delete meanwhile: a pack gone with its row is no damage.
            let o = run(repo, &["-q", "verify"]);
            if o.status.success() {
                tally.verified += 1;
            } else {
                failures.lock().unwrap().push(format!(
                    "verify during the stress: exit {:?}: {}{}",
                    o.status.code(),
                    text(&o.stdout),
                    text(&o.stderr)
                ));
            }
            continue;
        }
        let in_place = n.is_multiple_of(3);
        let pick = {
            let committed = committed.lock().unwrap();
            let recent = recent.lock().unwrap();
            // Any writer's, in place too: files of different writers are written at once with the same size, and
            // file clocks here tick every few milliseconds, so a file an interrupted in-place checkout placed can
            // carry the size and mtime of the one it replaced. Checkout forgets the record of what was checked
            // out before it changes anything, so such a file is hashed, never trusted.
            let ids: Vec<&String> = if rng.next().is_multiple_of(2) {
                recent.iter().rev().take(8).collect()
            } else {
                committed.keys().collect()
            };
            (!ids.is_empty()).then(|| {
                let id = ids[rng.range(0, ids.len())];
                (id.clone(), committed[id].clone())
            })
        };
        let Some((id, (w, manifest))) = pick else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let dest = if in_place { persistent.clone() } else { scratch.join(format!("read-{n}")) };
        let mut args = vec!["-q", "checkout", &id, p(&dest)];
        if in_place {
            args.extend(["--in-place", "--delete"]);
        }
        let o = run(repo, &args);
        let what = format!("{} checkout of writer {w}'s {}", if in_place { "in-place" } else { "fresh" }, &id[..12]);
        let err = text(&o.stderr);
        let got = if dest.exists() { tree_hashes(&dest) } else { Manifest::new() };
        if o.status.success() {
            if got == manifest {
                *(if in_place { &mut tally.in_place } else { &mut tally.fresh }) += 1;
            } else {
                failures.lock().unwrap().push(format!("{what} succeeded but holds {got:?}, committed {manifest:?}"));
            }
        } else if listed(repo).contains(&id) {
            failures.lock().unwrap().push(format!(
                "{what} failed though the checkpoint is still listed: exit {:?}: {}",
                o.status,
                err.trim()
            ));
        } else if !clear_failure(&o)
            || o.status.code() != Some(4)
            || !(err.contains("was forgotten while it was being read") || err.contains("no checkpoint matches"))
        {
            failures.lock().unwrap().push(format!(
                "{what} failed as the checkpoint was forgotten, but not clearly: exit {:?}: {}",
                o.status,
                err.trim()
            ));
        } else {
            tally.refused += 1;
        }
        if !in_place {
            // A failed checkout removes what it created: nothing with other bytes may stay behind.
            let wrong: Vec<&String> = got.iter().filter(|(f, h)| manifest.get(*f) != Some(h)).map(|(f, _)| f).collect();
            if !o.status.success() && !wrong.is_empty() {
                failures.lock().unwrap().push(format!("{what} failed and left {wrong:?} with other bytes"));
            }
            let _ = fs::remove_dir_all(&dest);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tally
}

// ---------------------------------------------------------------------------------------------------------------
// Pack names: content-addressed packs meet GC
// ---------------------------------------------------------------------------------------------------------------

/// A commit that stores again chunks GC condemned (W1: a condemned chunk counts as absent) writes, for the same
/// data, a pack byte-identical to the old one — the same content-derived name. Recording it must not fail.
#[test]
fn storing_condemned_chunks_again_does_not_collide_with_their_old_pack() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let data = pseudo_random(2 * MIB, 0x61);
    let x = repo.commit_reader("x.bin", &mut &data[..], &CommitOptions::default()).unwrap();
    // A writer older than the next mark is running (this process), so what GC condemns now is deferred.
    insert_session(repo.path(), &hostname(), std::process::id(), now_ns());
    repo.forget(&[&x.id]).unwrap();
    let g = gc(&repo);
    assert!(g.chunks_deferred > 0 && g.chunks_swept == 0, "{g:?}");
    let packs: Vec<String> = pack_files(repo.path());

    // The same data again, as another file: its chunks are condemned, so they are stored again.
    let y = repo.commit_reader("y.bin", &mut &data[..], &CommitOptions::default());
    let y = y
        .unwrap_or_else(|e| panic!("committing data whose chunks are condemned failed: {e} (packs before: {packs:?})"));
    assert_eq!(y.bytes_new, data.len() as u64);
    let cat = crate::util::catalog_rw(&repo).unwrap();
    cat.connection().execute("DELETE FROM sessions", []).unwrap();
    gc(&repo);
    assert_checks_out(&repo, &y.id, &data, &scratch);
    audit(repo.path()).assert_clean("after gc");
}

/// GC drops the row of a pack no chunk uses, commits, then deletes the file. A commit that stores the same
/// chunks again in between writes a pack with the same content, hence the same name, and records it: GC's
/// deletion must not take that commit's pack with it.
#[test]
fn a_pack_stored_again_while_gc_deletes_its_namesake_is_not_lost() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let data = pseudo_random(2 * MIB, 0x71);
    let x = repo.commit_reader("x.bin", &mut &data[..], &CommitOptions::default()).unwrap();
    let keep = pseudo_random(MIB, 0x73);
    let k = repo.commit_reader("k.bin", &mut &keep[..], &CommitOptions::default()).unwrap();
    repo.forget(&[&x.id]).unwrap();

    let (reached_tx, reached_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    // The first removal of a pack waits until released: holds GC between the transaction that drops the
    // pack's row and the deletion of its file.
    let (reached, release) = (Mutex::new(Some(reached_tx)), Mutex::new(release_rx));
    let backend = Hooked {
        on_remove: Box::new(move |name| {
            if name.starts_with("packs/")
                && let Some(tx) = reached.lock().unwrap().take()
            {
                let _ = tx.send(name.to_string());
                let _ = release.lock().unwrap().recv();
            }
        }),
        ..Hooked::new(repo.path())
    };
    let gc_repo = Repository::open_with(repo.path(), Arc::new(backend)).unwrap();
    let collector = std::thread::spawn(move || gc_repo.gc(&GcOptions::default()));
    let removing = reached_rx.recv_timeout(Duration::from_secs(60)).expect("gc reached the deletion of a pack");

    // Meanwhile, the same data is committed again: its chunks are gone from the index, so they are stored.
    let y = repo.commit_reader("y.bin", &mut &data[..], &CommitOptions::default()).unwrap();
    assert_eq!(y.bytes_new, data.len() as u64);
    let y_packs: Vec<String> = {
        let cat = crate::util::catalog_rw(&repo).unwrap();
        let mut stmt = cat.connection().prepare("SELECT name FROM packs").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    release_tx.send(()).unwrap();
    let g = collector.join().unwrap().unwrap();
    assert!(g.packs_deleted >= 1, "{g:?}");

    let result = checkout_file(&repo, &y.id, &scratch);
    let a = audit(repo.path());
    assert!(
        result.as_deref() == Ok(&data[..]) && a.problems.is_empty(),
        "gc deleted {removing} while a commit recorded a pack of that name (its packs: {y_packs:?}); the new \
         checkpoint then {}; audit: {:?}",
        match &result {
            Ok(d) if *d == data => "checks out".to_string(),
            Ok(_) => "checks out wrong".to_string(),
            Err(e) => format!("fails: {e}"),
        },
        a.problems
    );
    assert_checks_out(&repo, &k.id, &keep, &scratch);
}

/// The same root cause without any GC: two commits storing the same new chunks at the same time each write a
/// pack of identical bytes, hence of one name; the second to record it must not fail.
#[test]
fn two_commits_storing_the_same_new_chunks_at_once_both_succeed() {
    let t = tmp();
    let scratch = t.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    // The streams end with data already stored, so that their last chunk (cut only at the end of the stream,
    // after the gate) is found present by both, and both packs hold exactly the new chunks before it.
    let tail = pseudo_random(MIB, 0x91);
    repo.commit_reader("tail.bin", &mut &tail[..], &CommitOptions::default()).unwrap();
    let mut data = pseudo_random(3 * MIB, 0x93);
    data.extend_from_slice(&tail);
    let mut gates = Vec::new();
    let mut writers = Vec::new();
    for name in ["one.bin", "two.bin"] {
        let (blocked_tx, blocked_rx) = mpsc::channel();
        let (rest_tx, rest_rx) = mpsc::channel::<Vec<u8>>();
        let (path, first) = (repo.path().to_path_buf(), data.clone());
        writers.push(std::thread::spawn(move || {
            let r = Repository::open(&path).unwrap();
            let mut reader =
                GatedReader { first, pos: 0, blocked: Some(blocked_tx), rest: rest_rx, tail: None, tail_pos: 0 };
            r.commit_reader(name, &mut reader, &CommitOptions::default())
        }));
        gates.push((blocked_rx, rest_tx));
    }
    for (blocked, _) in &gates {
        blocked.recv_timeout(Duration::from_secs(60)).expect("a commit reached the end of its stream");
    }
    // Both have looked up and packed every chunk but the last.
    std::thread::sleep(Duration::from_millis(300));
    let mut results = Vec::new();
    for ((_, rest), w) in gates.into_iter().zip(writers) {
        drop(rest); // end of stream
        results.push(w.join().unwrap());
    }
    for r in &results {
        let s = r.as_ref().unwrap_or_else(|e| panic!("a commit of data another commit stored meanwhile failed: {e}"));
        assert_checks_out(&repo, &s.id, &data, &scratch);
    }
}

/// A damaged pack due for a merge is left as it is and named, every other small pack is still merged and gc
/// exits with code 3; `--max-unused 100` rewrites nothing.
#[test]
fn a_damaged_small_pack_is_left_out_of_the_merge() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let pack_files = || pack_files(repo.path());
    let held = commit_states(&repo, 12, |i| 20_000 + i as usize * 100, |i| 2 * i);
    let none = gc_cli_args(repo.path(), &["--max-unused", "100"]);
    assert_eq!(none["packs_rewritten"], 0, "{none}");
    assert_eq!(pack_files().len(), 12);

    let damaged = pack_files()[3].clone();
    corrupt_pack_blob(&repo.path().join(&damaged), 0.5);
    let out = run(repo.path(), &["--json", "gc"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["damaged_packs"][0]["pack"], damaged, "{s}");
    assert_eq!(s["damaged_packs"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(s["packs_rewritten"], 11, "{s}");
    let left = pack_files();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&damaged));
    assert_eq!(not_restored(&repo, &held, t.path()), 1, "only the checkpoint in the damaged pack is lost");

    // Two small packs are too few to merge: the next gc has nothing to rewrite and succeeds.
    let again = gc_cli(repo.path());
    assert_eq!(again["packs_rewritten"], 0, "{again}");
    assert_eq!(pack_files(), left);
}

/// A damaged blob near the end of a pack of several chunks: the sound blobs before and after it move, the
/// pack keeps only the damaged one's row, and only the checkpoint that needs it is lost. A pack that has
/// gone missing is reported the same way, not as a failed GC.
#[test]
fn a_damaged_pack_keeps_only_what_cannot_be_copied() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let held = commit_states(&repo, 9, |i| 400_000 + i as usize * 1000, |i| 2 * i + 100);
    let damaged = pack_files(repo.path())[4].clone();
    let rows_in = |pack: &str| -> i64 {
        let cat = crate::util::catalog_rw(&repo).unwrap();
        cat.connection()
            .query_row("SELECT count(*) FROM chunks c JOIN packs p ON c.pack = p.id WHERE p.name = ?1", [pack], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let rows_before = rows_in(&damaged);
    assert!(rows_before >= 4, "a pack of several chunks: {rows_before}");
    corrupt_pack_blob(&repo.path().join(&damaged), 0.95);
    let out = run(repo.path(), &["--json", "gc"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["damaged_packs"][0]["pack"], damaged, "{s}");
    assert!(
        s["damaged_packs"][0]["problem"].as_str().unwrap().contains("live blobs failing their hash or cut short: 1 of"),
        "{s}"
    );
    assert_eq!(rows_in(&damaged), 1, "only the damaged blob's row stays in the damaged pack");
    assert_eq!(not_restored(&repo, &held, t.path()), 1, "only the checkpoint that needs the damaged blob is lost");

    // The pack gone altogether, with more small packs to merge: reported, everything else collected.
    for i in 0..8u64 {
        repo.commit_reader("other.bin", &mut &pseudo_random(400_000, 2 * i + 300)[..], &Default::default()).unwrap();
    }
    fs::remove_file(repo.path().join(&damaged)).unwrap();
    let out = run(repo.path(), &["gc"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("damaged pack {damaged}: missing")), "{}", text(&out.stderr));
}

/// A live blob that GC finds damaged while it rewrites a pack is marked, so the next commit of the same data
/// stores it afresh (reading the file though its stat is unchanged); the pack is then collected as usual and
/// every checkpoint using the chunk checks out byte for byte again.
#[test]
fn a_blob_gc_finds_damaged_is_stored_afresh_by_the_next_commit() {
    let t = tmp();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let x = pseudo_random(MIB, 61);
    fs::write(src.join("x.bin"), &x).unwrap();
    fs::write(src.join("y.bin"), pseudo_random(MIB, 62)).unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let first = repo.commit(&src, &CommitOptions::default()).unwrap().id;
    fs::remove_file(src.join("y.bin")).unwrap();
    let kept = repo.commit(&src, &CommitOptions::default()).unwrap().id;
    repo.forget(&[&first]).unwrap();
    let victim = chunk_ids(&repo, &x)[3];
    let loc = crate::util::catalog_rw(&repo).unwrap().chunk_location(&victim).unwrap().unwrap();
    let pack = repo.path().join(&loc.pack);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[(loc.offset + loc.stored_len as u64 / 2) as usize] ^= 0x5a;
    fs::remove_file(&pack).unwrap();
    fs::write(&pack, bytes).unwrap();

    // y.bin's half of the pack is unused, so GC rewrites it and meets the damaged blob.
    let g = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(g.damaged_packs.len(), 1, "{g:?}");
    let marks: i64 = crate::util::catalog_rw(&repo)
        .unwrap()
        .connection()
        .query_row("SELECT count(*) FROM damaged_chunks WHERE id = ?1", [&victim.0[..]], |r| r.get(0))
        .unwrap();
    assert_eq!(marks, 1, "GC marked the blob it found damaged");

    let c = repo.commit(&src, &CommitOptions::default()).unwrap();
    assert_eq!((c.bytes_read, c.chunks_new), (MIB as u64, 1), "{c:?}");
    let g = gc(&repo);
    assert!(g.damaged_packs.is_empty(), "{g:?}");
    for id in [&kept, &c.id] {
        let dest = t.path().join(format!("out-{id}"));
        repo.checkout(id, &dest, &CheckoutOptions::default()).unwrap();
        assert_eq!(fs::read(dest.join("x.bin")).unwrap(), x);
    }
    let v = repo.verify(&snapstore::VerifyOptions { read_data: snapstore::DataSubset::All, ..Default::default() });
    assert!(v.unwrap().is_clean());
}

/// A checkpoint every few minutes of a few changed bytes writes a small pack each time; GC merges them once
/// there are enough, and every checkpoint still checks out byte for byte.
#[test]
fn small_packs_are_merged() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let pack_files = || pack_files(repo.path()).len();
    let held = commit_states(&repo, 12, |i| 20_000 + i as usize * 100, |i| 2 * i);
    assert_eq!(pack_files(), 12, "one small pack per commit");
    let dry = repo.gc(&GcOptions { dry_run: true, ..Default::default() }).unwrap();
    assert_eq!(dry.packs_rewritten, 12, "{dry:?}");
    assert_eq!(pack_files(), 12, "a dry run changes nothing");
    let s = gc(&repo);
    assert_eq!(s.packs_rewritten, 12, "{s:?}");
    assert_eq!(pack_files(), 1, "merged into one pack");
    for (id, data) in &held {
        assert_checks_out(&repo, id, data, t.path());
    }
    assert!(
        repo.verify(&snapstore::VerifyOptions { read_data: snapstore::DataSubset::All, ..Default::default() })
            .unwrap()
            .is_clean()
    );
    // A few more small packs are left alone until there are enough to be worth a rewrite.
    for i in 0..3u64 {
        repo.commit_reader("state.bin", &mut &pseudo_random(5_000, 200 + 2 * i)[..], &Default::default()).unwrap();
    }
    assert_eq!(gc(&repo).packs_rewritten, 0);
    assert_eq!(pack_files(), 4);
}

/// GC's last step shrinks the catalog's log without waiting for readers on older snapshots (a long `verify`
/// holds one): a truncating checkpoint that waited kept the write lock meanwhile, stopping every commit for up
/// to the busy timeout (two minutes). The 60 s below only tells a hang from a pass.
#[test]
fn gc_does_not_wait_for_a_reader_to_end() {
    let t = tmp();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    for seed in [3, 5, 7] {
        repo.commit_reader("s", &mut &pseudo_random(2 * MIB, seed)[..], &Default::default()).unwrap();
    }
    let kept = repo.checkpoints().unwrap().remove(0).id;
    let old: Vec<String> = repo.checkpoints().unwrap().into_iter().skip(1).map(|c| c.id).collect();
    repo.forget(&old.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let reader = rusqlite::Connection::open(repo.path().join("catalog.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    reader.query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0)).unwrap();
    let (tx, rx) = mpsc::channel();
    let path = repo.path().to_path_buf();
    std::thread::spawn(move || {
        tx.send(Repository::open(&path).unwrap().gc(&Default::default()).map(|s| s.chunks_swept))
    });
    let done = rx.recv_timeout(Duration::from_secs(60));
    drop(reader);
    let swept = done.expect("gc waited for the reader to end").unwrap();
    assert!(swept > 0);
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut repo.open_file(&kept, "s").unwrap(), &mut back).unwrap();
    assert!(back == pseudo_random(2 * MIB, 7));
}
