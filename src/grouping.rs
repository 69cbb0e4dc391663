//! Byte grouping: a chunk of fixed-width numbers stored as planes, one per byte position of a number.
//!
//! In float32 tensors the fourth byte of every value (sign and high exponent) takes a handful of values while
//! the two low mantissa bytes look random. zstd over the interleaved bytes codes them all with one entropy
//! table and saves about 7 %. Regrouped into planes (byte 0 of every value, then byte 1, ...), each plane gets
//! its own: the exponent plane shrinks to about 40 % and the random planes are stored as they are, so the
//! chunk shrinks by 14 % and reading it back skips zstd for three quarters of its bytes. float64 fields
//! (simulation restart files) group by 8. This is the BG4 transform of xet-core, with each plane compressed
//! on its own rather than the regrouped bytes as one zstd frame, which measured under 1 % better than none.
//!
//! Whether to group a chunk, by 4 or 8, and which planes to leave raw, is decided from byte histograms of a
//! sample of it (about 2 % of zstd's time on the chunk): grouping must beat the chunk's own order-0 entropy,
//! and a chunk that entropy already calls compressible (text, code, sparse data) is left to zstd, whose
//! matches grouping would break. Measured per workload in docs/benchmarks.md. Histograms cannot see repeats:
//! floats that repeat within a chunk (a short pattern tiled) are stored as planes even where one zstd frame
//! would be smaller; checkpoint tensors and fields do not repeat that way, and trying both would double
//! the compression time of every numeric chunk.
//!
//! A grouped blob (pack flag 2, format 2 onwards):
//! ```text
//! stride u8 (4 or 8) | zstd mask u8 (bit p: plane p is a zstd frame, else raw) | stored length u32 LE per plane
//! plane 0 | plane 1 | ... | plane stride-1 | tail
//! ```
//! Plane p holds byte p of every `stride`-byte word of the chunk's first `raw_len - raw_len % stride` bytes;
//! the tail is the last `raw_len % stride` bytes, raw.

use std::sync::OnceLock;

use zstd::bulk::{Compressor, Decompressor};

/// Chunks shorter than this are never grouped: their sample is too small to judge.
const MIN_LEN: usize = 4096;
/// Words of 8 bytes sampled per chunk.
const SAMPLE_WORDS: usize = 2048;
/// A plane whose sampled entropy is above this many bits per byte is stored raw without trying zstd (a
/// uniformly random plane samples at about 7.91 from 2048 bytes).
const RAW_ABOVE: f32 = 7.8;
/// Chunks whose order-0 entropy is at or below this are left whole: zstd already does well on them.
const WHOLE_AT_OR_BELOW: f32 = 6.0;
/// How many bits per byte grouping must save, by the sample, to be chosen.
const MIN_GAIN: f32 = 0.3;
/// How much better 8 must do than 4 to be chosen over it.
const EIGHT_OVER_FOUR: f32 = 0.2;

/// How to store a chunk as planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    stride: usize,
    /// Bit p set: plane p is worth giving to zstd.
    compress: u8,
}

/// The plan for `data`, or `None` if it is best stored as one zstd frame.
pub(crate) fn plan(data: &[u8]) -> Option<Plan> {
    if data.len() < MIN_LEN {
        return None;
    }
    let words = data.len() / 8;
    let step = words.div_ceil(SAMPLE_WORDS);
    let mut hist = [[0u32; 256]; 8];
    for word in data.chunks_exact(8).step_by(step) {
        for (h, &b) in hist.iter_mut().zip(word) {
            h[b as usize] += 1;
        }
    }
    let mut by4 = [[0u32; 256]; 4];
    let mut whole = [0u32; 256];
    for (p, h) in hist.iter().enumerate() {
        for (v, &c) in h.iter().enumerate() {
            by4[p % 4][v] += c;
            whole[v] += c;
        }
    }
    let whole = entropy(&whole);
    if whole <= WHOLE_AT_OR_BELOW {
        return None;
    }
    let e8: Vec<f32> = hist.iter().map(entropy).collect();
    let e4: Vec<f32> = by4.iter().map(entropy).collect();
    let mean = |e: &[f32]| e.iter().sum::<f32>() / e.len() as f32;
    let (m8, m4) = (mean(&e8), mean(&e4));
    let chosen = if m8 < whole - MIN_GAIN && m8 < m4 - EIGHT_OVER_FOUR {
        e8
    } else if m4 < whole - MIN_GAIN {
        e4
    } else {
        return None;
    };
    let compress = chosen.iter().enumerate().filter(|(_, e)| **e <= RAW_ABOVE).fold(0u8, |m, (p, _)| m | 1 << p);
    Some(Plan { stride: chosen.len(), compress })
}

