//! Throughput of the stages of the commit pipeline, each on one core: chunking, hashing, compression.
//!
//! Run: `cargo bench --bench throughput`. Figures are bytes per second of input.

use divan::counter::BytesCount;
use divan::{Bencher, black_box};
use snapstore::{Chunker, RepoParams};

fn main() {
    divan::main();
}

const LEN: usize = 64 << 20;

/// Mixed input: incompressible random bytes, then text, as a VM image or a checkpoint holds.
fn input() -> Vec<u8> {
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut v: Vec<u8> = (0..LEN / 2)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let text = b"step 1200 loss 0.0412 lr 3.0e-4 grad_norm 1.25 tokens 1048576\n";
    while v.len() < LEN {
        v.extend_from_slice(text);
    }
    v.truncate(LEN);
    v
}

#[divan::bench]
fn chunk_fastcdc(b: Bencher) {
    let data = input();
    let params = RepoParams::default();
    b.counter(BytesCount::new(LEN)).bench(|| {
        let mut c = Chunker::new(&data[..], &params);
        let mut n = 0;
        while let Some(ch) = c.next_chunk().unwrap() {
            n += ch.len();
        }
        black_box(n)
    });
}

#[divan::bench]
fn hash_blake3_64k_chunks(b: Bencher) {
    let data = input();
    b.counter(BytesCount::new(LEN)).bench(|| {
        for ch in data.chunks(64 << 10) {
            black_box(blake3::hash(ch));
        }
    });
}

#[divan::bench(args = [1, 3])]
fn compress_zstd_64k_chunks(b: Bencher, level: i32) {
    let data = input();
    let mut c = zstd::bulk::Compressor::new(level).unwrap();
    b.counter(BytesCount::new(LEN)).bench_local(|| {
        for ch in data.chunks(64 << 10) {
            black_box(c.compress(ch).unwrap());
        }
    });
}

#[divan::bench]
fn decompress_zstd_64k_chunks(b: Bencher) {
    let data = input();
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let frames: Vec<Vec<u8>> = data.chunks(64 << 10).map(|ch| c.compress(ch).unwrap()).collect();
    let mut d = zstd::bulk::Decompressor::new().unwrap();
    b.counter(BytesCount::new(LEN)).bench_local(|| {
        for f in &frames {
            black_box(d.decompress(f, 64 << 10).unwrap());
        }
    });
}
