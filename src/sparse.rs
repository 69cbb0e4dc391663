//! Runs of zeros: found fast, so that chunking, hashing and checkout can skip them.

use std::fs::File;
use std::io;

use crate::aligned::AlignedBuf;
use crate::chunker::read_at_most;

/// Whether every byte of `b` is zero. Works in 32-byte strides the compiler vectorises, unlike a
/// short-circuiting byte loop.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut strides = b.chunks_exact(32);
    let body = strides.by_ref().all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0);
    body && strides.remainder().iter().all(|&x| x == 0)
}

/// Where the next data of `f` at or after `offset` lies, as the filesystem reports it: `offset` itself
/// inside data, the end of a hole, or `None` when only a hole (or nothing) follows. A filesystem that does not
/// track holes reports everything as data.
pub(crate) fn next_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(offset)) {
        Ok(at) => Ok(Some(at)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        // Not supported here: treat it all as data, as a plain read would.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => Ok(Some(offset)),
        Err(e) => Err(e.into()),
    }
}

/// Reads a file in blocks from offset 0, skipping the filesystem's holes: a block that lies wholly in a hole
/// is `None`, its bytes known to be zero without reading them (sparse VM images are largely holes).
pub(crate) struct HoleSkippingReader<'a> {
    f: &'a File,
    offset: u64,
    /// The next data at or after `offset`, once asked; `u64::MAX` when none follows.
    data_at: Option<u64>,
}

impl<'a> HoleSkippingReader<'a> {
    pub fn new(f: &'a File) -> Self {
        HoleSkippingReader { f, offset: 0, data_at: None }
    }

    /// The next block of `len` bytes, read into `buf` (`Some(n)`, `n < len` only at the end of the file),
    /// or `None` when those `len` bytes are a hole inside the file of length `file_len`.
    pub fn next_block(&mut self, buf: &mut AlignedBuf, len: usize, file_len: u64) -> io::Result<Option<usize>> {
        let end = self.offset + len as u64;
        if end <= file_len {
            let data_at = match self.data_at {
                Some(at) if at >= self.offset => at,
                _ => next_data(self.f, self.offset)?.unwrap_or(u64::MAX),
            };
            self.data_at = Some(data_at);
            if data_at >= end {
                self.offset = end;
                return Ok(None);
            }
        }
        buf.set_len(len);
        let n = read_at_most(self.f, buf, self.offset)?;
        buf.set_len(n);
        self.offset += n as u64;
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_any_nonzero_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 1000]));
        for at in [0, 31, 32, 500, 999] {
            let mut v = vec![0u8; 1000];
            v[at] = 1;
            assert!(!is_zero(&v), "{at}");
        }
    }

    #[test]
    fn holes_are_skipped_and_data_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let block = 64 << 10;
        let f = File::create(&path).unwrap();
        // Data in blocks 1 and 5 and at the very end; holes elsewhere (where the filesystem makes them).
        f.write_all_at(&[1u8; 100], block as u64 + 7).unwrap();
        f.write_all_at(&[2u8; 5000], 5 * block as u64).unwrap();
        f.write_all_at(&[3u8; 10], 9 * block as u64 + 90).unwrap();
        let len = f.metadata().unwrap().len();
        let f = File::open(&path).unwrap();
        let mut reader = HoleSkippingReader::new(&f);
        let (mut buf, mut rebuilt) = (AlignedBuf::default(), Vec::new());
        let mut skipped = 0;
        loop {
            match reader.next_block(&mut buf, block, len).unwrap() {
                None => {
                    skipped += 1;
                    rebuilt.resize(rebuilt.len() + block, 0);
                }
                Some(0) => break,
                Some(n) => rebuilt.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(rebuilt, std::fs::read(&path).unwrap());
        // Only a filesystem that tracks holes lets blocks be skipped; the bytes are right either way.
        let tracks_holes = next_data(&f, 0).unwrap() != Some(0);
        assert!(!tracks_holes || skipped >= 6, "{skipped} blocks skipped");
    }
}
