//! The `snapstore` command: a thin face over the library. It parses arguments, draws progress on a TTY,
//! prints results (or JSON), and turns library errors into one clear line and an exit code.

/// `eprintln!` that ignores a failed write: a closed or full stderr must not turn an answer into a panic
/// (exit 101); the exit code still says how the command ended.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Set once `--json` is known: what goes to stderr besides the error is then JSON too (see [`notice`]).
static JSON_NOTICES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A warning (`kind` "warning") or a note ("note") on stderr: `warning: ...` (a note as it is), or with `--json`
/// one JSON object per line, `{"warning": ...}` or `{"note": ...}`, so that a script reads stderr line by line
/// as JSON; an error, if one ends the command, is the last line.
fn notice(kind: &str, message: &str) {
    if JSON_NOTICES.load(std::sync::atomic::Ordering::Relaxed) {
        let mut v = serde_json::Map::new();
        v.insert(kind.to_string(), message.into());
        say!("{}", serde_json::Value::Object(v));
    } else if kind == "note" {
        say!("{}", output::printable(message));
    } else {
        say!("{kind}: {}", output::printable(message));
    }
}

mod diff;
mod group;
mod output;
mod progress;
mod stream;
mod verify;
mod watch;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use snapstore::{CheckoutOptions, CommitOptions, Error, Repository};

use output::Out;

/// Exit codes, documented in `--help`.
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CORRUPT: u8 = 3;
const EXIT_NOT_FOUND: u8 = 4;
const EXIT_BUSY: u8 = 5;

/// Shown under every command's help.
macro_rules! exit_help {
    () => {
        "Exit codes:
  0  success
  1  failure (I/O, catalog, ...)
  2  bad usage or arguments
  3  damaged data detected (in a bucket: records lost or damaged there)
  4  repository, checkpoint or path not found
  5  busy (another gc, commits during repair, or another forget meanwhile)

Checkpoint ids: any unique prefix of 4 or more hex digits, or 'latest'; ID~N is the checkpoint N before ID of
the same path and host (latest~1: the one before latest of its path; ~ alone is ~1)."
    };
}

/// snapstore: a checkpoint store. Each checkpoint costs only what changed since the last.
#[derive(Parser)]
#[command(name = "snapstore", version, about, after_help = exit_help!())]
struct Cli {
    /// Repository: a directory, or s3://BUCKET/PREFIX for one in S3-compatible storage (endpoint, region and
    /// credentials from the AWS_* environment variables and ~/.aws files) [default: .snapstore in the current
    /// directory]
    #[arg(long, global = true, env = "SNAPSTORE_REPO", value_name = "PATH|URL", help_heading = "Global options")]
    repo: Option<PathBuf>,
    /// Print machine-readable JSON on stdout, and warnings and errors as JSON lines on stderr
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Print only what scripts need (for commit: the id alone), no progress
    #[arg(short, long, global = true, help_heading = "Global options")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new, empty repository
    #[command(after_help = exit_help!())]
    Init {
        /// Average chunk size, in KiB (a power of two from 1 to 4096); chunks range from a quarter to four
        /// times it. Smaller chunks store less of a file rewritten in small scattered pieces (a database's
        /// pages), at more catalog per GiB. Fixed for the repository's life.
        #[arg(long, value_name = "KIB", default_value_t = 64, value_parser = chunk_kib)]
        chunk_size: u32,
        /// zstd level for new chunks (1 to 22); higher is smaller and slower. Can differ between runs only
        /// by re-creating the repository.
        #[arg(long, value_name = "LEVEL", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
        compression_level: i32,
        /// FastCDC normalization level (0 to 3): higher packs chunk sizes closer around the average. Fixed for
        /// the repository's life.
        #[arg(long, value_name = "LEVEL", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=3))]
        normalization: u32,
    },
    /// Save a file, a directory tree, or stdin as a new checkpoint
    #[command(after_help = concat!("Files whose size, mtime, ctime and inode match the previous checkpoint of the same path \
are not read again. Only chunks the repository lacks are compressed and stored. Each entry's mode, mtime, numeric \
owner and group, symlink target, hard links, and the extended attributes (ACLs among them) of files and directories \
are recorded with its bytes.\n\
The new checkpoint's full id is printed last on stdout. If the repository does not exist yet, it is created.\n\
A stream (-) is committed as it ends: a producer that dies midway leaves a short stream that looks whole to a pipe. \
Give the producer after -- instead: its output is committed only if it exits with status 0. An empty stream is \
refused unless --allow-empty (a producer that failed at once, or a closed stdin, gives one).\n\n\
Examples:\n  snapstore commit ./run -m \"before upgrade\"\n  snapstore commit ./vm.img --tag nightly\n  \
snapstore commit - --name state.bin -- trainer --dump-state\n\n", exit_help!()))]
    Commit {
        /// File or directory to checkpoint, or - to read a stream from stdin (with --name)
        path: PathBuf,
        /// With -: run this command and commit what it writes to stdout, only if it exits with status 0
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
        /// With -: record an empty stream as an empty state instead of refusing it
        #[arg(long)]
        allow_empty: bool,
        /// Message recorded with the checkpoint
        #[arg(short, long, default_value = "")]
        message: String,
        /// Tag the checkpoint (repeatable, or comma-separated as in restic: --tag nightly,keep is two tags)
        #[arg(short, long = "tag", value_name = "TAG", value_delimiter = ',')]
        tags: Vec<String>,
        /// Name of the file the stream becomes (required with -)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Read every file, even those unchanged since the previous checkpoint, and every name of a hard-linked
        /// file
        #[arg(long)]
        reread: bool,
        /// Record unreadable files as skipped instead of failing the commit (files deleted while the commit
        /// runs are always left out and recorded as skipped)
        #[arg(long)]
        skip_unreadable: bool,
        /// Make no checkpoint when nothing differs from the previous checkpoint of the path (contents,
        /// names, metadata; a stream: its bytes); print that one's id instead (JSON: `unchanged` true), as
        /// restic's --skip-if-unchanged. Not with --group
        #[arg(long, conflicts_with = "group")]
        skip_unchanged: bool,
        /// Worker threads for hashing and compression [default: one per core, at most 16; at most 4 into s3://]
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
        /// Commit as one part of the group checkpoint NAME (with --part): the group is a restore point only
        /// once every part is in
        #[arg(long, value_name = "NAME", requires = "part")]
        group: Option<String>,
        /// This part's place in the group: I/N with 0 <= I < N, e.g. the rank and world size (with --group)
        #[arg(long, value_name = "I/N", requires = "group")]
        part: Option<String>,
    },
    /// Recreate a checkpoint at DEST, byte for byte, verifying every chunk
    #[command(after_help = concat!("DEST becomes what the committed path was (the directory, or the file). \
