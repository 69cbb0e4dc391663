//! Text and JSON output on stdout. Every write returns its error, so a closed pipe ends the command quietly.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufWriter, StdoutLock, Write};

use snapstore::{
    CheckoutSummary, Checkpoint, CommitSummary, EntryKind, FileInfo, GcSummary, Plan, RepoStats, Repository,
};

pub struct Out {
    w: BufWriter<StdoutLock<'static>>,
    json: bool,
    /// Elements written since [`Out::json_open`].
    items: u64,
    /// What [`Out::json_open`] was given, written with the first element or at the close.
    head: Option<String>,
}

impl Out {
    pub fn new(json: bool) -> Self {
        Out { w: BufWriter::new(io::stdout().lock()), json, items: 0, head: None }
    }

    /// Writes one line of text, with any control character left in it escaped (see [`printable`]).
    pub fn line(&mut self, s: &str) -> io::Result<()> {
        writeln!(self.w, "{}", printable(s))
    }

    pub fn json<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> io::Result<()> {
        debug_assert!(self.json);
        // io::Error::from keeps a broken pipe's kind, so `--json log | head` ends quietly.
        serde_json::to_writer_pretty(&mut self.w, v).map_err(io::Error::from)?;
        writeln!(self.w)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// Opens a JSON array that [`Out::json_item`] fills one element at a time, after `head` (e.g. `{"a": 1,
    /// "files": `): a listing of a tree of millions of entries holds one entry, not the list. Each element is
    /// one line. Nothing is written before the first element or the close, so that an error before either
    /// leaves stdout empty.
    pub fn json_open(&mut self, head: &str) {
        debug_assert!(self.json);
        self.items = 0;
        self.head = Some(format!("{head}["));
    }

    pub fn json_item<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> io::Result<()> {
        if let Some(head) = self.head.take() {
            self.w.write_all(head.as_bytes())?;
        }
        self.w.write_all(if self.items == 0 { b"\n  " } else { b",\n  " })?;
        self.items += 1;
        serde_json::to_writer(&mut self.w, v).map_err(io::Error::from)
    }

    /// Closes the array, then writes `tail` (e.g. `}`) and a newline.
    pub fn json_close(&mut self, tail: &str) -> io::Result<()> {
        let head = self.head.take().unwrap_or_default();
        let end = if self.items == 0 { "]" } else { "\n]" };
        writeln!(self.w, "{head}{end}{tail}")
    }
}

/// `v` as a JSON object with `extra` fields beside its own (a group beside a commit's, a part's index
/// beside its checkout's).
pub fn json_with<T: serde::Serialize>(v: &T, extra: &[(&str, serde_json::Value)]) -> io::Result<serde_json::Value> {
    let mut v = serde_json::to_value(v).map_err(io::Error::from)?;
    for (key, value) in extra {
        v[*key] = value.clone();
    }
    Ok(v)
}

/// Prints from inside a library callback (a walk, a diff): the first failed write (stdout closed) stops the
/// walk with a stand-in error, and [`Sink::finish`] reports the write error instead of it.
#[derive(Default)]
pub struct Sink {
    failed: Option<io::Error>,
}

impl Sink {
    pub fn write(&mut self, written: io::Result<()>) -> snapstore::Result<()> {
        written.map_err(|e| {
            self.failed = Some(e);
            snapstore::Error::Internal("stdout closed".into())
        })
    }

    pub fn finish<T>(self, walked: snapstore::Result<T>) -> Result<T, crate::Failure> {
        match self.failed {
            Some(e) => Err(e.into()),
            None => Ok(walked?),
        }
    }
}

/// Bytes in binary units, as restic and borg print them.
pub fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// A time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn human_time(ns: i64) -> String {
    snapstore::format_utc(ns)
}

