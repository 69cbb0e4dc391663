//! Byte buffers that start on a page boundary, for large reads from and writes to the kernel.
//!
//! glibc serves a large allocation from its own mapping, 16 bytes past a page boundary. The kernel copies
//! file data to user memory with `rep movsb`, which on the machines we measured runs four times slower into a
//! destination misaligned that way (512 MiB from the page cache: 0.24 s into a buffer at page + 16, 0.06 s at
//! page + 64). Every large read buffer therefore comes from here.

use std::io::{self, Read};
use std::ops::{Deref, DerefMut};

const ALIGN: usize = 4096;

/// A buffer of `len` bytes starting on a page boundary (writes from a page-aligned buffer measured faster
/// too). Growing it zeroes only new memory; shrinking and growing back again does not clear what is there, so
/// a recycled buffer costs no memset.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = AlignedBuf::default();
        b.set_len(len);
        b
    }

    /// Sets the length to `len`. Bytes beyond the previous length hold whatever this buffer held there
    /// before, or zeros: callers overwrite them or read only what they wrote.
    pub fn set_len(&mut self, len: usize) {
        if self.start + len > self.mem.len() {
            // New memory is needed: nothing worth copying into it.
            self.len = 0;
        }
        self.grow_keeping(len);
    }

    /// Sets the length to `len`, keeping the bytes held now.
    fn grow_keeping(&mut self, len: usize) {
        if self.start + len > self.mem.len() {
            // Fresh zeroed memory rather than `resize`: the allocator hands out untouched pages, where
            // `resize` would write every byte (a 2 MiB memset and 512 page faults for a 4 KiB file).
            let mut mem = vec![0; len + ALIGN];
            let start = mem.as_ptr().align_offset(ALIGN);
            mem[start..start + self.len].copy_from_slice(&self.mem[self.start..self.start + self.len]);
            (self.mem, self.start) = (mem, start);
        }
        self.len = len;
    }

    /// Fills the buffer with up to `len` bytes read from `r` (fewer only at the end of the input); returns
    /// how many, which is also the new length. The buffer grows as the input goes on, so a small file read
    /// through a fresh 1 MiB block touches kilobytes, not the block.
    pub fn fill_from(&mut self, r: &mut (impl Read + ?Sized), len: usize) -> io::Result<usize> {
        let have = self.mem.len().saturating_sub(self.start);
        let mut room = have.max(64 << 10).min(len);
        self.set_len(room);
        let mut n = 0;
        while n < len {
            if n == room {
                room = (room * 2).min(len);
                self.len = n;
                self.grow_keeping(room);
            }
            match r.read(&mut self[n..room]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.len = 0;
                    return Err(e);
                }
            }
        }
        self.len = n;
        Ok(n)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_aligned_and_keeps_what_was_read() {
        let mut b = AlignedBuf::default();
        for len in [0, 1, 100, 5000, 3 << 20, 17, 4 << 20] {
            b.set_len(len);
            assert_eq!(b.len(), len);
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            }
        }
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        // A reader that hands out a few bytes per call: the fill must continue to the requested length.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        assert_eq!(b.fill_from(&mut Dribble(&data), 4096).unwrap(), 4096);
        assert_eq!(&b[..], &data[..4096]);
        assert_eq!(b.fill_from(&mut Dribble(&data[9000..]), 4096).unwrap(), 1000);
        assert_eq!(&b[..], &data[9000..]);
        // A fresh buffer grows while it fills, keeping what it read and its alignment.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut fresh = AlignedBuf::default();
        assert_eq!(fresh.fill_from(&mut &big[..], 200_000).unwrap(), 200_000);
        assert_eq!(&fresh[..], &big[..200_000]);
        assert_eq!(fresh.as_ptr() as usize % ALIGN, 0);
    }
}