/// Shannon entropy in bits per byte of a histogram.
fn entropy(hist: &[u32; 256]) -> f32 {
    let n: u32 = hist.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let table = c_log_c();
    let sum: f32 = hist.iter().filter(|&&c| c > 0).map(|&c| table[c as usize]).sum();
    (n as f32).log2() - sum / n as f32
}

/// `c * log2(c)` for every count a histogram of the sample can hold: 256 logarithms per plane would cost
/// more than the histograms.
fn c_log_c() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=8 * SAMPLE_WORDS).map(|c| if c == 0 { 0.0 } else { c as f32 * (c as f32).log2() }).collect()
    })
}

/// What an encoder keeps between chunks: its zstd context and scratch buffers.
pub(crate) struct Encoder {
    zstd: Compressor<'static>,
    planes: Vec<u8>,
    frame: Vec<u8>,
}

impl Encoder {
    /// A plane is an entropy coder's job: matches of a few bytes in an exponent plane are coincidences that
    /// cost more to code than the literals. zstd's fastest strategy with its longest minimum match and a
    /// small hash table, measured over the exponent planes of float32 weights and the planes of float64
    /// fields: 19 % smaller than level 3 on the weights, and 3 times as fast to compress and 1.7 times to
    /// decompress; 5 % larger on the fields, whose runs level 3 finds a little more of.
    pub fn new() -> std::io::Result<Self> {
        use zstd::zstd_safe::CParameter;
        let mut zstd = Compressor::new(1)?;
        for p in [CParameter::MinMatch(7), CParameter::SearchLog(1), CParameter::HashLog(9)] {
            zstd.set_parameter(p)?;
        }
        Ok(Encoder { zstd, planes: Vec::new(), frame: Vec::new() })
    }
}

/// Writes `data` grouped by `plan` into `out` (cleared first).
pub(crate) fn encode(data: &[u8], plan: Plan, encoder: &mut Encoder, out: &mut Vec<u8>) {
    let s = plan.stride;
    let header = 2 + 4 * s;
    out.clear();
    out.push(s as u8);
    out.push(0);
    out.resize(header, 0);
    let Encoder { zstd, planes, frame } = encoder;
    let n = data.len() / s;
    planes.resize(n * s, 0);
    match s {
        4 => group::<4>(data, planes),
        _ => group::<8>(data, planes),
    }
    for (p, plane) in planes.chunks_exact(n.max(1)).take(s).enumerate() {
        let plane = &plane[..n];
        frame.clear();
        frame.reserve(zstd::zstd_safe::compress_bound(n));
        let stored = match plan.compress & 1 << p != 0 {
            true => match zstd.compress_to_buffer(plane, frame) {
                Ok(k) if k < n => {
                    out[1] |= 1 << p;
                    &frame[..k]
                }
                _ => plane,
            },
            false => plane,
        };
        out[2 + 4 * p..6 + 4 * p].copy_from_slice(&(stored.len() as u32).to_le_bytes());
        out.extend_from_slice(stored);
    }
    out.extend_from_slice(&data[data.len() - data.len() % s..]);
}

