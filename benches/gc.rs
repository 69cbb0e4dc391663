//! Garbage collection of a repository with millions of chunks: its wall time and its peak memory.
//!
//! Run: `cargo bench --bench gc` (2 million chunks; `SNAPSTORE_GC_CHUNKS=200000` for a quick run).
//! `SNAPSTORE_BENCH_DIR` chooses where the repository goes (default: the system temp dir), and
//! `SNAPSTORE_GC_KEEP=1` leaves it there afterwards. `SNAPSTORE_GC_TRACE=1` traces the GC's resident memory
//! (a line whenever it moves by 1 MiB, and every 5 s).
//!
//! Chunks are made cheap with tiny chunk sizes (64/256/1024 bytes) over incompressible xorshift streams. Four
//! checkpoints are committed; each carries over a quarter of the 64 KiB blocks from the first half of the
//! one before, so some packs of the two checkpoints that are then forgotten still hold live chunks (GC rewrites
//! them) and the rest hold none (GC deletes them). `SNAPSTORE_GC_SCENARIO=rewrite` instead carries over 87 % of
//! all blocks, so that nearly every live chunk of the forgotten checkpoints' packs is moved: the worst case for
//! the rewrite. The GC, after a dry run, runs in a child process (this binary, re-executed with `--gc-child`)
//! so that its peak RSS (VmHWM) is its own.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapstore::{Chunker, CommitOptions, GcOptions, RepoParams, Repository};

/// Checkpoints committed; the older half is forgotten before GC.
const CHECKPOINTS: u64 = 4;
/// Unit of carry-over between consecutive checkpoints.
const BLOCK: usize = 64 << 10;

/// Which blocks of a checkpoint are copies of the previous checkpoint's.
#[derive(Clone, Copy)]
struct Carry {
    /// Chance, in percent, that a block in the carried range is a copy.
    percent: u64,
    /// The carried range is the whole stream, not its first half.
    whole: bool,
}

impl Carry {
    /// Share of a later checkpoint's blocks that are copies.
    fn share(self) -> f64 {
        self.percent as f64 / 100.0 * if self.whole { 1.0 } else { 0.5 }
    }
}

