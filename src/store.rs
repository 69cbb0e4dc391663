//! The chunk store: chunks go into packs on the way in, and come out verified against their hash.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::aligned::AlignedBuf;
use crate::backend::Backend;
use crate::catalog::{Catalog, FoundDamage};
use crate::error::{Error, Result};
use crate::grouping;
use crate::id::ObjectId;
use crate::pack::{FLAG_GROUPED, FLAG_ZSTD, PackEntry, PackWriter};
use crate::runs::{RunError, RunReader, Span, run_len};
use crate::tree::ChunkRef;

/// Compresses a chunk for storage: as byte planes if the chunk looks like an array of numbers and the
/// repository's format allows it, else as a zstd frame; and as the chunk itself if neither is smaller.
pub(crate) struct Compressor {
    inner: zstd::bulk::Compressor<'static>,
    /// Present when byte planes may be written.
    planes: Option<grouping::Encoder>,
    out: Vec<u8>,
}

impl Compressor {
    /// `group`: whether byte planes may be written ([`crate::RepoParams::groups_bytes`]).
    pub fn new(level: i32, group: bool) -> Result<Self> {
        let zstd_error = |e| Error::Internal(format!("zstd: {e}"));
        let inner = zstd::bulk::Compressor::new(level).map_err(zstd_error)?;
        let planes = if group { Some(grouping::Encoder::new().map_err(zstd_error)?) } else { None };
        Ok(Compressor { inner, planes, out: Vec::new() })
    }

    /// Returns the flags and the blob to store.
    pub fn compress<'a>(&'a mut self, data: &'a [u8]) -> (u8, &'a [u8]) {
        if let Some((encoder, plan)) = self.planes.as_mut().and_then(|e| Some((e, grouping::plan(data)?))) {
            grouping::encode(data, plan, encoder, &mut self.out);
            return match self.out.len() < data.len() {
                true => (FLAG_GROUPED, &self.out),
                false => (0, data),
            };
        }
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        match self.inner.compress_to_buffer(data, &mut self.out) {
            Ok(n) if n < data.len() => (FLAG_ZSTD, &self.out[..n]),
            _ => (0, data),
        }
    }
}

/// Turns a stored blob back into its chunk and checks it against the chunk's id: the one place every reader
/// of packs (checkout, verify, GC's rewrite) decides whether bytes are good.
pub(crate) struct BlobDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    /// One buffer reused for every chunk: a fresh allocation per chunk costs page faults.
    out: AlignedBuf,
    /// The decompressed planes of a grouped blob, reused likewise.
    planes: Vec<u8>,
}

impl BlobDecoder {
    pub fn new() -> Result<Self> {
        let decompressor = zstd::bulk::Decompressor::new().map_err(|e| Error::Internal(format!("zstd: {e}")))?;
        Ok(BlobDecoder { decompressor, out: AlignedBuf::default(), planes: Vec::new() })
    }

    /// The chunk `blob` holds, or why it is not chunk `id` of `raw_len` bytes.
    pub fn decode<'a>(
        &'a mut self,
        id: &ObjectId,
        flags: u8,
        raw_len: u32,
        blob: &'a [u8],
    ) -> std::result::Result<&'a [u8], String> {
        let data = match flags {
            FLAG_ZSTD => {
                // A blob that inflates beyond `raw_len` does not fit: zstd refuses it rather than growing the
                // buffer.
                self.out.set_len(raw_len as usize);
                let n = self
                    .decompressor
                    .decompress_to_buffer(blob, &mut self.out[..])
                    .map_err(|e| format!("cannot be decompressed ({e})"))?;
                &self.out[..n]
            }
            FLAG_GROUPED => {
                self.out.set_len(raw_len as usize);
                grouping::decode(blob, &mut self.out[..], &mut self.decompressor, &mut self.planes)?;
                &self.out[..]
            }
            0 => blob,
            _ => return Err(format!("has unknown flags {flags}")),
        };
        if data.len() != raw_len as usize || ObjectId::of(data) != *id {
            return Err("content does not match its hash".into());
        }
        Ok(data)
    }
}

/// Reads chunks back, decompressing and checking each against its id.
pub(crate) struct ChunkReader {
    backend: Arc<dyn Backend>,
    decoder: BlobDecoder,
    runs: RunReader,
    max_read: u64,
    /// Damage met is marked (see [`Catalog::note_damaged`]) until marking fails once: a reader meeting much
    /// damage while another process holds the catalog's write lock waits for it once, not once per file.
    marking: bool,
    /// Packs missing or cut short whose chunks this reader has marked already (each costs a scan).
    packs_marked: HashSet<String>,
}