pub fn commit_summary(out: &mut Out, s: &CommitSummary) -> io::Result<()> {
    let parent = s.parent.as_deref().map(|p| format!(" (parent {})", &p[..8])).unwrap_or_default();
    if s.unchanged {
        out.line(&format!("no checkpoint made: nothing changed since checkpoint {}", &s.id[..8]))?;
    } else {
        out.line(&format!("checkpoint {}{parent}", &s.id[..8]))?;
    }
    out.line(&format!(
        "  files: {} new, {} changed, {} unchanged; {}, {}",
        s.files_new,
        s.files_changed,
        s.files_unchanged,
        plural(s.dirs, "dir"),
        plural(s.symlinks, "symlink")
    ))?;
    if s.special_skipped + s.unreadable_skipped + s.vanished > 0 {
        out.line(&format!(
            "  skipped: {} special, {} unreadable, {} vanished while the commit ran",
            s.special_skipped, s.unreadable_skipped, s.vanished
        ))?;
    }
    let rate = s.bytes_read as f64 / s.seconds.max(1e-9);
    let read = if s.bytes_read == 0 {
        format!("nothing read, in {:.2} s", s.seconds)
    } else {
        format!("read {} in {:.2} s ({}/s)", human_bytes(s.bytes_read), s.seconds, human_bytes(rate as u64))
    };
    out.line(&format!("  size {}; {read}", human_bytes(s.logical_bytes)))?;
    if s.files_reread_for_damage > 0 {
        out.line(&format!(
            "  {} unchanged but read again: {} chunks marked damaged or missing from the index, stored afresh",
            plural(s.files_reread_for_damage, "file"),
            if s.files_reread_for_damage == 1 { "it holds" } else { "they hold" }
        ))?;
    }
    out.line(&format!(
        "  new after dedup {} ({} new of {} chunks read); stored {} after compression",
        human_bytes(s.bytes_new),
        s.chunks_new,
        s.chunks_new + s.chunks_reused,
        human_bytes(s.bytes_stored)
    ))
}

pub fn checkout_summary(out: &mut Out, s: &CheckoutSummary, dest: &std::path::Path) -> io::Result<()> {
    let rate = s.logical_bytes as f64 / s.seconds.max(1e-9);
    out.line(&format!(
        "checked out {} to {}: {}, {}, {}, {} in {:.2} s ({}/s)",
        &s.id[..snapstore::SHORT_ID_LEN],
        dest.display(),
        plural(s.files, "file"),
        plural(s.dirs, "dir"),
        plural(s.symlinks, "symlink"),
        human_bytes(s.logical_bytes),
        s.seconds,
        human_bytes(rate as u64)
    ))?;
    if s.files_unchanged + s.files_patched + s.files_linked + s.removed > 0 || s.bytes_written != s.logical_bytes {
        // Only the counts that say something: a fresh checkout has nothing unchanged, patched or removed.
        let counts = [
            (s.files_unchanged, "unchanged"),
            (s.files_patched, "patched in place"),
            (s.files_linked, "hard-linked to another name"),
            (s.files_written, "written"),
        ];
        let mut parts: Vec<String> = counts
            .into_iter()
            .filter(|&(n, _)| n > 0)
            .map(|(n, what)| format!("{} {what}", plural(n, "file")))
            .collect();
        if s.removed > 0 {
            parts.push(if s.removed == 1 {
                "1 entry removed".into()
            } else {
                format!("{} entries removed", s.removed)
            });
        }
        parts.push(format!("wrote {}", human_bytes(s.bytes_written)));
        out.line(&format!("  {}", parts.join(", ")))?;
    }
    Ok(())
}

pub fn plural(n: u64, what: &str) -> String {
    if n == 1 { format!("1 {what}") } else { format!("{n} {what}s") }
}

/// How each of `paths` is shown in a listing: its last component, or as many of its last components as tell it
/// apart from the others listed (`a/run` and `b/run`, where `run` alone would look like one series), up to
/// the whole path; a stream (`stdin:NAME`) whole.
pub fn shown_paths<'a>(paths: impl IntoIterator<Item = &'a str>) -> HashMap<&'a str, String> {
    let distinct: BTreeSet<&str> = paths.into_iter().collect();
    let parts = |p: &str| p.split('/').filter(|c| !c.is_empty()).count();
    let suffix = |p: &'a str, depth: usize| -> String {
        if p.starts_with("stdin:") || depth >= parts(p) {
            return p.to_string();
        }
        let mut last: Vec<&str> = p.rsplit('/').filter(|c| !c.is_empty()).take(depth).collect();
        last.reverse();
        last.join("/")
    };
    let mut depth: HashMap<&str, usize> = distinct.iter().map(|p| (*p, 1)).collect();
    loop {
        let mut alike: HashMap<String, Vec<&str>> = HashMap::new();
        for p in &distinct {
            alike.entry(suffix(p, depth[p])).or_default().push(p);
        }
        let mut longer = false;
        for p in alike.into_values().filter(|ps| ps.len() > 1).flatten() {
            if depth[p] < parts(p) {
                *depth.get_mut(p).expect("every path has a depth") += 1;
                longer = true;
            }
        }
        if !longer {
            return distinct.iter().map(|p| (*p, suffix(p, depth[p]))).collect();
        }
    }
}

