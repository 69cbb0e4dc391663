//! Runs of blobs: blobs that sit close together in one pack, fetched with one read from a disk or one request
//! to a bucket. Checkout, verify and GC's rewrite read packs this way.

use std::io::{self, Read};

use crate::aligned::AlignedBuf;
use crate::backend::Backend;

/// Unused blobs (left by GC) shorter than this between two blobs wanted are read through rather than skipped.
pub(crate) const MAX_GAP: u64 = 256 << 10;

/// Where a blob sits in its pack: its offset and stored length.
pub(crate) type Span = (u64, u32);

/// How many of `spans` (in one pack, by offset) one run takes from the first, taking no more of them than
/// it needs: each next blob starts at most
/// `max_gap` bytes past the end of the one before, and the run spans at most `max_read` bytes (a blob longer
/// than that is a run of its own). A blob before the end of the one before ends the run.
pub(crate) fn run_len(spans: impl IntoIterator<Item = Span>, max_read: u64, max_gap: u64) -> usize {
    let mut spans = spans.into_iter();
    let Some((start, len)) = spans.next() else { return 0 };
    let mut end = start + len as u64;
    let mut n = 1;
    for (offset, len) in spans {
        let next_end = offset + len as u64;
        if offset < end || offset - end > max_gap || next_end - start > max_read {
            break;
        }
        end = next_end;
        n += 1;
    }
    n
}

/// What stopped a run.
#[derive(Debug)]
pub(crate) enum RunError<E> {
    /// The blob of this index, and those after it, could not be read; those before it were handed on.
    Read(usize, io::Error),
    /// The caller's handler failed.
    Handler(E),
}

/// Reads runs of blobs, reusing one buffer.
#[derive(Default)]
pub(crate) struct RunReader {
    buf: AlignedBuf,
}