DEST must not exist, or be an empty directory for a directory's checkpoint (a file's is checked out to a path \
that names the file: DIR/vm.img, not DIR), unless --in-place: then files that already match the checkpoint are left untouched, \
and a file that differs is patched by writing only the chunks that differ (to roll a VM image or a training run \
back or forward; a file with other hard links is written anew instead, so that they keep their content). A file is taken to hold an earlier checkpoint's content when its size and mtime match what \
that checkpoint recorded there and it has not changed since (its ctime: before the end of the last whole checkout \
into DEST, or as the last commit of DEST saw it); any other file is hashed; --checksum hashes every existing file. Files in DEST that the \
checkpoint lacks stay unless --delete (never the repository itself; a DEST in the repository, or a checkpoint \
entry where the repository is, is refused; so is, without --delete, a file or symlink of the checkpoint where \
DEST has a directory holding files). Permissions, mtimes and symlinks end as in \
the checkpoint; runs of zeros become holes. Run as root, the checkout also gives every entry the owner and \
group it was committed with, as numeric ids (--no-owners: not); run as another user, what it creates belongs to \
that user. Checkpoints taken before snapstore recorded owners, and streams, have none to restore. Set-uid and \
set-gid bits are given only to files that end up owned by their recorded owner. Names that \
were hard links of one file when committed are linked again (copies where the filesystem cannot link). Extended \
attributes (ACLs among them) of files and directories are restored (--no-xattrs: not); those only root may set \
(trusted.*, security.*) are counted in a warning for anyone else. A file whose data is damaged in the repository is \
left out (under every name it has) and named, every other file is restored, and the checkout exits 3. If a checkout \
is interrupted, run it again with --in-place: it finishes the job, writing only what is missing or incomplete.\n\n\
Examples:\n  snapstore checkout latest ./restored\n  snapstore checkout 3fa2c1 ./vm.img --in-place\n  \
snapstore checkout 3fa2c1 ./run --in-place --delete\n  snapstore checkout latest ./out --path config --path data/step-100\n\n", exit_help!()))]
    Checkout {
        /// Checkpoint id, unique prefix, 'latest' (ID~N: N before it on its path), or a group checkpoint's name
        /// (part I goes to DEST/part-I)
        id: String,
        /// Where to recreate it
        dest: PathBuf,
        /// Update an existing destination, writing only what differs
        #[arg(long, visible_alias = "force")]
        in_place: bool,
        /// With --in-place: remove files and directories the checkpoint lacks
        #[arg(long, requires = "in_place")]
        delete: bool,
        /// With --in-place: hash existing files instead of trusting their size, mtime and ctime
        #[arg(long, requires = "in_place")]
        checksum: bool,
        /// Restore only this path of the checkpoint, relative to the committed directory (repeatable)
        #[arg(long = "path", value_name = "SUBPATH")]
        paths: Vec<PathBuf>,
        /// Run as root: leave what the checkout creates owned by root instead of by the recorded owners
        #[arg(long)]
        no_owners: bool,
        /// Leave extended attributes (and ACLs) as the filesystem gives new files, and as they are on files
        /// kept in place
        #[arg(long)]
        no_xattrs: bool,
        /// Worker threads [default: two per core, at most 32]
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
    },
    /// Write one file of a checkpoint to stdout
    #[command(after_help = concat!("PATH is relative to the committed directory (as `snapstore ls` prints it); \
for a checkpoint of one file, its name. Every chunk is verified before it is written.\n\n", exit_help!()))]
    Cat {
        /// Checkpoint id, unique prefix, or 'latest'; ID~N: N before it on its path
        id: String,
        /// The file inside the checkpoint
        path: PathBuf,
    },
    /// List the files of a checkpoint
    #[command(after_help = concat!("Lists the entries of PATH (default: the top of the checkpoint), or every entry \
below it with -r: mode, size, modification time (UTC) and path. Paths are relative to the committed directory, \
as cat, diff and checkout --path take them.\n\n\
Examples:\n  snapstore ls latest\n  snapstore ls 3fa2c1 data -r\n  snapstore --json ls latest -r   # one object per entry\n\n", exit_help!()))]
    Ls {
        /// Checkpoint id, unique prefix, or 'latest'; ID~N: N before it on its path
        id: String,
        /// A directory or file inside the checkpoint [default: its top]
        path: Option<PathBuf>,
        /// List everything below PATH, not only its entries
        #[arg(short, long)]
        recursive: bool,
    },
    /// List checkpoints, newest first
    #[command(after_help = concat!("Columns: ID (the first 8 hex digits; any unique prefix of 4 or more names it), \
TIME (UTC), PATH (the committed path's last part; stdin:NAME for a stream), SIZE (all files' bytes), NEW (bytes \
this checkpoint added to the store before compression), TAGS, MESSAGE. Group checkpoints follow, with their \
parts (`snapstore groups`); they are not in the table, nor in --json or -q, and --tag, --path, --host or -n \
leave them out.\n\n\
Examples:\n  snapstore log -n 10\n  snapstore log --path ./vm.img --tag release\n  \
snapstore log --path stdin:model.bin --host trainer-3\n\n", exit_help!()))]
    Log {
        /// Show at most N checkpoints
        #[arg(short = 'n', long, value_name = "N")]
        limit: Option<usize>,
        /// Only checkpoints with this tag (repeatable or comma-separated: all must match)
        #[arg(long = "tag", value_name = "TAG", value_delimiter = ',')]
        tags: Vec<String>,
        /// Only checkpoints of this committed path, as `forget --path` takes it (repeatable: any may match)
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Only checkpoints committed on this host (repeatable: any may match)
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Add or remove tags of a checkpoint
    #[command(after_help = concat!("A tag named by a retention policy's --keep-tag keeps the checkpoint whatever \
else the policy says: tag one after the fact to protect it from `forget` and the cron job that runs it.\n\n\
Examples:\n  snapstore tag 3fa2c1 --add keep\n  snapstore tag latest --add release-1.2 --remove candidate\n\n",
        exit_help!()
    ))]
    #[command(group(clap::ArgGroup::new("change").args(["add", "remove"]).required(true).multiple(true)))]
    Tag {
        /// Checkpoint id, unique prefix, or 'latest'; ID~N: N before it on its path
        id: String,
        /// Add this tag (repeatable, or comma-separated: --add a,b adds two)
        #[arg(long, value_name = "TAG", value_delimiter = ',')]
        add: Vec<String>,
        /// Remove this tag (repeatable, or comma-separated)
        #[arg(long, value_name = "TAG", value_delimiter = ',')]
        remove: Vec<String>,
    },
    /// List group checkpoints (coordinated checkpoints of several processes) with their parts
    #[command(after_help = concat!("A group is a restore point once all its parts are in \
(`snapstore checkout GROUP DEST` restores part I into DEST/part-I); until then it is listed as incomplete, and \
`snapstore gc` drops it with its parts once it is older than --incomplete-after.\n\n", exit_help!()))]
    Groups,
    /// Show one checkpoint and its files
    #[command(after_help = concat!("Prints the checkpoint's record (id, parent, time, host, path, sizes, tags, \
message), what the commit skipped and why, and its files with the committed name first (run/a.txt; ls, cat and \
checkout --path take them without it: a.txt).\n\n\
Examples:\n  snapstore show latest\n  snapstore --json show 3fa2c1\n\n", exit_help!()))]
    Show {
        /// Checkpoint id, unique prefix, or 'latest'; ID~N: N before it on its path
        id: String,
    },
    /// Drop checkpoints, by id or by a retention policy (restic's rules)
    #[command(after_help = concat!("Forgetting removes checkpoints from the catalog at once and for good: there is no undo, \
so try --dry-run first. Their data stays until `snapstore gc` reclaims it (--prune runs it right after, as \
restic's does; not with --dry-run).
A policy keeps, per host and committed path (unless --across-paths), the checkpoints any rule keeps: the N newest \
(--keep-last), the newest of each of the last N hours, days, ISO weeks, months, years that have one (periods in UTC), \
all within a duration of the newest (--keep-within 7d; units y=365d, m=30d, w, d, h), all with a tag (--keep-tag). \
Counts take 'unlimited'. A policy that would forget every checkpoint of a path is refused.\n\n", exit_help!()))]
    Forget {
        /// Checkpoints to forget (ids, prefixes, latest, ID~N); or give a policy instead
        ids: Vec<String>,
        /// Forget this group checkpoint with all its parts (every group of that name; repeatable)
        #[arg(long = "group", value_name = "NAME")]
        groups: Vec<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Only consider checkpoints with this tag (repeatable or comma-separated: all must match)
        #[arg(long = "tag", value_name = "TAG", value_delimiter = ',')]
        tags: Vec<String>,
        /// Only consider checkpoints of this committed path (repeatable)
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Apply the policy to all checkpoints together, not per host and path
        #[arg(long)]
        across_paths: bool,
        /// Show what would be kept and forgotten, and why; change nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Then reclaim the space no checkpoint uses any more, as `snapstore gc` does (its exit codes too)
        #[arg(long)]
        prune: bool,
    },
    /// Checkpoint a path automatically: a commit at each interval when something changed
    #[command(after_help = concat!("Commits PATH every INTERVAL when anything in it changed (an unchanged tree costs a \
stat walk, not a read, and makes no checkpoint), then applies the --keep-* policy to PATH's checkpoints, and \
with --gc-every collects garbage now and then. Logs one line per checkpoint on stdout (--json: one JSON object \
per event, checkpoints, unchanged looks, gc runs and errors); a failed step is logged (on stderr, or as an \
error event with --json) and tried again \
at the next interval. SIGINT or SIGTERM ends it cleanly: a commit under way completes first; a second signal \
ends it at once, and the commit under way leaves nothing visible.\n\n\
Examples:\n  snapstore watch ./run --every 5min --keep-last 12 --keep-hourly 24 --gc-every 1h\n  \
snapstore --json watch ./vm.img --every 30s --keep-within 1d\n\n", exit_help!()))]
    Watch(watch::WatchArgs),
    /// Reclaim space: drop data no checkpoint uses, delete and rewrite packs
    #[command(after_help = concat!("Safe to run while commits run, from cron: it takes no lock that stops commits, \