/// A message or tags on one line: line breaks and tabs become spaces, other control characters escapes.
fn one_line(s: &str) -> String {
    printable(&s.replace(['\n', '\r', '\t'], " ")).into_owned()
}

/// Text from a catalog (names, messages, hosts: a hostile catalog chooses them) made safe for a terminal: each
/// control character, an escape sequence's ESC among them, is written as its Rust escape (`\u{1b}`), so that
/// no name can move the cursor, recolour, retitle or clear the screen, or fake a line of output.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect())
}

/// A name in a line-oriented listing: quoted with escapes (as Rust's `{:?}` does) when it holds a control
/// character, or starts with a quote and would otherwise read as quoted; as it is otherwise.
pub fn listed_name(s: &str) -> String {
    if s.starts_with('"') || s.chars().any(char::is_control) { format!("{s:?}") } else { s.to_string() }
}

pub fn log(out: &mut Out, list: &[Checkpoint], quiet: bool) -> io::Result<()> {
    if quiet {
        for c in list {
            out.line(&c.id)?;
        }
        return Ok(());
    }
    if list.is_empty() {
        return out.line("no checkpoints yet: `snapstore commit PATH` makes the first");
    }
    let shown = shown_paths(list.iter().map(|c| c.path.as_str()));
    let shown: HashMap<&str, String> = shown.into_iter().map(|(p, s)| (p, one_line(&s))).collect();
    let width = shown.values().map(|s| s.chars().count()).max().unwrap_or(0).max(16);
    out.line(&format!(
        "{:<8}  {:<19}  {:<width$}  {:>10}  {:>10}  {:<12}  MESSAGE",
        "ID", "TIME (UTC)", "PATH", "SIZE", "NEW", "TAGS"
    ))?;
    for c in list {
        out.line(&format!(
            "{:<8}  {:<19}  {:<width$}  {:>10}  {:>10}  {:<12}  {}",
            c.short_id(),
            human_time(c.time_ns),
            shown[c.path.as_str()],
            human_bytes(c.logical_bytes),
            human_bytes(c.bytes_new),
            one_line(&c.tags.join(",")),
            one_line(&c.message)
        ))?;
    }
    Ok(())
}

pub fn checkpoint_header(out: &mut Out, c: &Checkpoint) -> io::Result<()> {
    out.line(&format!("checkpoint {}", c.id))?;
    if let Some(p) = &c.parent {
        out.line(&format!("parent     {p}"))?;
    }
    out.line(&format!("time       {} UTC", human_time(c.time_ns)))?;
    out.line(&format!("host       {}", listed_name(&c.host)))?;
    out.line(&format!("path       {}", listed_name(&c.path)))?;
    if !c.tags.is_empty() {
        out.line(&format!("tags       {}", one_line(&c.tags.join(", "))))?;
    }
    if !c.message.is_empty() {
        out.line(&format!("message    {}", one_line(&c.message)))?;
    }
    out.line(&format!(
        "size       {} in {}, {}, {}; {} new ({} stored)",
        human_bytes(c.logical_bytes),
        plural(c.files, "file"),
        plural(c.dirs, "dir"),
        plural(c.symlinks, "symlink"),
        human_bytes(c.bytes_new),
        human_bytes(c.bytes_stored)
    ))?;
    out.line("")
}

