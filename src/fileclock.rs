//! The clock file timestamps come from, for telling files changed after a checkout from those it placed.
//!
//! A file's ctime is set by the kernel from its coarse clock (`CLOCK_REALTIME_COARSE`, which moves once per
//! tick, and on this project's VMs was seen up to 7.6 ms behind the fine clock with 4 ms ticks), or on
//! kernels with multigrain timestamps sometimes from the fine one, and is then cut down to the filesystem's
//! granularity (1 ns on ext4, XFS, btrfs and tmpfs; 1 s on an ext4 with small inodes, 2 s on FAT). A
//! fine-clock reading taken after a checkout is therefore no bound: a file changed a moment later can get a
//! ctime before it. [`Boundary`] is one that holds both ways.

use std::path::Path;
use std::time::Duration;

use rustix::time::{ClockId, Timespec, clock_gettime};

/// A time `at` (ns since the epoch) such that every file whose ctime was set before [`Boundary::after_now`] was
/// called has a ctime before `at`, as far as the filesystem's granularity allows (files placed within its last
/// granule may not, which only costs them a hash), and every ctime set after [`Boundary::wait`] returns is at
/// or after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Boundary {
    pub at: i64,
    /// Just after the fine clock's time when the boundary was drawn, which every ctime set until then is
    /// before; the coarse clock must reach it before anything is said to be done.
    next: i64,
}

fn ns(t: Timespec) -> i64 {
    t.tv_sec.saturating_mul(1_000_000_000).saturating_add(t.tv_nsec)
}

impl Boundary {
    /// The boundary after everything done so far, for files on the filesystem of `sample` (a file or
    /// directory there whose ctime shows its granularity).
    pub fn after_now(sample: &Path) -> Boundary {
        // Every timestamp set so far, coarse or fine, is at or before the fine clock's present.
        let next = ns(clock_gettime(ClockId::Realtime)).saturating_add(1);
        let granule = sample_granularity(sample);
        Boundary { at: next - next.rem_euclid(granule), next }
    }

    /// Waits until the coarse clock has caught up with the boundary (a tick or two, and mostly spent already
    /// writing the record), so that a change made from now on gets a ctime at or after `at`.
    pub fn wait(&self) {
        loop {
            let left = self.next - ns(clock_gettime(ClockId::RealtimeCoarse));
            if left <= 0 {
                return;
            }
            std::thread::sleep(Duration::from_nanos(left.unsigned_abs().min(1_000_000)));
        }
    }
}

/// A file's mtime in nanoseconds since the epoch.
pub(crate) fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

/// A file's ctime in nanoseconds since the epoch.
pub(crate) fn ctime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.ctime() * 1_000_000_000 + md.ctime_nsec()
}

/// The coarse clock's present, which every ctime set from now on is at or after (the kernel stamps from it,
/// or from the fine clock, which is ahead of it).
pub(crate) fn coarse_now() -> i64 {
    ns(clock_gettime(ClockId::RealtimeCoarse))
}

/// Whether a file whose ctime is `ctime_ns`, seen by a stat asked for after `start` (a [`coarse_now`]
/// reading), could change after that stat and keep its ctime: its ctime lies in the granule of its filesystem
/// that `start` falls in, or later, so a change within that granule gets the same one. Such a stat vouches for
/// nothing later (git's "racily clean" entries). The granularity is guessed from the ctime itself, so a
/// filesystem of coarse timestamps mounted inside a fine one is judged by its own.
pub(crate) fn may_change_unseen(ctime_ns: i64, start: i64) -> bool {
    let granule = granularity_of(ctime_ns.rem_euclid(1_000_000_000));
    ctime_ns >= start - start.rem_euclid(granule)
}

/// Whether the filesystem holding `path` gets multigrain timestamps from this kernel (Linux 6.13 and later,
/// for ext4, XFS, btrfs and tmpfs): once a stat has seen a file's ctime, its next change gets a fine-grained
/// one, so no change after a stat can keep the ctime the stat saw, and [`may_change_unseen`] need not be
/// asked there. Where it cannot tell, no.
pub(crate) fn multigrain(path: &Path) -> bool {
    static KERNEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let kernel = *KERNEL.get_or_init(|| {
        let release = rustix::system::uname().release().to_string_lossy().into_owned();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (6, 13)
    });
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let fs = rustix::fs::statfs(path).map(|s| s.f_type as i64);
    kernel && fs.is_ok_and(|t| [EXT4, XFS, BTRFS, TMPFS].contains(&t))
}

/// A granularity at least as coarse as the filesystem's at `sample`, guessed from the nanoseconds of its
/// ctime: the largest power of ten they are a multiple of (a filesystem of 1 ns shows most of them, rarely
/// a round number, which only makes the guess safer), 2 s where they are zero (FAT), 1 ns if it cannot be
/// read.
fn sample_granularity(sample: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(sample) else { return 1 };
    granularity_of(md.ctime_nsec())
}

fn granularity_of(nsec: i64) -> i64 {
    if nsec == 0 {
        return 2_000_000_000;
    }
    let mut g = 1;
    while g < 100_000_000 && nsec % (g * 10) == 0 {
        g *= 10;
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ctime_in_the_granule_the_commit_started_in_may_change_unseen() {
        let start = 1_700_000_000_123_456_789;
        // 1 ns timestamps (a ctime that is no round number): only a ctime at or after the start.
        assert!(!may_change_unseen(start - 1, start));
        assert!(may_change_unseen(start, start));
        assert!(may_change_unseen(start + 5, start));
        // 1 s timestamps show whole seconds: the whole second the start falls in.
        let second = 1_700_000_000_000_000_000;
        assert!(may_change_unseen(second, start));
        assert!(!may_change_unseen(second - 1_000_000_000, start));
        // A round number of milliseconds is taken as millisecond timestamps: the millisecond of the start.
        assert!(may_change_unseen(1_700_000_000_123_000_000, start));
        assert!(!may_change_unseen(1_700_000_000_122_000_000, start));
    }

    #[test]
    fn granularity_is_guessed_from_round_nanoseconds() {
        assert_eq!(granularity_of(123_456_789), 1);
        assert_eq!(granularity_of(123_456_000), 1_000);
        assert_eq!(granularity_of(100_000_000), 100_000_000);
        assert_eq!(granularity_of(0), 2_000_000_000);
    }

    /// A file written before the boundary has a ctime before it; one written after `wait` a ctime at or after
    /// it, however soon after (here: at once, many times over, so that some fall in the same coarse tick).
    #[test]
    fn files_changed_after_the_boundary_have_later_ctimes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let ctime = |f: &Path| ctime_ns(&std::fs::symlink_metadata(f).unwrap());
        for _ in 0..200 {
            std::fs::write(&f, b"placed").unwrap();
            let b = Boundary::after_now(&f);
            b.wait();
            let placed = ctime(&f);
            std::fs::write(&f, b"changed").unwrap();
            let changed = ctime(&f);
            // The sample's own granularity may be guessed coarser than it is, putting the boundary at or
            // before a placed file's ctime; never after a changed one's.
            assert!(changed >= b.at, "changed at {changed}, boundary {}", b.at);
            if b.at == b.next {
                assert!(placed < b.at, "placed at {placed}, boundary {}", b.at);
            }
        }
    }
}
