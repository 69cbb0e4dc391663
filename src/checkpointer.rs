//! Checkpoints a long-running program takes of itself: [`Checkpointer`].
//!
//! Taking a checkpoint is split in two, as CheckFreq splits snapshot from persist. The *capture* runs on the
//! caller's thread: the program writes its state image into a spool file (an unlinked temporary, so a crash
//! leaves nothing behind), which costs a sequential write into the page cache. The *persist* (chunking,
//! hashing, compressing, storing, the catalog transaction, then retention) runs on a background thread. One
//! captured image may wait while another is persisted; a third capture waits, before it writes anything,
//! until the store has caught up, so a program that checkpoints faster than the store can persist is slowed,
//! never left with an unbounded queue, and at most two images are spooled. Memory stays bounded: the image
//! lives in the spool file, not in memory.

use std::fs::File;
use std::io::{self, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Checkpoint, CommitOptions, CommitSummary, Error, GcSummary, Policy, Repository, Result};

/// When [`Checkpointer::step`] takes a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// At every step that is a multiple of N (N > 0).
    EverySteps(u64),
    /// At the first step, then at the first step at least this long after the last checkpoint.
    Every(Duration),
    /// Never by itself: only [`Checkpointer::checkpoint`].
    OnDemand,
}

/// How a [`Checkpointer`] names, schedules and keeps checkpoints.
///
/// One state is one series of checkpoints, named by `name` (or by `path`), **whatever host made them**: a
/// job restarted on another machine or in a new container (another hostname) resumes from the series, and
/// retention counts the series as a whole. Give each job's state a name of its own: [`Checkpointer::new`]
/// refuses a series another `Checkpointer` is using, since the two would resume from, and let retention
/// forget, each other's checkpoints. Setting `commit.host` pins the series to that host name instead.
#[derive(Clone)]
pub struct CheckpointerOptions {
    /// The state's name: its checkpoints are those of the stream `NAME` (path `stdin:NAME` in `log`).
    pub name: String,
    /// When [`Checkpointer::step`] takes one.
    pub schedule: Schedule,
    /// Applied to this state's checkpoints after each one is persisted; `None` keeps them all. The
    /// checkpoint just persisted is always kept, even if a clock that stepped back dated the others later.
    /// A policy that keeps only tags the commits do not carry is refused by [`Checkpointer::new`].
    pub retention: Option<Policy>,
    /// Collect garbage after a checkpoint is persisted and retention applied, when this long has passed
    /// since the last collection (or since the `Checkpointer` started); `None`: never. Retention only forgets
    /// checkpoints: without a collection their chunks stay on disk. Skipped when another collection runs.
    pub gc_every: Option<Duration>,
    /// Message and tags for each commit (a `step=N` tag is added).
    pub commit: CommitOptions,
    /// Where captured images wait to be persisted; `None`: the system's temporary directory.
    pub spool_dir: Option<PathBuf>,
    /// For state kept in files: the file or directory that [`Checkpointer::step_path`] checkpoints. A
    /// relative path is taken from the current directory when the `Checkpointer` is made, not at each call.
    /// A symbolic link is refused by [`Checkpointer::new`] (a commit records a link, not what it points to).
    pub path: Option<PathBuf>,
}

impl Default for CheckpointerOptions {
    fn default() -> Self {
        CheckpointerOptions {
            name: "state".into(),
            schedule: Schedule::OnDemand,
            retention: None,
            gc_every: None,
            commit: CommitOptions::default(),
            spool_dir: None,
            path: None,
        }
    }
}

/// A checkpoint made durable in the background.
#[derive(Debug)]
pub struct Persisted {
    /// The step it was captured at.
    pub step: u64,
    /// The commit.
    pub summary: CommitSummary,
    /// Checkpoints the retention policy forgot after it.
    pub forgotten: Vec<Checkpoint>,
    /// Why the retention policy could not be applied after it (the checkpoint itself is durable).
    pub retention_error: Option<Error>,
    /// The garbage collection run after it ([`CheckpointerOptions::gc_every`]), if one was due and ran.
    pub gc: Option<GcSummary>,
    /// Why that collection failed (the checkpoint itself is durable).
    pub gc_error: Option<Error>,
}

