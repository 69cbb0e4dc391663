//! A count of failures that do not stop the work they happen in (an owner or an extended attribute a
//! checkout could not restore, a damaged file it left out), with the first one's description, for one
//! warning or error at the end instead of one per file.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Tally {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Tally {
    /// Counts one; `what` describes it, and is only formatted for the first.
    pub(crate) fn note(&self, what: impl FnOnce() -> String) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(what());
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// How many, and the first's description; `None` if there were none. Meant for when every note is done:
    /// the first to count writes its description just after counting.
    pub(crate) fn summary(&self) -> Option<(u64, String)> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some((self.count(), first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_all_and_describes_only_the_first() {
        let t = Tally::default();
        assert_eq!(t.summary(), None);
        t.note(|| "a".into());
        t.note(|| unreachable!("only the first is described"));
        assert_eq!(t.summary(), Some((2, "a".into())));
    }

    #[test]
    fn threads_count_every_failure() {
        let t = Tally::default();
        std::thread::scope(|s| {
            for i in 0..4 {
                let t = &t;
                s.spawn(move || (0..1000).for_each(|j| t.note(|| format!("{i}/{j}"))));
            }
        });
        let (n, first) = t.summary().unwrap();
        assert_eq!(n, 4000);
        assert!(first.ends_with("/0"), "{first}");
    }
}
