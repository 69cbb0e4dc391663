//! Content-defined chunking with FastCDC 2020, in bounded memory.
//!
//! A cut is only taken once at least one maximum chunk of data lies beyond the chunk's start (or the input
//! has ended), which makes every cut point identical to what FastCDC would choose over the whole input held in
//! memory. Two front ends share the cut: [`Chunker`] reads a stream through a window; `BlockChunker` cuts
//! blocks that a reader thread fills, handing out chunks as ranges of the shared blocks without copying them.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use fastcdc::v2020::{Normalization, cut, select_masks};

use crate::aligned::AlignedBuf;
use crate::params::RepoParams;
use crate::sparse::is_zero;

/// The cut function with a repository's parameters.
#[derive(Clone, Copy)]
pub(crate) struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Cutter {
    pub fn new(params: &RepoParams) -> Self {
        let level = match params.normalization {
            0 => Normalization::Level0,
            1 => Normalization::Level1,
            2 => Normalization::Level2,
            _ => Normalization::Level3,
        };
        let (mask_s, mask_l) = select_masks(params.chunk_avg as usize, level);
        Cutter {
            min: params.chunk_min as usize,
            avg: params.chunk_avg as usize,
            max: params.chunk_max as usize,
            mask_s,
            mask_l,
        }
    }

    /// The maximum chunk length.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Length of the chunk starting at `window[0]`. `window` must hold at least `max` bytes unless the input
    /// ends with it.
    pub fn cut(&self, window: &[u8]) -> usize {
        // FastCDC's hash starts afresh at `min` and never matches on zeros (see `zeros_cut_at_max`), so a
        // window whose bytes from `min` to `max` are all zero cuts at `max`. Checking that is a memory scan,
        // far cheaper than the rolling hash, and VM images are largely zeros.
        if window.len() >= self.max && is_zero(&window[self.min..self.max]) {
            return self.max;
        }
        let (m_s, m_l) = (self.mask_s, self.mask_l);
        cut(window, self.min, self.avg, self.max, m_s, m_l, m_s << 1, m_l << 1).1
    }
}

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
    cutter: Cutter,
}

impl<R: Read> Chunker<R> {
    /// A chunker reading `reader` with the repository's chunk sizes.
    pub fn new(reader: R, params: &RepoParams) -> Self {
        let cutter = Cutter::new(params);
        Chunker {
            reader,
            // Large reads amortise syscalls; 4 maximum chunks keeps compaction copies rare.
            buf: vec![0; (4 * cutter.max).max(4 << 20)],
            start: 0,
            end: 0,
            eof: false,
            cutter,
        }
    }

    /// The next chunk, or `None` at the end of the stream. The slice is valid until the next call.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        while !self.eof && self.end - self.start < self.cutter.max {
            self.fill()?;
        }
        if self.start == self.end {
            return Ok(None);
        }
        let len = self.cutter.cut(&self.buf[self.start..self.end]);
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
        self.end += read_retrying(&mut self.reader, &mut self.buf[self.end..])?;
        if self.end - self.start < self.cutter.max && self.end < self.buf.len() {
            // A short read is not the end; only a read of zero bytes is.
            let n = read_retrying(&mut self.reader, &mut self.buf[self.end..])?;
            self.eof = n == 0;
            self.end += n;
        }
        Ok(())
    }
}

fn read_retrying(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
pub(crate) fn read_at_most(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A buffer that goes back to its pool when the last chunk cut from it is done, so a commit reuses a few
/// blocks instead of allocating (and page-faulting in) fresh memory for every one.
pub(crate) struct Buf {
    data: AlignedBuf,
    home: Option<crossbeam_channel::Sender<AlignedBuf>>,
}

impl Buf {
    pub fn new(data: AlignedBuf, home: Option<crossbeam_channel::Sender<AlignedBuf>>) -> Self {
        Buf { data, home }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(home) = &self.home {
            let _ = home.try_send(std::mem::take(&mut self.data));
        }
    }
}

/// A block of input shared by the chunks cut from it.
pub(crate) type Block = Arc<Buf>;

/// A chunk's bytes: a range of a shared block, or its own copy when it straddles two blocks.
pub(crate) enum ChunkBytes {
    Shared(Block, usize, usize),
    Owned(Vec<u8>),
}

impl Deref for ChunkBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ChunkBytes::Shared(b, start, end) => &b[*start..*end],
            ChunkBytes::Owned(v) => v,
        }
    }
}

