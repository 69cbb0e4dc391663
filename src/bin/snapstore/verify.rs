//! `snapstore verify` and `snapstore repair`: their arguments and their reports, as text or JSON.

use std::io::{self, IsTerminal};
use std::path::Path;

use snapstore::{DataSubset, RepairReport, Repository, VerifyOptions, VerifyReport};

use crate::output::{Out, human_bytes, human_time, plural};
use crate::{EXIT_CORRUPT, Failure, progress};

/// Arguments of `verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Also read every chunk: decompress it and check it against its hash
    #[arg(long)]
    read_data: bool,
    /// Read only a share of the packs: N/M (part N of M; parts 1/M..M/M together cover every pack) or P%
    /// (a random P percent). Implies --read-data
    #[arg(long, value_name = "N/M|P%", value_parser = |s: &str| s.parse::<DataSubset>())]
    read_data_subset: Option<DataSubset>,
    /// Threads reading packs [default: one per core, at most 32]
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    threads: usize,
}

/// Arguments of `repair`.
#[derive(clap::Args)]
pub struct RepairArgs {
    #[command(subcommand)]
    what: RepairWhat,
}

#[derive(clap::Subcommand)]
enum RepairWhat {
    /// Rebuild the chunk index (the catalog's packs and chunks) from the packs' own indexes
    #[command(after_help = "Use it when `snapstore verify` reports chunks missing from the index, or when \
catalog.db was lost (a new catalog is created; checkpoints live only in the catalog, so none survive that, \
but the stored chunks do). Packs whose index is damaged are reported and left out. Refused while a commit is \
running. Afterwards every checkpoint is listed as whole or damaged.

With --read-data it then reads every indexed chunk, checks it against its id as `verify --read-data` does, \
and leaves the blobs whose bytes are wrong out of the index (moving the chunk to a sound copy if a pack has \
one). A chunk left out is stored afresh by the next commit that meets it: until then a commit reads every file \
whose previous checkpoint holds such a chunk, whatever its stat, so committing the original data again makes \
every checkpoint that uses it whole again. A later `repair index` without --read-data would index such a blob again.

Exit codes:
  0  every checkpoint whole
  1  failure
  3  damage remains (damaged packs, checkpoints missing data, or the catalog was lost)
  4  no repository
  5  a gc is running")]
    Index {
        /// Also read every chunk and leave the ones whose bytes are damaged out of the index
        #[arg(long)]
        read_data: bool,
        /// Threads reading chunk data (default: one per core, at most 32)
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
    },
}

/// What to do about records gone from a bucket (`verify`, `sync`).
pub const RECORDS_MISSING_HINT: &str = "a catalog rebuilt from the bucket (a new machine, `sync --rebuild`) lacks what \
     the missing records recorded (a commit's checkpoint or chunks, a forget, a gc step), and a machine that applied \
     them keeps it: do not rebuild that machine's copy, and restore what you need there. If they were moved out of \
     records/ by hand, put them back; gc, on every machine, deletes nothing until they are back, or until `snapstore \
     sync --accept-missing` accepts them as lost on each machine that applied them (add `--everywhere` only if no \
     machine that applied them is left)";

/// Lines of one kind printed before "... and N more".
const SHOWN: usize = 50;

fn show_progress(json: bool, quiet: bool) -> bool {
    !quiet && !json && io::stderr().is_terminal()
}

pub fn verify(repo_dir: &Path, args: &VerifyArgs, json: bool, quiet: bool, out: &mut Out) -> Result<(), Failure> {
    let read_data = match args.read_data_subset {
        Some(subset) => subset,
        None if args.read_data => DataSubset::All,
        None => DataSubset::None,
    };
    let repo = crate::open(repo_dir)?;
    let bar = progress::Bar::new(show_progress(json, quiet));
    let opts = VerifyOptions { read_data, threads: args.threads, progress: bar.clone() };
    let report = repo.verify(&opts)?;
    bar.finish();
    if json {
        out.json(&report)?;
    } else {
        verify_text(out, &report, read_data, quiet, repo.location().starts_with("s3://"))?;
    }
    out.flush()?;
    if report.is_clean() { Ok(()) } else { Err(Failure::Exit(EXIT_CORRUPT)) }
}

fn short(id: &str) -> &str {
    &id[..snapstore::SHORT_ID_LEN.min(id.len())]
}

fn more(out: &mut Out, total: u64, shown: usize, what: &str) -> io::Result<()> {
    if total > shown as u64 { out.line(&format!("... and {} more {what}", total - shown as u64)) } else { Ok(()) }
}