/// Rebuilds the chunk of `out.len()` bytes that grouped blob `blob` holds, or says why it cannot.
pub(crate) fn decode(
    blob: &[u8],
    out: &mut [u8],
    zstd: &mut Decompressor<'static>,
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let bad = |why: &str| Err(format!("grouped blob {why}"));
    let (s, mask) = match blob {
        [s @ (4 | 8), mask, ..] => (*s as usize, *mask as u32),
        _ => return bad("has no valid header"),
    };
    let header = 2 + 4 * s;
    if mask >> s != 0 || blob.len() < header {
        return bad("has no valid header");
    }
    let n = out.len() / s;
    let lens: Vec<usize> =
        blob[2..header].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize).collect();
    let tail = out.len() % s;
    if lens.iter().sum::<usize>().checked_add(header + tail) != Some(blob.len()) {
        return bad("lengths do not add up to its size");
    }
    let starts: Vec<usize> = lens.iter().scan(header, |at, &len| Some(std::mem::replace(at, *at + len))).collect();
    scratch.resize(n * s, 0);
    for p in 0..s {
        let stored = &blob[starts[p]..starts[p] + lens[p]];
        if mask & 1 << p != 0 {
            let got = zstd
                .decompress_to_buffer(stored, &mut scratch[p * n..(p + 1) * n])
                .map_err(|e| format!("grouped blob plane {p} cannot be decompressed ({e})"))?;
            if got != n {
                return bad("has a plane of the wrong length");
            }
        } else if lens[p] != n {
            return bad("has a plane of the wrong length");
        }
    }
    // A raw plane is read where it lies in the blob; a compressed one from `scratch`.
    let planes: Vec<&[u8]> = (0..s)
        .map(|p| if mask & 1 << p != 0 { &scratch[p * n..(p + 1) * n] } else { &blob[starts[p]..starts[p] + n] })
        .collect();
    let (body, rest) = out.split_at_mut(n * s);
    match s {
        4 => ungroup::<4>(&planes, body),
        _ => ungroup::<8>(&planes, body),
    }
    rest.copy_from_slice(&blob[blob.len() - tail..]);
    Ok(())
}

/// Splits the `S`-byte words of `data` into `S` planes of `out.len() / S` bytes each, back to back in `out`.
/// By 4, each word is loaded whole and taken apart by shifts, one pass at 2.8 times the speed of a strided
/// gather per plane; by 8 the gather is faster (eight byte stores per word defeat the compiler).
fn group<const S: usize>(data: &[u8], out: &mut [u8]) {
    let n = out.len() / S;
    let (words, _) = data.as_chunks::<S>();
    if S == 8 {
        for (p, plane) in out.chunks_exact_mut(n.max(1)).enumerate() {
            for (b, w) in plane.iter_mut().zip(words) {
                *b = w[p];
            }
        }
        return;
    }
    let mut planes: [&mut [u8]; S] = {
        let mut rest = out.chunks_exact_mut(n.max(1));
        std::array::from_fn(|_| rest.next().unwrap_or_default())
    };
    for (i, w) in words[..n].iter().enumerate() {
        let v = word(w);
        for (p, plane) in planes.iter_mut().enumerate() {
            plane[i] = (v >> (8 * p)) as u8;
        }
    }
}

/// Interleaves `S` planes of equal length back into `S`-byte words, each built by shifts and stored whole:
/// three times the speed of storing byte by byte.
fn ungroup<const S: usize>(planes: &[&[u8]], out: &mut [u8]) {
    let (words, _) = out.as_chunks_mut::<S>();
    let n = words.len();
    let planes: [&[u8]; S] = std::array::from_fn(|p| &planes[p][..n]);
    for (i, w) in words.iter_mut().enumerate() {
        let v = planes.iter().enumerate().fold(0u64, |v, (p, plane)| v | (plane[i] as u64) << (8 * p));
        w.copy_from_slice(&v.to_le_bytes()[..S]);
    }
}

