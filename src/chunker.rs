//! Content-defined chunking of a byte stream with FastCDC 2020, in bounded memory.
//!
//! The stream is read through a window a few times the largest chunk; a cut is only taken once at least one
//! maximum chunk of data lies beyond the cut's start (or the stream has ended), which makes every cut point
//! identical to what FastCDC would choose over the whole input held in memory.

use std::io::{self, Read};

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::params::RepoParams;

/// Cuts a reader into content-defined chunks.
///
/// ```
/// use snapstore::{Chunker, RepoParams};
/// let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
/// let mut chunker = Chunker::new(&data[..], &RepoParams::default());
/// let mut total = 0;
/// while let Some(chunk) = chunker.next_chunk().unwrap() {
///     total += chunk.len();
/// }
/// assert_eq!(total, data.len());
/// ```
pub struct Chunker<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    masks: (u64, u64),
}

impl<R: Read> Chunker<R> {
    /// A chunker reading `reader` with the repository's chunk sizes.
    pub fn new(reader: R, params: &RepoParams) -> Self {
        let level = match params.normalization {
            0 => Normalization::Level0,
            1 => Normalization::Level1,
            2 => Normalization::Level2,
            _ => Normalization::Level3,
        };
        let max = params.chunk_max as usize;
        Chunker {
            reader,
            // Large reads amortise syscalls; 4 maximum chunks keeps compaction copies rare.
            buf: vec![0; (4 * max).max(4 << 20)],
            start: 0,
            end: 0,
            eof: false,
            min: params.chunk_min as usize,
            avg: params.chunk_avg as usize,
            max,
            masks: select_masks(params.chunk_avg as usize, level),
        }
    }

    /// The next chunk, or `None` at the end of the stream. The slice is valid until the next call.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        while !self.eof && self.end - self.start < self.max {
            self.fill()?;
        }
        if self.start == self.end {
            return Ok(None);
        }
        let (mask_s, mask_l) = self.masks;
        let window = &self.buf[self.start..self.end];
        let (_, len) = cut(window, self.min, self.avg, self.max, mask_s, mask_l, mask_s << 1, mask_l << 1);
        let chunk_start = self.start;
        self.start += len;
        Ok(Some(&self.buf[chunk_start..chunk_start + len]))
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A reader that returns at most `step` bytes per call, to exercise window refills at odd places.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn small_params() -> RepoParams {
        RepoParams { chunk_min: 256, chunk_avg: 1024, chunk_max: 4096, ..Default::default() }
    }

    fn chunks_of(data: &[u8], step: usize, params: &RepoParams) -> Vec<Vec<u8>> {
        let mut c = Chunker::new(Trickle(data, step), params);
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch.to_vec());
        }
        out
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn matches_fastcdc_over_whole_input() {
        let data = pseudo_random(3 << 20, 7);
        let p = RepoParams::default();
        let ours: Vec<usize> = chunks_of(&data, 100_003, &p).iter().map(|c| c.len()).collect();
        let reference: Vec<usize> =
            fastcdc::v2020::FastCDC::new(&data, 16384, 65536, 262144).map(|c| c.length).collect();
        assert_eq!(ours, reference);
        assert!(ours.iter().take(ours.len() - 1).all(|&l| (16384..=262144).contains(&l)));
    }

    #[test]
    fn empty_input_has_no_chunks() {
        assert!(chunks_of(&[], 10, &RepoParams::default()).is_empty());
    }

    #[test]
    fn zeros_cut_at_max() {
        let data = vec![0u8; 1 << 20];
        let lens: Vec<usize> = chunks_of(&data, 1 << 20, &RepoParams::default()).iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![262144; 4]);
    }

    proptest! {
        #[test]
        fn chunks_concatenate_to_input(len in 0usize..40_000, seed in any::<u64>(), step in 1usize..9000) {
            let data = pseudo_random(len, seed);
            let p = small_params();
            let chunks = chunks_of(&data, step, &p);
            prop_assert_eq!(chunks.concat(), data.clone());
            // Cut points do not depend on how the reader delivers bytes.
            prop_assert_eq!(chunks, chunks_of(&data, 1 << 20, &p));
        }
    }
}
