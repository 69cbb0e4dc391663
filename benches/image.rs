//! End-to-end: commit and check out a generated disk image, with scattered 4 KiB writes between versions.
//!
//! Run: `cargo bench --bench image` (1 GiB image; `SNAPSTORE_BENCH_MIB=256` for a smaller one).
//! It also rolls the image back in place across a 1 % change (and forward again) and compares the time and
//! the bytes written (the process's `wchar` in /proc/self/io) with a checkout into an empty directory.
//! `cargo bench --bench image -- --sweep` also compares average chunk sizes (the cost of a 4 KiB write
//! against throughput), which is how the default of 64 KiB was chosen.
//! Figures are in decimal MB/s of image bytes; the image is in the page cache, as a just-written one is.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use snapstore::{CheckoutOptions, CommitOptions, RepoParams, Repository};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A disk image's mix, 1 MiB extents at a time: 30 % never written (zeros), 35 % incompressible
/// (binaries, compressed files), 25 % text-like (logs, configs, databases), 10 % copies of earlier extents.
fn generate(path: &Path, mib: usize) {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let words: Vec<&[u8]> = [
        &b"error "[..],
        b"kernel: ",
        b"INSERT INTO t VALUES ",
        b"user=",
        b"GET /index.html ",
        b"\n",
        b"0x7fff",
        b"ok ",
    ]
    .into_iter()
    .collect();
    let mut extent = vec![0u8; 1 << 20];
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mib {
        match rng.next() % 100 {
            0..=29 => extent.fill(0),
            30..=64 => rng.fill(&mut extent),
            65..=89 => {
                let mut at = 0;
                while at < extent.len() {
                    let w = words[(rng.next() % words.len() as u64) as usize];
                    let n = w.len().min(extent.len() - at);
                    extent[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                    let digits = format!("{} ", rng.next() % 100_000);
                    let n = digits.len().min(extent.len() - at);
                    extent[at..at + n].copy_from_slice(&digits.as_bytes()[..n]);
                    at += n;
                }
            }
            _ if !kept.is_empty() => extent.copy_from_slice(&kept[(rng.next() % kept.len() as u64) as usize]),
            _ => rng.fill(&mut extent),
        }
        if kept.len() < 16 && rng.next().is_multiple_of(8) {
            kept.push(extent.clone());
        }
        out.write_all(&extent).unwrap();
    }
    out.flush().unwrap();
}

/// A guest's scattered in-place writes: `count` random 4 KiB blocks.
fn scatter_writes(path: &Path, count: usize, seed: u64) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let blocks = f.metadata().unwrap().len() / 4096;
    let mut rng = Rng(seed);
    let mut buf = [0u8; 4096];
    for _ in 0..count {
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(rng.next() % blocks * 4096)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

/// A guest rewriting `percent` % of the image in 64 KiB extents at random 4 KiB-aligned places.
fn rewrite_extents(path: &Path, percent: u64, seed: u64) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..len * percent / 100 / buf.len() as u64 {
        rng.fill(&mut buf);
        f.seek(SeekFrom::Start(rng.next() % ((len - buf.len() as u64) / 4096) * 4096)).unwrap();
        f.write_all(&buf).unwrap();
    }
}

/// Bytes this process has handed to write calls so far.
fn wchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// Times a checkout and counts the bytes it writes.
fn timed_checkout(repo: &Repository, id: &str, dest: &Path, opts: &CheckoutOptions) -> (f64, u64) {
    let (t, w) = (Instant::now(), wchar());
    let s = repo.checkout(id, dest, opts).unwrap();
    let (secs, written) = (t.elapsed().as_secs_f64(), wchar() - w);
    assert!(written >= s.bytes_written, "wchar must count at least the file bytes written");
    (secs, written)
}

/// Rolls the image back in place across a 1 % change and forward again, against a checkout into an empty
/// directory; also a rollback of a copy no record vouches for (hashed), and of 1 % as scattered 4 KiB writes.
fn rollback(dir: &Path, image: &Path) {
    let size = std::fs::metadata(image).unwrap().len();
    let repo_dir = dir.join("repo-rollback");
    let _ = std::fs::remove_dir_all(&repo_dir);
    let repo = Repository::init(&repo_dir).unwrap();
    let v1 = repo.commit(image, &CommitOptions::default()).unwrap().id;
    let h1 = file_hash(image);
    rewrite_extents(image, 1, 7);
    let v2 = repo.commit(image, &CommitOptions::default()).unwrap().id;
    let h2 = file_hash(image);
    let in_place = CheckoutOptions { in_place: true, ..Default::default() };
    let fresh = dir.join("fresh.img");
    let _ = std::fs::remove_file(&fresh);
    let (full_s, full_w) = timed_checkout(&repo, &v1, &fresh, &CheckoutOptions::default());
    assert_eq!(file_hash(&fresh), h1);
    let (back_s, back_w) = timed_checkout(&repo, &v1, image, &in_place);
    assert_eq!(file_hash(image), h1, "rollback is not byte-identical");
    let (fwd_s, fwd_w) = timed_checkout(&repo, &v2, image, &in_place);
    assert_eq!(file_hash(image), h2, "roll-forward is not byte-identical");
    // A copy of v2 with a fresh mtime: nothing vouches for it, so it is read and hashed.
    std::fs::copy(image, &fresh).unwrap();
    let (hashed_s, hashed_w) = timed_checkout(&repo, &v1, &fresh, &in_place);
    assert_eq!(file_hash(&fresh), h1);
    // 1 % as 2,600 scattered 4 KiB writes: each dirties a whole chunk, which must be fetched and compared.
    scatter_writes(image, (size / 100 / 4096) as usize, 9);
    let v3 = repo.commit(image, &CommitOptions::default()).unwrap().id;
    let (scatter_s, scatter_w) = timed_checkout(&repo, &v2, image, &in_place);
    assert_eq!(file_hash(image), h2);
    let _ = repo.checkout(&v3, image, &in_place).unwrap();
    std::fs::remove_file(&fresh).unwrap();
    let _ = std::fs::remove_dir_all(&repo_dir);
    let pct = |w: u64| 100.0 * w as f64 / size as f64;
    println!();
    println!(
        "rollback of the {:.0} MiB image, in place (time and bytes written against the full checkout)",
        size as f64 / 1048576.0
    );
    println!("| checkout | time | vs full | bytes written | of image |");
    println!("|---|---|---|---|---|");
    for (what, s, w) in [
        ("full, into an empty directory", full_s, full_w),
        ("rollback across a 1 % change (64 KiB extents)", back_s, back_w),
        ("roll forward again", fwd_s, fwd_w),
        ("rollback of an unrecorded copy (hashed)", hashed_s, hashed_w),
        ("rollback across 1 % as scattered 4 KiB writes", scatter_s, scatter_w),
    ] {
        println!("| {what} | {s:.3} s | {:.3} | {:.1} MiB | {:.2} % |", s / full_s, w as f64 / 1048576.0, pct(w));
    }
}

fn file_hash(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

struct Run {
    first: f64,
    incremental: f64,
    checkout: f64,
    new_per_write: f64,
}

fn run(dir: &Path, image: &Path, params: RepoParams, writes: usize, print: bool) -> Run {
    let size = std::fs::metadata(image).unwrap().len();
    let repo_dir = dir.join(format!("repo-{}", params.chunk_avg));
    let _ = std::fs::remove_dir_all(&repo_dir);
    let repo = Repository::init_with(&repo_dir, params).unwrap();
    let opts = CommitOptions::default();
    let t = Instant::now();
    let first = repo.commit(image, &opts).unwrap();
    let first_s = t.elapsed().as_secs_f64();
    scatter_writes(image, writes, 42);
    let t = Instant::now();
    let second = repo.commit(image, &opts).unwrap();
    let incr_s = t.elapsed().as_secs_f64();
    assert_eq!(second.bytes_read, size, "the changed image must be read again");
    let dest = dir.join("checkout.img");
    let _ = std::fs::remove_file(&dest);
    let t = Instant::now();
    repo.checkout(&second.id, &dest, &CheckoutOptions::default()).unwrap();
    let checkout_s = t.elapsed().as_secs_f64();
    assert_eq!(file_hash(&dest), file_hash(image), "checkout differs from the image");
    std::fs::remove_file(&dest).unwrap();
    if print {
        let stats = repo.stats().unwrap();
        println!("image {:.0} MiB, {} scattered 4 KiB writes between versions", size as f64 / 1048576.0, writes);
        println!("| step | time | throughput |");
        println!("|---|---|---|");
        println!("| first commit | {first_s:.2} s | {:.0} MB/s |", mbps(size, first_s));
        println!("| incremental commit | {incr_s:.2} s | {:.0} MB/s |", mbps(size, incr_s));
        println!("| checkout (empty dir) | {checkout_s:.2} s | {:.0} MB/s |", mbps(size, checkout_s));
        println!(
            "first commit stored {:.1} MiB ({:.1} MiB unique before compression); incremental added {:.2} MiB new, {:.2} MiB stored",
            first.bytes_stored as f64 / 1048576.0,
            first.bytes_new as f64 / 1048576.0,
            second.bytes_new as f64 / 1048576.0,
            second.bytes_stored as f64 / 1048576.0
        );
        println!(
            "repository: {} packs, catalog {:.1} MiB",
            stats.catalog.packs,
            stats.catalog_bytes as f64 / 1048576.0
        );
        println!("peak RSS of this process: {:.1} MiB", peak_rss_mib());
    }
    let _ = std::fs::remove_dir_all(&repo_dir);
    Run {
        first: mbps(size, first_s),
        incremental: mbps(size, incr_s),
        checkout: mbps(size, checkout_s),
        new_per_write: second.bytes_new as f64 / writes as f64,
    }
}

fn main() {
    let sweep = std::env::args().any(|a| a == "--sweep");
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench -- --list
    }
    let mib: usize = std::env::var("SNAPSTORE_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let dir = tempfile::Builder::new()
        .prefix("snapstore-bench")
        .tempdir_in(
            std::env::var("SNAPSTORE_BENCH_DIR")
                .unwrap_or_else(|_| std::env::temp_dir().to_string_lossy().into_owned()),
        )
        .unwrap();
    let image = dir.path().join("disk.img");
    generate(&image, mib);
    let writes = 256;
    println!("threads: {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    run(dir.path(), &image, RepoParams::default(), writes, true);
    generate(&image, mib);
    rollback(dir.path(), &image);
    if sweep {
        println!();
        println!("| average chunk | new bytes per 4 KiB write | first commit | incremental commit | checkout |");
        println!("|---|---|---|---|---|");
        for avg in [16u32 << 10, 32 << 10, 64 << 10, 128 << 10] {
            generate(&image, mib);
            let params = RepoParams { chunk_min: avg / 4, chunk_avg: avg, chunk_max: avg * 4, ..Default::default() };
            let r = run(dir.path(), &image, params, writes, false);
            println!(
                "| {} KiB | {:.0} KiB | {:.0} MB/s | {:.0} MB/s | {:.0} MB/s |",
                avg >> 10,
                r.new_per_write / 1024.0,
                r.first,
                r.incremental,
                r.checkout
            );
        }
    }
}
