//! Retention policies: which checkpoints a `forget` keeps, with the semantics of restic's `forget --keep-*`.
//!
//! A [`Policy`] is a set of rules; a checkpoint kept by any rule stays, every other one is forgotten. Each
//! group of checkpoints (one per host and path, or all together) is judged on its own, newest first:
//!
//! - `keep_last` N keeps the N newest checkpoints.
//! - `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly`, `keep_yearly` N keep the newest checkpoint of
//!   each of the N most recent hours (days, ISO weeks, months, years) that have a checkpoint at all; periods
//!   without one do not count. While such a rule still has count left when the oldest checkpoint of the group
//!   is reached, that oldest checkpoint is kept too (reason `oldest ...`), as restic does since 0.16, so that
//!   a short history is kept whole rather than trimmed to its newest end.
//! - `keep_within` D keeps every checkpoint strictly newer than D before the newest checkpoint of the group,
//!   not before now: a repository left alone for a year does not lose everything on the next run.
//! - `keep_tags` keeps every checkpoint carrying one of the tags; an entry `a,b` keeps one carrying both, as
//!   restic's `--keep-tag a,b` does (entries are alternatives, as restic's repeated `--keep-tag`).
//!
//! A count of [`UNLIMITED`] (`u32::MAX`, restic's `unlimited`) never runs out. A count of 0, like an absent
//! rule or a zero `keep_within`, is no rule at all: restic treats `--keep-last 0` the same way.
//!
//! Where we differ from restic, and why:
//! - Periods are computed in UTC, because snapstore carries no time zone database; restic uses the local
//!   time zone of the machine running `forget`. Days, weeks (ISO 8601, Monday to Sunday) and the rest thus
//!   start at 00:00 UTC.
//! - `keep_within` is a fixed [`Duration`]; [`parse_duration`] reads restic's `2y5m7d3h` with a year of 365
//!   days and a month of 30 days, where restic steps back calendar years and months in local time. It also
//!   accepts `w` (7 days), which restic does not.
//! - Repeated `--tag` filters must all match, where restic takes any of them (`--tag a,b` needs both in
//!   either). Tags hold no commas (from schema 14: a comma separates tags, as on restic's command line).
//! - Checkpoints with the same time are ordered by id (the smaller id is the newer), so that the outcome
//!   never depends on input order and the checkpoint kept by `keep_last 1` is the one `latest` names;
//!   restic keeps the order in which it happened to load them.
//! - An empty policy keeps everything (reason `policy is empty`) instead of forgetting everything. The
//!   caller must refuse it anyway ([`Policy::is_empty`]), as restic refuses a `forget` without `--keep-*`;
//!   this way a caller that misses the check loses nothing.
//! - The `keep-within-hourly` family of restic rules and grouping by tags are not offered.
//!
//! Like restic, [`plan`] ignores checkpoints dated in the future (a wrong clock at commit) when it looks for
//! the newest one that `keep_within` counts from; they are themselves kept by `keep_within`. And like
//! restic, a caller should refuse to run a plan that would forget every checkpoint of a group, which only a
//! tags-only policy can do (a mistyped tag): see [`Plan::emptied_groups`].
//!
//! Calendar arithmetic is done here without external crates: days since the epoch to a civil date and back
//! follow Howard Hinnant's `civil_from_days` and `days_from_civil` algorithms, valid for every `i64`
//! nanosecond timestamp.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::checkpoint::Checkpoint;

/// A count that never runs out: keep every hour (day, ...) that has a checkpoint, or every checkpoint.
pub const UNLIMITED: u32 = u32::MAX;

/// Which checkpoints to keep. A rule set to `None`, `Some(0)` or a zero duration is no rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest checkpoints.
    pub keep_last: Option<u32>,
    /// Keep the newest checkpoint of each of the N most recent hours that have one.
    pub keep_hourly: Option<u32>,
    /// Keep the newest checkpoint of each of the N most recent days that have one.
    pub keep_daily: Option<u32>,
    /// Keep the newest checkpoint of each of the N most recent ISO weeks that have one.
    pub keep_weekly: Option<u32>,
    /// Keep the newest checkpoint of each of the N most recent months that have one.
    pub keep_monthly: Option<u32>,
    /// Keep the newest checkpoint of each of the N most recent years that have one.
    pub keep_yearly: Option<u32>,
    /// Keep every checkpoint newer than this much before the group's newest checkpoint.
    pub keep_within: Option<Duration>,
    /// Keep every checkpoint having one of these tags; `""` matches checkpoints without tags, and `a,b` those
    /// having both a and b (as restic's `--keep-tag a,b`).
    pub keep_tags: Vec<String>,
}

impl Policy {
    /// True if no rule is set (`Some(0)` and a zero `keep_within` count as unset, as in restic). Applying
    /// such a policy keeps everything; a `forget` must refuse it instead.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(n, _)| *n == 0) && self.within().is_none() && self.keep_tags.is_empty()
    }

    /// Whether the policy keeps by tags alone (no count and no time rule).
    pub fn keeps_only_tags(&self) -> bool {
        !self.keep_tags.is_empty() && self.counts().iter().all(|(n, _)| *n == 0) && self.within().is_none()
    }

    /// Whether the policy keeps by tags alone and none of them is among `tags`: applied after each commit
    /// carrying `tags` (a watch, a `Checkpointer`), it would be refused every time for forgetting them all.
    pub fn keeps_none_tagged(&self, tags: &[String]) -> bool {
        self.keeps_only_tags() && !self.keep_tags.iter().any(|t| carries(tags, t))
    }

    /// The counting rules, newest-first in restic's order; 0 stands for an absent rule.
    fn counts(&self) -> [(u32, Period); 6] {
        [
            (self.keep_last.unwrap_or(0), Period::Last),
            (self.keep_hourly.unwrap_or(0), Period::Hour),
            (self.keep_daily.unwrap_or(0), Period::Day),
            (self.keep_weekly.unwrap_or(0), Period::Week),
            (self.keep_monthly.unwrap_or(0), Period::Month),
            (self.keep_yearly.unwrap_or(0), Period::Year),
        ]
    }

    fn within(&self) -> Option<Duration> {
        self.keep_within.filter(|d| !d.is_zero())
    }
}

/// Whether a checkpoint with `tags` carries the keep tag `keep`; the empty tag stands for having none, and one
/// with commas for having every tag between them (restic's `--keep-tag a,b`).
pub(crate) fn carries(tags: &[String], keep: &str) -> bool {
    if keep.is_empty() {
        tags.is_empty()
    } else {
        crate::catalog::tag_parts(keep).all(|part| tags.iter().any(|t| t == part))
    }
}

/// A one-line description, e.g. `keep 7 daily, all monthly checkpoints and all checkpoints within 30d of
/// the newest`, for a `forget` to print before its plan.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("keep everything (no rule given)");
        }
        let mut clauses = Vec::new();
        let given: Vec<(u32, Period)> = self.counts().into_iter().filter(|(n, _)| *n > 0).collect();
        let counts: Vec<String> = given
            .iter()
            .map(|&(n, period)| {
                let name = if period == Period::Last { "latest" } else { period.name() };
                if n == UNLIMITED { format!("all {name}") } else { format!("{n} {name}") }
            })
            .collect();
        if !counts.is_empty() {
            let noun = if matches!(given[..], [(1, _)]) { "checkpoint" } else { "checkpoints" };
            clauses.push(format!("{} {noun}", counts.join(", ")));
        }
        if !self.keep_tags.is_empty() {
            let tags: Vec<String> =
                self.keep_tags.iter().map(|t| if t.is_empty() { "''".to_string() } else { t.clone() }).collect();
            clauses.push(format!("all checkpoints tagged {}", tags.join(" or ")));
        }
        if let Some(d) = self.within() {
            clauses.push(format!("all checkpoints within {} of the newest", format_duration(d)));
        }
        write!(f, "keep {}", clauses.join(" and "))
    }
}