/// The checkpoint [`Checkpointer::restore_latest`] brought back.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Its id.
    pub id: String,
    /// The step it was captured at.
    pub step: u64,
}

struct Job {
    step: u64,
    image: File,
}

/// What follows a checkpoint: retention, then now and then a garbage collection.
struct Upkeep {
    gc: crate::gc::GcEvery,
}

impl Upkeep {
    fn new(opts: &CheckpointerOptions) -> Self {
        Upkeep { gc: crate::gc::GcEvery::new(opts.gc_every) }
    }

    fn after(
        &mut self,
        repo: &Repository,
        opts: &CheckpointerOptions,
        key: &str,
        step: u64,
        summary: CommitSummary,
    ) -> Persisted {
        let host = opts.commit.host.as_deref();
        let retained = opts.retention.as_ref().map(|policy| repo.retain_path(policy, key, host, &summary.id));
        let (forgotten, retention_error) = match retained {
            None => (Vec::new(), None),
            Some(Ok(v)) => (v, None),
            Some(Err(e)) => (Vec::new(), Some(e)),
        };
        let (gc, gc_error) = match self.gc.run_if_due(repo, &Default::default()) {
            None => (None, None),
            Some(Ok(g)) => (Some(g), None),
            Some(Err(e)) => (None, Some(e)),
        };
        Persisted { step, summary, forgotten, retention_error, gc, gc_error }
    }
}

/// Takes checkpoints of a program's state on a schedule, persisting them in the background. Dropping it waits
/// for the checkpoints already captured to be persisted, but cannot report their errors: call
/// [`Checkpointer::wait`] before the end.
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
/// use std::io::Write;
/// use snapstore::{Checkpointer, CheckpointerOptions, Schedule};
/// let opts = CheckpointerOptions { schedule: Schedule::EverySteps(10), ..Default::default() };
/// let mut cp = Checkpointer::new(repo, opts).unwrap();
/// let mut state = 0u64;
/// if let Some(r) = cp.restore_latest(&mut Vec::new()).unwrap() {
///     unreachable!("a new repository holds no checkpoint, got {}", r.id);
/// }
/// for step in 1..=25u64 {
///     state = state.wrapping_mul(31).wrapping_add(step);
///     cp.step(step, |w| w.write_all(&state.to_le_bytes())).unwrap();
/// }
/// let persisted = cp.wait().unwrap();
/// assert_eq!(persisted.iter().map(|p| p.step).collect::<Vec<_>>(), vec![10, 20]);
/// let mut image = Vec::new();
/// assert_eq!(cp.restore_latest(&mut image).unwrap().unwrap().step, 20);
/// assert_eq!(image.len(), 8);
/// ```
pub struct Checkpointer {
    repo: Arc<Repository>,
    opts: CheckpointerOptions,
    last: Option<(u64, Instant)>,
    jobs: Option<SyncSender<Job>>,
    done: Receiver<(u64, Result<Persisted>)>,
    /// Captured and not yet reported by [`Checkpointer::wait`].
    in_flight: u64,
    /// Persisted and not yet reported by [`Checkpointer::wait`].
    ready: Vec<Persisted>,
    /// A persist that failed, not yet reported.
    failed: Option<Error>,
    /// The steps whose captured checkpoint could not be persisted.
    lost: Vec<u64>,
    worker: Option<JoinHandle<()>>,
    /// Retention and GC after [`Checkpointer::checkpoint_path`], which commits on the caller's thread.
    upkeep: Upkeep,
    /// Held for the Checkpointer's life: no other Checkpointer takes this series meanwhile.
    _series_lock: Vec<File>,
}

/// The tag that records a checkpoint's step.
fn step_tag(step: u64) -> String {
    format!("step={step}")
}

