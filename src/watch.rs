//! Automatic checkpoints of one path: a commit at each interval when something changed, the retention policy
//! applied after each new checkpoint, and GC now and then, until told to stop.
//!
//! An unchanged tree costs a stat walk: files whose size, mtime, ctime and inode match the parent are not
//! read, and a commit whose tree equals its parent's publishes nothing ([`CommitOptions::skip_unchanged`]).
//! Stopping is checked between steps, never inside one, so a commit under way completes (or fails, leaving
//! nothing visible) before [`Repository::watch`] returns.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Checkpoint, CommitOptions, CommitSummary, Error, GcOptions, GcSummary, Policy, Repository, Result};

/// How to watch.
#[derive(Clone)]
pub struct WatchOptions {
    /// Time from the start of one commit to the start of the next. A commit that takes longer delays the next
    /// one; ticks missed meanwhile are skipped, not made up.
    pub every: Duration,
    /// Message, tags and the rest, for each commit (`skip_unchanged` is always on).
    pub commit: CommitOptions,
    /// Applied to this path's checkpoints after each new one; `None` keeps them all.
    pub policy: Option<Policy>,
    /// Collect garbage when this much time has passed since the last collection; `None`: never.
    pub gc_every: Option<Duration>,
    /// Options for those collections.
    pub gc: GcOptions,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            every: Duration::from_secs(60),
            commit: CommitOptions::default(),
            policy: None,
            gc_every: None,
            gc: GcOptions::default(),
        }
    }
}

/// What happened at one step of a watch.
#[derive(Debug)]
pub enum WatchEvent<'a> {
    /// A new checkpoint, and the checkpoints the policy forgot after it.
    Checkpoint {
        /// The commit.
        summary: &'a CommitSummary,
        /// Forgotten by the retention policy.
        forgotten: &'a [Checkpoint],
    },
    /// Nothing had changed: no checkpoint was made.
    Unchanged(&'a CommitSummary),
    /// A garbage collection ran.
    Gc(&'a GcSummary),
    /// A step failed; the watch goes on and tries again at the next interval.
    Failed {
        /// What was being done: `"commit"`, `"retention"` or `"gc"`.
        step: &'static str,
        /// Why it failed.
        error: &'a Error,
    },
}

/// The polling period while waiting: how long a stop request can go unnoticed between steps.
const POLL: Duration = Duration::from_millis(50);

pub(crate) fn watch(
    repo: &Repository,
    path: &Path,
    opts: &WatchOptions,
    stop: &AtomicBool,
    mut on: impl FnMut(WatchEvent<'_>),
) -> Result<()> {
    if opts.every.is_zero() {
        return Err(Error::InvalidInput("the watch interval must be longer than zero".into()));
    }
    // Fail at once on what retrying cannot fix; later failures are reported and retried.
    std::fs::symlink_metadata(path).map_err(|e| Error::reading_source(path, e))?;
    repo.refuse_another_users()?;
    if let Some(policy) = &opts.policy
        && policy.keeps_none_tagged(&opts.commit.tags)
    {
        return Err(Error::InvalidInput(format!(
            "the policy keeps only checkpoints tagged {}, which this watch's commits are not: every run would \
             be refused for forgetting them all; add a --keep-last or --keep-within rule, or --tag the commits",
            policy.keep_tags.join(" or ")
        )));
    }
    let key = crate::commit::path_key(path)?;
    let host = opts.commit.host.clone().unwrap_or_else(crate::catalog::host_name);
    let commit = CommitOptions { skip_unchanged: true, ..opts.commit.clone() };
    let mut next = Instant::now();
    let mut gc = crate::gc::GcEvery::new(opts.gc_every);
    while !stop.load(Ordering::SeqCst) {
        match repo.commit(path, &commit) {
            Ok(s) if s.unchanged => on(WatchEvent::Unchanged(&s)),
            Ok(s) => {
                let forgotten = match &opts.policy {
                    None => Ok(Vec::new()),
                    Some(policy) => repo.retain_path(policy, &key, Some(&host), &s.id),
                };
                match forgotten {
                    Ok(forgotten) => on(WatchEvent::Checkpoint { summary: &s, forgotten: &forgotten }),
                    Err(error) => {
                        on(WatchEvent::Checkpoint { summary: &s, forgotten: &[] });
                        on(WatchEvent::Failed { step: "retention", error: &error });
                    }
                }
            }
            Err(error @ Error::NoRepository(_)) => {
                // Nothing later can commit there; retrying would only repeat this.
                on(WatchEvent::Failed { step: "commit", error: &error });
                return Err(error);
            }
            Err(error) => on(WatchEvent::Failed { step: "commit", error: &error }),
        }
        if !stop.load(Ordering::SeqCst) {
            match gc.run_if_due(repo, &opts.gc) {
                Some(Ok(g)) => on(WatchEvent::Gc(&g)),
                Some(Err(error)) => on(WatchEvent::Failed { step: "gc", error: &error }),
                None => {}
            }
        }
        next += opts.every;
        let now = Instant::now();
        if next < now {
            let missed = (now - next).as_nanos() / opts.every.as_nanos() + 1;
            next += opts.every * missed as u32;
        }
        while !stop.load(Ordering::SeqCst) && Instant::now() < next {
            std::thread::sleep(POLL.min(next.saturating_duration_since(Instant::now())));
        }
    }
    Ok(())
}

/// Parses an interval such as `500ms`, `30s`, `5min`, `1h30min` or `1d`: numbers each followed by a unit,
/// `ms`, `s`, `min`, `h` or `d`. A bare `m` is refused: in retention it means months (as in restic), and an
/// interval read as the other would be off by a factor of 43,200.
pub fn parse_interval(s: &str) -> std::result::Result<Duration, String> {
    let text = s.trim();
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err("empty interval: give a number and a unit, e.g. 30s, 5min or 1h".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let number: u64 =
            rest[..digits].parse().map_err(|_| format!("invalid interval '{text}': expected a number at '{rest}'"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            "m" => return Err(format!("invalid interval '{text}': write 'min' for minutes")),
            "" => return Err(format!("invalid interval '{text}': no unit after {number} (use ms, s, min, h or d)")),
            other => return Err(format!("invalid interval '{text}': unknown unit '{other}' (use ms, s, min, h or d)")),
        };
        let part = u32::try_from(number).ok().and_then(|n| unit.checked_mul(n));
        total =
            part.and_then(|p| total.checked_add(p)).ok_or_else(|| format!("invalid interval '{text}': too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_explicit_units() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("1h30min"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_interval(" 2d "), Ok(Duration::from_secs(172_800)));
        for bad in ["", "5", "5m", "min", "5 min", "3x", "99999999999s"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
