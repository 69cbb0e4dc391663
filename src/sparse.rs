//! Runs of zeros: found fast, so that chunking, hashing and checkout can skip them.

/// Whether every byte of `b` is zero. Works in 32-byte strides the compiler vectorises, unlike a
/// short-circuiting byte loop.
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut strides = b.chunks_exact(32);
    let body = strides.by_ref().all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0);
    body && strides.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