and a second gc at the same time exits with code 5. Chunks a commit in progress may still use are kept until \
that commit ends (the next gc reclaims them). Packs with more than --max-unused unused are rewritten, and once \
there are 8 or more small packs of about the same size (under a quarter of the pack size: frequent commits \
of few changes make them) they are merged (--max-unused 100 rewrites and merges nothing). A damaged pack due for a rewrite is left as it \
is, everything else is collected, and gc exits with code 3. In an s3:// bucket it deletes, and drops incomplete \
groups, only while no commit, checkout or verify runs on any machine; otherwise it marks what is unused and leaves \
the rest to the next run. Without a terminal it prints only its summary (-q: nothing).\n\n", exit_help!()))]
    Gc {
        /// Show what would be reclaimed; change nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Rewrite packs with more than this percentage unused
        #[arg(long, value_name = "PERCENT", default_value_t = 10.0)]
        max_unused: f64,
        /// Drop group checkpoints still incomplete this long after their first part (e.g. 6h, 30min)
        #[arg(long, value_name = "INTERVAL", value_parser = snapstore::parse_interval, default_value = "24h")]
        incomplete_after: std::time::Duration,
        /// In an s3:// bucket, delete a pack no record names (a crashed commit's upload, or the pack of a
        /// record lost from the bucket) only this long after a gc on this machine first saw it, and remove
        /// chunks and metadata only this long after a gc here first found them unused (e.g. 1h, 0s): time for
        /// a machine that applied a lost record, whose checkpoints may use them, to say so
        #[arg(long, value_name = "INTERVAL", value_parser = snapstore::parse_interval, default_value = "24h")]
        orphan_grace: std::time::Duration,
    },
    /// Show what changed between two checkpoints, from the catalog alone (no data is read)
    #[command(after_help = concat!("For a modified file, the byte ranges listed are where its new version may \
differ from the old one at the same offsets, to the nearest chunk: a chunk held at the same offset by both, or \
zeros in both, is unchanged. Bytes inserted or removed shift everything after them, which is then listed as \
changed (the commit itself stores only the chunks that are new). With -q, only the changed paths, one per line \
after its mark (+ added, - removed, M modified; a directory's ends with /), and no totals.\n\n\
Examples:\n  snapstore diff latest            # what the last commit changed (latest~1 to latest; for a path's \
first checkpoint, everything in it, as added)\n  \
snapstore diff 3fa2c1 latest\n  snapstore --json diff latest~3 latest\n\n", exit_help!()))]
    Diff(diff::DiffArgs),
    /// Check the repository: catalog against packs, and with --read-data every chunk's bytes
    #[command(after_help = concat!("Damaged chunks it finds are marked in the catalog (its only write; none in a \
repository opened read-only), as they are when a checkout, cat or gc meets one: commits no longer reuse them, and \
the next commit of the original data stores them afresh (reading a file that holds one though its stat is \
unchanged), which makes whole every checkpoint that uses them.\n\n", exit_help!()))]
    Verify(verify::VerifyArgs),
    /// Repair a damaged repository (see `snapstore repair index --help`)
    #[command(after_help = exit_help!())]
    Repair(verify::RepairArgs),
    /// Repository totals: logical and stored bytes, dedup and compression ratios, chunks and packs
    #[command(after_help = concat!("Logical bytes are the sizes of every checkpoint's files summed; unique bytes \
the chunks they share stored once; stored bytes those chunks compressed; pack bytes what the pack files take \
(with blobs no checkpoint uses, until gc rewrites them).\n\n\
Examples:\n  snapstore stats\n  snapstore --json stats\n\n", exit_help!()))]
    Stats,
    /// Bring the local copy of an s3:// repository's catalog up to date with its bucket
    ///
    /// Every command does this when it opens an s3:// repository; `sync` does only that, and reports it. It
    /// warns of records missing from the bucket (deleted behind snapstore's back): gc deletes nothing while
    /// any is. The local copy lives in SNAPSTORE_CACHE_DIR (default ~/.cache/snapstore).
    #[command(after_help = exit_help!())]
    Sync {
        /// Discard the local copy and rebuild it from the bucket alone
        #[arg(long, conflicts_with = "accept_missing")]
        rebuild: bool,
        /// Accept that the records reported missing from the bucket are lost for good, so that gc (which
        /// deletes nothing while any is missing) collects again; run it on each machine that reports records
        /// it applied as missing. This machine keeps what they changed, and first writes to the bucket again
        /// each checkpoint only it still holds, so that every machine keeps it. Refused for a missing record
        /// this machine never applied that no machine has reported as its own
        #[arg(long)]
        accept_missing: bool,
        /// With --accept-missing: accept every missing record, including those this machine never applied
        /// and those other machines reported as theirs, for a loss no machine that applied them is left to
        /// accept. Their checkpoints are then lost for good, wherever they are still listed
        #[arg(long, requires = "accept_missing")]
        everywhere: bool,
    },
}

/// Opens the repository, creating it first if there is none (as `commit` and `watch` do).
fn open_or_init(repo_dir: &std::path::Path) -> Result<Repository, Error> {
    let (repo, created) = Repository::open_or_init(repo_dir)?;
    if created {
        notice("note", &format!("created snapstore repository at {}", repo.location()));
    }
    Ok(telling_waits(repo))
}

/// Opens the repository.
fn open(repo_dir: &std::path::Path) -> Result<Repository, Error> {
    Repository::open(repo_dir).map(telling_waits)
}

/// `repo`, saying on stderr when a command waits for another machine's hold on its bucket (a gc deleting, a
/// forget), which can last minutes, or reads without a session there.
fn telling_waits(mut repo: Repository) -> Repository {
    repo.on_notice(|what| notice("note", what));
    repo
}

/// A retention policy's rules, as `forget` and `watch` take them.
#[derive(clap::Args)]
struct KeepArgs {
    /// Keep the N newest checkpoints
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_last: Option<u32>,
    /// Keep the newest checkpoint of each of the last N hours
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_hourly: Option<u32>,
    /// Keep the newest checkpoint of each of the last N days
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_daily: Option<u32>,
    /// Keep the newest checkpoint of each of the last N ISO weeks
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_weekly: Option<u32>,
    /// Keep the newest checkpoint of each of the last N months
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_monthly: Option<u32>,
    /// Keep the newest checkpoint of each of the last N years
    #[arg(long, value_name = "N", value_parser = snapstore::parse_count)]
    keep_yearly: Option<u32>,
    /// Keep every checkpoint within DURATION of the newest (e.g. 2d12h)
    #[arg(long, value_name = "DURATION", value_parser = snapstore::parse_duration)]
    keep_within: Option<std::time::Duration>,
    /// Keep every checkpoint with this tag (repeatable: any of them keeps it; TAG1,TAG2 keeps those with both, as
    /// in restic)
    #[arg(long, value_name = "TAG")]
    keep_tag: Vec<String>,
}