pub fn file_line(out: &mut Out, f: &FileInfo) -> io::Result<()> {
    let kind = match f.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
    };
    let size = if f.kind == EntryKind::File { human_bytes(f.size) } else { String::new() };
    let path = listed_name(&f.path.to_string_lossy());
    let target = match &f.link_target {
        Some(t) => format!(" -> {}", listed_name(&t.to_string_lossy())),
        None => String::new(),
    };
    let owner = f.owner.map_or("-".to_string(), |o| format!("{}:{}", o.uid, o.gid));
    out.line(&format!(
        "{kind}{:04o}  {owner:>11}  {:>10}  {}  {path}{target}",
        f.mode & 0o7777,
        size,
        human_time(f.mtime_ns)
    ))
}

pub fn plan(out: &mut Out, plan: &Plan) -> io::Result<()> {
    let shown = shown_paths(plan.keep.iter().chain(&plan.forget).map(|d| d.path.as_str()));
    for (what, list) in [("keep  ", &plan.keep), ("forget", &plan.forget)] {
        for d in list.iter() {
            let why = if d.reasons.is_empty() { String::new() } else { format!("  ({})", d.reasons.join(", ")) };
            fate_line(out, what, &d.id, d.time_ns, &shown[d.path.as_str()], &why)?;
        }
    }
    Ok(())
}

/// One checkpoint a `forget` keeps or forgets, alike for a policy's plan and for ids given; `shown` is its
/// path as [`shown_paths`] shows it among the others listed.
pub fn fate_line(out: &mut Out, what: &str, id: &str, time_ns: i64, shown: &str, why: &str) -> io::Result<()> {
    let short = &id[..snapstore::SHORT_ID_LEN.min(id.len())];
    out.line(&format!("{what}  {short}  {}  {}{why}", human_time(time_ns), one_line(shown)))
}

/// The last line of a `forget`: with a policy, how many it kept too; by id or group, only what it forgot.
/// `pruning`: GC runs next (`--prune`), so the line does not send the user to it.
pub fn forget_total(
    out: &mut Out,
    kept: Option<usize>,
    forgotten: usize,
    what: &str,
    dry_run: bool,
    pruning: bool,
) -> io::Result<()> {
    let forgotten = plural(forgotten as u64, what);
    let then = if pruning { "" } else { "; `snapstore gc` reclaims the space" };
    match (kept, dry_run) {
        (Some(kept), true) => out.line(&format!("would keep {kept}, forget {forgotten} (dry run: nothing changed)")),
        (Some(kept), false) => out.line(&format!("kept {kept}, forgot {forgotten}{then}")),
        (None, true) => out.line(&format!("would forget {forgotten} (dry run: nothing changed)")),
        (None, false) => out.line(&format!("forgot {forgotten}{then}")),
    }
}

pub fn gc_summary(out: &mut Out, s: &GcSummary) -> io::Result<()> {
    let verb = if s.dry_run { "would free" } else { "freed" };
    out.line(&format!(
        "gc {verb} {}: {} deleted, {} rewritten, {} orphan files removed, in {:.2} s",
        human_bytes(s.bytes_freed),
        plural(s.packs_deleted, "pack"),
        plural(s.packs_rewritten, "pack"),
        s.orphans_deleted,
        s.seconds
    ))?;
    if s.orphans_waiting > 0 {
        out.line(&format!(
            "  kept {} no record names until the grace after this machine's gc first saw them (--orphan-grace)",
            plural(s.orphans_waiting, "orphan file")
        ))?;
    }
    if s.groups_dropped > 0 {
        let verb = if s.dry_run { "would drop" } else { "dropped" };
        out.line(&format!("  {verb} {} left incomplete", plural(s.groups_dropped, "group checkpoint")))?;
    }
    out.line(&format!(
        "  chunks: {} newly unused, {} removed, {} kept for commits still running or the grace (--orphan-grace)",
        s.chunks_condemned, s.chunks_swept, s.chunks_deferred
    ))?;
    if s.sessions_expired > 0 {
        out.line(&format!("  expired {}", plural(s.sessions_expired, "dead session")))?;
    }
    if s.sweep_deferred_by > 0 {
        out.line(&format!(
            "  marked only: {} running on the bucket (commits, checkouts, verifies or readers); the next gc with \
             none running deletes what is unused and drops groups left incomplete",
            plural(s.sweep_deferred_by, "session")
        ))?;
    }
    if !s.records_missing.is_empty() {
        out.line(&format!(
            "  marked only: {} missing from the bucket, whose checkpoints may use what looks unused here; \
             nothing is deleted until they are back, or accepted as lost (`snapstore sync --accept-missing`)",
            plural(s.records_missing.len() as u64, "record")
        ))?;
    }
    if s.dry_run {
        out.line("  dry run: nothing changed")?;
    }
    Ok(())
}

