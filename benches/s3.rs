//! A repository in an S3 bucket against the same repository on the local disk, in one run: commit, incremental
//! commit and checkout throughput, and the requests sent per GiB committed.
//!
//! Run against a local S3 server (moto, MinIO, ...):
//!
//! ```text
//! moto_server -H 127.0.0.1 -p 9000 &
//! AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test cargo bench --bench s3
//! ```
//!
//! The bucket is created with an unsigned `PUT` (which moto accepts); `SNAPSTORE_S3_BENCH_BUCKET=s3://B/P` uses
//! an existing one instead. `SNAPSTORE_S3_BENCH_MIB` sets the image size (default 1024). The image is
//! incompressible (float32 noise, as model weights are); the second version rewrites 5 % of it in 1 MiB runs.

use std::path::Path;
use std::time::Instant;

use snapstore::{CheckoutOptions, CommitOptions, Repository};

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

struct Run {
    commit: f64,
    incremental: f64,
    checkout: f64,
    requests: [u64; 3],
}

fn measure(repo: &Repository, dir: &Path, v1: &[u8], v2: &[u8]) -> Run {
    let mib = v1.len() as f64 / (1 << 20) as f64;
    let (a, b) = (dir.join("v1.img"), dir.join("v2.img"));
    std::fs::write(&a, v1).unwrap();
    std::fs::write(&b, v2).unwrap();
    let opts = CommitOptions::default();
    let r0 = repo.requests();
    let t = Instant::now();
    repo.commit(&a, &opts).unwrap();
    let commit = mib / t.elapsed().as_secs_f64();
    let r1 = repo.requests();
    // The same path again, with its second content: the incremental commit.
    std::fs::rename(&b, &a).unwrap();
    let t = Instant::now();
    let s = repo.commit(&a, &opts).unwrap();
    let incremental = mib / t.elapsed().as_secs_f64();
    let r2 = repo.requests();
    let out = dir.join("out.img");
    let t = Instant::now();
    repo.checkout(&s.id, &out, &CheckoutOptions::default()).unwrap();
    let checkout = mib / t.elapsed().as_secs_f64();
    let r3 = repo.requests();
    assert!(std::fs::read(&out).unwrap() == v2, "checkout differs");
    std::fs::remove_file(&out).unwrap();
    Run { commit, incremental, checkout, requests: [r1 - r0, r2 - r1, r3 - r2] }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let Some(endpoint) = std::env::var("AWS_ENDPOINT_URL").ok() else {
        eprintln!("set AWS_ENDPOINT_URL (and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) to a local S3 server");
        return;
    };
    let mib: usize = std::env::var("SNAPSTORE_S3_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let url = std::env::var("SNAPSTORE_S3_BENCH_BUCKET")
        .unwrap_or_else(|_| snapstore::backend::create_test_bucket(&endpoint));
    let v1 = image(mib << 20, 1);
    let mut v2 = v1.clone();
    let fresh = image(mib << 20, 2);
    // 5 % rewritten, in 1 MiB runs spread over the image.
    for k in (0..mib).step_by(20) {
        let r = k << 20..(k + 1) << 20;
        v2[r.clone()].copy_from_slice(&fresh[r]);
    }
    let work = tempfile::tempdir().unwrap();
    let local = Repository::init(work.path().join("repo")).unwrap();
    let local_run = measure(&local, work.path(), &v1, &v2);
    let remote = Repository::init(&url).unwrap();
    let remote_run = measure(&remote, work.path(), &v1, &v2);
    drop(remote);
    let t = Instant::now();
    let (_, s) = Repository::rebuild(&url).unwrap();
    let rebuild = t.elapsed().as_secs_f64();

    let gib = mib as f64 / 1024.0;
    println!("image {mib} MiB (incompressible), second version 5 % rewritten; S3 server {endpoint}");
    println!("| | local disk | S3 | S3 / local |");
    println!("|---|---|---|---|");
    for (what, l, r) in [
        ("first commit, MiB/s", local_run.commit, remote_run.commit),
        ("incremental commit, MiB/s", local_run.incremental, remote_run.incremental),
        ("checkout, MiB/s", local_run.checkout, remote_run.checkout),
    ] {
        println!("| {what} | {l:.0} | {r:.0} | {:.2}x |", r / l);
    }
    let [c, i, o] = remote_run.requests;
    println!(
        "requests: first commit {c} ({:.0} per GiB), incremental {i}, checkout {o} ({:.0} per GiB)",
        c as f64 / gib,
        o as f64 / gib
    );
    println!("catalog rebuilt from the bucket alone: {} records in {rebuild:.2} s", s.records);
}