impl KeepArgs {
    fn policy(&self) -> snapstore::Policy {
        snapstore::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: self.keep_within,
            keep_tags: self.keep_tag.clone(),
        }
    }
}

/// The subcommands a help text lists under `Commands:` (but `help`).
fn subcommands_listed(help: &str) -> Vec<&str> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect()
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // With --json, a usage error is one JSON object too, as every other error is (--help and --version
        // are not errors).
        Err(e) if e.use_stderr() && std::env::args_os().any(|a| a == "--json") => {
            // clap's text: the error, then `tip:` lines, the usage and "For more information"; the usage is
            // for a reader of text, and --help says the rest.
            let text = e.render().to_string();
            // A command given without its subcommand renders its help, whose first line is no error (round 35
            // review, F11).
            if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let commands = subcommands_listed(&text);
                let error = format!("a subcommand is required: {}", commands.join(", "));
                return report(true, &[error], Some("--help lists the subcommands"), EXIT_USAGE);
            }
            let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let end =
                lines.iter().position(|l| ["Usage:", "tip:", "For more information"].iter().any(|s| l.starts_with(s)));
            let error = lines[..end.unwrap_or(lines.len())].join(" ").trim_start_matches("error: ").to_string();
            let tips: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("tip:")).map(str::trim).collect();
            let hint = if tips.is_empty() { "--help lists the options".to_string() } else { tips.join("; ") };
            return report(true, &[error], Some(&hint), EXIT_USAGE);
        }
        Err(e) => e.exit(),
    };
    JSON_NOTICES.store(cli.json, std::sync::atomic::Ordering::Relaxed);
    let mut out = Out::new(cli.json);
    let repo = repo_path(&cli);
    let read_only = snapstore::readonly::catalog_fingerprint(&repo);
    let mut result = run(&cli, &mut out);
    // Read through a read-only mount while another mount wrote it: whatever it printed or wrote, or whatever
    // damage or absence it thought it saw, may come from two states mixed. Errors of the command line or the
    // destination stand.
    if read_only.is_some()
        && match &result {
            Ok(()) | Err(Failure::Exit(_)) => true,
            Err(Failure::Lib(e)) => e.may_come_from_a_changing_read(),
            _ => false,
        }
        && snapstore::readonly::catalog_fingerprint(&repo) != read_only
    {
        result = Err(Failure::Lib(Error::ChangedWhileRead(repo)));
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Pipe) => ExitCode::SUCCESS,
        Err(Failure::Lib(e)) => {
            let (errors, hint, code) = describe(&e, &repo_path(&cli));
            report(cli.json, &errors, hint.as_deref(), code)
        }
        Err(Failure::Exit(code)) => ExitCode::from(code),
        Err(Failure::Usage(msg)) => report(cli.json, &[msg], None, EXIT_USAGE),
    }
}

/// What went wrong (one or more lines), what to do about it, and the exit code.
fn describe(e: &Error, repo: &std::path::Path) -> (Vec<String>, Option<String>, u8) {
    if e.is_corruption()
        && matches!(e, Error::Catalog(_))
        && let Some(io) = unreadable_catalog(repo)
    {
        // SQLite reports an I/O error while it loads the schema as a malformed database.
        return (vec![format!("catalog: {io}")], Some(CATALOG_IO.to_string()), EXIT_FAILURE);
    }
    let mut errors = vec![e.to_string()];
    let remote = in_bucket(repo);
    let hint = if remote && matches!(e, Error::Catalog(_) | Error::CatalogEmpty(_)) && e.is_corruption() {
        // This machine's copy of the catalog, not the repository: the bucket's records make it again.
        Some(
            "this machine's copy of the catalog (under SNAPSTORE_CACHE_DIR, default ~/.cache/snapstore) is damaged, \
             not the repository: `snapstore sync --rebuild` makes it again from the bucket"
                .to_string(),
        )
    } else if let Some(full) = disk_full(e, repo) {
        errors.push(full);
        Some(FREE_SPACE.to_string())
    } else {
        catalog_lost(e).or_else(|| hint(e).map(str::to_string))
    };
    (errors, hint, exit_code(e))
}

/// Prints an error on stderr: `error:` and `hint:` lines, or with --json one JSON object that scripts can parse
/// (`error`, `hint` when there is one, `exit_code`).
fn report(json: bool, errors: &[String], hint: Option<&str>, code: u8) -> ExitCode {
    if json {
        let mut v = serde_json::json!({ "error": errors.join("; "), "exit_code": code });
        if let Some(h) = hint {
            v["hint"] = h.into();
        }
        say!("{v}");
    } else {
        for e in errors {
            say!("error: {}", output::printable(e));
        }
        if let Some(h) = hint {
            say!("hint: {}", output::printable(h));
        }
    }
    ExitCode::from(code)
}

pub(crate) enum Failure {
    Lib(Error),
    /// The command already reported what went wrong (e.g. `verify` listing damage): exit with this code.
    Exit(u8),
    Usage(String),
    /// stdout was closed (`snapstore log | head`): not an error.
    Pipe,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lib(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe { Failure::Pipe } else { Failure::Lib(Error::io("<stdout>", e)) }
    }
}

/// Whether `--repo` names a repository in a bucket (`s3://...`).
fn in_bucket(repo: &std::path::Path) -> bool {
    repo.to_str().is_some_and(|r| r.starts_with("s3://"))
}

fn exit_code(e: &Error) -> u8 {
    match e {
        // The bucket lost records, or holds them damaged: what `verify` reports with 3 too.
        _ if e.is_corruption() || matches!(e, Error::RecordsWaiting(_)) => EXIT_CORRUPT,
        Error::NoRepository(_)
        | Error::CheckpointNotFound(_)
        | Error::GroupNotFound(_)
        | Error::Forgotten(_)
        | Error::ForgottenBeforeTagged(_)
        | Error::GroupIncomplete { .. }
        | Error::PathNotFound { .. }
        | Error::SourceNotFound(_) => EXIT_NOT_FOUND,
        Error::GcRunning { .. }
        | Error::SweepRunning { .. }
        | Error::ForgetRunning { .. }
        | Error::LockLost(_)
        | Error::ChangedWhileRead(_)
        | Error::CommitsRunning { .. }
        | Error::CopyInUse { .. }
        | Error::SeriesBusy { .. }
        | Error::RetentionRaced { .. } => EXIT_BUSY,
        Error::InvalidId(_)
        | Error::AmbiguousId { .. }
        | Error::InvalidInput(_)
        | Error::DestinationNotEmpty(_)
        | Error::RepositoryExists(_)
        | Error::EmptyPolicy
        | Error::PolicyEmptiesPath { .. }
        | Error::GroupComplete(_)
        | Error::PartMismatch { .. }
        | Error::PartOfGroup { .. } => EXIT_USAGE,
        _ => EXIT_FAILURE,
    }
}

