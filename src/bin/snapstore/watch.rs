//! `snapstore watch`: its arguments, signal handling, and one log line per event (text or JSON lines).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde_json::json;
use snapstore::{CommitOptions, WatchEvent, WatchOptions};

use crate::output::{Out, human_bytes, human_time};
use crate::{Failure, KeepArgs};

/// Arguments of `watch`.
#[derive(clap::Args)]
pub struct WatchArgs {
    /// File or directory to checkpoint
    path: PathBuf,
    /// Interval from one commit to the next: 500ms, 30s, 5min, 1h, 1d, or sums like 1h30min
    #[arg(long, value_name = "INTERVAL", value_parser = snapstore::parse_interval)]
    every: Duration,
    /// Message recorded with each checkpoint
    #[arg(short, long, default_value = "")]
    message: String,
    /// Tag each checkpoint (repeatable)
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    #[command(flatten)]
    keep: KeepArgs,
    /// Collect garbage when this long has passed since the last collection (same units as --every)
    #[arg(long, value_name = "INTERVAL", value_parser = snapstore::parse_interval)]
    gc_every: Option<Duration>,
    /// Record unreadable files as skipped instead of failing the commit
    #[arg(long)]
    skip_unreadable: bool,
    /// Worker threads for hashing and compression [default: one per core, at most 16; at most 4 into s3://]
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    threads: usize,
}

pub fn watch(repo_dir: &Path, args: &WatchArgs, json: bool, quiet: bool, out: &mut Out) -> Result<(), Failure> {
    // A commit that cannot start must not leave a new, empty repository behind.
    std::fs::symlink_metadata(&args.path).map_err(|e| snapstore::Error::reading_source(&args.path, e))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal lets the commit under way finish; a second one ends the process at once, which a
        // commit survives like any crash (it leaves nothing visible). Before the repository is opened, so
        // that a signal while a new one is made (or a bucket's copy synced) does not kill it halfway.
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| snapstore::Error::io("<signal handler>", e))?;
    }
    let repo = crate::open_or_init(repo_dir)?;
    let policy = args.keep.policy();
    let opts = WatchOptions {
        every: args.every,
        commit: CommitOptions {
            message: args.message.clone(),
            tags: args.tags.clone(),
            skip_unreadable: args.skip_unreadable,
            threads: args.threads,
            ..Default::default()
        },
        policy: (!policy.is_empty()).then_some(policy),
        gc_every: args.gc_every,
        ..Default::default()
    };
    let mut written = Ok(());
    repo.watch(&args.path, &opts, &stop, |event| {
        if written.is_ok() {
            written = log(out, &event, json, quiet);
            // Nobody reads the log any more (`watch --json | head -1`): stop as on a signal.
            if written.is_err() {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    })?;
    written?;
    Ok(())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// One line per event, flushed at once: the log of a long-running process is read while it runs.
fn log(out: &mut Out, event: &WatchEvent<'_>, json: bool, quiet: bool) -> std::io::Result<()> {
    let now = now_ns();
    if json {
        let time = snapstore::format_rfc3339(now);
        let mut line = match event {
            WatchEvent::Checkpoint { summary, forgotten } => json!({
                "event": "checkpoint", "commit": summary,
                "forgotten": forgotten.iter().map(|c| &c.id).collect::<Vec<_>>(),
            }),
            WatchEvent::Unchanged(s) => json!({"event": "unchanged", "latest": s.id}),
            WatchEvent::Gc(g) => json!({"event": "gc", "gc": g}),
            // As a command's error object has it (`error`, `hint`), with the step that failed.
            WatchEvent::Failed { step, error } => json!({"event": "error", "step": step, "error": error.to_string()}),
        };
        if let WatchEvent::Failed { error, .. } = event
            && let Some(hint) = crate::hint(error)
        {
            line["hint"] = hint.into();
        }
        line["time_ns"] = now.into();
        line["time"] = time.into();
        out.line(&line.to_string())?;
    } else {
        let at = human_time(now);
        match event {
            WatchEvent::Checkpoint { summary: s, forgotten } => {
                let mut line = format!(
                    "{at}  checkpoint {}  {} new, {} changed, {} unchanged files; {} new",
                    &s.id[..8],
                    s.files_new,
                    s.files_changed,
                    s.files_unchanged,
                    human_bytes(s.bytes_new)
                );
                if !forgotten.is_empty() {
                    let ids: Vec<&str> = forgotten.iter().map(|c| &c.id[..8]).collect();
                    line.push_str(&format!("; forgot {}", ids.join(" ")));
                }
                if !quiet {
                    out.line(&line)?;
                }
            }
            WatchEvent::Unchanged(_) => {}
            // Only a collection that found something is news.
            WatchEvent::Gc(g) => {
                if !quiet && g.bytes_freed + g.chunks_swept > 0 {
                    out.line(&format!("{at}  gc  freed {}", human_bytes(g.bytes_freed)))?;
                }
                // On stderr with the errors: damage needs someone to look, and the watch goes on.
                for d in &g.damaged_packs {
                    let what = format!("damaged pack {}: {}; left as it is", d.pack, d.problem);
                    say!("{at}  error: gc: {what} (`snapstore verify --read-data` says what it reaches)");
                }
            }
            // On stderr, as every error: the watch goes on.
            WatchEvent::Failed { step, error } => {
                say!("{at}  error: {step}: {}", crate::output::printable(&error.to_string()))
            }
        }
    }
    out.flush()
}
