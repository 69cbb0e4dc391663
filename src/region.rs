//! Parallel chunking of one large file, with exactly the cut points of sequential chunking.
//!
//! Chunking is a scan: each cut depends on where the chunk began. To spread one file over all cores, the file
//! is split at fixed offsets into regions, and each region is cut (and its chunks hashed) independently,
//! starting at the region's first byte, by whichever core is free. Those cuts are right only from the first
//! place where they meet the sequential chunking: a cut point depends only on the chunk's start and the bytes
//! after it, so once both chunkings start a chunk at the same offset they agree from there on. The stitcher
//! walks the regions in order, carrying the sequential chunking across each boundary itself (cutting and
//! hashing those few chunks again) until it lands on a cut the region's worker also made, then adopts the
//! worker's chunks to the region's end. In practice the two meet within a chunk or two of the boundary, so
//! the repeated work is about 2 % for 4 MiB regions. They never meet inside a run of zeros (both cut it into
//! maximum chunks, out of phase) or other periodic data; zero runs are common in disk images, so the workers
//! report them and the stitcher cuts them without reading a byte. In other periodic data the stitcher alone
//! cuts the region, at sequential speed. (desync's parallel chunker resynchronises the same way.)

use crate::chunker::Cutter;

/// Regions are used only with this many worker threads or more. Below, the sequential pipeline (a reader
/// thread, the cutting walker, hashing workers) already keeps every core busy, and measured faster on two
/// cores: 0.95–1.09 s against 1.11–1.18 s for the incremental commit of a 1 GiB image (docs/benchmarks.md).
pub(crate) const REGION_MIN_THREADS: usize = 4;

/// The most bytes per region: large enough that the junction work is small (about 2 % at 4 MiB).
pub(crate) const REGION_MAX: u64 = 4 << 20;

/// What the regions in flight may hold: each worker's buffer (a region and a maximum chunk), and the results
/// of the regions read ahead of the stitcher (their new chunks' blobs: up to a region each where nothing
/// compresses). With 4 MiB regions whatever the thread count, a first commit of incompressible data peaked at
/// 78 MiB with 4 threads and 142 MiB with 8, against the commit's bound of 64 MiB.
const REGION_BUDGET: u64 = 24 << 20;

/// What the regions get however much the store's writes hold: 1 MiB regions for up to three workers.
const REGION_BUDGET_MIN: u64 = 8 << 20;

/// The regions' budget beside a store whose own writes hold `store_writes` bytes ([`crate::backend::Backend::
/// write_memory`]: a bucket's upload parts). Both come out of the commit's bound: a first commit into a bucket
/// with 4 or 16 threads peaked at 74-81 MiB with the whole [`REGION_BUDGET`] beside four 6 MiB parts.
pub(crate) fn region_budget(store_writes: u64) -> u64 {
    REGION_BUDGET.saturating_sub(store_writes).max(REGION_BUDGET_MIN)
}

/// At most this many region workers, however many cores: each holds a catalog connection and a compressor
/// (about 2 MiB) besides its buffer, and more would shrink regions toward 1 MiB, where the junctions' repeated
/// work grows, to stay within [`REGION_BUDGET`].
pub(crate) const REGION_MAX_WORKERS: usize = 4;

/// The region length for `workers` region workers, which keep `workers + 2` regions in flight: a power of two
/// from 1 MiB to [`REGION_MAX`] such that a buffer per worker and a result per region in flight fit `budget`
/// (from [`region_budget`]).
pub(crate) fn region_len(workers: usize, budget: u64) -> u64 {
    let per = budget / (2 * workers as u64 + 2);
    (1u64 << per.max(1).ilog2()).clamp(1 << 20, REGION_MAX)
}

/// The least length of a file cut in regions by `workers` workers: four regions as long as a local store's.
/// Each file cut in regions starts its workers, each with a catalog connection and a compressor, so the
/// shorter regions beside a bucket's uploads ([`region_budget`]) do not bring smaller files to them.
pub(crate) fn region_min_file(workers: usize) -> u64 {
    4 * region_len(workers, REGION_BUDGET)
}

/// Offsets, relative to the region's start, and lengths of the chunks a worker cuts in a region on its own.
/// `buf` holds the region followed by up to one maximum chunk of what comes after it (less where the file
/// ends), so that every chunk starting inside the region can be cut.
pub(crate) fn cut_region(cutter: &Cutter, buf: &[u8], region_len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < region_len.min(buf.len()) {
        let len = cutter.cut(&buf[pos..]);
        out.push((pos, len));
        pos += len;
    }
    out
}

/// Chunks the stitcher cut itself at a region's start: offset, length, and what `cut_at` noted of each.
pub(crate) type Junction<T> = Vec<(u64, usize, T)>;