/// glibc gives every thread that allocates an arena of its own and keeps what each one frees for it: with a
/// worker per core, that came to more than the live heap (a first commit of a tree of 4 MiB files with 16
/// threads: 107 MiB peak RSS against a heap of 60 MiB; with two arenas, 64-69 MiB). The workers allocate a few
/// times per chunk, so sharing two arenas costs them no measurable time. Before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    unsafe extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    const M_ARENA_MAX: std::ffi::c_int = -8;
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        mallopt(M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// When an I/O failure came with the disk holding the repository full, says so: SQLite reports a write that
/// hit ENOSPC in its journal as a bare "disk I/O error".
fn disk_full(e: &Error, repo: &std::path::Path) -> Option<String> {
    if !matches!(e, Error::Catalog(_)) {
        return None;
    }
    let free = rustix::fs::statvfs(repo).ok().map(|v| v.f_bavail.saturating_mul(v.f_frsize))?;
    (free < 1 << 20).then(|| format!("the disk holding {} is full ({free} bytes free)", repo.display()))
}

/// For a directory that holds packs but no catalog: `init` would refuse it, and the packs are what `repair
/// index` rebuilds a catalog from.
fn catalog_lost(e: &Error) -> Option<String> {
    let Error::NoRepository(root) = e else { return None };
    std::fs::read_dir(root.join("packs")).ok()?;
    Some(format!(
        "{} has packs but no catalog.db: put back a copy of catalog.db if there is one, else `snapstore --repo {} \
         repair index` makes a new one holding the packs' chunks (the checkpoints were listed in catalog.db alone, so \
         committing the same data again stores little, but the old checkpoints are not recovered)",
        root.display(),
        root.display()
    ))
}

/// Reads the catalog's files through, for the error that made a readable catalog look damaged.
fn unreadable_catalog(repo: &std::path::Path) -> Option<String> {
    for name in ["catalog.db", "catalog.db-wal"] {
        let path = repo.join(name);
        let read = std::fs::File::open(&path).and_then(|mut f| io::copy(&mut f, &mut io::sink()));
        match read {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Some(format!("reading {}: {e}", path.display())),
            _ => {}
        }
    }
    None
}

const CATALOG_IO: &str = "the disk failed reading or writing the catalog (see `dmesg`); what was committed before is \
                          kept. Once the disk works, run the command again, then `snapstore verify`";

const FREE_SPACE: &str = "free some space and run the command again; nothing written before was lost";

fn hint(e: &Error) -> Option<&'static str> {
    Some(match e {
        Error::Io { source, .. } | Error::Backend { source, .. } if source.raw_os_error() == Some(28) => FREE_SPACE,
        Error::Catalog(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure) => CATALOG_IO,
        Error::Catalog(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ReadOnly) => {
            "the repository is on a read-only filesystem (or its catalog.db is read-only): it can be read (log, show, \
             ls, diff, cat, checkout, verify) but not changed; copy it to writable storage to change it"
        }
        Error::Catalog(_) if e.is_corruption() => {
            "the catalog file catalog.db is damaged (the packs are not): keep a copy of the repository as it is, then \
             put back a backup of catalog.db, or salvage its rows with `sqlite3 catalog.db .recover`; as a last \
             resort, move catalog.db and catalog.db-wal aside and run `snapstore repair index`, which makes a new catalog from the \
             packs (the list of checkpoints is lost, their data is kept)"
        }
        Error::CatalogEmpty(_) => {
            "put back a backup of catalog.db; without one, `snapstore repair index` makes a new catalog from the \
             packs (the checkpoints were recorded only in the catalog and are lost; their data is kept). For an \
             s3:// repository, `snapstore sync --rebuild`"
        }
        // `init` cannot make a repository where a file is.
        Error::NoRepository(path) if path.is_file() => {
            "that is a file, not a repository directory: point --repo or SNAPSTORE_REPO at the repository's directory"
        }
        Error::NoRepository(_) => {
            "create one with `snapstore init`, or point --repo or SNAPSTORE_REPO at an existing one"
        }
        Error::RepositoryExists(_) => "use it as it is, or choose another --repo",
        Error::CheckpointNotFound(id) if id == "latest" => {
            "`latest` is the newest checkpoint that is not part of a group: `snapstore log` lists the checkpoints, \
             `snapstore groups` the group checkpoints (`checkout` takes a group's name)"
        }
        Error::CheckpointNotFound(id) if id.contains('~') => {
            "ID~N counts back among the checkpoints of ID's path and host that are still kept: `snapstore log --path \
             PATH` lists them"
        }
        Error::CheckpointNotFound(_) => "`snapstore log` lists the checkpoints",
        Error::GroupNotFound(_) => "`snapstore groups` lists the group checkpoints",
        Error::InvalidId(_) => {
            "`snapstore log` lists the checkpoints; `checkout` also takes a group checkpoint's name, and \
             `snapstore groups` lists those"
        }
        Error::SourceNotFound(_) => {
            "check the path; to commit a stream, give - and --name, and the command that writes it after --"
        }
        Error::PathNotFound { .. } => {
            "`snapstore ls ID -r` lists its paths, relative to the committed directory (`show` prints them with the \
             committed name first)"
        }
        Error::GroupIncomplete { .. } => {
            "commit the missing parts (a part committed again replaces the earlier one); `snapstore groups` shows \
             which are in"
        }
        Error::Forgotten(_) => {
            "a forget (or a retention run) removed it during the checkout, which is incomplete; `snapstore log` lists \
             the checkpoints left"
        }
        Error::ForgottenBeforeTagged(_) => "`snapstore log` lists the checkpoints left",
        Error::AmbiguousId { .. } => "give more digits of the id",
        Error::DestinationNotEmpty(_) => {
            "choose a path that does not exist yet (or an empty directory), or pass --in-place to update what is \
             there or to finish an interrupted checkout into it (only what differs is written)"
        }
        Error::Unreadable { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
            "fix the permissions, or pass --skip-unreadable to record the file as skipped"
        }
        Error::Unreadable { .. } => {
            "the error above says why it could not be read; pass --skip-unreadable to record such files as skipped"
        }
        Error::FileChanged(_) => "stop the program writing to it, or pass --skip-unreadable to leave it out",
        // A bucket's damaged record says itself what to do (`Remote::sync`).
        Error::Corrupt { what } if what.contains("no machine can sync past it") => {
            "the error says what to do; `snapstore verify` cannot look past that record either"
        }
        Error::Corrupt { what } if what.contains("is missing from the chunk index") => {
            "the chunk index lacks chunks the checkpoint uses, whose data may still be in the packs: in a local \
             repository, `snapstore repair index` indexes what the packs hold; in an s3:// repository, on a machine \
             that accepted lost records (`sync --accept-missing`), `snapstore gc` first looks for them in the packs \
             this copy has. `snapstore verify` says which checkpoints and files are affected; where the data is \
             gone, committing the original data again stores it afresh and makes them whole (once `snapstore gc` or \
             `repair index` has found it missing, the files holding it are read whatever their stat; --reread reads \
             every file)"
        }
        Error::Corrupt { .. } | Error::UnsafeName { .. } => {
            "the repository is damaged; nothing was written in place of good data (a checkout restores every file it can \
             and leaves the damaged ones out). `snapstore verify --read-data` says what the damage reaches; other \
             checkpoints may still check out. A damaged chunk a read meets is marked where the repository can be \
             written: the next commit of the original data stores it afresh, which makes whole the checkpoints \
             that use it"
        }
        Error::Format(_) => "this repository needs a different snapstore version",
        Error::GcRunning { .. } => "wait for it to finish; if its process is gone, the next gc takes over by itself",
        Error::CopyInUse { .. } => {
            "a checkout, verify, watch or program holding the repository open keeps the copy: once it ends, the next \
             command builds it again; or wait longer with SNAPSTORE_COPY_WAIT=SECONDS"
        }
        Error::SweepRunning { .. } => {
            "run it again once that gc ends, or wait longer with SNAPSTORE_SWEEP_WAIT=SECONDS; a gc whose process \
             is gone is cleared by the first command that sees it (read-only credentials read beside it instead: \
             at once on its host, after 20 minutes elsewhere)"
        }
        Error::ChangedWhileRead(_) => {
            "run the command again: what it printed or wrote may mix the two states; nothing in the repository \
             was changed by it"
        }
        Error::LockLost(_) => "run it again; what it did before is kept, and the run that took over goes on",
        Error::ReadOnlyWal(_) => {
            "copy the repository, catalog.db-wal included, to writable storage and run snapstore on the copy \
             (it then replays the log); nothing in the repository was changed"
        }
        Error::ForgetRunning { .. } => {
            "run this again once it ends; a lock whose process is gone is taken over after 10 minutes (at once on its own machine)"
        }
        Error::RetentionRaced { .. } => "run the policy again: it is planned afresh against the checkpoints left",
        Error::CommitsRunning { .. } => {
            "run it again when they have finished; a commit whose process is gone is cleared by itself"
        }
        Error::PolicyEmptiesPath { .. } => {
            "check --keep-tag for a typo: a policy of tags alone keeps only what carries them. `--dry-run` shows \
             the plan; add --keep-last 1 to keep each path's newest whatever its tags"
        }
        Error::EmptyPolicy => "for example --keep-last 10 --keep-daily 7; try --dry-run first",
        Error::NotOwner { .. } => {
            "run the change as the user who owns it (for example with sudo -u and that user's name)"
        }
        Error::SessionExpired => "commit again; a gc took this commit for dead after an hour without progress",
        _ => return None,
    })
}