fn verify_text(out: &mut Out, r: &VerifyReport, read_data: DataSubset, quiet: bool, bucket: bool) -> io::Result<()> {
    let read = match read_data {
        DataSubset::None => "read no chunk data (--read-data reads it)".to_string(),
        _ => format!("read {} of data ({} packs, {} chunks)", human_bytes(r.bytes_read), r.packs_read, r.chunks_read),
    };
    if r.is_clean() {
        if !quiet {
            out.line(&format!(
                "no damage found: {}, {}, {} checked; {read}",
                plural(r.checkpoints, "checkpoint"),
                plural(r.packs, "pack"),
                plural(r.chunks, "chunk")
            ))?;
        }
        return Ok(());
    }
    for p in r.damaged_packs.iter().take(SHOWN) {
        out.line(&format!("damaged pack {}: {}", p.pack, p.problem))?;
    }
    more(out, r.damaged_packs.len() as u64, SHOWN, "damaged packs")?;
    // A chunk in a damaged pack is damaged for that reason alone: the pack's line says it once, not per chunk.
    let in_damaged_pack =
        |c: &&snapstore::DamagedChunk| r.damaged_packs.iter().any(|p| c.pack.as_deref() == Some(p.pack.as_str()));
    let own: Vec<_> = r.damaged_chunks.iter().filter(|c| !in_damaged_pack(c)).collect();
    for c in own.iter().take(SHOWN) {
        let place = c.pack.as_deref().map(|p| format!(" in {p}")).unwrap_or_default();
        out.line(&format!("damaged chunk {}{place}: {}", c.id, c.problem))?;
    }
    let own_total = r.damaged_chunks_total - r.damaged_chunks_in_damaged_packs;
    more(out, own_total, SHOWN.min(own.len()), "damaged chunks")?;
    for o in r.damaged_objects.iter().take(SHOWN) {
        out.line(&format!("damaged {} {} in the catalog: {}", o.kind, o.id, o.problem))?;
    }
    more(out, r.damaged_objects_total, SHOWN.min(r.damaged_objects.len()), "damaged catalog objects")?;
    for f in &r.affected_files {
        out.line(&format!("affected: {} {} ({})", short(&f.checkpoint), f.path.display(), f.problem))?;
    }
    more(out, r.affected_files_total, r.affected_files.len(), "affected files")?;
    for m in r.records_missing.iter().take(SHOWN) {
        out.line(&format!("record missing from the bucket: {m}"))?;
    }
    more(out, r.records_missing.len() as u64, SHOWN, "records missing")?;
    if !quiet {
        let records = match r.records_missing.len() {
            0 => String::new(),
            n => format!(", {} missing from the bucket", plural(n as u64, "record")),
        };
        out.line(&format!(
            "damage found: {}, {}, {}{records}; {} in {} of {} affected; {read}",
            plural(r.damaged_packs.len() as u64, "damaged pack"),
            plural(r.damaged_chunks_total, "damaged chunk"),
            plural(r.damaged_objects_total, "damaged catalog object"),
            plural(r.affected_files_total, "file"),
            r.affected_checkpoints.len(),
            plural(r.checkpoints, "checkpoint")
        ))?;
        if !r.records_missing.is_empty() {
            out.line(&format!("hint: {RECORDS_MISSING_HINT}"))?;
        }
        if r.damaged_chunks_marked > 0 {
            // `repair index` is for local repositories; in a bucket, the healing commit's record moves every
            // machine's rows to the fresh copies.
            let repair = if bucket {
                ". In a bucket, every machine learns of the marks at its next command (unless this machine's \
                 credentials may not write), so the commit may be on any of them, and every machine then reads \
                 the fresh copies"
            } else {
                ". `snapstore repair index --read-data` moves them to sound copies where another pack holds one"
            };
            out.line(&format!(
                "hint: {} marked: the next commit of the original data stores them afresh (reading the files that \
                 hold them) and makes the checkpoints that use them whole; until then commits do not reuse \
                 them{repair}",
                plural(r.damaged_chunks_marked, "damaged chunk")
            ))?;
        } else if bucket && r.damaged_chunks_total > 0 {
            out.line(
                "hint: restore what you need from checkpoints that are whole, and keep the original data of the \
                 affected ones: `repair index` is for local repositories, and these chunks could not be marked for \
                 the next commit to store afresh",
            )?;
        } else if r.damaged_chunks.iter().any(|c| c.pack.is_some()) {
            out.line(
                "hint: `snapstore repair index --read-data` leaves the damaged chunks out of the index; committing \
                 the original data again then stores them afresh and makes the checkpoints that use \
                 them whole",
            )?;
        }
        let chunks_missing = r.damaged_chunks.iter().any(|c| c.pack.is_none());
        if (chunks_missing || r.packs_not_in_catalog > 0) && !bucket {
            let packs = crate::output::plural(r.packs_not_in_catalog, "pack file");
            let what = match (r.packs_not_in_catalog, chunks_missing) {
                (0, _) => "chunks missing from the catalog's index".to_string(),
                (_, false) => format!("{packs} not in the catalog"),
                (_, true) => format!("{packs} not in the catalog, and chunks missing from its index"),
            };
            out.line(&format!(
                "hint: {what}: `snapstore repair index --read-data` rebuilds the index from what the packs hold \
                 soundly; chunks it cannot find are stored again by committing the original data (the files holding them \
                 are then read whatever their stat)"
            ))?;
        }
    }
    Ok(())
}