/// Cuts a sequence of blocks. Every block but the last must be full (at least one maximum chunk long), so
/// that a window shorter than a maximum chunk means the input has ended.
pub(crate) struct BlockChunker<F> {
    next_block: F,
    cur: Option<Block>,
    pos: usize,
    lookahead: Option<Block>,
    ended: bool,
    cutter: Cutter,
}

impl<F: FnMut() -> io::Result<Option<Block>>> BlockChunker<F> {
    pub fn new(cutter: Cutter, next_block: F) -> Self {
        BlockChunker { next_block, cur: None, pos: 0, lookahead: None, ended: false, cutter }
    }

    fn fetch(&mut self) -> io::Result<Option<Block>> {
        if self.ended {
            return Ok(None);
        }
        loop {
            match (self.next_block)()? {
                Some(b) if b.is_empty() => continue,
                Some(b) => return Ok(Some(b)),
                None => {
                    self.ended = true;
                    return Ok(None);
                }
            }
        }
    }

    /// Makes the block at the position current; `None` at the end of the input.
    fn current(&mut self) -> io::Result<Option<Block>> {
        loop {
            match self.cur.clone() {
                Some(cur) if self.pos < cur.len() => return Ok(Some(cur)),
                Some(_) => self.cur = None,
                None => {
                    self.cur = match self.lookahead.take() {
                        Some(b) => Some(b),
                        None => self.fetch()?,
                    };
                    self.pos = 0;
                    if self.cur.is_none() {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The `len` bytes that lie `skip` bytes past the position, without consuming them; `None` when the two
    /// blocks at hand (the current one and the next) do not hold them, the input having ended or not.
    pub fn peek(&mut self, skip: usize, len: usize) -> io::Result<Option<ChunkBytes>> {
        let Some(cur) = self.current()? else { return Ok(None) };
        let (from, avail) = (self.pos + skip, cur.len() - self.pos);
        if skip + len <= avail {
            return Ok(Some(ChunkBytes::Shared(cur, from, from + len)));
        }
        if self.lookahead.is_none() {
            self.lookahead = self.fetch()?;
        }
        let Some(next) = self.lookahead.clone() else { return Ok(None) };
        if skip >= avail {
            let at = skip - avail;
            return Ok((at + len <= next.len()).then(|| ChunkBytes::Shared(next, at, at + len)));
        }
        let (head, tail) = (avail - skip, len - (avail - skip));
        if tail > next.len() {
            return Ok(None);
        }
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&cur[from..from + head]);
        v.extend_from_slice(&next[..tail]);
        Ok(Some(ChunkBytes::Owned(v)))
    }

    /// Consumes `n` bytes that [`peek`](Self::peek) returned.
    pub fn advance(&mut self, n: usize) {
        let avail = self.cur.as_ref().map_or(0, |c| c.len() - self.pos);
        if n < avail {
            self.pos += n;
        } else {
            self.cur = self.lookahead.take();
            self.pos = n - avail;
        }
    }

    pub fn next_chunk(&mut self) -> io::Result<Option<ChunkBytes>> {
        let max = self.cutter.max;
        let Some(cur) = self.current()? else { return Ok(None) };
        let avail = cur.len() - self.pos;
        if avail >= max {
            let len = self.cutter.cut(&cur[self.pos..]);
            self.pos += len;
            return Ok(Some(ChunkBytes::Shared(cur, self.pos - len, self.pos)));
        }
        if self.lookahead.is_none() {
            self.lookahead = self.fetch()?;
        }
        let Some(next) = self.lookahead.clone() else {
            // The input ends inside this block.
            let len = self.cutter.cut(&cur[self.pos..]);
            self.pos += len;
            return Ok(Some(ChunkBytes::Shared(cur, self.pos - len, self.pos)));
        };
        let take = (max - avail).min(next.len());
        let mut window = Vec::with_capacity(avail + take);
        window.extend_from_slice(&cur[self.pos..]);
        window.extend_from_slice(&next[..take]);
        let len = self.cutter.cut(&window);
        if len <= avail {
            self.pos += len;
            return Ok(Some(ChunkBytes::Shared(cur, self.pos - len, self.pos)));
        }
        window.truncate(len);
        self.cur = self.lookahead.take();
        self.pos = len - avail;
        Ok(Some(ChunkBytes::Owned(window)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;
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

    /// The chunk lengths the `fastcdc` crate itself cuts `data` into with the default sizes and `level`.
    fn reference(data: &[u8], level: u32) -> Vec<usize> {
        use fastcdc::v2020::{FastCDC, Normalization};
        let levels = [Normalization::Level0, Normalization::Level1, Normalization::Level2, Normalization::Level3];
        FastCDC::with_level(data, 16384, 65536, 262144, levels[level as usize]).map(|c| c.length).collect()
    }

    #[test]
    fn matches_fastcdc_over_whole_input() {
        let data = pseudo_random(3 << 20, 7);
        for normalization in 0..=3 {
            let p = RepoParams { normalization, ..Default::default() };
            let ours: Vec<usize> = chunks_of(&data, 100_003, &p).iter().map(|c| c.len()).collect();
            assert_eq!(ours, reference(&data, normalization), "normalization {normalization}");
            assert!(ours.iter().take(ours.len() - 1).all(|&l| (16384..=262144).contains(&l)));
        }
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

    fn block_chunks(data: &[u8], block: usize, params: &RepoParams) -> Vec<Vec<u8>> {
        let mut blocks = data.chunks(block).map(|b| {
            let mut a = AlignedBuf::default();
            a.set_len(b.len());
            a.copy_from_slice(b);
            Arc::new(Buf::new(a, None))
        });
        let mut c = BlockChunker::new(Cutter::new(params), || Ok(blocks.next()));
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch.to_vec());
        }
        out
    }

    /// Random bytes with long zero runs in them, as a disk image has.
    fn with_zero_runs(len: usize, seed: u64) -> Vec<u8> {
        let mut data = pseudo_random(len, seed);
        let mut at = (seed as usize) % 5000;
        while at < len {
            let run = (at * 7 + 13_000) % 40_000;
            let end = (at + run).min(len);
            data[at..end].fill(0);
            at = end + (at % 9000) + 100;
        }
        data
    }

    #[test]
    fn zero_shortcut_matches_fastcdc() {
        let mut data = with_zero_runs(4 << 20, 3);
        // Runs longer than a maximum chunk, at odd offsets, so the shortcut is taken.
        for (start, end) in [(500_001, 1_700_000), (2_000_000, 2_300_123), (3_000_000, 3_290_000)] {
            data[start..end].fill(0);
        }
        let p = RepoParams::default();
        let ours: Vec<usize> = chunks_of(&data, 1 << 20, &p).iter().map(|c| c.len()).collect();
        assert_eq!(ours, reference(&data, p.normalization));
    }

    proptest! {
        #[test]
        fn block_chunker_matches_stream_chunker(len in 0usize..60_000, seed in any::<u64>(), blocks in 1usize..6) {
            let p = small_params();
            let data = with_zero_runs(len, seed);
            let block = 4096 * blocks + (seed as usize % 3) * 2;
            prop_assert_eq!(block_chunks(&data, block, &p), chunks_of(&data, 7000, &p));
        }

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