fn repo_path(cli: &Cli) -> PathBuf {
    cli.repo.clone().unwrap_or_else(|| PathBuf::from(".snapstore"))
}

fn show_progress(cli: &Cli) -> bool {
    !cli.quiet && !cli.json && io::stderr().is_terminal()
}

fn run(cli: &Cli, out: &mut Out) -> Result<(), Failure> {
    let repo_dir = repo_path(cli);
    match &cli.command {
        Command::Init { chunk_size, compression_level, normalization } => {
            let kib = *chunk_size * 1024;
            let params = snapstore::RepoParams {
                chunk_min: kib / 4,
                chunk_avg: kib,
                chunk_max: kib * 4,
                compression_level: *compression_level,
                normalization: *normalization,
                ..Default::default()
            };
            let repo = Repository::init_with(&repo_dir, params)?;
            if cli.json {
                out.json(&serde_json::json!({ "repository": repo.location(), "params": repo.params() }))?;
            } else if !cli.quiet {
                out.line(&format!("created snapstore repository at {}", repo.location()))?;
            }
        }
        Command::Commit {
            path,
            command,
            allow_empty,
            message,
            tags,
            name,
            reread,
            skip_unreadable,
            skip_unchanged,
            threads,
            group,
            part,
        } => {
            let group = match (group, part) {
                (Some(g), Some(p)) => Some(snapstore::GroupPart::parse(g, p)?),
                _ => None,
            };
            // A commit that cannot start must not leave a new, empty repository behind.
            let stream = path.as_os_str() == "-";
            if stream {
                let Some(name) = name else {
                    return Err(Failure::Usage(
                        "reading stdin needs --name NAME: the name of the file the stream becomes".into(),
                    ));
                };
                snapstore::validate_stream_name(name)?;
                if command.is_empty() && io::IsTerminal::is_terminal(&io::stdin()) {
                    return Err(Failure::Usage(
                        "stdin is a terminal: pipe the state in, or give the command that writes it after --".into(),
                    ));
                }
            } else if name.is_some() || !command.is_empty() || *allow_empty {
                return Err(Failure::Usage(
                    "--name, --allow-empty and a command after -- only apply when committing a stream (-)".into(),
                ));
            }
            if !stream {
                let md = std::fs::symlink_metadata(path).map_err(|e| Error::reading_source(path, e))?;
                // A `run` or `latest` link to the real state is common, and its checkpoint would hold the link
                // alone: recorded as asked, but said.
                if md.file_type().is_symlink() && std::fs::metadata(path).is_ok_and(|t| t.is_dir()) {
                    let shown = path.display();
                    notice(
                        "warning",
                        &format!(
                            "{shown} is a symbolic link to a directory: only the link is recorded; give {shown}/ to \
                             checkpoint the directory it points to"
                        ),
                    );
                }
            }
            // Started before the repository is opened (or created), so that one that cannot run leaves nothing.
            let producer = if command.is_empty() { None } else { Some(stream::Producer::spawn(command)?) };
            let repo = open_or_init(&repo_dir)?;
            let bar = progress::Bar::new(show_progress(cli));
            let opts = CommitOptions {
                message: message.clone(),
                tags: tags.clone(),
                reread: *reread,
                skip_unreadable: *skip_unreadable,
                skip_unchanged: *skip_unchanged,
                threads: *threads,
                progress: bar.clone(),
                group: group.clone(),
                ..Default::default()
            };
            let summary = match (name, producer) {
                (Some(name), None) => {
                    let mut stdin = stream::Checked::new(io::stdin().lock(), *allow_empty);
                    repo.commit_reader(name, &mut stdin, &opts)?
                }
                (Some(name), Some(producer)) => {
                    let mut output = stream::Checked::new(producer, *allow_empty);
                    repo.commit_reader(name, &mut output, &opts)?
                }
                _ => repo.commit(path, &opts)?,
            };
            bar.finish();
            let status = match &group {
                Some(part) => Some((repo.group_of(part)?, part.part)),
                None => None,
            };
            if cli.json {
                match &status {
                    // The commit's own fields where a plain commit has them, and the group beside them.
                    Some((g, _)) => {
                        let group = serde_json::to_value(g).map_err(io::Error::from)?;
                        out.json(&output::json_with(&summary, &[("group", group)])?)?
                    }
                    None => out.json(&summary)?,
                }
            } else {
                if !cli.quiet {
                    output::commit_summary(out, &summary)?;
                    if let Some((g, part)) = &status {
                        group::part_status(out, g, *part)?;
                    }
                }
                out.line(&summary.id)?;
            }
        }
        Command::Checkout { id, dest, in_place, delete, checksum, paths, no_owners, no_xattrs, threads } => {
            let repo = open(&repo_dir)?;
            let bar = progress::Bar::new(show_progress(cli));
            let opts = CheckoutOptions {
                in_place: *in_place,
                delete: *delete,
                checksum: *checksum,
                paths: paths.clone(),
                owners: !*no_owners,
                xattrs: !*no_xattrs,
                threads: *threads,
                progress: bar.clone(),
            };
            // A group checkpoint's name restores all its parts, part I into DEST/part-I.
            let group = match repo.group(id) {
                Ok(g) => Some(g),
                Err(Error::GroupNotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            if let Some(g) = group {
                let summaries = repo.checkout_group(&g.name, dest, &opts)?;
                bar.finish();
                if cli.json {
                    let parts: Vec<_> = summaries
                        .iter()
                        .zip(&g.members)
                        .map(|(s, (i, _))| {
                            let to = dest.join(format!("part-{i}")).to_string_lossy().into_owned();
                            output::json_with(s, &[("part", (*i).into()), ("dest", to.into())])
                        })
                        .collect::<io::Result<_>>()?;
                    out.json(&serde_json::json!({ "group": g.name, "parts": parts }))?;
                } else if !cli.quiet {
                    for (s, (i, _)) in summaries.iter().zip(&g.members) {
                        output::checkout_summary(out, s, &dest.join(format!("part-{i}")))?;
                    }
                }
                out.flush()?;
                return Ok(());
            }
            let summary = repo.checkout(id, dest, &opts)?;
            bar.finish();
            if cli.json {
                out.json(&summary)?;
            } else if !cli.quiet {
                output::checkout_summary(out, &summary, dest)?;
            }
        }
        Command::Cat { id, path } => {
            let repo = open(&repo_dir)?;
            let mut file = repo.open_file(id, path)?;
            // Reads return at most one chunk; a large buffer keeps writes to a pipe few.
            let mut stdout = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
            io::copy(&mut file, &mut stdout).and_then(|_| stdout.flush()).map_err(|e| {
                // A damaged chunk comes back as the library's error inside an io::Error.
                if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                    let inner = e.into_inner().expect("checked").downcast::<Error>().expect("checked");
                    Failure::Lib(*inner)
                } else {
                    Failure::from(e)
                }
            })?;
        }
        Command::Ls { id, path, recursive } => {
            let repo = open(&repo_dir)?;
            let mut sink = output::Sink::default();
            if cli.json {
                out.json_open("");
            }
            let listed = repo.list(id, path.as_deref().unwrap_or(std::path::Path::new("")), *recursive, |f| {
                if cli.json { sink.write(out.json_item(f)) } else { sink.write(output::file_line(out, f)) }
            });
            sink.finish(listed)?;
            if cli.json {
                out.json_close("")?;
            }
        }
        Command::Tag { id, add, remove } => {
            let tagged = open(&repo_dir)?.tag(id, add, remove)?;
            // A mistyped tag to remove would otherwise pass unnoticed: nothing to remove is not an error.
            for t in remove.iter().filter(|t| !tagged.removed.contains(t)) {
                notice("warning", &format!("{id} has no tag {t}; nothing to remove"));
            }
            let c = &tagged.checkpoint;
            if cli.json {
                // The checkpoint as `show` gives it, and what this changed: a tag to remove that was not there
                // is missing from `removed`.
                let (added, removed) = (tagged.added.clone().into(), tagged.removed.clone().into());
                out.json(&output::json_with(c, &[("added", added), ("removed", removed)])?)?;
            } else if !cli.quiet {
                let tags = if c.tags.is_empty() { "no tags".to_string() } else { c.tags.join(", ") };
                out.line(&format!("{}: {tags}", c.short_id()))?;
            }
        }
        Command::Log { limit, tags, paths, hosts } => {
            let repo = open(&repo_dir)?;
            let mut list = repo.checkpoints()?;
            let any = !list.is_empty();
            let paths = path_keys(paths)?;
            list.retain(|c| {
                tags.iter().all(|t| c.tags.contains(t))
                    && (paths.is_empty() || paths.contains(&c.path))
                    && (hosts.is_empty() || hosts.contains(&c.host))
            });
            let filtered = !(tags.is_empty() && paths.is_empty() && hosts.is_empty());
            if let Some(n) = limit {
                list.truncate(*n);
            }
            if cli.json {
                out.json(&list)?;
            } else if any && list.is_empty() && filtered {
                if !cli.quiet {
                    let mut what = Vec::new();
                    if !tags.is_empty() {
                        what.push(format!("tagged {}", tags.join(" and ")));
                    }
                    if !paths.is_empty() {
                        let shown: Vec<_> = paths.iter().map(|p| output::printable(p)).collect();
                        what.push(format!("of {}", shown.join(" or ")));
                    }
                    if !hosts.is_empty() {
                        what.push(format!("from host {}", hosts.join(" or ")));
                    }
                    out.line(&format!(
                        "no checkpoint {} (`snapstore log` lists them all, with their paths)",
                        what.join(", ")
                    ))?;
                }
            } else {
                let groups = repo.groups()?;
                // With only group checkpoints, or with `-n 0`, the "no checkpoints yet" line would mislead.
                if (!list.is_empty() || groups.is_empty() || cli.quiet) && *limit != Some(0) {
                    output::log(out, &list, cli.quiet)?;
                }
                // The groups are their own listing; a filtered or shortened log is about checkpoints only.
                if !cli.quiet && !groups.is_empty() && !filtered && limit.is_none() {
                    if !list.is_empty() {
                        out.line("")?;
                    }
                    group::list(out, &groups)?;
                }
            }
        }
        Command::Groups => {
            let groups = open(&repo_dir)?.groups()?;
            if cli.json {
                out.json(&groups)?;
            } else if groups.is_empty() {
                if !cli.quiet {
                    out.line("no group checkpoints (`snapstore commit PATH --group NAME --part I/N` makes one part)")?;
                }
            } else {
                group::list(out, &groups)?;
            }
        }
        Command::Show { id } => {
            let repo = open(&repo_dir)?;
            let cp = repo.checkpoint(id)?;
            let skipped = repo.skipped(&cp.id)?;
            if cli.json {
                // The files streamed as the walk meets them (see `Out::json_open`), after the rest.
                let head = format!(
                    "{{\"checkpoint\": {},\n\"skipped\": {},\n\"files\": ",
                    serde_json::to_string(&cp).map_err(io::Error::from)?,
                    serde_json::to_string(&skipped).map_err(io::Error::from)?
                );
                let mut sink = output::Sink::default();
                out.json_open(&head);
                let walked = repo.walk(&cp.id, |f| sink.write(out.json_item(f)));
                sink.finish(walked)?;
                out.json_close("}")?;
            } else {
                output::checkpoint_header(out, &cp)?;
                for s in &skipped {
                    out.line(&format!("skipped   {}: {}", s.path.display(), s.reason))?;
                }
                let mut sink = output::Sink::default();
                let walked = repo.walk(&cp.id, |f| sink.write(output::file_line(out, f)));
                sink.finish(walked)?;
            }
        }
        Command::Forget { ids, groups, keep, tags, paths, across_paths, dry_run, prune } => {
            let repo = open(&repo_dir)?;
            let prune = *prune && !*dry_run;
            let policy = keep.policy();
            if !groups.is_empty() {
                if !ids.is_empty() || !policy.is_empty() {
                    return Err(Failure::Usage("give groups, checkpoint ids or a policy, one at a time".into()));
                }
                let names: Vec<&str> = groups.iter().map(String::as_str).collect();
                let gone = if *dry_run {
                    names.iter().map(|n| repo.groups_named(n)).collect::<Result<Vec<_>, _>>()?.concat()
                } else {
                    repo.forget_groups(&names)?
                };
                let mut doc = None;
                if cli.json {
                    // One shape for the three ways of forgetting: the parts as the checkpoints forgotten.
                    let parts: Vec<_> = gone.iter().flat_map(|g| g.members.iter().map(|(_, c)| fate(c))).collect();
                    doc = Some(serde_json::json!({
                        "dry_run": dry_run, "keep": [], "forget": parts, "forget_groups": gone
                    }));
                } else if !cli.quiet {
                    group::list(out, &gone)?;
                    output::forget_total(out, None, gone.len(), "group", *dry_run, prune)?;
                }
                return then_prune(cli, out, &repo, doc, prune);
            }
            if !ids.is_empty() {
                if !policy.is_empty() || !tags.is_empty() || !paths.is_empty() {
                    return Err(Failure::Usage("give checkpoint ids or a policy (--keep-*), not both".into()));
                }
                let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                let forgotten = if *dry_run { repo.checkpoints_named(&ids)? } else { repo.forget(&ids)? };
                let mut doc = None;
                if cli.json {
                    let forget: Vec<_> = forgotten.iter().map(fate).collect();
                    doc = Some(serde_json::json!({
                        "dry_run": dry_run, "keep": [], "forget": forget, "forget_groups": []
                    }));
                } else if !cli.quiet {
                    let shown = output::shown_paths(forgotten.iter().map(|c| c.path.as_str()));
                    for c in &forgotten {
                        output::fate_line(out, "forget", &c.id, c.time_ns, &shown[c.path.as_str()], "")?;
                    }
                    output::forget_total(out, None, forgotten.len(), "checkpoint", *dry_run, prune)?;
                }
                return then_prune(cli, out, &repo, doc, prune);
            }
            let paths = path_keys(paths)?;
            let scope = snapstore::RetentionScope { tags: tags.clone(), paths, across_paths: *across_paths };
            let mut plan = repo.plan_retention(&policy, &scope)?;
            // A mistyped --path in a cron job would otherwise prune nothing, silently, for ever.
            for p in &scope.paths {
                if !plan.keep.iter().chain(&plan.forget).any(|d| &d.path == p) {
                    notice(
                        "warning",
                        &format!(
                            "no checkpoint of {p} (`snapstore show ID` gives the path a checkpoint was committed from)"
                        ),
                    );
                }
            }
            if !dry_run {
                let forgotten: std::collections::HashSet<String> =
                    repo.apply_retention(&plan)?.into_iter().map(|c| c.id).collect();
                // Its tags changed while this ran (a tag the policy keeps added, or one `--tag` asks for
                // removed): kept, and shown so (one forgotten by another process is gone).
                let (gone, spared): (Vec<_>, Vec<_>) = std::mem::take(&mut plan.forget)
                    .into_iter()
                    .partition(|d| forgotten.contains(&d.id) || repo.checkpoint(&d.id).is_err());
                plan.forget = gone;
                plan.keep.extend(spared.into_iter().map(|mut d| {
                    d.reasons.push("its tags changed while forget ran".into());
                    d
                }));
                plan.sort();
            }
            let mut doc = None;
            if cli.json {
                doc = Some(serde_json::json!({
                    "dry_run": dry_run, "policy": policy.to_string(), "keep": plan.keep, "forget": plan.forget,
                    "forget_groups": []
                }));
            } else if !cli.quiet {
                output::plan(out, &plan)?;
                output::forget_total(out, Some(plan.keep.len()), plan.forget.len(), "checkpoint", *dry_run, prune)?;
            }
            if *dry_run {
                if let Some(doc) = &doc {
                    out.json(doc)?;
                }
                // Shown first, so the refusal can be understood; it still fails the dry run as the real one fails.
                out.flush()?;
                plan.refuse_emptying()?;
                return Ok(());
            }
            then_prune(cli, out, &repo, doc, prune)?;
        }
        Command::Gc { dry_run, max_unused, incomplete_after, orphan_grace } => {
            if !(0.0..=100.0).contains(max_unused) {
                return Err(Failure::Usage("--max-unused takes a percentage from 0 to 100".into()));
            }
            let repo = open(&repo_dir)?;
            let opts = snapstore::GcOptions {
                dry_run: *dry_run,
                max_unused: max_unused / 100.0,
                incomplete_after: *incomplete_after,
                orphan_grace: *orphan_grace,
                ..Default::default()
            };
            let summary = collect(cli, &repo, opts)?;
            if cli.json {
                out.json(&summary)?;
            } else if !cli.quiet {
                output::gc_summary(out, &summary)?;
            }
            gc_damage(cli, &summary)?;
        }
        Command::Diff(args) => diff::diff(&repo_dir, args, cli.json, cli.quiet, out)?,
        Command::Verify(args) => verify::verify(&repo_dir, args, cli.json, cli.quiet, out)?,
        Command::Watch(args) => watch::watch(&repo_dir, args, cli.json, cli.quiet, out)?,
        Command::Repair(args) => verify::repair(&repo_dir, args, cli.json, cli.quiet, out)?,
        Command::Sync { rebuild, accept_missing, everywhere } => {
            let (repo, s) =
                if *rebuild { Repository::rebuild(&repo_dir)? } else { Repository::open_synced(&repo_dir)? };
            let repo = telling_waits(repo);
            let (s, accepted) = if *accept_missing {
                let accepted =
                    if *everywhere { repo.accept_missing_everywhere()? } else { repo.accept_missing_records()? };
                (repo.sync()?, accepted)
            } else {
                (s, Vec::new())
            };
            if cli.json {
                let mut doc = serde_json::to_value(&s).map_err(io::Error::other)?;
                if *accept_missing {
                    doc["accepted_as_lost"] = accepted.into();
                }
                out.json(&doc)?;
            } else if !cli.quiet {
                for a in &accepted {
                    out.line(&format!("accepted as lost: {a}"))?;
                }
                out.line(&format!(
                    "synced {}: applied {} of {}; {}{}",
                    repo.location(),
                    s.applied,
                    output::plural(s.records, "record"),
                    output::plural(s.checkpoints, "checkpoint"),
                    if s.rebuilt { " (this machine's copy of the catalog built again from the bucket)" } else { "" }
                ))?;
            }
            // Told even with --quiet: a bucket that lost records lost checkpoints for every new machine.
            warn_records_missing(&s.records_missing);
        }
        Command::Stats => {
            let repo = open(&repo_dir)?;
            let stats = repo.stats()?;
            if cli.json {
                out.json(&stats)?;
            } else {
                output::stats(out, &repo, &stats)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// An average chunk size in KiB that FastCDC accepts with a quarter and four times it.
fn chunk_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s.parse().map_err(|_| format!("'{s}' is not a whole number of KiB"))?;
    if !kib.is_power_of_two() || !(1..=4096).contains(&kib) {
        return Err(format!("{kib} KiB: the average chunk size must be a power of two from 1 to 4096 KiB"));
    }
    Ok(kib)
}

/// The catalog's keys for committed paths given on the command line (`--path`): a stream's `stdin:NAME`, or a
/// key as `log --json` shows it for a path that is not UTF-8 (`bytes:...`), as it is; a path made absolute and
/// cleaned, as commit recorded it.
fn path_keys(paths: &[PathBuf]) -> Result<Vec<String>, Error> {
    paths
        .iter()
        .map(|p| match p.to_str() {
            Some(s) if s.starts_with("stdin:") || s.starts_with("bytes:") => Ok(s.to_owned()),
            _ => snapstore::path_key(p),
        })
        .collect()
}

/// Runs GC with a progress bar where one is shown.
fn collect(cli: &Cli, repo: &Repository, opts: snapstore::GcOptions) -> Result<snapstore::GcSummary, Failure> {
    let bar = progress::Bar::new(show_progress(cli));
    let summary = repo.gc(&snapstore::GcOptions { progress: bar.clone(), ..opts })?;
    bar.finish();
    Ok(summary)
}

/// Records gone from a bucket (`sync`, `gc`), told on stderr: the first ten, and what to do.
fn warn_records_missing(missing: &[String]) {
    for m in missing.iter().take(10) {
        notice("warning", &format!("record missing from the bucket: {m}"));
    }
    if missing.len() > 10 {
        notice("warning", &format!("... and {} more records missing", missing.len() - 10));
    }
    if !missing.is_empty() {
        notice("hint", verify::RECORDS_MISSING_HINT);
    }
}

/// GC's damaged packs, told on stderr (JSON lists them in the summary), fail the command with exit 3: everything
/// else was collected, and the exit code is what tells cron that someone must look.
fn gc_damage(cli: &Cli, summary: &snapstore::GcSummary) -> Result<(), Failure> {
    if !summary.records_missing.is_empty() {
        if !cli.json {
            warn_records_missing(&summary.records_missing);
        }
        return Err(Failure::Exit(EXIT_CORRUPT));
    }
    if summary.damaged_packs.is_empty() {
        return Ok(());
    }
    if !cli.json {
        for d in &summary.damaged_packs {
            say!("warning: damaged pack {}: {}; left as it is", d.pack, d.problem);
        }
        say!(
            "hint: `snapstore verify --read-data` shows what the damage reaches; {}",
            if cli.repo.as_deref().is_some_and(in_bucket) {
                "a chunk a read finds damaged is marked for every machine, and the next commit of its data on any \
                 of them stores it afresh"
            } else {
                "`snapstore repair index --read-data` then drops what is lost"
            }
        );
    }
    Err(Failure::Exit(EXIT_CORRUPT))
}

/// The end of a forget: with `prune`, GC (its summary under `gc` in the JSON document `doc`, or printed after
/// the forget's lines), then `doc` written.
fn then_prune(
    cli: &Cli,
    out: &mut Out,
    repo: &Repository,
    mut doc: Option<serde_json::Value>,
    prune: bool,
) -> Result<(), Failure> {
    let summary = if prune { Some(collect(cli, repo, Default::default())?) } else { None };
    if let Some(summary) = &summary {
        match &mut doc {
            Some(doc) => doc["gc"] = serde_json::to_value(summary).map_err(io::Error::other)?,
            None if !cli.quiet => output::gc_summary(out, summary)?,
            None => {}
        }
    }
    if let Some(doc) = &doc {
        out.json(doc)?;
    }
    out.flush()?;
    summary.as_ref().map_or(Ok(()), |s| gc_damage(cli, s))
}

/// A checkpoint forgotten by id or with its group, as a policy's decisions list one (no rule kept it).
fn fate(c: &snapstore::Checkpoint) -> snapstore::Decision {
    snapstore::Decision {
        id: c.id.clone(),
        time_ns: c.time_ns,
        host: c.host.clone(),
        path: c.path.clone(),
        reasons: Vec::new(),
    }
}