impl Checkpointer {
    /// Starts the background persister. The state's name must be a valid file name, and no other
    /// `Checkpointer`, in this process or another, may be using its series (see [`CheckpointerOptions`]).
    pub fn new(repo: Repository, mut opts: CheckpointerOptions) -> Result<Self> {
        if let Some(p) = opts.path.take() {
            let p = std::path::absolute(&p).map_err(|e| Error::io(&p, e))?;
            // A `current` link to the step directory is common; its checkpoints would hold the link alone.
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                let to = std::fs::read_link(&p).map(|t| t.display().to_string()).unwrap_or_default();
                return Err(Error::InvalidInput(format!(
                    "CheckpointerOptions::path {} is a symbolic link (to {to}): its checkpoints would hold the link, \
                     not the state; give the directory or file it points to",
                    p.display()
                )));
            }
            opts.path = Some(p);
        }
        crate::tree::validate_name(opts.name.as_bytes())
            .map_err(|_| Error::InvalidInput(format!("invalid state name {:?}", opts.name)))?;
        if opts.schedule == Schedule::EverySteps(0) {
            return Err(Error::InvalidInput("Schedule::EverySteps needs a step count above zero".into()));
        }
        if let Some(policy) = &opts.retention
            && policy.keeps_none_tagged(&opts.commit.tags)
        {
            return Err(Error::InvalidInput(format!(
                "the retention policy keeps only checkpoints tagged {}, which this Checkpointer's commits are \
                 not: it would be refused after every checkpoint; add a keep_last or keep_within rule, or the \
                 tag to CheckpointerOptions::commit",
                policy.keep_tags.join(" or ")
            )));
        }
        let key = match &opts.path {
            Some(p) => crate::commit::path_key(p)?,
            None => format!("stdin:{}", opts.name),
        };
        // Its lock file, created in the repository, would be this user's.
        repo.refuse_another_users()?;
        let series_lock = lock_series(&repo, &key, opts.commit.host.as_deref())?;
        let repo = Arc::new(repo);
        // One image waits while another is persisted; a third capture waits for room.
        let (jobs, job_rx) = sync_channel::<Job>(1);
        let (done_tx, done) = channel::<(u64, Result<Persisted>)>();
        let worker = {
            let (repo, opts) = (repo.clone(), opts.clone());
            std::thread::Builder::new()
                .name("snapstore-persist".into())
                .spawn(move || {
                    let mut upkeep = Upkeep::new(&opts);
                    for job in job_rx {
                        let step = job.step;
                        if done_tx.send((step, persist(&repo, &opts, &mut upkeep, job))).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| Error::io("<persist thread>", e))?
        };
        Ok(Checkpointer {
            upkeep: Upkeep::new(&opts),
            repo,
            opts,
            last: None,
            jobs: Some(jobs),
            done,
            in_flight: 0,
            ready: Vec::new(),
            failed: None,
            lost: Vec::new(),
            worker: Some(worker),
            _series_lock: series_lock,
        })
    }

    /// The repository it checkpoints into.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Whether the schedule calls for a checkpoint at `step`.
    pub fn due(&self, step: u64) -> bool {
        match &self.opts.schedule {
            Schedule::EverySteps(n) => step.is_multiple_of(*n) && self.last.is_none_or(|(s, _)| s != step),
            Schedule::Every(d) => self.last.is_none_or(|(_, at)| at.elapsed() >= *d),
            Schedule::OnDemand => false,
        }
    }

    /// Called at each step of the program: when [`Checkpointer::due`], captures the state (`capture` writes
    /// its image) and queues it to be persisted. Returns whether it did. A failure to persist an earlier
    /// checkpoint is returned by the first call after it is known, due or not, after this step's capture is
    /// queued: that earlier checkpoint is lost, the others are not.
    pub fn step(&mut self, step: u64, capture: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<bool> {
        let due = self.due(step);
        if due {
            self.capture(step, capture)?;
        }
        self.collect();
        self.failed.take().map_or(Ok(due), Err)
    }

    /// Captures the state now, whatever the schedule, and queues it to be persisted; reports an earlier
    /// failure as [`Checkpointer::step`] does.
    pub fn checkpoint(&mut self, step: u64, capture: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
        self.capture(step, capture)?;
        self.collect();
        self.failed.take().map_or(Ok(()), Err)
    }

    fn capture(&mut self, step: u64, capture: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
        if self.opts.path.is_some() {
            // One schedule serves one state: shared with files, the stream would never be due when they are.
            return Err(Error::InvalidInput(
                "this Checkpointer checkpoints the files of CheckpointerOptions::path (step_path, checkpoint_path); \
                 a state written as a stream needs a Checkpointer of its own, with another name"
                    .into(),
            ));
        }
        // At most one image persisting and one waiting: wait for room before writing a third.
        while self.in_flight >= 2 {
            let r = self.done.recv().map_err(|_| Error::Internal("persister stopped".into()))?;
            self.absorb(r);
        }
        let (mut image, spool) = spool_file(self.opts.spool_dir.as_ref())?;
        {
            let mut spooled = Spool { file: &mut image, failed: false };
            let mut w = io::BufWriter::with_capacity(1 << 20, &mut spooled);
            // A full or failing spool disk shows in the capture's own error: it is named, not the capture.
            let captured = capture(&mut w).and_then(|()| w.flush());
            drop(w);
            captured.map_err(|e| {
                let what = if spooled.failed { spool.as_str() } else { "<captured state>" };
                Error::io(what, e)
            })?;
        }
        image.rewind().map_err(|e| Error::io("<spool>", e))?;
        self.last = Some((step, Instant::now()));
        let jobs = self.jobs.as_ref().ok_or_else(|| Error::Internal("persister stopped".into()))?;
        jobs.send(Job { step, image }).map_err(|_| Error::Internal("persister stopped".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    /// For state kept in files ([`CheckpointerOptions::path`]): when [`Checkpointer::due`], checkpoints them.
    /// Returns whether it did.
    pub fn step_path(&mut self, step: u64) -> Result<bool> {
        if !self.due(step) {
            return Ok(false);
        }
        self.checkpoint_path(step)?;
        Ok(true)
    }

    /// Checkpoints [`CheckpointerOptions::path`] now. Files cannot be captured apart from being persisted
    /// without copying them, so this commits on the caller's thread: the program must not change them until
    /// it returns. The commit reads only files changed since the last checkpoint.
    pub fn checkpoint_path(&mut self, step: u64) -> Result<()> {
        let path = self.state_path()?.to_path_buf();
        let mut commit = self.opts.commit.clone();
        commit.tags.push(step_tag(step));
        let summary = self.repo.commit(&path, &commit)?;
        self.last = Some((step, Instant::now()));
        let key = crate::commit::path_key(&path)?;
        let persisted = self.upkeep.after(&self.repo, &self.opts, &key, step, summary);
        self.ready.push(persisted);
        Ok(())
    }

    /// Puts the newest checkpoint of [`CheckpointerOptions::path`] back in place (only what differs is
    /// written; files it lacks are removed) and returns which it was; `None` when there is none.
    ///
    /// The schedule counts the restored step as just checkpointed, as [`Checkpointer::restore_latest`] does.
    /// On damage ([`Error::is_corruption`]) a file being patched may be left partly patched: restore the
    /// checkpoint before over it (docs/checkpointing.md, *Errors*).
    pub fn restore_latest_path(&mut self) -> Result<Option<Restored>> {
        let path = self.state_path()?;
        let Some((latest, step)) = self.latest(&crate::commit::path_key(path)?)? else { return Ok(None) };
        let opts = crate::CheckoutOptions { in_place: true, delete: true, ..Default::default() };
        self.repo.checkout(&latest.id, path, &opts)?;
        self.last = Some((step, Instant::now()));
        Ok(Some(Restored { id: latest.id, step }))
    }

    fn state_path(&self) -> Result<&std::path::Path> {
        self.opts.path.as_deref().ok_or_else(|| Error::InvalidInput("CheckpointerOptions::path is not set".into()))
    }

    /// The newest checkpoint of this series (recorded under `key`, from any host unless `commit.host` pins
    /// one) that carries a step tag, with its step: a checkpoint committed under the same name by other
    /// means (`snapstore commit - --name NAME`) has none and is passed over.
    fn latest(&self, key: &str) -> Result<Option<(Checkpoint, u64)>> {
        let host = self.opts.commit.host.as_deref();
        let Some(latest) = self.repo.open_catalog()?.latest_of_path_tagged(key, host, "step=")? else {
            return Ok(None);
        };
        let step = latest
            .tags
            .iter()
            .find_map(|t| t.strip_prefix("step=").and_then(|s| s.parse().ok()))
            .ok_or_else(|| Error::corrupt(format!("checkpoint {} of {key} has no step tag", latest.id)))?;
        Ok(Some((latest, step)))
    }

    /// Waits until every captured checkpoint is persisted; returns those not reported before, in order, or
    /// the first failure once all are done. After a failure the others are durable, and the next call
    /// returns them.
    pub fn wait(&mut self) -> Result<Vec<Persisted>> {
        while self.in_flight > 0 {
            let r = self.done.recv().map_err(|_| Error::Internal("persister stopped".into()))?;
            self.absorb(r);
        }
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut self.ready)),
        }
    }

    /// Takes the results already in, without waiting.
    fn collect(&mut self) {
        while let Ok(r) = self.done.try_recv() {
            self.absorb(r);
        }
    }

    fn absorb(&mut self, (step, r): (u64, Result<Persisted>)) {
        self.in_flight -= 1;
        match r {
            Ok(p) => self.ready.push(p),
            Err(e) => {
                self.lost.push(step);
                self.failed.get_or_insert(e);
            }
        }
    }

    /// The steps captured so far whose checkpoint could not be persisted, in the order they failed: the
    /// errors say why, this says which (an error is reported once, by the call after it is known).
    pub fn lost(&self) -> &[u64] {
        &self.lost
    }

    /// Writes the newest checkpoint of this state into `into` (its bytes are verified chunk by chunk as they
    /// are read) and returns which it was; `None` when there is none. Checkpoints still being persisted are
    /// not considered: call [`Checkpointer::wait`] first for those.
    ///
    /// A chunk that fails its check is returned as the library's own error ([`Error::is_corruption`]), after
    /// `into` took the bytes before it: discard them. To fall back to an older checkpoint, list the series
    /// with [`Repository::checkpoints`] (path `stdin:NAME`, tag `step=N`) and read one with
    /// [`Repository::open_file`]. The read marked the damaged chunk in the catalog: the next checkpoint holding
    /// the same bytes stores them afresh, which makes whole every checkpoint using the chunk.
    ///
    /// The schedule then counts the restored step as just checkpointed: a loop that resumes at that step
    /// does not checkpoint it again, and [`Schedule::Every`] waits its interval from now.
    pub fn restore_latest(&mut self, into: &mut dyn Write) -> Result<Option<Restored>> {
        let path = format!("stdin:{}", self.opts.name);
        let Some((latest, step)) = self.latest(&path)? else { return Ok(None) };
        let mut reader = self.repo.open_file(&latest.id, "")?;
        io::copy(&mut reader, into).map_err(|e| {
            // The reader carries the store's typed error (a corrupt chunk, a failed read) inside io::Error.
            if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
                match e.into_inner().map(|i| i.downcast::<Error>()) {
                    Some(Ok(inner)) => return *inner,
                    _ => unreachable!("checked to hold an Error"),
                }
            }
            Error::io(format!("<restore target of checkpoint {} of {path}>", latest.short_id()), e)
        })?;
        self.last = Some((step, Instant::now()));
        Ok(Some(Restored { id: latest.id, step }))
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the queue lets the persister finish what was captured, then end.
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn persist(repo: &Repository, opts: &CheckpointerOptions, upkeep: &mut Upkeep, mut job: Job) -> Result<Persisted> {
    let mut commit = opts.commit.clone();
    commit.tags.push(step_tag(job.step));
    let summary = repo.commit_reader(&opts.name, &mut job.image, &commit)?;
    Ok(upkeep.after(repo, opts, &format!("stdin:{}", opts.name), job.step, summary))
}

/// Locks the series `key` (a name's stream or a path; of one host, if pinned) in the repository, without
/// waiting: two Checkpointers of one series would resume from, and let retention forget, each other's
/// checkpoints. An unpinned series is every host's checkpoints of `key`, so it overlaps every pinned one:
/// an unpinned Checkpointer holds `REPO/locks/series-H(key)` exclusively, a pinned one holds that file shared
/// and `series-H(key, host)` exclusively (H: 16 hex digits of a BLAKE3). So two unpinned, an unpinned and a
/// pinned, or two pinned to one host exclude each other, and two pinned to different hosts do not. The
/// exclusive file records the holder's pid for the error; `flock` ends with the process, however it ends.
/// For a repository in a bucket the files lie in the local copy, so they keep apart one machine's processes.
fn lock_series(repo: &Repository, key: &str, host: Option<&str>) -> Result<Vec<File>> {
    let dir = repo.root.join("locks");
    crate::backend::local_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let open = |series: &str| {
        let path = dir.join(format!("series-{}", &blake3::hash(series.as_bytes()).to_hex()[..16]));
        crate::copylock::open_lock_file(&path).map(|f| (f, path))
    };
    let busy = |path: &std::path::Path| {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        let pid = holder.trim().strip_prefix("pid ").and_then(|p| p.parse().ok());
        // Typed, so that a program restarted while its old process still runs can wait and retry (round 37
        // review, F2: it was InvalidInput, told from a bad option by its text alone).
        Error::SeriesBusy { key: key.to_string(), pid }
    };
    use rustix::fs::FlockOperation::{NonBlockingLockExclusive, NonBlockingLockShared};
    // `false`: the filesystem has no locks, so there is nothing to keep apart with, as before locks.
    let lock = |file: &File, path: &std::path::Path, op| match rustix::fs::flock(file, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(busy(path)),
        Err(_) => Ok(false),
    };
    let note_pid = |mut file: File| {
        file.set_len(0).and_then(|()| file.write_all(format!("pid {}\n", std::process::id()).as_bytes())).ok();
        file
    };
    let (all, all_path) = open(key)?;
    let Some(host) = host else {
        return Ok(vec![if lock(&all, &all_path, NonBlockingLockExclusive)? { note_pid(all) } else { all }]);
    };
    if !lock(&all, &all_path, NonBlockingLockShared)? {
        return Ok(vec![all]);
    }
    let (own, path) = open(&format!("{key}\0{host}"))?;
    let own = if lock(&own, &path, NonBlockingLockExclusive)? { note_pid(own) } else { own };
    Ok(vec![all, own])
}

/// The spool file as the capture writes it, remembering whether a write to it failed.
struct Spool<'a> {
    file: &'a mut File,
    failed: bool,
}

impl Write for Spool<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().inspect_err(|_| self.failed = true)
    }
}

/// A temporary file with no name: created, then unlinked at once, so that nothing is left behind whatever
/// happens to the process. Returned with a description of where it is, for errors.
fn spool_file(dir: Option<&PathBuf>) -> Result<(File, String)> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = dir.cloned().unwrap_or_else(std::env::temp_dir);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".snapstore-spool-{}-{n}", std::process::id()));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            // Checkpoints hold private state: so does the spool.
            .mode(0o600)
            .open(&path);
        match opened {
            Ok(file) => {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                return Ok((file, format!("{} (the spool directory)", dir.display())));
            }
            // Left by a process killed between create and unlink whose pid this one has (as in containers):
            // not this process's to remove while another may hold it, so the next name is tried.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1 << 20 => {}
            Err(e) => return Err(Error::io(format!("{} (spool directory)", path.display()), e)),
        }
    }
}