/// What a policy decides: the checkpoints to keep, with why, and those to forget. Both lists are newest
/// first, as `latest` and `log` count it (of equal times, the smaller id first).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Checkpoints kept, each with at least one reason.
    pub keep: Vec<Decision>,
    /// Checkpoints to forget; their `reasons` are empty.
    pub forget: Vec<Decision>,
    /// The policy's `keep_tags`: applying the plan checks them again, so that a checkpoint tagged to keep
    /// after the plan was made is not forgotten.
    #[serde(skip)]
    pub(crate) keep_tags: Vec<String>,
    /// The tags the plan was limited to ([`crate::RetentionScope::tags`]): applying it checks them again,
    /// so that a checkpoint whose tag was removed since (taken out of the rotation) is not forgotten.
    #[serde(skip)]
    pub(crate) scope_tags: Vec<String>,
    /// Whether it was planned per (host, path): applying it refuses to empty one of those
    /// ([`Plan::emptied_groups`]).
    #[serde(skip)]
    pub(crate) by_path: bool,
}

/// One checkpoint's fate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// The checkpoint's full id.
    pub id: String,
    /// Its commit time, nanoseconds since the Unix epoch (and `time` in RFC 3339 in JSON).
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::time_ns")]
    pub time_ns: i64,
    /// Its host.
    pub host: String,
    /// Its committed path.
    pub path: String,
    /// Every rule that keeps it, e.g. `last 1`, `daily 2026-11-25`, `oldest yearly 2014`, `within 7d`,
    /// `tag release`; empty for a forgotten checkpoint.
    pub reasons: Vec<String>,
}

impl Plan {
    /// Puts both lists back in their order, newest first, after a caller moved decisions between them.
    pub fn sort(&mut self) {
        for list in [&mut self.keep, &mut self.forget] {
            list.sort_by(|a, b| newest_first(a.time_ns, &a.id, b.time_ns, &b.id));
        }
    }

    /// The groups that would lose every checkpoint, as (host, path) pairs; empty when the plan is safe.
    ///
    /// Planned per (host, path) (`RetentionScope::across_paths` false, in [`crate::Repository::plan_retention`]),
    /// these are the (host, path) groups with nothing kept. Otherwise all checkpoints form one group: if nothing
    /// at all is kept, every (host, path) of the forget list is returned. restic refuses such a `forget`
    /// ("refusing to delete last snapshot of snapshot group"), because it is almost always a mistyped
    /// `--keep-tag`: see [`Plan::refuse_emptying`].
    pub fn emptied_groups(&self) -> Vec<(String, String)> {
        let key = |d: &Decision| (d.host.clone(), d.path.clone());
        let forgotten: BTreeSet<(String, String)> = self.forget.iter().map(key).collect();
        if !self.by_path {
            return if self.keep.is_empty() { forgotten.into_iter().collect() } else { Vec::new() };
        }
        let kept: BTreeSet<(String, String)> = self.keep.iter().map(key).collect();
        forgotten.difference(&kept).cloned().collect()
    }

    /// Refuses, like restic, a plan that would forget every checkpoint of a (host, path) it was planned for:
    /// that is almost always a mistyped `--keep-tag`. Checked when the plan is applied, so that a dry run
    /// still shows what it would have done.
    pub fn refuse_emptying(&self) -> crate::Result<()> {
        let mut emptied = self.emptied_groups().into_iter();
        match emptied.next() {
            Some((host, path)) => Err(crate::Error::PolicyEmptiesPath { host, path, others: emptied.len() }),
            None => Ok(()),
        }
    }
}

/// Applies `policy` to `checkpoints`, per (host, path) group if `group_by_path`, else to all of them as
/// one group. The input may be in any order. An empty policy keeps everything (see the module docs).
///
/// Checkpoints dated after the current clock are skipped when finding the newest checkpoint that
/// `keep_within` counts from; [`plan_at`] takes that clock as an argument instead.
pub fn plan(checkpoints: &[Checkpoint], policy: &Policy, group_by_path: bool) -> Plan {
    plan_at(checkpoints, policy, group_by_path, crate::catalog::now_ns())
}

/// [`plan`] with the current time given, in nanoseconds since the Unix epoch, for reproducible results.
pub fn plan_at(checkpoints: &[Checkpoint], policy: &Policy, group_by_path: bool, now_ns: i64) -> Plan {
    let mut groups: BTreeMap<(&str, &str), Vec<&Checkpoint>> = BTreeMap::new();
    for cp in checkpoints {
        let key = if group_by_path { (cp.host.as_str(), cp.path.as_str()) } else { ("", "") };
        groups.entry(key).or_default().push(cp);
    }
    let mut plan = Plan { keep_tags: policy.keep_tags.clone(), by_path: group_by_path, ..Default::default() };
    for mut group in groups.into_values() {
        group.sort_by(|a, b| newest_first(a.time_ns, &a.id, b.time_ns, &b.id));
        for (cp, reasons) in group.iter().zip(judge(&group, policy, now_ns)) {
            let decision = Decision {
                id: cp.id.clone(),
                time_ns: cp.time_ns,
                host: cp.host.clone(),
                path: cp.path.clone(),
                reasons,
            };
            if decision.reasons.is_empty() { plan.forget.push(decision) } else { plan.keep.push(decision) }
        }
    }
    plan.sort();
    plan
}

/// `catalog::NEWEST_FIRST` in Rust: of equal times, the smaller id is the newer.
fn newest_first(a_time: i64, a_id: &str, b_time: i64, b_id: &str) -> std::cmp::Ordering {
    b_time.cmp(&a_time).then_with(|| a_id.cmp(b_id))
}

/// The reasons to keep each checkpoint of one group, sorted newest first; an empty list means forget.
fn judge(group: &[&Checkpoint], policy: &Policy, now_ns: i64) -> Vec<Vec<String>> {
    if policy.is_empty() {
        return vec![vec!["policy is empty".to_string()]; group.len()];
    }
    // A checkpoint from a clock set years ahead would otherwise make keep-within forget all real ones.
    let newest = group.iter().map(|cp| cp.time_ns).filter(|&t| t < now_ns).max();
    let within = policy.within().map(|d| {
        let cutoff = newest.map(|t| i128::from(t) - i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        (cutoff, format!("within {}", format_duration(d)))
    });
    let mut rules: Vec<Rule> = policy
        .counts()
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(left, period)| Rule { period, left, last_bucket: None })
        .collect();

    let oldest = group.len().saturating_sub(1);
    let mut out = Vec::with_capacity(group.len());
    for (rank, cp) in group.iter().enumerate() {
        let mut reasons = Vec::new();
        for tag in &policy.keep_tags {
            if carries(&cp.tags, tag) {
                reasons.push(if tag.is_empty() { "tag ''".to_string() } else { format!("tag {tag}") });
            }
        }
        if let Some((cutoff, reason)) = &within {
            // No past checkpoint at all leaves no reference point; restic then keeps them all.
            if cutoff.is_none_or(|c| i128::from(cp.time_ns) > c) {
                reasons.push(reason.clone());
            }
        }
        let when = Utc::from_ns(cp.time_ns);
        for rule in rules.iter_mut().filter(|r| r.left > 0) {
            let bucket = rule.period.bucket(&when, rank);
            let repeat = rule.last_bucket == Some(bucket);
            // restic also keeps the oldest checkpoint while the rule has count left, so that a history shorter
            // than the policy allows is kept whole instead of losing its oldest end.
            if !repeat || rank == oldest {
                let label = rule.period.label(&when, rank);
                reasons.push(if repeat { format!("oldest {label}") } else { label });
                rule.last_bucket = Some(bucket);
                if rule.left != UNLIMITED {
                    rule.left -= 1;
                }
            }
        }
        out.push(reasons);
    }
    out
}

/// One counting rule while a group is judged.
struct Rule {
    period: Period,
    /// Periods still to keep; [`UNLIMITED`] never decreases.
    left: u32,
    /// The period of the last checkpoint this rule kept.
    last_bucket: Option<i64>,
}