pub fn stats(out: &mut Out, repo: &Repository, s: &RepoStats) -> io::Result<()> {
    let c = &s.catalog;
    out.line(&format!("repository   {}", repo.location()))?;
    out.line(&format!("checkpoints  {}", c.checkpoints))?;
    out.line(&format!("logical      {} (sum of all checkpoints)", human_bytes(c.logical_bytes)))?;
    out.line(&format!("unique       {} in {} chunks", human_bytes(c.unique_bytes), c.chunks))?;
    out.line(&format!(
        "stored       {} in {} packs, catalog {}",
        human_bytes(c.pack_bytes),
        c.packs,
        human_bytes(s.catalog_bytes)
    ))?;
    // An empty repository has no ratio to show.
    let ratio = |r: f64| if c.chunks == 0 { "-".to_string() } else { format!("{r:.2}x") };
    // Chunks stay counted until GC collects them, so forgetting checkpoints lowers the ratio until then.
    let uncollected =
        if c.chunks > 0 && s.dedup_ratio < 1.0 { " (counts chunks `snapstore gc` may collect)" } else { "" };
    out.line(&format!("dedup        {}{uncollected}", ratio(s.dedup_ratio)))?;
    out.line(&format!("compression  {}", ratio(s.compression_ratio)))?;
    let p = repo.params();
    out.line(&format!(
        "parameters   format {}, {} {}/{}/{} B, {}, zstd level {}",
        p.format_version, p.chunker, p.chunk_min, p.chunk_avg, p.chunk_max, p.hash, p.compression_level
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_paths_show_as_much_as_tells_them_apart() {
        let paths = ["/home/a/run", "/home/b/run", "/data/x/b/run", "/srv/vm.img", "stdin:state", "/", "/run"];
        let shown = shown_paths(paths);
        let want = [
            ("/home/a/run", "a/run"),
            ("/home/b/run", "/home/b/run"),
            ("/data/x/b/run", "x/b/run"),
            ("/srv/vm.img", "vm.img"),
            ("stdin:state", "stdin:state"),
            ("/", "/"),
            ("/run", "/run"),
        ];
        for (path, expected) in want {
            assert_eq!(shown[path], expected, "{path}");
        }
        assert_eq!(shown_paths(["/x/run", "/x/run"])["/x/run"], "run", "one path listed twice is one series");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert!(matches!(printable("plain, ünïcode"), Cow::Borrowed(_)));
        assert_eq!(
            printable("red\x1b[31m bell\x07 del\x7f c1\u{9b}"),
            "red\\u{1b}[31m bell\\u{7} del\\u{7f} c1\\u{9b}"
        );
        assert_eq!(one_line("a\nb\tc\x1b]0;title\x07"), "a b c\\u{1b}]0;title\\u{7}");
        assert_eq!(listed_name("dir/file"), "dir/file");
        assert_eq!(listed_name("x\x1bc"), "\"x\\u{1b}c\"");
        assert_eq!(listed_name("a\nb"), "\"a\\nb\"");
        // A name that begins with a quote is quoted too, or `"a\nb"` could be a real name or an escaped one.
        assert_eq!(listed_name("\"q\""), "\"\\\"q\\\"\"");
    }

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(human_time(0), "1970-01-01 00:00:00");
        assert_eq!(human_time(951_782_400 * 1_000_000_000), "2000-02-29 00:00:00");
        assert_eq!(human_time(1_795_650_674 * 1_000_000_000), "2026-11-25 23:51:14");
        assert_eq!(human_time(-1_000_000_000), "1969-12-31 23:59:59");
    }
}