pub fn repair(repo_dir: &Path, args: &RepairArgs, json: bool, quiet: bool, out: &mut Out) -> Result<(), Failure> {
    let RepairWhat::Index { read_data, threads } = args.what;
    // Not `Repository::open`: that refuses a directory whose catalog is lost, which is what this repairs.
    let report = if read_data {
        let bar = progress::Bar::new(show_progress(json, quiet));
        let opts = VerifyOptions { read_data: DataSubset::All, threads, progress: bar.clone() };
        let report = Repository::repair_index_reading_data(repo_dir, &opts);
        bar.finish();
        report?
    } else {
        Repository::repair_index_at(repo_dir)?
    };
    if json {
        out.json(&report)?;
    } else {
        repair_text(out, &report, quiet)?;
    }
    out.flush()?;
    if report.is_whole() { Ok(()) } else { Err(Failure::Exit(EXIT_CORRUPT)) }
}

fn repair_text(out: &mut Out, r: &RepairReport, quiet: bool) -> io::Result<()> {
    if r.catalog_created {
        let params = match r.params_recovered {
            Some(_) => "the repository's parameters, from its copy of them in `params`",
            None => "default parameters: the repository has no copy of its own in `params`",
        };
        out.line(&format!(
            "catalog.db was missing or empty: created a new catalog ({params}) and rebuilt its chunk index"
        ))?;
    }
    for p in &r.damaged_packs {
        out.line(&format!("damaged pack {}: {} (left out of the index)", p.pack, p.problem))?;
    }
    for c in r.damaged_chunks.iter().take(SHOWN) {
        let place = c.pack.as_deref().map(|p| format!(" in {p}")).unwrap_or_default();
        out.line(&format!("damaged chunk {}{place}: {} (left out of the index)", c.id, c.problem))?;
    }
    more(out, r.damaged_chunks_total, SHOWN.min(r.damaged_chunks.len()), "damaged chunks")?;
    if !quiet {
        out.line(&format!(
            "scanned {} packs ({} damaged); chunk index: {} chunks ({} added, {} re-pointed, {} removed); \
             pack rows: {} added, {} removed",
            r.packs_scanned,
            r.damaged_packs.len(),
            r.chunks_indexed,
            r.chunks_added,
            r.chunks_repointed,
            r.chunks_removed,
            r.packs_added,
            r.packs_removed
        ))?;
        if r.sessions_expired > 0 {
            out.line(&format!("expired {} sessions of commits that had died", r.sessions_expired))?;
        }
    }
    for c in &r.checkpoints {
        let head = format!("{}  {}  {}", short(&c.id), human_time(c.time_ns), c.path);
        if c.whole {
            if !quiet {
                out.line(&format!("whole    {head}"))?;
            }
        } else {
            out.line(&format!(
                "damaged  {head}: {} affected; missing {} trees, {} contents, {} segments, {} chunks",
                crate::output::plural(c.files, "file"),
                c.missing_trees,
                c.missing_contents,
                c.missing_segments,
                c.missing_chunks
            ))?;
        }
    }
    for f in &r.affected_files {
        out.line(&format!("affected: {} {} ({})", short(&f.checkpoint), f.path.display(), f.problem))?;
    }
    more(out, r.affected_files_total, r.affected_files.len(), "affected files")?;
    if quiet {
        return Ok(());
    }
    let whole = r.checkpoints.iter().filter(|c| c.whole).count();
    if r.catalog_created {
        out.line(
            "no checkpoints survive: trees and checkpoints live only in the catalog, which was lost; the chunks \
             are indexed again, so committing the same data again stores little",
        )
    } else {
        let read =
            if r.data_read { "" } else { " (as far as the index shows: --read-data also checks every chunk's bytes)" };
        out.line(&format!("{whole} of {} checkpoints whole{read}", r.checkpoints.len()))?;
        if r.damaged_chunks_total > 0 && whole < r.checkpoints.len() {
            out.line(
                "hint: commit the original data again: files holding the chunks left out are read whatever their \
                 stat, the chunks are stored afresh, and every checkpoint that uses them is whole again",
            )?;
        }
        Ok(())
    }
}