/// What a counting rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Last,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Last => "last",
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// A number equal for two checkpoints exactly when they fall in the same period; every checkpoint is
    /// its own period for `Last`.
    fn bucket(self, t: &Utc, rank: usize) -> i64 {
        match self {
            Period::Last => rank as i64,
            Period::Hour => t.days * 24 + i64::from(t.hour),
            Period::Day => t.days,
            Period::Week => {
                let (year, week) = iso_week(t.days);
                year * 100 + i64::from(week)
            }
            Period::Month => t.year * 12 + i64::from(t.month),
            Period::Year => t.year,
        }
    }

    fn label(self, t: &Utc, rank: usize) -> String {
        let name = self.name();
        match self {
            Period::Last => format!("{name} {}", rank + 1),
            Period::Hour => format!("{name} {:04}-{:02}-{:02} {:02}h", t.year, t.month, t.day, t.hour),
            Period::Day => format!("{name} {:04}-{:02}-{:02}", t.year, t.month, t.day),
            Period::Week => {
                let (year, week) = iso_week(t.days);
                format!("{name} {year:04}-W{week:02}")
            }
            Period::Month => format!("{name} {:04}-{:02}", t.year, t.month),
            Period::Year => format!("{name} {:04}", t.year),
        }
    }
}

/// A timestamp's UTC calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Utc {
    /// Days since 1970-01-01.
    days: i64,
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
}

impl Utc {
    fn from_ns(time_ns: i64) -> Utc {
        // Euclidean division, so that instants before 1970 fall in the day and hour they belong to.
        let secs = time_ns.div_euclid(1_000_000_000);
        let days = secs.div_euclid(86_400);
        let hour = (secs.rem_euclid(86_400) / 3600) as u32;
        let (year, month, day) = civil_from_days(days);
        Utc { days, year, month, day, hour }
    }
}

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to an era count starting 0000-03-01, so that the leap day ends each 400-year era's years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_from_march = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// ISO 8601 (week-numbering year, week 1-53) of a count of days since 1970-01-01.
fn iso_week(days: i64) -> (i64, u32) {
    // A week belongs to the year of its Thursday; 1970-01-01 was a Thursday.
    let weekday = (days + 3).rem_euclid(7) + 1; // Monday 1 .. Sunday 7
    let thursday = days - weekday + 4;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week as u32)
}

/// Parses a `--keep-within` duration in restic's style: numbers each followed by a unit, e.g. `7d`, `36h`,
/// `2y5m7d3h`. Units are `y` (365 days), `m` (months of 30 days, not minutes, as in restic), `w` (7 days;
/// restic lacks it), `d` (24 hours) and `h`. Each unit may appear once, in any order, save `m` after `h`
/// (`1h30m` meant minutes, which would keep months); `0d` parses to zero, which [`Policy`] treats as no rule.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration: give a number and a unit, e.g. 7d, 36h or 2y5m7d3h".to_string());
    }
    let mut rest = text;
    let mut seen = String::new();
    let mut hours: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration '{text}': expected a number at '{rest}'"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration '{text}': {} is too large", &rest[..digits]))?;
        let Some(unit) = rest[digits..].chars().next() else {
            return Err(format!("invalid duration '{text}': no unit after {number} (use y, m, w, d or h)"));
        };
        if rest[digits..].starts_with("min") || rest[digits..].starts_with('s') {
            // `watch --every` takes minutes and seconds; a retention window counts hours at the finest.
            return Err(format!(
                "invalid duration '{text}': retention counts hours at the finest (use y, m for months, w, d or h)"
            ));
        }
        let unit_hours = match unit {
            'y' => 365 * 24,
            'm' => 30 * 24,
            'w' => 7 * 24,
            'd' => 24,
            'h' => 1,
            _ => {
                return Err(format!(
                    "invalid duration '{text}': unknown unit '{unit}' (use y, m for months, w, d or h)"
                ));
            }
        };
        if seen.contains(unit) {
            return Err(format!("invalid duration '{text}': unit '{unit}' given twice"));
        }
        if unit == 'm' && seen.contains('h') {
            // `1h30m` meant minutes, surely, and would keep 30 months.
            return Err(format!(
                "invalid duration '{text}': {number}m after hours would be {number} months (m is months here, as \
                 in restic); retention counts hours at the finest"
            ));
        }
        seen.push(unit);
        hours = number
            .checked_mul(unit_hours)
            .and_then(|h| hours.checked_add(h))
            .filter(|h| h.checked_mul(3600).is_some())
            .ok_or_else(|| format!("invalid duration '{text}': too long"))?;
        rest = &rest[digits + unit.len_utf8()..];
    }
    Ok(Duration::from_secs(hours * 3600))
}

/// Parses a `--keep-*` count: a number, or `unlimited` for [`UNLIMITED`], as restic accepts.
pub fn parse_count(s: &str) -> Result<u32, String> {
    let text = s.trim();
    if text == "unlimited" {
        return Ok(UNLIMITED);
    }
    text.parse().map_err(|_| format!("invalid count '{text}': give a whole number from 0, or 'unlimited'"))
}