/// Reads are merged when chunks sit back to back in one pack, up to this many bytes per read.
pub(crate) const MAX_READ: u64 = 8 << 20;

/// How long one of `threads` readers' merged reads may be. From a disk all of them share 16 MiB (at least
/// 512 KiB each): many readers need no long reads to keep it busy, and 8 MiB each took a checkout on 32
/// threads to 166 MiB. From a bucket every read is a request ([`Backend::reads_are_requests`]), and each
/// reads up to 8 MiB, the fewer requests the better; its body is taken blob by blob as it arrives
/// ([`crate::runs::RunReader`]), so the length costs no memory.
pub(crate) fn read_share(reads_are_requests: bool, threads: usize) -> u64 {
    if reads_are_requests {
        return MAX_READ;
    }
    (READ_BUDGET / threads.max(1) as u64).clamp(MIN_READ_SHARE, MAX_READ)
}

/// What all of a disk's readers' merged reads hold at once (see [`read_share`]).
const READ_BUDGET: u64 = 16 << 20;
/// The least one reader's share, however many there are.
const MIN_READ_SHARE: u64 = 512 << 10;
/// Readers beyond this many each get the least share, and together hold more than the budget.
pub(crate) const READERS_WITHIN_BUDGET: usize = (READ_BUDGET / MIN_READ_SHARE) as usize;

impl ChunkReader {
    pub fn new(backend: Arc<dyn Backend>) -> Result<Self> {
        Self::with_max_read(backend, MAX_READ)
    }

    /// A reader whose merged reads stop at `max_read` bytes (a single blob larger than that is still read
    /// whole): its buffer, held for as long as the reader, is what many readers at once multiply.
    pub fn with_max_read(backend: Arc<dyn Backend>, max_read: u64) -> Result<Self> {
        Ok(ChunkReader {
            backend,
            decoder: BlobDecoder::new()?,
            runs: RunReader::default(),
            max_read,
            marking: true,
            packs_marked: HashSet::new(),
        })
    }

    /// Reads `refs` in order, handing each verified chunk to `sink` with its index in `refs`.
    pub fn read_chunks(
        &mut self,
        catalog: &Catalog,
        refs: &[ChunkRef],
        sink: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.read_from(catalog, refs, 0, false, sink).map_err(|(_, e)| e)
    }

