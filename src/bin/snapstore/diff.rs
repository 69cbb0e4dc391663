//! `snapstore diff`: added, removed and modified files between two checkpoints.

use std::path::Path;

use snapstore::{Change, ChangeKind, EntryKind};

use crate::Failure;
use crate::output::{Out, Sink, human_bytes};

/// Arguments of `diff`.
#[derive(clap::Args)]
pub struct DiffArgs {
    /// The older checkpoint (id, unique prefix, or 'latest'; latest~1 is the one before latest on its path);
    /// alone, the newer one, compared with the checkpoint before it on its path (ID~1)
    a: String,
    /// The newer checkpoint
    b: Option<String>,
}

/// Ranges listed per file in text output; `--json` lists them all.
const RANGES_SHOWN: usize = 4;

pub fn diff(repo_dir: &Path, args: &DiffArgs, json: bool, quiet: bool, out: &mut Out) -> Result<(), Failure> {
    let repo = crate::open(repo_dir)?;
    let mut sink = Sink::default();
    // With --json the changes are streamed as they are found (see `Out::json_open`), the summary last.
    if json {
        out.json_open("{\"changes\": ");
    }
    // One checkpoint: what its commit changed, as `git show` tells; for a path's first, everything it holds.
    let pair = match &args.b {
        Some(b) => Some((args.a.clone(), b.clone())),
        None => {
            let newer = repo.checkpoint(&args.a)?;
            match repo.checkpoint(&format!("{}~1", newer.id)) {
                Ok(older) => Some((older.id, newer.id)),
                Err(snapstore::Error::CheckpointNotFound(_)) => None,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let mut each = |c: &Change| if json { sink.write(out.json_item(c)) } else { sink.write(line(out, c, quiet)) };
    let diffed = match pair {
        Some((a, b)) => repo.diff(&a, &b, &mut each),
        None => repo.diff_added(&args.a, &mut each),
    };
    let summary = sink.finish(diffed)?;
    if json {
        let summary = serde_json::to_string(&summary).map_err(std::io::Error::from)?;
        out.json_close(&format!(",\n\"summary\": {summary}}}"))?;
    } else if !quiet {
        out.line(&format!(
            "{} added ({}), {} removed ({}), {} modified ({} changed)",
            summary.added,
            human_bytes(summary.bytes_added),
            summary.removed,
            human_bytes(summary.bytes_removed),
            summary.modified,
            human_bytes(summary.bytes_changed)
        ))?;
    }
    Ok(())
}

/// One change; `quiet`: its mark and path alone, for scripts.
fn line(out: &mut Out, c: &Change, quiet: bool) -> std::io::Result<()> {
    let mark = match c.change {
        ChangeKind::Added => '+',
        ChangeKind::Removed => '-',
        ChangeKind::Modified => 'M',
    };
    let mut path = crate::output::listed_name(&c.path.to_string_lossy());
    if c.kind == EntryKind::Dir {
        path.push('/');
    }
    if quiet {
        return out.line(&format!("{mark} {path}"));
    }
    let shown = |t: &Path| crate::output::listed_name(&t.to_string_lossy());
    if let Some(target) = &c.link_target {
        path.push_str(&format!(" -> {}", shown(target)));
        if let Some(before) = &c.link_target_before {
            path.push_str(&format!("  (was -> {})", shown(before)));
        }
    }
    let detail = match c.change {
        ChangeKind::Modified if !c.content_changed => "  (mode, owner or mtime only)".to_string(),
        ChangeKind::Modified if c.kind == EntryKind::File => {
            let mut shown: Vec<String> = c.ranges.iter().take(RANGES_SHOWN).map(|(s, e)| format!("{s}..{e}")).collect();
            if c.ranges.len() > RANGES_SHOWN {
                shown.push(format!("+{} more", c.ranges.len() - RANGES_SHOWN));
            }
            let size = if c.size_before == c.size_after {
                human_bytes(c.size_after)
            } else {
                format!("{} -> {}", human_bytes(c.size_before), human_bytes(c.size_after))
            };
            format!("  {size}, {} changed [{}]", human_bytes(c.bytes_changed), shown.join(", "))
        }
        _ if c.kind == EntryKind::File => format!("  {}", human_bytes(c.size_after.max(c.size_before))),
        _ => String::new(),
    };
    out.line(&format!("{mark} {path}{detail}"))
}