fn params() -> RepoParams {
    RepoParams { chunk_min: 64, chunk_avg: 256, chunk_max: 1024, ..Default::default() }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// One checkpoint's state image, generated block by block as it is read.
struct Stream {
    carry: Carry,
    checkpoint: u64,
    blocks: u64,
    next_block: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Stream {
    fn new(carry: Carry, checkpoint: u64, blocks: u64) -> Self {
        Stream { carry, checkpoint, blocks, next_block: 0, buf: Vec::new(), pos: 0 }
    }

    /// The checkpoint whose block `j` this checkpoint's block `j` is a copy of (itself if fresh).
    fn origin(&self, j: u64) -> u64 {
        let mut c = self.checkpoint;
        let in_range = self.carry.whole || j < self.blocks / 2;
        while c > 0 && in_range && splitmix(c << 32 ^ j) % 100 < self.carry.percent {
            c -= 1;
        }
        c
    }

    fn fill_block(&mut self, j: u64) {
        let mut x = splitmix(self.origin(j) << 40 ^ j ^ 0x5eed) | 1;
        self.buf.resize(BLOCK, 0);
        for word in self.buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        self.pos = 0;
    }
}

impl Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next_block == self.blocks {
                return Ok(0);
            }
            self.fill_block(self.next_block);
            self.next_block += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Average chunks per block, measured on a sample of fresh blocks.
fn chunks_per_block() -> f64 {
    let sample = 64;
    let mut chunker = Chunker::new(Stream::new(Carry { percent: 0, whole: false }, 0, sample), &params());
    let mut n = 0u64;
    while chunker.next_chunk().unwrap().is_some() {
        n += 1;
    }
    n as f64 / sample as f64
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The child: one GC (or dry run) on the repository at `path`; prints its summary and memory as JSON.
fn gc_child(path: &Path, dry_run: bool) {
    let repo = Repository::open(path).unwrap();
    let summary = repo.gc(&GcOptions { dry_run, ..Default::default() }).unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let memory: serde_json::Value = ["VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"]
        .iter()
        .map(|k| (k.to_string(), status_kib(&status, k).into()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    println!("{}", serde_json::json!({ "summary": summary, "memory_kib": memory }));
}

struct GcRun {
    summary: serde_json::Value,
    memory_kib: serde_json::Value,
    wall: f64,
}

/// Runs `--gc-child` as a separate process, sampling its resident memory while it runs.
fn run_child(path: &Path, dry_run: bool, trace: bool) -> GcRun {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("--gc-child").arg(path).stdout(Stdio::piped());
    if dry_run {
        cmd.arg("--dry-run");
    }
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let (mut last_print, mut last_rss) = (0.0, 0);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if trace && let Ok(status) = std::fs::read_to_string(&status_path) {
            let t = started.elapsed().as_secs_f64();
            let rss = status_kib(&status, "VmRSS");
            // A line whenever resident memory moved by 1 MiB, and every 5 s otherwise.
            if rss.abs_diff(last_rss) >= 1024 || t - last_print >= 5.0 {
                (last_print, last_rss) = (t, rss);
                println!(
                    "  t={t:6.1} s  RSS {:6.1} MiB (anon {:6.1}, file {:5.1}, shmem {:5.1})",
                    mib(rss),
                    mib(status_kib(&status, "RssAnon")),
                    mib(status_kib(&status, "RssFile")),
                    mib(status_kib(&status, "RssShmem")),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(if trace { 20 } else { 5 }));
    };
    let wall = started.elapsed().as_secs_f64();
    assert!(exit.success(), "gc child failed: {exit}");
    let line = BufReader::new(child.stdout.take().unwrap()).lines().last().unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    GcRun { summary: v["summary"].clone(), memory_kib: v["memory_kib"].clone(), wall }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

fn hash_reader(mut r: impl Read) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--gc-child") {
        gc_child(Path::new(&args[i + 1]), args.iter().any(|a| a == "--dry-run"));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // cargo bench -- --list
    }
    let target: u64 =
        std::env::var("SNAPSTORE_GC_CHUNKS").ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(2_000_000);
    let carry = match std::env::var("SNAPSTORE_GC_SCENARIO").as_deref() {
        Ok("rewrite") => Carry { percent: 87, whole: true },
        Ok("default") | Err(_) => Carry { percent: 25, whole: false },
        Ok(other) => panic!("unknown SNAPSTORE_GC_SCENARIO '{other}' (default or rewrite)"),
    };
    let keep = std::env::var_os("SNAPSTORE_GC_KEEP").is_some();
    let trace = std::env::var_os("SNAPSTORE_GC_TRACE").is_some();
    let dir = tempfile::Builder::new()
        .prefix("snapstore-gc-bench")
        .tempdir_in(
            std::env::var("SNAPSTORE_BENCH_DIR")
                .unwrap_or_else(|_| std::env::temp_dir().to_string_lossy().into_owned()),
        )
        .unwrap();
    let repo_dir = dir.path().join("repo");
    let repo = Repository::init_with(&repo_dir, params()).unwrap();

    // Unique chunks: the first checkpoint's blocks, then the fresh ones of each later checkpoint.
    let fresh_share = 1.0 + (CHECKPOINTS - 1) as f64 * (1.0 - carry.share());
    let blocks = (target as f64 / (chunks_per_block() * fresh_share)).ceil().max(2.0) as u64;
    println!(
        "generating {CHECKPOINTS} checkpoints of {blocks} blocks of {} KiB ({:.0} MiB each), about {target} chunks",
        BLOCK >> 10,
        (blocks * BLOCK as u64) as f64 / 1048576.0
    );
    let mut ids = Vec::new();
    let (mut commit_s, mut chunks_new) = (0.0, 0);
    for c in 0..CHECKPOINTS {
        let opts = CommitOptions { message: format!("checkpoint {c}"), ..Default::default() };
        let t = Instant::now();
        let s = repo.commit_reader("state.bin", &mut Stream::new(carry, c, blocks), &opts).unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  commit {c}: {} new chunks, {} reused, {secs:.1} s ({:.0} new chunks/s)",
            s.chunks_new,
            s.chunks_reused,
            s.chunks_new as f64 / secs
        );
        commit_s += secs;
        chunks_new += s.chunks_new;
        ids.push(s.id);
    }
    let before = repo.stats().unwrap();
    println!(
        "committed {} chunks in {commit_s:.1} s: {:.0} chunks/s, {:.1} MB/s of stream; catalog {:.0} MiB, {} packs",
        before.catalog.chunks,
        chunks_new as f64 / commit_s,
        (CHECKPOINTS * blocks * BLOCK as u64) as f64 / commit_s / 1e6,
        before.catalog_bytes as f64 / 1048576.0,
        before.catalog.packs
    );

    let forget: Vec<&str> = ids[..ids.len() / 2].iter().map(String::as_str).collect();
    repo.forget(&forget).unwrap();
    println!("forgot {} of {} checkpoints", forget.len(), ids.len());

    println!("gc --dry-run (child process)");
    let dry = run_child(&repo_dir, true, trace);
    println!(
        "  {} in {:.1} s, peak RSS {:.1} MiB",
        dry.summary,
        dry.wall,
        mib(dry.memory_kib["VmHWM"].as_u64().unwrap())
    );
    println!("gc (child process)");
    let gc = run_child(&repo_dir, false, trace);
    println!("  {} in {:.1} s, memory at exit {}", gc.summary, gc.wall, gc.memory_kib);
    let after = repo.stats().unwrap();

    // The oldest kept checkpoint holds chunks that GC moved out of rewritten packs: it must read back intact.
    let out = dir.path().join("checkout.bin");
    let kept = ids.len() / 2;
    repo.checkout(&ids[kept], &out, &Default::default()).unwrap();
    let same = hash_reader(std::fs::File::open(&out).unwrap()) == hash_reader(Stream::new(carry, kept as u64, blocks));
    std::fs::remove_file(&out).unwrap();
    assert!(same, "checkpoint {kept} differs after GC");

    let s = &gc.summary;
    let peak = mib(gc.memory_kib["VmHWM"].as_u64().unwrap());
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| chunks in repository (before GC) | {} |", before.catalog.chunks);
    println!("| chunks after GC | {} |", after.catalog.chunks);
    println!("| chunks condemned / swept | {} / {} |", s["chunks_condemned"], s["chunks_swept"]);
    println!(
        "| packs before GC / deleted / rewritten | {} / {} / {} |",
        before.catalog.packs, s["packs_deleted"], s["packs_rewritten"]
    );
    println!("| bytes freed | {:.1} MiB |", s["bytes_freed"].as_f64().unwrap() / 1048576.0);
    println!("| gc wall time (child process) | {:.1} s ({:.1} s inside gc) |", gc.wall, s["seconds"].as_f64().unwrap());
    println!("| gc peak RSS | {peak:.1} MiB |");
    println!(
        "| gc --dry-run wall time / peak RSS | {:.1} s / {:.1} MiB |",
        dry.wall,
        mib(dry.memory_kib["VmHWM"].as_u64().unwrap())
    );
    println!("| commit throughput (generation) | {:.0} chunks/s |", chunks_new as f64 / commit_s);
    println!(
        "| machine | {} threads, {} |",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model()
    );
    println!(
        "checkpoint {kept} verified after GC; peak RSS {} the 100 MiB bound",
        if peak < 100.0 { "within" } else { "EXCEEDS" }
    );
    if keep {
        println!("repository kept at {}", dir.keep().join("repo").display());
    }
}