/// Carries the sequential chunking from `pos` into a region ending at `region_end` whose worker cut chunks
/// starting at `starts` (absolute offsets, ascending). `cut_at(p)` cuts the chunk starting at `p` and returns
/// its length with whatever the caller wants to remember of it. Returns the chunks the stitcher had to cut
/// itself, and the index of the first of `starts` that is on the sequential chunking (all of `starts` from
/// there on are); `pos` is left after the junction.
pub(crate) fn stitch<T, E>(
    pos: &mut u64,
    region_end: u64,
    starts: &[u64],
    mut cut_at: impl FnMut(u64) -> Result<(usize, T), E>,
) -> Result<(Junction<T>, usize), E> {
    let mut junction = Vec::new();
    loop {
        if let Ok(i) = starts.binary_search(pos) {
            return Ok((junction, i));
        }
        if *pos >= region_end {
            return Ok((junction, starts.len()));
        }
        let (len, t) = cut_at(*pos)?;
        junction.push((*pos, len, t));
        *pos += len as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::RepoParams;
    use crate::testutil::pseudo_random;
    use proptest::prelude::*;

    fn sequential(cutter: &Cutter, data: &[u8]) -> Vec<(u64, usize)> {
        cut_region(cutter, data, data.len()).into_iter().map(|(o, l)| (o as u64, l)).collect()
    }

    /// Chunks `data` region by region and stitches, as the commit pipeline does.
    fn parallel(cutter: &Cutter, data: &[u8], region: usize, max: usize) -> (Vec<(u64, usize)>, usize) {
        let mut out = Vec::new();
        let mut pos = 0u64;
        let mut redone = 0;
        for start in (0..data.len()).step_by(region) {
            let end = (start + region).min(data.len());
            let buf = &data[start..(end + max).min(data.len())];
            let own: Vec<(u64, usize)> =
                cut_region(cutter, buf, end - start).into_iter().map(|(o, l)| ((start + o) as u64, l)).collect();
            let starts: Vec<u64> = own.iter().map(|c| c.0).collect();
            let (junction, first) = stitch(&mut pos, end as u64, &starts, |p| {
                Ok::<_, ()>((cutter.cut(&data[p as usize..(p as usize + max).min(data.len())]), ()))
            })
            .unwrap();
            redone += junction.len();
            out.extend(junction.into_iter().map(|(o, l, ())| (o, l)));
            if let Some(&(o, l)) = own[first..].last() {
                pos = o + l as u64;
            }
            out.extend_from_slice(&own[first..]);
        }
        (out, redone)
    }

    fn small() -> (Cutter, usize) {
        let p = RepoParams { chunk_min: 1024, chunk_avg: 4096, chunk_max: 16384, ..Default::default() };
        (Cutter::new(&p), 16384)
    }

    #[test]
    fn stitched_cuts_equal_sequential_cuts_and_resync_quickly() {
        let (cutter, max) = small();
        let mut data = pseudo_random(3_000_000, 5);
        // Runs of zeros across region boundaries: cut at max, in step with the sequential chunking or not.
        data[190_000..420_000].fill(0);
        data[1_000_000..1_100_000].fill(7);
        for region in [65_536usize, 200_000, 262_144, 1 << 20] {
            let (got, redone) = parallel(&cutter, &data, region, max);
            assert_eq!(got, sequential(&cutter, &data), "region {region}");
            let boundaries = data.len().div_ceil(region);
            assert!(redone <= 4 * boundaries, "region {region}: {redone} chunks recut at {boundaries} boundaries");
        }
    }

    #[test]
    fn regions_shrink_with_more_workers_to_stay_within_the_budget() {
        let local = region_budget(0);
        assert_eq!(region_len(1, local), REGION_MAX);
        assert_eq!(region_len(4, local), 2 << 20);
        assert_eq!(region_len(8, local), 1 << 20);
        for w in 1..=8 {
            let len = region_len(w, local);
            assert!(len.is_power_of_two() && (w as u64 * (len + (256 << 10)) + (w as u64 + 2) * len) <= 28 << 20);
        }
    }

    #[test]
    fn a_store_that_holds_uploads_takes_its_memory_from_the_regions() {
        assert_eq!(region_budget(0), REGION_BUDGET);
        assert_eq!(region_budget(6 << 20), REGION_BUDGET - (6 << 20));
        // A bucket's default three 6 MiB parts leave the floor: 1 MiB regions for the four workers.
        assert_eq!(region_budget(18 << 20), REGION_BUDGET_MIN);
        assert_eq!(region_budget(u64::MAX), REGION_BUDGET_MIN);
        assert_eq!(region_len(4, region_budget(18 << 20)), 1 << 20);
        assert_eq!(region_len(2, region_budget(18 << 20)), 1 << 20);
        assert_eq!(region_len(1, region_budget(12 << 20)), 2 << 20);
        // Which files are cut in regions does not change with the budget.
        assert_eq!(region_min_file(4), 8 << 20);
    }

    proptest! {
        #[test]
        fn stitching_never_changes_a_cut(len in 0usize..400_000, seed in any::<u64>(), region in 1usize..120_000,
                                          zeros in 0usize..100_000) {
            let (cutter, max) = small();
            let mut data = pseudo_random(len, seed);
            let z = zeros.min(len);
            data[len - z..].fill(0);
            prop_assert_eq!(parallel(&cutter, &data, region, max).0, sequential(&cutter, &data));
        }
    }
}