/// Days, hours and seconds, e.g. `7d`, `1d12h`, `90s`: `m` would read as months, so minutes stay seconds.
fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let mut out = String::new();
    for (value, unit) in [(secs / 86_400, "d"), (secs % 86_400 / 3600, "h"), (secs % 3600, "s")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    if d.subsec_nanos() > 0 {
        out.push_str(&format!("{}ns", d.subsec_nanos()));
    }
    if out.is_empty() { "0s".to_string() } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;
    const HOUR: i64 = 3600 * SEC;
    const DAY: i64 = 24 * HOUR;

    /// Nanoseconds of a UTC time written `YYYY-MM-DD HH:MM:SS`, with an optional `.f` fraction.
    fn ts(s: &str) -> i64 {
        let (date, time) = s.split_once(' ').unwrap();
        let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
        let (whole, frac) = time.split_once('.').unwrap_or((time, ""));
        let t: Vec<i64> = whole.split(':').map(|x| x.parse().unwrap()).collect();
        let frac_ns = if frac.is_empty() { 0 } else { format!("{frac:0<9}").parse::<i64>().unwrap() };
        let days = days_from_civil(d[0], d[1] as u32, d[2] as u32);
        days * DAY + t[0] * HOUR + t[1] * 60 * SEC + t[2] * SEC + frac_ns
    }

    /// A checkpoint whose id is `n` as 64 hex digits, so that ids sort like `n`.
    fn cp_at(n: usize, time_ns: i64, tags: &[&str], host: &str, path: &str) -> Checkpoint {
        let mut tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        tags.sort();
        Checkpoint {
            id: format!("{n:064x}"),
            parent: None,
            time_ns,
            message: String::new(),
            tags,
            host: host.to_string(),
            path: path.to_string(),
            root: String::new(),
            files: 0,
            dirs: 0,
            symlinks: 0,
            logical_bytes: 0,
            bytes_new: 0,
            bytes_stored: 0,
            skipped: 0,
        }
    }

    /// Checkpoints on one host and path, numbered in the order given.
    fn cps(times: &[&str]) -> Vec<Checkpoint> {
        times.iter().enumerate().map(|(n, t)| cp_at(n, ts(t), &[], "h", "/p")).collect()
    }

    /// Far after every test timestamp, so that none counts as dated in the future.
    fn now() -> i64 {
        ts("2100-01-01 00:00:00")
    }

    fn run(list: &[Checkpoint], policy: &Policy) -> Plan {
        plan_at(list, policy, true, now())
    }

    /// Kept checkpoints as (number, reasons), newest first.
    fn kept(plan: &Plan) -> Vec<(usize, Vec<String>)> {
        plan.keep.iter().map(|d| (usize::from_str_radix(&d.id, 16).unwrap(), d.reasons.clone())).collect()
    }

    fn kept_ids(plan: &Plan) -> Vec<usize> {
        kept(plan).into_iter().map(|(n, _)| n).collect()
    }

    fn forgotten_ids(plan: &Plan) -> Vec<usize> {
        plan.forget.iter().map(|d| usize::from_str_radix(&d.id, 16).unwrap()).collect()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // ---- calendar ----

    #[test]
    fn civil_dates_round_trip_and_match_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28), 2, "2000 is a leap year");
        assert_eq!(days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28), 1, "1900 is not");
        assert_eq!(days_from_civil(2026, 11, 25), 20_782);
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
        for days in -800_000..800_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn utc_fields_before_and_after_the_epoch() {
        let before = Utc::from_ns(-1);
        assert_eq!((before.year, before.month, before.day, before.hour, before.days), (1969, 12, 31, 23, -1));
        let t = Utc::from_ns(ts("2026-11-25 14:59:59.999"));
        assert_eq!((t.year, t.month, t.day, t.hour), (2026, 11, 25, 14));
        let extreme = Utc::from_ns(i64::MIN);
        assert_eq!((extreme.year, extreme.month, extreme.day), (1677, 9, 21));
        assert_eq!(Utc::from_ns(i64::MAX).year, 2262);
    }

    #[test]
    fn iso_weeks_around_new_year() {
        let week = |s: &str| {
            iso_week(days_from_civil(s[..4].parse().unwrap(), s[5..7].parse().unwrap(), s[8..].parse().unwrap()))
        };
        assert_eq!(week("2020-12-28"), (2020, 53)); // Monday
        assert_eq!(week("2020-12-31"), (2020, 53));
        assert_eq!(week("2021-01-01"), (2020, 53));
        assert_eq!(week("2021-01-03"), (2020, 53)); // Sunday: still the last week of 2020
        assert_eq!(week("2021-01-04"), (2021, 1)); // Monday
        assert_eq!(week("2008-12-29"), (2009, 1)); // a December day in the next ISO year
        assert_eq!(week("2026-01-01"), (2026, 1)); // a Thursday starts week 1
        assert_eq!(week("2026-12-31"), (2026, 53));
        assert_eq!(week("2027-01-03"), (2026, 53));
        assert_eq!(week("2026-11-25"), (2026, 48));
        assert_eq!(week("1970-01-01"), (1970, 1));
        assert_eq!(week("1969-12-28"), (1969, 52)); // Sunday before the epoch
    }

    #[test]
    fn iso_weeks_of_new_year_days_match_a_reference() {
        // From Python's date.isocalendar(): "year:iso_year-week" for January 1st, then December 31st.
        let jan1 = "1995:1994-52 1996:1996-01 1997:1997-01 1998:1998-01 1999:1998-53 2000:1999-52 2001:2001-01 \
            2002:2002-01 2003:2003-01 2004:2004-01 2005:2004-53 2006:2005-52 2007:2007-01 2008:2008-01 2009:2009-01 \
            2010:2009-53 2011:2010-52 2012:2011-52 2013:2013-01 2014:2014-01 2015:2015-01 2016:2015-53 2017:2016-52 \
            2018:2018-01 2019:2019-01 2020:2020-01 2021:2020-53 2022:2021-52 2023:2022-52 2024:2024-01 2025:2025-01 \
            2026:2026-01 2027:2026-53 2028:2027-52 2029:2029-01 2030:2030-01";
        let dec31 = "1995:1995-52 1996:1997-01 1997:1998-01 1998:1998-53 1999:1999-52 2000:2000-52 2001:2002-01 \
            2002:2003-01 2003:2004-01 2004:2004-53 2005:2005-52 2006:2006-52 2007:2008-01 2008:2009-01 2009:2009-53 \
            2010:2010-52 2011:2011-52 2012:2013-01 2013:2014-01 2014:2015-01 2015:2015-53 2016:2016-52 2017:2017-52 \
            2018:2019-01 2019:2020-01 2020:2020-53 2021:2021-52 2022:2022-52 2023:2023-52 2024:2025-01 2025:2026-01 \
            2026:2026-53 2027:2027-52 2028:2028-52 2029:2030-01 2030:2031-01";
        for (table, (month, day)) in [(jan1, (1, 1)), (dec31, (12, 31))] {
            for entry in table.split_whitespace() {
                let (year, want) = entry.split_once(':').unwrap();
                let (year_want, week_want) = want.split_once('-').unwrap();
                let got = iso_week(days_from_civil(year.parse().unwrap(), month, day));
                assert_eq!(got, (year_want.parse().unwrap(), week_want.parse().unwrap()), "{year}-{month}-{day}");
            }
        }
        // Weeks change on Mondays and only then, always to the next week.
        for days in -100_000..100_000 {
            let (before, after) = (iso_week(days - 1), iso_week(days));
            let monday = (days + 3).rem_euclid(7) == 0;
            assert_eq!(before != after, monday, "day {days}");
            if monday {
                assert!(after == (before.0, before.1 + 1) || (after == (before.0 + 1, 1) && before.1 >= 52));
            }
        }
    }

    // ---- single rules ----

    #[test]
    fn keep_last_keeps_the_newest_n_whatever_the_input_order() {
        let mut list =
            cps(&["2026-11-20 10:00:00", "2026-11-21 10:00:00", "2026-11-22 10:00:00", "2026-11-23 10:00:00"]);
        list.reverse();
        let p = run(&list, &Policy { keep_last: Some(2), ..Default::default() });
        assert_eq!(kept(&p), vec![(3, strs(&["last 1"])), (2, strs(&["last 2"]))]);
        assert_eq!(forgotten_ids(&p), vec![1, 0]);
        assert!(p.forget.iter().all(|d| d.reasons.is_empty()));
    }

    #[test]
    fn keep_hourly_takes_the_newest_of_each_hour() {
        let list = cps(&[
            "2026-11-25 09:59:59", // 0: hour 09
            "2026-11-25 10:00:00", // 1: hour 10, older
            "2026-11-25 10:45:00", // 2: hour 10, newest of it
            "2026-11-25 13:10:00", // 3: hour 13 (no checkpoint at 11 or 12: those hours do not count)
        ]);
        let p = run(&list, &Policy { keep_hourly: Some(2), ..Default::default() });
        assert_eq!(kept(&p), vec![(3, strs(&["hourly 2026-11-25 13h"])), (2, strs(&["hourly 2026-11-25 10h"]))]);
        assert_eq!(forgotten_ids(&p), vec![1, 0]);
    }

    #[test]
    fn keep_daily_takes_the_newest_of_each_day() {
        let list = cps(&[
            "2026-11-23 08:00:00", // 0
            "2026-11-24 00:00:00", // 1: same day as 2, older
            "2026-11-24 23:59:59", // 2
            "2026-11-25 07:00:00", // 3
            "2026-11-25 18:00:00", // 4
        ]);
        let p = run(&list, &Policy { keep_daily: Some(2), ..Default::default() });
        assert_eq!(kept(&p), vec![(4, strs(&["daily 2026-11-25"])), (2, strs(&["daily 2026-11-24"]))]);
        assert_eq!(forgotten_ids(&p), vec![3, 1, 0]);
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_across_new_year() {
        let list = cps(&[
            "2020-12-27 12:00:00", // 0: Sunday, week 52 of 2020
            "2020-12-31 12:00:00", // 1: week 53 of 2020
            "2021-01-03 12:00:00", // 2: Sunday, still week 53 of 2020
            "2021-01-04 12:00:00", // 3: Monday, week 1 of 2021
        ]);
        let p = run(&list, &Policy { keep_weekly: Some(3), ..Default::default() });
        assert_eq!(
            kept(&p),
            vec![(3, strs(&["weekly 2021-W01"])), (2, strs(&["weekly 2020-W53"])), (0, strs(&["weekly 2020-W52"])),]
        );
        assert_eq!(forgotten_ids(&p), vec![1]);
    }

    #[test]
    fn keep_monthly_and_yearly() {
        let list = cps(&[
            "2024-06-15 00:00:00", // 0
            "2024-12-31 23:59:59", // 1: newest of 2024
            "2025-01-01 00:00:00", // 2: newest of January 2025
            "2025-02-28 10:00:00", // 3
            "2025-02-28 11:00:00", // 4: newest of February 2025
        ]);
        let monthly = run(&list, &Policy { keep_monthly: Some(2), ..Default::default() });
        assert_eq!(kept(&monthly), vec![(4, strs(&["monthly 2025-02"])), (2, strs(&["monthly 2025-01"]))]);
        let yearly = run(&list, &Policy { keep_yearly: Some(1), ..Default::default() });
        assert_eq!(kept(&yearly), vec![(4, strs(&["yearly 2025"]))]);
        assert_eq!(forgotten_ids(&yearly), vec![3, 2, 1, 0]);
    }

    #[test]
    fn the_oldest_checkpoint_is_kept_while_a_rule_has_count_left() {
        // Three days with checkpoints but room for five: restic (since 0.16) keeps the oldest checkpoint too,
        // even though it shares its day with a kept one.
        let list = cps(&["2026-11-23 08:00:00", "2026-11-23 09:00:00", "2026-11-24 08:00:00", "2026-11-25 08:00:00"]);
        let p = run(&list, &Policy { keep_daily: Some(5), ..Default::default() });
        assert_eq!(
            kept(&p),
            vec![
                (3, strs(&["daily 2026-11-25"])),
                (2, strs(&["daily 2026-11-24"])),
                (1, strs(&["daily 2026-11-23"])),
                (0, strs(&["oldest daily 2026-11-23"])),
            ]
        );
        // With the count used up exactly, the oldest is not kept for that reason.
        let p = run(&list, &Policy { keep_daily: Some(3), ..Default::default() });
        assert_eq!(kept_ids(&p), vec![3, 2, 1]);
    }

    #[test]
    fn keep_tags_keeps_every_tagged_checkpoint_and_empty_tag_means_untagged() {
        let list = vec![
            cp_at(0, ts("2026-01-01 00:00:00"), &["release"], "h", "/p"),
            cp_at(1, ts("2026-01-02 00:00:00"), &[], "h", "/p"),
            cp_at(2, ts("2026-01-03 00:00:00"), &["nightly", "release"], "h", "/p"),
            cp_at(3, ts("2026-01-04 00:00:00"), &["nightly"], "h", "/p"),
            cp_at(4, ts("2026-01-05 00:00:00"), &["releases"], "h", "/p"),
        ];
        let p = run(&list, &Policy { keep_tags: strs(&["release"]), ..Default::default() });
        assert_eq!(kept(&p), vec![(2, strs(&["tag release"])), (0, strs(&["tag release"]))]);
        assert_eq!(forgotten_ids(&p), vec![4, 3, 1]);

        let p = run(&list, &Policy { keep_tags: strs(&["release", "nightly"]), ..Default::default() });
        assert_eq!(kept(&p)[1], (2, strs(&["tag release", "tag nightly"])));
        assert_eq!(kept_ids(&p), vec![3, 2, 0]);

        let p = run(&list, &Policy { keep_tags: strs(&[""]), ..Default::default() });
        assert_eq!(kept(&p), vec![(1, strs(&["tag ''"]))]);
    }

    #[test]
    fn keep_within_counts_from_the_newest_checkpoint_not_from_now() {
        let list = cps(&[
            "2026-11-01 12:00:00", // 0: 7 days before 2 exactly: not strictly within
            "2026-11-01 12:00:01", // 1
            "2026-11-08 12:00:00", // 2: the newest
        ]);
        let policy = Policy { keep_within: Some(Duration::from_secs(7 * 86_400)), ..Default::default() };
        // Run years later: restic's rule is relative to the newest checkpoint, so nothing new is lost.
        let p = plan_at(&list, &policy, true, ts("2030-01-01 00:00:00"));
        assert_eq!(kept(&p), vec![(2, strs(&["within 7d"])), (1, strs(&["within 7d"]))]);
        assert_eq!(forgotten_ids(&p), vec![0]);
    }

    #[test]
    fn keep_within_ignores_checkpoints_from_the_future_as_reference() {
        let list = cps(&["2026-11-01 00:00:00", "2026-11-02 00:00:00", "2099-01-01 00:00:00"]);
        let policy = Policy { keep_within: Some(Duration::from_secs(36 * 3600)), ..Default::default() };
        let p = plan_at(&list, &policy, true, ts("2026-11-03 00:00:00"));
        // The newest checkpoint that is not in the future is 1; the future one is itself within.
        assert_eq!(kept_ids(&p), vec![2, 1, 0]);
        let p = plan_at(&list, &policy, true, ts("2026-11-01 12:00:00"));
        // Only 0 is in the past: everything newer than 36 h before it is kept, which is everything.
        assert_eq!(kept_ids(&p), vec![2, 1, 0]);
        let p = plan_at(&list, &policy, true, ts("2026-10-01 00:00:00"));
        // Nothing in the past: no reference, so restic keeps them all.
        assert_eq!(kept_ids(&p), vec![2, 1, 0]);
        // A clock far ahead makes the future checkpoint the reference and forgets the rest.
        let p = plan_at(&list, &policy, true, now());
        assert_eq!((kept_ids(&p), forgotten_ids(&p)), (vec![2], vec![1, 0]));
    }

    #[test]
    fn plan_uses_the_clock() {
        // The real clock is after 2001 and before 2099, so the 2099 checkpoint is the only one in the future.
        let list = cps(&["2001-11-01 00:00:00", "2001-11-05 00:00:00", "2099-01-01 00:00:00"]);
        let policy = Policy { keep_within: Some(Duration::from_secs(86_400)), ..Default::default() };
        let p = plan(&list, &policy, true);
        assert_eq!((kept_ids(&p), forgotten_ids(&p)), (vec![2, 1], vec![0]));
        assert_eq!(p, plan_at(&list, &policy, true, ts("2030-01-01 00:00:00")));
    }

    // ---- combinations, grouping, limits ----

    #[test]
    fn rules_combine_by_or_and_list_every_reason() {
        let list = vec![
            cp_at(0, ts("2026-10-31 20:00:00"), &["release"], "h", "/p"),
            cp_at(1, ts("2026-11-24 09:00:00"), &[], "h", "/p"),
            cp_at(2, ts("2026-11-25 08:00:00"), &[], "h", "/p"),
            cp_at(3, ts("2026-11-25 09:00:00"), &[], "h", "/p"),
        ];
        let policy = Policy {
            keep_last: Some(1),
            keep_daily: Some(2),
            keep_monthly: Some(2),
            keep_within: Some(Duration::from_secs(2 * 3600)),
            keep_tags: strs(&["release"]),
            ..Default::default()
        };
        let p = run(&list, &policy);
        assert_eq!(
            kept(&p),
            vec![
                (3, strs(&["within 2h", "last 1", "daily 2026-11-25", "monthly 2026-11"])),
                (2, strs(&["within 2h"])),
                (1, strs(&["daily 2026-11-24"])),
                (0, strs(&["tag release", "monthly 2026-10"])),
            ]
        );
        assert!(p.forget.is_empty());
    }

    #[test]
    fn grouping_by_path_applies_the_policy_to_each_host_and_path() {
        let list = vec![
            cp_at(0, ts("2026-11-20 00:00:00"), &[], "a", "/data"),
            cp_at(1, ts("2026-11-21 00:00:00"), &[], "a", "/data"),
            cp_at(2, ts("2026-11-22 00:00:00"), &[], "a", "/logs"),
            cp_at(3, ts("2026-11-23 00:00:00"), &[], "b", "/data"),
            cp_at(4, ts("2026-11-24 00:00:00"), &[], "a", "/logs"),
        ];
        let policy = Policy { keep_last: Some(1), ..Default::default() };
        let grouped = plan_at(&list, &policy, true, now());
        assert_eq!(kept_ids(&grouped), vec![4, 3, 1]);
        assert_eq!(forgotten_ids(&grouped), vec![2, 0]);
        let k = &grouped.keep[1];
        assert_eq!((k.host.as_str(), k.path.as_str(), k.time_ns), ("b", "/data", ts("2026-11-23 00:00:00")));
        let together = plan_at(&list, &policy, false, now());
        assert_eq!(kept_ids(&together), vec![4]);
        assert_eq!(forgotten_ids(&together), vec![3, 2, 1, 0]);
    }

    #[test]
    fn equal_times_are_ordered_by_id() {
        let t = ts("2026-11-25 10:00:00");
        let list = vec![cp_at(7, t, &[], "h", "/p"), cp_at(5, t, &[], "h", "/p"), cp_at(6, t, &[], "h", "/p")];
        let p = run(&list, &Policy { keep_daily: Some(1), ..Default::default() });
        assert_eq!(kept(&p), vec![(5, strs(&["daily 2026-11-25"]))]);
        assert_eq!(forgotten_ids(&p), vec![6, 7]);
    }

    #[test]
    fn unlimited_counts_never_run_out() {
        let list = cps(&[
            "2026-11-23 08:00:00",
            "2026-11-23 09:00:00",
            "2026-11-24 08:00:00",
            "2026-11-25 08:00:00",
            "2026-11-25 09:00:00",
        ]);
        let all = run(&list, &Policy { keep_last: Some(UNLIMITED), ..Default::default() });
        assert_eq!(kept_ids(&all), vec![4, 3, 2, 1, 0]);
        assert_eq!(all.keep[4].reasons, strs(&["last 5"]));
        let days = run(&list, &Policy { keep_daily: Some(UNLIMITED), ..Default::default() });
        // Every day's newest, plus the oldest checkpoint, as restic's `--keep-daily unlimited`.
        assert_eq!(kept_ids(&days), vec![4, 2, 1, 0]);
        assert_eq!(days.keep[3].reasons, strs(&["oldest daily 2026-11-23"]));
    }

    #[test]
    fn an_empty_policy_keeps_everything_and_says_so() {
        for policy in [
            Policy::default(),
            Policy { keep_last: Some(0), keep_daily: Some(0), ..Default::default() },
            Policy { keep_within: Some(Duration::ZERO), ..Default::default() },
        ] {
            assert!(policy.is_empty(), "{policy:?}");
            let list = cps(&["2026-11-24 08:00:00", "2026-11-25 08:00:00"]);
            let p = run(&list, &policy);
            assert_eq!(kept(&p), vec![(1, strs(&["policy is empty"])), (0, strs(&["policy is empty"]))]);
            assert!(p.forget.is_empty());
        }
        assert!(!Policy { keep_last: Some(1), ..Default::default() }.is_empty());
        assert!(!Policy { keep_within: Some(Duration::from_secs(1)), ..Default::default() }.is_empty());
        assert!(!Policy { keep_tags: strs(&[""]), ..Default::default() }.is_empty());
        let none = run(&[], &Policy { keep_last: Some(1), ..Default::default() });
        assert!(none.keep.is_empty() && none.forget.is_empty());
    }

    #[test]
    fn emptied_groups_flags_a_policy_that_would_forget_a_whole_group() {
        let list = vec![
            cp_at(0, ts("2026-11-20 00:00:00"), &["keep"], "a", "/data"),
            cp_at(1, ts("2026-11-21 00:00:00"), &[], "a", "/logs"),
            cp_at(2, ts("2026-11-22 00:00:00"), &[], "b", "/data"),
        ];
        let typo = Policy { keep_tags: strs(&["kep"]), ..Default::default() };
        let all_gone = plan_at(&list, &typo, false, now());
        assert_eq!(all_gone.emptied_groups().len(), 3);
        let policy = Policy { keep_tags: strs(&["keep"]), ..Default::default() };
        let grouped = plan_at(&list, &policy, true, now());
        assert_eq!(
            grouped.emptied_groups(),
            vec![("a".to_string(), "/logs".to_string()), ("b".to_string(), "/data".to_string())]
        );
        assert!(plan_at(&list, &policy, false, now()).emptied_groups().is_empty());
        let last = plan_at(&list, &Policy { keep_last: Some(1), ..Default::default() }, true, now());
        assert!(last.emptied_groups().is_empty());
    }

    // ---- restic's documentation and test suite ----

    #[test]
    fn restic_docs_twelve_sundays_keep_daily_4() {
        // doc/060_forget.rst: one backup every Sunday for 12 weeks; `forget --keep-daily 4` keeps the last
        // four Sundays and removes the other eight.
        let list = cps(&[
            "2019-09-01 11:00:00",
            "2019-09-08 11:00:00",
            "2019-09-15 11:00:00",
            "2019-09-22 11:00:00",
            "2019-09-29 11:00:00",
            "2019-10-06 11:00:00",
            "2019-10-13 11:00:00",
            "2019-10-20 11:00:00",
            "2019-10-27 11:00:00",
            "2019-11-03 11:00:00",
            "2019-11-10 11:00:00",
            "2019-11-17 11:00:00",
        ]);
        let p = run(&list, &Policy { keep_daily: Some(4), ..Default::default() });
        let days: Vec<String> = p.keep.iter().flat_map(|d| d.reasons.clone()).collect();
        assert_eq!(days, strs(&["daily 2019-11-17", "daily 2019-11-10", "daily 2019-11-03", "daily 2019-10-27"]));
        assert_eq!(kept_ids(&p), vec![11, 10, 9, 8]);
        assert_eq!(forgotten_ids(&p), vec![7, 6, 5, 4, 3, 2, 1, 0]);
    }

    #[test]
    fn restic_docs_a_century_of_daily_checkpoints() {
        // doc/060_forget.rst: with a backup every day for 100 years, `--keep-daily 7 --keep-weekly 5
        // --keep-monthly 12 --keep-yearly 75` keeps 7 dailies, then weeklies, monthlies and yearlies that are
        // not already kept. Ending on Wednesday 2026-11-25: dailies 11-19..11-25; weeklies 11-25 and 11-22
        // are dailies, so 11-15, 11-08, 11-01 are new; monthlies are month ends 2025-12-31..2026-10-31 (11
        // new, November being 11-25); yearlies 2026 and 2025 are kept already, 1952..2024 add 73 (Dec 31).
        let end = days_from_civil(2026, 11, 25);
        let start = days_from_civil(1926, 11, 26);
        let list: Vec<Checkpoint> =
            (start..=end).map(|d| cp_at((d - start) as usize, d * DAY + 12 * HOUR, &[], "h", "/p")).collect();
        let policy = Policy {
            keep_daily: Some(7),
            keep_weekly: Some(5),
            keep_monthly: Some(12),
            keep_yearly: Some(75),
            ..Default::default()
        };
        let p = run(&list, &policy);
        assert_eq!(p.keep.len(), 7 + 3 + 11 + 73);
        assert_eq!(p.keep.len() + p.forget.len(), list.len());
        let date = |d: &Decision| {
            let u = Utc::from_ns(d.time_ns);
            (u.year, u.month, u.day)
        };
        let dates: Vec<(i64, u32, u32)> = p.keep.iter().map(date).collect();
        assert_eq!(&dates[..7], &(19..=25).rev().map(|d| (2026, 11, d)).collect::<Vec<_>>()[..]);
        assert_eq!(&dates[7..10], &[(2026, 11, 15), (2026, 11, 8), (2026, 11, 1)]);
        assert_eq!(dates[10], (2026, 10, 31));
        assert_eq!(dates[13], (2026, 7, 31));
        assert_eq!(dates[17], (2026, 3, 31));
        assert_eq!(dates[18], (2026, 2, 28));
        assert_eq!(dates[20], (2025, 12, 31));
        assert_eq!(p.keep[20].reasons, strs(&["monthly 2025-12", "yearly 2025"]));
        assert_eq!(dates[21], (2024, 12, 31));
        assert_eq!(*dates.last().unwrap(), (1952, 12, 31));
        assert_eq!(p.keep[0].reasons, strs(&["daily 2026-11-25", "weekly 2026-W48", "monthly 2026-11", "yearly 2026"]));
    }

    /// The 103 snapshots of restic's `TestApplyPolicy` (internal/data/snapshot_policy_test.go), in order.
    #[rustfmt::skip]
    const RESTIC_SNAPSHOTS: &[(&str, &[&str])] = &[
        ("2014-09-01 10:20:30", &[]), ("2014-09-02 10:20:30", &[]), ("2014-09-05 10:20:30", &[]),
        ("2014-09-06 10:20:30", &[]), ("2014-09-08 10:20:30", &[]), ("2014-09-09 10:20:30", &[]),
        ("2014-09-10 10:20:30", &[]), ("2014-09-11 10:20:30", &[]), ("2014-09-20 10:20:30", &[]),
        ("2014-09-22 10:20:30", &[]), ("2014-08-08 10:20:30", &[]), ("2014-08-10 10:20:30", &[]),
        ("2014-08-12 10:20:30", &[]), ("2014-08-13 10:20:30", &[]), ("2014-08-13 10:20:30.1", &[]),
        ("2014-08-15 10:20:30", &[]), ("2014-08-18 10:20:30", &[]), ("2014-08-20 10:20:30", &[]),
        ("2014-08-21 10:20:30", &[]), ("2014-08-22 10:20:30", &[]), ("2014-10-01 10:20:30", &["foo"]),
        ("2014-10-02 10:20:30", &["foo"]), ("2014-10-05 10:20:30", &["foo"]), ("2014-10-06 10:20:30", &["foo"]),
        ("2014-10-08 10:20:30", &["foo"]), ("2014-10-09 10:20:30", &["foo"]), ("2014-10-10 10:20:30", &["foo"]),
        ("2014-10-11 10:20:30", &["foo"]), ("2014-10-20 10:20:30", &["foo"]), ("2014-10-22 10:20:30", &["foo"]),
        ("2014-11-08 10:20:30", &["foo"]), ("2014-11-10 10:20:30", &["foo"]), ("2014-11-12 10:20:30", &["foo"]),
        ("2014-11-13 10:20:30", &["foo"]), ("2014-11-13 10:20:30.1", &["bar"]),
        ("2014-11-15 10:20:30", &["foo", "bar"]), ("2014-11-18 10:20:30", &[]), ("2014-11-20 10:20:30", &[]),
        ("2014-11-21 10:20:30", &[]), ("2014-11-22 10:20:30", &[]), ("2015-09-01 10:20:30", &[]),
        ("2015-09-02 10:20:30", &[]), ("2015-09-05 10:20:30", &[]), ("2015-09-06 10:20:30", &[]),
        ("2015-09-08 10:20:30", &[]), ("2015-09-09 10:20:30", &[]), ("2015-09-10 10:20:30", &[]),
        ("2015-09-11 10:20:30", &[]), ("2015-09-20 10:20:30", &[]), ("2015-09-22 10:20:30", &[]),
        ("2015-08-08 10:20:30", &[]), ("2015-08-10 10:20:30", &[]), ("2015-08-12 10:20:30", &[]),
        ("2015-08-13 10:20:30", &[]), ("2015-08-13 10:20:30.1", &[]), ("2015-08-15 10:20:30", &[]),
        ("2015-08-18 10:20:30", &[]), ("2015-08-20 10:20:30", &[]), ("2015-08-21 10:20:30", &[]),
        ("2015-08-22 10:20:30", &[]), ("2015-10-01 10:20:30", &[]), ("2015-10-02 10:20:30", &[]),
        ("2015-10-05 10:20:30", &[]), ("2015-10-06 10:20:30", &[]), ("2015-10-08 10:20:30", &[]),
        ("2015-10-09 10:20:30", &[]), ("2015-10-10 10:20:30", &[]), ("2015-10-11 10:20:30", &[]),
        ("2015-10-20 10:20:30", &[]), ("2015-10-22 10:20:30", &[]), ("2015-10-22 10:20:30", &[]),
        ("2015-10-22 10:20:30", &["foo", "bar"]), ("2015-10-22 10:20:30", &["foo", "bar"]),
        ("2015-10-22 10:20:30", &["foo", "bar"]), ("2015-11-08 10:20:30", &[]), ("2015-11-10 10:20:30", &[]),
        ("2015-11-12 10:20:30", &[]), ("2015-11-13 10:20:30", &[]), ("2015-11-13 10:20:30.1", &[]),
        ("2015-11-15 10:20:30", &[]), ("2015-11-18 10:20:30", &[]), ("2015-11-20 10:20:30", &[]),
        ("2015-11-21 10:20:30", &[]), ("2015-11-22 10:20:30", &[]), ("2016-01-01 01:02:03", &[]),
        ("2016-01-01 01:03:03", &[]), ("2016-01-01 07:08:03", &[]), ("2016-01-03 07:02:03", &[]),
        ("2016-01-04 10:23:03", &[]), ("2016-01-04 11:23:03", &[]), ("2016-01-04 12:23:03", &[]),
        ("2016-01-04 12:24:03", &[]), ("2016-01-04 12:28:03", &[]), ("2016-01-04 12:30:03", &[]),
        ("2016-01-04 16:23:03", &[]), ("2016-01-05 09:02:03", &[]), ("2016-01-06 08:02:03", &[]),
        ("2016-01-07 10:02:03", &[]), ("2016-01-08 20:02:03", &[]), ("2016-01-09 21:02:03", &[]),
        ("2016-01-12 21:02:03", &[]), ("2016-01-12 21:08:03", &[]), ("2016-01-18 12:02:03", &[]),
    ];

    /// Policies of restic's `TestApplyPolicy` and what its golden files (internal/data/testdata/
    /// policy_keep_snapshots_N) keep: `index:kinds` in keep order, where index points into
    /// [`RESTIC_SNAPSHOTS`] and kinds are l(ast), h(ourly), d(aily), w(eekly), m(onthly), y(early), with `o`
    /// for restic's "oldest ...", W for within and `t:tag`. Durations are whole days or hours, where restic's
    /// calendar arithmetic and our fixed lengths agree; the AND-taglist case (`foo,bar`) has no equivalent.
    fn restic_cases() -> Vec<(usize, Policy, &'static str)> {
        let p = Policy::default;
        let within = |s: &str| Policy { keep_within: Some(parse_duration(s).unwrap()), ..p() };
        vec![
            (1, Policy { keep_last: Some(10), ..p() }, "102:l 101:l 100:l 99:l 98:l 97:l 96:l 95:l 94:l 93:l"),
            (
                5,
                Policy { keep_hourly: Some(20), ..p() },
                "102:h 101:h 99:h 98:h 97:h 96:h 95:h 94:h 93:h 89:h 88:h 87:h 86:h 85:h 83:h 82:h 81:h 80:h 79:h 78:h",
            ),
            (6, Policy { keep_daily: Some(3), ..p() }, "102:d 101:d 99:d"),
            (7, Policy { keep_daily: Some(10), ..p() }, "102:d 101:d 99:d 98:d 97:d 96:d 95:d 94:d 87:d 86:d"),
            (9, Policy { keep_last: Some(5), keep_daily: Some(5), ..p() }, "102:l,d 101:l,d 100:l 99:l,d 98:l,d 97:d"),
            (
                10,
                Policy { keep_last: Some(2), keep_daily: Some(10), ..p() },
                "102:l,d 101:l,d 99:d 98:d 97:d 96:d 95:d 94:d 87:d 86:d",
            ),
            (11, Policy { keep_weekly: Some(2), ..p() }, "102:w 101:w"),
            (12, Policy { keep_weekly: Some(4), ..p() }, "102:w 101:w 99:w 87:w"),
            (13, Policy { keep_daily: Some(3), keep_weekly: Some(4), ..p() }, "102:d,w 101:d,w 99:d,w 87:w"),
            (14, Policy { keep_monthly: Some(6), ..p() }, "102:m 83:m 69:m 49:m 59:m 39:m"),
            (
                15,
                Policy { keep_daily: Some(2), keep_weekly: Some(2), keep_monthly: Some(6), ..p() },
                "102:d,w,m 101:d,w 83:m 69:m 49:m 59:m 39:m",
            ),
            (16, Policy { keep_yearly: Some(10), ..p() }, "102:y 83:y 39:y 10:oy"),
            (
                17,
                Policy {
                    keep_daily: Some(7),
                    keep_weekly: Some(2),
                    keep_monthly: Some(3),
                    keep_yearly: Some(10),
                    ..p()
                },
                "102:d,w,m,y 101:d,w 99:d 98:d 97:d 96:d 95:d 83:m,y 69:m 39:y 10:oy",
            ),
            (
                18,
                Policy { keep_tags: strs(&["foo"]), ..p() },
                "71:t:foo 72:t:foo 73:t:foo 35:t:foo 33:t:foo 32:t:foo 31:t:foo 30:t:foo 29:t:foo 28:t:foo 27:t:foo \
                 26:t:foo 25:t:foo 24:t:foo 23:t:foo 22:t:foo 21:t:foo 20:t:foo",
            ),
            (
                20,
                Policy { keep_tags: strs(&["foo", "bar"]), ..p() },
                "71:t:foo,t:bar 72:t:foo,t:bar 73:t:foo,t:bar 35:t:foo,t:bar 34:t:bar 33:t:foo 32:t:foo 31:t:foo \
                 30:t:foo 29:t:foo 28:t:foo 27:t:foo 26:t:foo 25:t:foo 24:t:foo 23:t:foo 22:t:foo 21:t:foo 20:t:foo",
            ),
            (21, within("1d"), "102:W"),
            (22, within("2d"), "102:W"),
            (23, within("7d"), "102:W 101:W 100:W"),
            (27, within("13d23h"), "102:W 101:W 100:W 99:W 98:W 97:W 96:W 95:W 94:W"),
            (
                38,
                Policy { keep_hourly: Some(UNLIMITED), ..p() },
                "102:h 101:h 99:h 98:h 97:h 96:h 95:h 94:h 93:h 89:h 88:h 87:h 86:h 85:h 83:h 82:h 81:h 80:h 79:h \
                 78:h 76:h 75:h 74:h 69:h 68:h 67:h 66:h 65:h 64:h 63:h 62:h 61:h 60:h 49:h 48:h 47:h 46:h 45:h 44:h \
                 43:h 42:h 41:h 40:h 59:h 58:h 57:h 56:h 55:h 54:h 52:h 51:h 50:h 39:h 38:h 37:h 36:h 35:h 34:h \
                 32:h 31:h 30:h 29:h 28:h 27:h 26:h 25:h 24:h 23:h 22:h 21:h 20:h 9:h 8:h 7:h 6:h 5:h 4:h 3:h 2:h \
                 1:h 0:h 19:h 18:h 17:h 16:h 15:h 14:h 12:h 11:h 10:h",
            ),
            (
                39,
                Policy {
                    keep_daily: Some(3),
                    keep_weekly: Some(2),
                    keep_monthly: Some(UNLIMITED),
                    keep_yearly: Some(UNLIMITED),
                    ..p()
                },
                "102:d,w,m,y 101:d,w 99:d 83:m,y 69:m 49:m 59:m 39:m,y 29:m 9:m 19:m 10:om,oy",
            ),
        ]
    }

    /// Our reason reduced to the golden file's vocabulary, e.g. `oldest yearly 2014` to `oy`.
    fn kind(reason: &str) -> String {
        if let Some(tag) = reason.strip_prefix("tag ") {
            return format!("t:{tag}");
        }
        if reason.starts_with("within ") {
            return "W".to_string();
        }
        let (oldest, rest) = match reason.strip_prefix("oldest ") {
            Some(rest) => ("o", rest),
            None => ("", reason),
        };
        let letter = match rest.split(' ').next().unwrap() {
            "last" => "l",
            "hourly" => "h",
            "daily" => "d",
            "weekly" => "w",
            "monthly" => "m",
            "yearly" => "y",
            other => panic!("unexpected reason {other}"),
        };
        format!("{oldest}{letter}")
    }

    #[test]
    fn restic_test_suite_golden_results() {
        let list: Vec<Checkpoint> =
            RESTIC_SNAPSHOTS.iter().enumerate().map(|(n, (t, tags))| cp_at(n, ts(t), tags, "h", "/p")).collect();
        for (case, policy, want) in restic_cases() {
            let p = plan_at(&list, &policy, true, now());
            let got: Vec<String> = kept(&p)
                .iter()
                .map(|(n, r)| format!("{n}:{}", r.iter().map(|r| kind(r)).collect::<Vec<_>>().join(",")))
                .collect();
            assert_eq!(got.join(" "), want, "restic policy case {case}: {policy}");
            assert_eq!(p.keep.len() + p.forget.len(), list.len(), "case {case}");
        }
        // Case 36, `--keep-last unlimited`, keeps all 103.
        let all = plan_at(&list, &Policy { keep_last: Some(UNLIMITED), ..Default::default() }, true, now());
        assert_eq!((all.keep.len(), all.forget.len()), (103, 0));
    }

    // ---- parsing and display ----

    #[test]
    fn parse_duration_reads_restic_units() {
        let h = |n: u64| Ok(Duration::from_secs(n * 3600));
        assert_eq!(parse_duration("7d"), h(7 * 24));
        assert_eq!(parse_duration("36h"), h(36));
        assert_eq!(parse_duration(" 2y5m7d3h "), h((2 * 365 + 5 * 30 + 7) * 24 + 3));
        assert_eq!(parse_duration("3h1y"), h(365 * 24 + 3));
        assert_eq!(parse_duration("90m"), h(90 * 30 * 24), "m is months, as in restic");
        assert_eq!(parse_duration("2w"), h(14 * 24));
        assert_eq!(parse_duration("0d"), Ok(Duration::ZERO));
        for bad in ["", "  ", "7", "d", "7x", "1d2d", "-1d", "1.5d", "7D", "90min", "1d 2h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_duration("1d1d").unwrap_err().contains("twice"));
        assert!(parse_duration("5s").unwrap_err().contains("hours at the finest"));
        assert!(parse_duration("90min").unwrap_err().contains("hours at the finest"));
        assert!(parse_duration("9000000000000000y").unwrap_err().contains("too long"));
        assert!(parse_duration("1h30m").unwrap_err().contains("30 months"), "minutes meant, months read");
        assert_eq!(parse_duration("30m1h"), h(30 * 30 * 24 + 1), "months before hours stay months");
    }

    #[test]
    fn parse_count_accepts_unlimited() {
        assert_eq!(parse_count("7"), Ok(7));
        assert_eq!(parse_count("0"), Ok(0));
        assert_eq!(parse_count("unlimited"), Ok(UNLIMITED));
        for bad in ["-1", "", "seven", "1.0", "4294967296"] {
            assert!(parse_count(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn durations_print_without_ambiguous_minutes() {
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(format_duration(Duration::from_secs(36 * 3600)), "1d12h");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h1800s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500000000ns");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn policies_describe_themselves() {
        let policy = Policy {
            keep_last: Some(3),
            keep_daily: Some(7),
            keep_monthly: Some(UNLIMITED),
            keep_within: Some(Duration::from_secs(30 * 86_400)),
            keep_tags: strs(&["release", ""]),
            ..Default::default()
        };
        assert_eq!(
            policy.to_string(),
            "keep 3 latest, 7 daily, all monthly checkpoints and all checkpoints tagged release or '' and all \
             checkpoints within 30d of the newest"
        );
        assert_eq!(Policy::default().to_string(), "keep everything (no rule given)");
        let one = Policy { keep_last: Some(1), ..Default::default() };
        assert_eq!(one.to_string(), "keep 1 latest checkpoint");
        let two = Policy { keep_last: Some(1), keep_daily: Some(1), ..Default::default() };
        assert_eq!(two.to_string(), "keep 1 latest, 1 daily checkpoints");
    }

    #[test]
    fn plans_serialize_to_json() {
        let list = cps(&["2026-11-24 08:00:00", "2026-11-25 08:00:00"]);
        let p = run(&list, &Policy { keep_last: Some(1), ..Default::default() });
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["keep"][0]["reasons"], serde_json::json!(["last 1"]));
        assert_eq!(json["keep"][0]["time_ns"], ts("2026-11-25 08:00:00"));
        assert_eq!(json["forget"][0]["id"], format!("{:064x}", 0));
        assert_eq!(json["forget"][0]["reasons"], serde_json::json!([]));
        assert_eq!(json["forget"][0]["host"], "h");
        assert_eq!(json["forget"][0]["path"], "/p");
    }
}