    /// As [`read_chunks`](Self::read_chunks), and a failure names the index of the chunk it concerns (for a
    /// pack that cannot be read, the first chunk not handed to `sink`), so that a caller reading for many
    /// files at once can say which file failed.
    pub fn read_chunks_indexed(
        &mut self,
        catalog: &Catalog,
        refs: &[ChunkRef],
        sink: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> std::result::Result<(), (usize, Error)> {
        self.read_from(catalog, refs, 0, false, sink)
    }

    fn read_from(
        &mut self,
        catalog: &Catalog,
        refs: &[ChunkRef],
        from: usize,
        retried: bool,
        mut sink: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> std::result::Result<(), (usize, Error)> {
        if refs.is_empty() {
            return Ok(());
        }
        // All lookups in one read transaction: one per chunk had SQLite set up every read anew, an `fstat` of
        // the catalog each (5,100 for a checkout of 5,100 small files).
        let lookup = || {
            let mut locs = Vec::with_capacity(refs.len());
            for (k, r) in refs.iter().enumerate() {
                let loc = catalog
                    .chunk_location(&r.id)
                    .and_then(|loc| {
                        loc.ok_or_else(|| Error::corrupt(format!("chunk {} is missing from the chunk index", r.id)))
                    })
                    .map_err(|e| (k, e))?;
                if loc.raw_len != r.len {
                    let why =
                        format!("chunk {} has length {} in the index but {} in the file", r.id, loc.raw_len, r.len);
                    return Err((k, Error::corrupt(why)));
                }
                locs.push(loc);
            }
            Ok(locs)
        };
        let locs = crate::catalog::in_snapshot(catalog.connection(), || Ok(lookup())).map_err(|e| (from, e))??;
        let spans: Vec<Span> = locs.iter().map(|l| (l.offset, l.stored_len)).collect();
        let mut i = from;
        while i < refs.len() {
            // A run is of blobs back to back in one pack, as a file's new chunks were written.
            let in_pack = locs[i..].iter().take_while(|l| l.pack == locs[i].pack);
            let j = i + run_len(in_pack.map(|l| (l.offset, l.stored_len)), self.max_read, 0);
            let decoder = &mut self.decoder;
            // After a chunk fails its hash, the rest of the run, already read, is only checked: damage often
            // comes in runs, and every chunk found damaged is marked below, not only the first.
            let mut failed = None;
            let mut found = FoundDamage { pack: locs[i].pack.clone(), ..Default::default() };
            let read = self.runs.read(self.backend.as_ref(), &locs[i].pack, &spans[i..j], |n, blob| {
                let k = i + n;
                match decoder.decode(&refs[k].id, locs[k].flags, locs[k].raw_len, blob) {
                    Err(why) => {
                        found.chunks.push(refs[k].id);
                        if failed.is_none() {
                            let at = format!("chunk {} in {} at offset {}", refs[k].id, locs[k].pack, locs[k].offset);
                            failed = Some((k, Error::corrupt(format!("{at}: {why}"))));
                        }
                        Ok(())
                    }
                    Ok(_) if failed.is_some() => Ok(()),
                    Ok(data) => sink(k, data).map_err(|e| (k, e)),
                }
            });
            // Marked so that the next commit meeting these bytes stores them afresh.
            match &read {
                // Nothing of the pack is there from this chunk on.
                Err(RunError::Read(n, e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    found.from_offset = Some(locs[i + n].offset);
                }
                Err(RunError::Read(_, e)) if e.kind() == std::io::ErrorKind::NotFound && retried => {
                    found.from_offset = Some(0);
                }
                _ => {}
            }
            if found.from_offset.is_some() && !self.packs_marked.insert(found.pack.clone()) {
                found.from_offset = None;
            }
            if self.marking && !found.is_empty() {
                self.marking = catalog.note_damaged(&found);
            }
            if let Some(first) = failed {
                return Err(first);
            }
            match read {
                Ok(()) => {}
                Err(RunError::Handler(e)) => return Err(e),
                // Packs are published whole and never written again, so one shorter than its catalog rows
                // say is damaged, as verify says too; not a failure that a retry might get past.
                Err(RunError::Read(n, e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    let l = &locs[i + n];
                    let why = format!(
                        "pack {} is cut short: chunk {} at offset {} is not all there",
                        l.pack,
                        refs[i + n].id,
                        l.offset
                    );
                    return Err((i + n, Error::corrupt(why)));
                }
                Err(RunError::Read(n, e)) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err((i + n, Error::backend(&locs[i].pack, e)));
                }
                Err(RunError::Read(n, _)) if retried => {
                    return Err((i + n, Error::corrupt(format!("pack {} is missing", locs[i].pack))));
                }
                // A concurrent GC may have moved these chunks to a new pack and deleted the old one: look
                // them up again and read them from wherever they are now.
                Err(RunError::Read(n, _)) => return self.read_from(catalog, refs, i + n, true, sink),
            }
            i = j;
        }
        Ok(())
    }
}

/// A pack published: its name, size and index entries.
pub(crate) type Published = (String, u64, Vec<PackEntry>);

/// Packs published at once on threads of their own, beyond which filling the next pack waits.
const PUBLISHING: usize = 2;

/// Fills packs with new chunks, never storing one chunk twice within a commit.
pub(crate) struct Packer {
    backend: Arc<dyn Backend>,
    target: u64,
    current: Option<PackWriter>,
    /// Chunks written by this packer whose pack is not yet recorded in the catalog.
    pending: HashSet<ObjectId>,
    /// Full packs being published, oldest first, when the backend's publishing is slow (an upload): the next
    /// pack fills meanwhile.
    publishing: VecDeque<std::thread::JoinHandle<Result<Published>>>,
}

impl Packer {
    pub fn new(backend: Arc<dyn Backend>, target: u64) -> Self {
        Packer { backend, target, current: None, pending: HashSet::new(), publishing: VecDeque::new() }
    }

    /// Whether this packer holds the chunk in a pack not yet indexed.
    pub fn is_pending(&self, id: &ObjectId) -> bool {
        self.pending.contains(id)
    }

    /// Appends a chunk; returns the packs whose publishing has completed since the last call (a pack is
    /// published once it is full).
    pub fn add(&mut self, id: ObjectId, flags: u8, raw_len: u32, blob: &[u8]) -> Result<Vec<Published>> {
        if self.current.is_none() {
            self.current = Some(PackWriter::new(self.backend.as_ref())?);
        }
        let w = self.current.as_mut().expect("just set");
        w.add(id, flags, raw_len, blob)?;
        self.pending.insert(id);
        let mut done = Vec::new();
        if w.len() >= self.target {
            let w = self.current.take().expect("just used");
            if !self.backend.concurrent_publish() {
                return Ok(vec![w.finish()?]);
            }
            if self.publishing.len() >= PUBLISHING {
                done.push(self.join_oldest()?);
            }
            self.publishing.push_back(std::thread::spawn(move || w.finish()));
        }
        while self.publishing.front().is_some_and(|h| h.is_finished()) {
            done.push(self.join_oldest()?);
        }
        Ok(done)
    }

    fn join_oldest(&mut self) -> Result<Published> {
        let h = self.publishing.pop_front().ok_or_else(|| Error::Internal("no pack being published".into()))?;
        h.join().map_err(|_| Error::Internal("publishing a pack panicked".into()))?
    }

    /// Publishes the current pack, if it holds anything, and waits for every pack being published.
    pub fn finish(&mut self) -> Result<Vec<Published>> {
        let mut done = Vec::new();
        while !self.publishing.is_empty() {
            done.push(self.join_oldest()?);
        }
        match self.current.take() {
            Some(w) if !w.is_empty() => done.push(w.finish()?),
            _ => {}
        }
        Ok(done)
    }

    /// Forgets pending ids once their pack is recorded in the catalog (where dedup finds them from then on).
    pub fn indexed(&mut self, entries: &[PackEntry]) {
        for e in entries {
            self.pending.remove(&e.id);
        }
    }
}

impl Drop for Packer {
    /// A packer dropped on an error path waits for its uploads: nothing keeps running behind the caller's back
    /// (what they published is an orphan for GC).
    fn drop(&mut self) {
        for h in self.publishing.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::catalog::Batch;
    use crate::params::RepoParams;

    #[test]
    fn read_shares_keep_all_readers_within_the_budget() {
        for threads in 1..=256 {
            let share = read_share(false, threads);
            assert!((512 << 10..=MAX_READ).contains(&share), "{threads}: {share}");
            assert!(share == 512 << 10 || threads as u64 * share <= 16 << 20, "{threads}: {share}");
            assert_eq!(read_share(true, threads), MAX_READ);
        }
        // On 2 cores a checkout runs 4 workers and verify 2: they read 4 and 8 MiB at a time.
        assert_eq!((read_share(false, 4), read_share(false, 2)), (4 << 20, MAX_READ));
        // The most readers that fit: each at the least share, all of them the whole budget.
        assert_eq!(read_share(false, READERS_WITHIN_BUDGET) * READERS_WITHIN_BUDGET as u64, 16 << 20);
    }

    #[test]
    fn a_blob_that_inflates_beyond_its_length_is_refused_without_growing() {
        // 64 MiB of zeros compress to a few kilobytes: a hostile pack could name it a 4 KiB chunk.
        let huge = vec![0u8; 64 << 20];
        let bomb = zstd::bulk::compress(&huge, 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        let mut decoder = BlobDecoder::new().unwrap();
        let err = decoder.decode(&ObjectId::of(&huge[..4096]), FLAG_ZSTD, 4096, &bomb).unwrap_err();
        assert!(err.contains("cannot be decompressed"), "{err}");
        assert!(decoder.out.len() <= 4096, "the output buffer grew to {}", decoder.out.len());
        // Garbage that is not a zstd frame at all, and a raw blob of the wrong length.
        assert!(decoder.decode(&ObjectId::of(b"x"), FLAG_ZSTD, 1, b"not zstd").is_err());
        assert!(decoder.decode(&ObjectId::of(b"xy"), 0, 2, b"x").is_err());
    }

    /// Chunks of two packs asked for out of order, one twice: each comes back in the order asked, and only
    /// chunks back to back in one pack share a read.
    #[test]
    fn chunks_of_two_packs_in_any_order_come_back_as_asked() {
        for requests in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut cat = Catalog::create(&dir.path().join("c.db"), &RepoParams::default()).unwrap();
            std::fs::create_dir(dir.path().join("store")).unwrap();
            let mut hooked = crate::testutil::Hooked::new(&dir.path().join("store"));
            let reads = Arc::new(std::sync::Mutex::new(0));
            let counted = reads.clone();
            hooked.on_read = Box::new(move |_, _| *counted.lock().unwrap() += 1);
            hooked.requests = requests;
            let backend: Arc<dyn Backend> = Arc::new(hooked);
            let mut comp = Compressor::new(3, true).unwrap();
            // Packs A and B, four chunks each.
            let mut chunks = Vec::new();
            for pack in 0..2u64 {
                let mut packer = Packer::new(backend.clone(), 1 << 20);
                for c in 0..4u64 {
                    let data = crate::testutil::pseudo_random(3000 + 100 * c as usize, 10 * pack + c);
                    let (flags, blob) = comp.compress(&data);
                    packer.add(ObjectId::of(&data), flags, data.len() as u32, blob).unwrap();
                    chunks.push(data);
                }
                let pack = packer.finish().unwrap().pop().unwrap();
                cat.write_batch(&mut Batch { packs: vec![pack], ..Default::default() }, None).unwrap();
            }
            // Runs: A0 A1 | B0 | A3 | A2 | B1 B2 | A0 | B1. Raw blobs, and A0 as long as B0: B1 starts in B
            // where A0 ends in A, so only the packs tell those two apart.
            let order = [0, 1, 4, 3, 2, 5, 6, 0, 5];
            let refs: Vec<ChunkRef> =
                order.iter().map(|&k| ChunkRef { id: ObjectId::of(&chunks[k]), len: chunks[k].len() as u32 }).collect();
            *reads.lock().unwrap() = 0;
            let mut got = Vec::new();
            ChunkReader::new(backend.clone())
                .unwrap()
                .read_chunks(&cat, &refs, |i, d| {
                    assert_eq!(i, got.len());
                    got.push(d.to_vec());
                    Ok(())
                })
                .unwrap();
            assert!(got.iter().zip(order).all(|(g, k)| *g == chunks[k]), "requests: {requests}");
            if !requests {
                assert_eq!(*reads.lock().unwrap(), 7);
            }
        }
    }

    #[test]
    fn stored_chunks_read_back_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::create(&dir.path().join("c.db"), &RepoParams::default()).unwrap();
        let mem = MemoryBackend::new();
        let backend: Arc<dyn Backend> = Arc::new(mem.clone());
        let mut packer = Packer::new(backend.clone(), 1 << 20);
        let mut comp = Compressor::new(3, true).unwrap();
        let chunks: Vec<Vec<u8>> =
            vec![vec![7u8; 5000], (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect(), b"tiny".to_vec()];
        let mut refs = Vec::new();
        for c in &chunks {
            let id = ObjectId::of(c);
            let (flags, blob) = comp.compress(c);
            assert!(packer.add(id, flags, c.len() as u32, blob).unwrap().is_empty());
            refs.push(ChunkRef { id, len: c.len() as u32 });
        }
        assert!(packer.is_pending(&refs[0].id));
        let pack = packer.finish().unwrap().pop().unwrap();
        assert_eq!(pack.2[0].flags, FLAG_ZSTD, "a run of one byte must compress");
        assert_eq!(pack.2[2].flags, 0, "four bytes cannot shrink");
        packer.indexed(&pack.2);
        let name = pack.0.clone();
        cat.write_batch(&mut Batch { packs: vec![pack], ..Default::default() }, None).unwrap();

        let mut reader = ChunkReader::new(backend.clone()).unwrap();
        let mut got = vec![Vec::new(); 3];
        reader
            .read_chunks(&cat, &refs, |i, d| {
                got[i] = d.to_vec();
                Ok(())
            })
            .unwrap();
        assert_eq!(got, chunks);

        // Flip a byte inside the last (raw) chunk's blob: reading must fail with corruption.
        let loc = cat.chunk_location(&refs[2].id).unwrap().unwrap();
        let size = mem.size(&name).unwrap() as usize;
        let mut bytes = vec![0u8; size];
        mem.read_at(&name, 0, &mut bytes).unwrap();
        bytes[loc.offset as usize + 1] ^= 0x40;
        let mut w = mem.create().unwrap();
        std::io::Write::write_all(&mut w, &bytes).unwrap();
        w.publish(&name).unwrap();
        let err = reader.read_chunks(&cat, &refs, |_, _| Ok(())).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains(&refs[2].id.to_hex()));
    }
}