/// A little-endian word of up to 8 bytes.
fn word<const S: usize>(w: &[u8; S]) -> u64 {
    let mut b = [0u8; 8];
    b[..S].copy_from_slice(w);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;

    /// Float32 values like a layer's weights (σ 0.02), from a fixed seed.
    fn weights(n: usize, seed: u64) -> Vec<u8> {
        // Sum of four uniforms: close enough to a normal for byte statistics.
        let uniforms = pseudo_random(8 * n, seed);
        let normal = |w: &[u8]| w.chunks(2).map(|u| u16::from_le_bytes([u[0], u[1]]) as u32).sum::<u32>();
        uniforms.chunks(8).flat_map(|w| ((normal(w) as f32 - 131_070.0) / 37_837.0 * 0.02).to_le_bytes()).collect()
    }

    fn roundtrip(data: &[u8], plan: Plan) -> Vec<u8> {
        let mut out = Vec::new();
        encode(data, plan, &mut Encoder::new().unwrap(), &mut out);
        let mut back = vec![0u8; data.len()];
        decode(&out, &mut back, &mut Decompressor::new().unwrap(), &mut Vec::new()).unwrap();
        assert_eq!(back, data);
        out
    }

    #[test]
    fn float32_weights_group_by_four_and_shrink_beyond_zstd() {
        let data = weights(16 * 1024 + 1, 7);
        let plan = plan(&data).expect("float32 weights must be grouped");
        assert_eq!(plan.stride, 4);
        assert_eq!(plan.compress, 0b1000, "only the sign and exponent plane is worth compressing");
        let grouped = roundtrip(&data, plan).len();
        let whole = zstd::bulk::compress(&data, 3).unwrap().len();
        assert!((grouped as f64) < whole as f64 * 0.95, "grouped {grouped} against zstd's {whole}");
    }

    #[test]
    fn float64_fields_group_by_eight() {
        // A smooth field: neighbours share their exponent and high mantissa bytes.
        let data: Vec<u8> = (0..8192).flat_map(|i| (1.0 + (i as f64 * 0.001).sin() * 0.3).to_le_bytes()).collect();
        let plan = plan(&data).expect("a float64 field must be grouped");
        assert_eq!(plan.stride, 8);
        let grouped = roundtrip(&data, plan).len();
        let whole = zstd::bulk::compress(&data, 3).unwrap().len();
        assert!(grouped < whole, "grouped {grouped} against zstd's {whole}");
    }

    #[test]
    fn text_random_bytes_and_short_chunks_stay_whole() {
        let text = b"fn main() { println!(\"checkpoint {}\", 42); }\n".repeat(2000);
        assert_eq!(plan(&text), None);
        assert_eq!(plan(&pseudo_random(65536, 3)), None);
        assert_eq!(plan(&weights(1000, 1)), None, "4,000 bytes is under the minimum");
    }

    #[test]
    fn every_length_and_stride_roundtrips() {
        for len in [4096, 4097, 4099, 4103, 65536 + 5] {
            let data = weights(len / 4 + 1, len as u64)[..len].to_vec();
            for (stride, compress) in [(4, 0b1111), (4, 0), (8, 0b1010_0101), (8, 0xff)] {
                roundtrip(&data, Plan { stride, compress });
            }
        }
    }

    #[test]
    fn damaged_blobs_are_refused_without_panicking() {
        let data = weights(4096, 9);
        let blob = roundtrip(&data, plan(&data).unwrap());
        let mut d = Decompressor::new().unwrap();
        let mut out = vec![0u8; data.len()];
        let mut scratch = Vec::new();
        for cut in [0, 1, 2, 17, blob.len() - 1] {
            assert!(decode(&blob[..cut], &mut out, &mut d, &mut scratch).is_err(), "cut at {cut}");
        }
        for bad_header in [[5u8, 0], [4, 0x10], [8, 0]] {
            let mut b = blob.clone();
            b[..2].copy_from_slice(&bad_header);
            assert!(decode(&b, &mut out, &mut d, &mut scratch).is_err(), "{bad_header:?}");
        }
        // A raw plane's stored length must be the plane's.
        let mut b = blob.clone();
        b[1] = 0;
        assert!(decode(&b, &mut out, &mut d, &mut scratch).is_err());
        // The wrong chunk length does not fit the planes.
        let mut short = vec![0u8; data.len() - 4];
        assert!(decode(&blob, &mut short, &mut d, &mut scratch).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(blob in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), len in 0usize..300) {
            let mut out = vec![0u8; len];
            let _ = decode(&blob, &mut out, &mut Decompressor::new().unwrap(), &mut Vec::new());
        }

        #[test]
        fn any_plan_roundtrips(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000), eight: bool, compress: u8) {
            let stride = if eight { 8 } else { 4 };
            roundtrip(&data, Plan { stride, compress: compress & ((1u16 << stride) - 1) as u8 });
        }
    }
}
