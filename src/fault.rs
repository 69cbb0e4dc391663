//! Named fault points: the steps of write → fsync → publish where a crash matters, so that the crash tests can
//! kill the process exactly there instead of hoping a random instant lands on them.
//!
//! `SNAPSTORE_FAULT=NAME:N` ends the process with SIGKILL the N-th time (from 1) it reaches point `NAME`, as a
//! crash there would: no destructor runs, nothing is flushed. `NAME:N:stop` stops it there with SIGSTOP
//! instead, so that a race test can run another process at exactly that step and then continue it. The
//! points are listed in [`POINTS`] and in docs/reliability.md. The hook is an environment variable rather
//! than a cargo feature because the crash tests drive the release binary that users run; unset, a point
//! costs one atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Every fault point, in the order a commit, a GC or a checkout passes them.
pub const POINTS: &[&str] = &[
    // A pack (commit and GC): its bytes written to the temporary file but not yet fsynced, fsynced but not yet
    // renamed into packs/, renamed but the directory not yet fsynced, and fully published.
    "pack-written",
    "pack-synced",
    "pack-renamed",
    "pack-published",
    // A batch of catalog rows (a commit's chunks and contents) committed, before the next one.
    "catalog-batch",
    // A remote repository's record is in the bucket; the catalog transaction carrying the same change has
    // not committed.
    "record-written",
    // A commit's checkpoint committed to the catalog, before its id is reported.
    "commit-published",
    // Forget: checkpoints chosen, before their removal is committed; and after.
    "forget-chosen",
    "forget-done",
    // A repository in a bucket: a forget (or a change of tags) holds the forget lock and has synced, and has not
    // yet written its change.
    "forget-synced",
    // GC: after its mark, its sweep, each rewritten pack recorded, its final catalog transaction, and each
    // file removed.
    "gc-marked",
    "gc-swept",
    "gc-moved",
    "gc-dropped",
    "gc-removed",
    // Checkout: a file's temporary written, before it is renamed into place; a file in place; the walk at a
    // file entry, its directory open, before it looks at the name (for the tests of names swapped meanwhile).
    "checkout-temp",
    "checkout-file",
    "checkout-entry",
];

struct Armed {
    name: String,
    at: u64,
    stop: bool,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("SNAPSTORE_FAULT").ok()?;
            let (name, at) = spec.split_once(':').unwrap_or((&spec, "1"));
            let (at, stop) = match at.split_once(':') {
                Some((at, "stop")) => (at, true),
                None => (at, false),
                Some(_) => malformed(&spec),
            };
            let at = at.parse().unwrap_or_else(|_| malformed(&spec));
            Some(Armed { name: name.to_string(), at, stop, hits: AtomicU64::new(0) })
        })
        .as_ref()
}

/// A test that sets a fault it did not spell right must fail, not run without it.
fn malformed(spec: &str) -> ! {
    panic!("SNAPSTORE_FAULT={spec:?}: expected NAME, NAME:N or NAME:N:stop")
}

/// Marks reaching fault point `name` (one of [`POINTS`]).
pub(crate) fn point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unlisted fault point {name}");
    let Some(armed) = armed() else { return };
    if armed.name == name && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.at {
        if armed.stop {
            // Returns once continued (SIGCONT).
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
            return;
        }
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; should delivery lag, never run past the point.
        loop {
            std::thread::park();
        }
    }
}