impl RunReader {
    /// Reads the blobs at `spans` (one run of `pack`, as [`run_len`] makes them) and hands each to `each`
    /// with its index, in order.
    ///
    /// From a disk the run is one read into a buffer as long as the run. From a bucket
    /// ([`Backend::reads_are_requests`]) it is one request whose body is taken blob by blob as it arrives,
    /// so that the buffer holds one blob: sixteen readers of 8 MiB runs took a checkout to 107 MiB when each
    /// held its whole run.
    pub fn read<E>(
        &mut self,
        backend: &dyn Backend,
        pack: &str,
        spans: &[Span],
        mut each: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), RunError<E>> {
        debug_assert!(spans.windows(2).all(|w| w[1].0 >= w[0].0 + w[0].1 as u64), "spans overlap or go back");
        let (Some(&(start, _)), Some(&(last, last_len))) = (spans.first(), spans.last()) else { return Ok(()) };
        let end = last + last_len as u64;
        if backend.reads_are_requests() {
            let mut body = backend.read_range(pack, start, end - start).map_err(|e| RunError::Read(0, e))?;
            let mut pos = start;
            for (k, &(offset, len)) in spans.iter().enumerate() {
                // The gap's bytes (blobs the caller skips) are read through: a second request would cost more.
                for want in [offset - pos, len as u64] {
                    self.buf.set_len(want as usize);
                    body.read_exact(&mut self.buf).map_err(|e| RunError::Read(k, e))?;
                }
                each(k, &self.buf).map_err(RunError::Handler)?;
                pos = offset + len as u64;
            }
            return Ok(());
        }
        self.buf.set_len((end - start) as usize);
        match backend.read_at(pack, start, &mut self.buf) {
            Ok(()) => {}
            // The pack ends inside the run: read blob by blob to hand on those before the end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && spans.len() > 1 => {
                for (k, &(offset, len)) in spans.iter().enumerate() {
                    self.buf.set_len(len as usize);
                    backend.read_at(pack, offset, &mut self.buf).map_err(|e| RunError::Read(k, e))?;
                    each(k, &self.buf).map_err(RunError::Handler)?;
                }
                // Each blob could be read on its own: nothing to report.
                return Ok(());
            }
            Err(e) => return Err(RunError::Read(0, e)),
        }
        for (k, &(offset, len)) in spans.iter().enumerate() {
            let at = (offset - start) as usize;
            each(k, &self.buf[at..at + len as usize]).map_err(RunError::Handler)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::testutil::{Hooked, pseudo_random};

    const PACK: &str = "packs/aa/run.pack";

    /// A store holding `data` as [`PACK`], and the log of the lengths of the reads made from it.
    fn store(dir: &std::path::Path, data: &[u8], requests: bool) -> (Hooked, Arc<Mutex<Vec<usize>>>) {
        let mut backend = Hooked::new(dir);
        let mut w = backend.create().unwrap();
        w.write_all(data).unwrap();
        w.publish(PACK).unwrap();
        let reads = Arc::new(Mutex::new(Vec::new()));
        let log = reads.clone();
        backend.on_read = Box::new(move |_, len| log.lock().unwrap().push(len));
        backend.requests = requests;
        (backend, reads)
    }

    /// The blobs a run hands on, and how it ended.
    fn read_all(backend: &dyn Backend, spans: &[Span]) -> (Vec<Vec<u8>>, Result<(), RunError<()>>) {
        let mut got = Vec::new();
        let end = RunReader::default().read(backend, PACK, spans, |k, blob| {
            assert_eq!(k, got.len(), "blobs are handed on in order");
            got.push(blob.to_vec());
            Ok(())
        });
        (got, end)
    }

    #[test]
    fn runs_stop_at_long_gaps_overlaps_and_the_length_limit() {
        let back_to_back = [(0, 10), (10, 5), (15, 5)];
        assert_eq!(run_len(back_to_back, 100, 0), 3);
        assert_eq!(run_len(back_to_back, 15, 0), 2);
        assert_eq!(run_len([(0, 10), (20, 5)], 100, 10), 2);
        assert_eq!(run_len([(0, 10), (20, 5)], 100, 9), 1);
        assert_eq!(run_len([(0, 10), (5, 5)], 100, 100), 1, "a blob before the last one's end");
        assert_eq!(run_len([(0, 200), (200, 5)], 100, 0), 1, "a blob longer than the limit is a run alone");
        assert_eq!(run_len(std::iter::empty(), 100, 0), 0);
    }

    #[test]
    fn a_run_hands_on_every_blob_from_a_disk_and_from_a_stream() {
        let data = pseudo_random(64 << 10, 11);
        // Back to back, then a gap of unused bytes, then a last blob.
        let spans = [(100, 3000), (3100, 9000), (12100, 500), (20000, 7000)];
        let want: Vec<Vec<u8>> = spans.iter().map(|&(o, l)| data[o as usize..][..l as usize].to_vec()).collect();
        for requests in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (backend, reads) = store(dir.path(), &data, requests);
            let (got, end) = read_all(&backend, &spans);
            end.unwrap();
            assert!(got == want, "requests: {requests}");
            let reads = reads.lock().unwrap().clone();
            if requests {
                // Taken from the stream a blob (or a gap) at a time: nothing holds the run.
                assert!(reads.iter().all(|&n| n <= 9000), "{reads:?}");
            } else {
                assert_eq!(reads, [27000 - 100]);
            }
        }
    }

    #[test]
    fn a_pack_cut_short_hands_on_the_blobs_before_the_cut() {
        let data = pseudo_random(32 << 10, 12);
        let spans = [(0, 4000), (4000, 4000), (8000, 4000), (12000, 4000)];
        for requests in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (backend, _) = store(dir.path(), &data, requests);
            std::fs::OpenOptions::new().write(true).open(dir.path().join(PACK)).unwrap().set_len(10_000).unwrap();
            let (got, end) = read_all(&backend, &spans);
            assert_eq!(got.len(), 2, "requests: {requests}");
            assert!(got[1] == data[4000..8000]);
            match end {
                Err(RunError::Read(2, e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("requests: {requests}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_missing_pack_fails_before_any_blob_and_a_handler_error_stops_the_run() {
        let data = pseudo_random(16 << 10, 13);
        let spans = [(0, 4000), (4000, 4000), (8000, 4000)];
        for requests in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (backend, _) = store(dir.path(), &data, requests);
            let mut calls = 0;
            let end = RunReader::default().read(&backend, PACK, &spans, |k, _| {
                calls += 1;
                if k == 1 { Err("full disk") } else { Ok(()) }
            });
            assert!(matches!(end, Err(RunError::Handler("full disk"))) && calls == 2, "requests: {requests}");
            backend.remove(PACK).unwrap();
            match RunReader::default().read(&backend, PACK, &spans, |_, _| -> Result<(), ()> { panic!("no blob") }) {
                Err(RunError::Read(0, e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
                other => panic!("requests: {requests}: {other:?}"),
            }
        }
    }
}
