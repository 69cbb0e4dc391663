//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The built `snapstore` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snapstore"))
}

/// Runs the binary with `args` against repository `repo`, returning its output.
pub fn run(repo: &Path, args: &[&str]) -> Output {
    Command::new(bin()).arg("--repo").arg(repo).args(args).output().expect("run snapstore")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A temporary directory on tmpfs where there is one: creating many small files on this machine's ext4 costs
/// milliseconds each, which made tree-heavy tests slow.
pub fn fast_tempdir(prefix: &str) -> tempfile::TempDir {
    let b = tempfile::Builder::new().prefix(prefix).to_owned();
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(t) = b.tempdir_in(shm)
    {
        return t;
    }
    b.tempdir().expect("temp dir")
}

/// Output bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts a CLI run succeeded without a panic or backtrace; returns its stdout.
pub fn succeeded(o: &Output, what: &str) -> String {
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(!out.contains("panicked") && !err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: {err}");
    assert!(o.status.success(), "{what}: {:?}\nstdout:\n{out}\nstderr:\n{err}", o.status);
    out
}

/// Starts the binary against `repo` with piped output and no stdin, for tests that kill or race it.
pub fn spawn(repo: &Path, args: &[&str]) -> Child {
    Command::new(bin())
        .arg("--repo")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn snapstore")
}

/// Ids listed by `log -q`, newest first.
pub fn listed(repo: &Path) -> Vec<String> {
    succeeded(&run(repo, &["-q", "log"]), "log -q").lines().map(str::to_string).collect()
}

/// Compares two trees: same names, kinds, file bytes, symlink targets and file permission bits; file mtimes
/// too when `mtimes`.
pub fn assert_same_tree(expected: &Path, actual: &Path, mtimes: bool) {
    let em = fs::symlink_metadata(expected).unwrap_or_else(|e| panic!("{}: {e}", expected.display()));
    let am = fs::symlink_metadata(actual).unwrap_or_else(|e| panic!("{} missing: {e}", actual.display()));
    assert_eq!(em.file_type(), am.file_type(), "kind differs at {}", actual.display());
    if em.is_symlink() {
        assert_eq!(fs::read_link(expected).unwrap(), fs::read_link(actual).unwrap(), "{}", actual.display());
    } else if em.is_file() {
        let (e, a) = (fs::read(expected).unwrap(), fs::read(actual).unwrap());
        assert!(e == a, "{}: content differs ({} vs {} bytes)", actual.display(), e.len(), a.len());
        assert_eq!(em.permissions().mode() & 0o7777, am.permissions().mode() & 0o7777, "{}", actual.display());
        if mtimes {
            assert_eq!(
                (em.mtime(), em.mtime_nsec()),
                (am.mtime(), am.mtime_nsec()),
                "mtime differs at {}",
                actual.display()
            );
        }
    } else {
        let names = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
            v.sort();
            v
        };
        let (en, an) = (names(expected), names(actual));
        assert_eq!(en, an, "directory listing differs at {}", actual.display());
        for n in en {
            assert_same_tree(&expected.join(&n), &actual.join(&n), mtimes);
        }
    }
}

/// Deterministic generator for delays, seeds, sizes and choices (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }
}

/// The chunks the repository's chunker cuts `data` into.
pub fn chunk_ids(repo: &snapstore::Repository, data: &[u8]) -> Vec<snapstore::ObjectId> {
    let mut chunker = snapstore::Chunker::new(data, repo.params());
    let mut ids = Vec::new();
    while let Some(c) = chunker.next_chunk().unwrap() {
        ids.push(snapstore::ObjectId::of(c));
    }
    ids
}

type Hook = Box<dyn Fn(&str) + Send + Sync>;

/// A repository's own chunk store with hooks called before each read and each removal, for tests that count
/// reads or hold GC at a removal.
pub struct Hooked {
    pub inner: snapstore::LocalBackend,
    pub on_read: Hook,
    pub on_remove: Hook,
}

impl Hooked {
    pub fn new(repo: &Path) -> Self {
        Hooked { inner: snapstore::LocalBackend::new(repo), on_read: Box::new(|_| {}), on_remove: Box::new(|_| {}) }
    }
}

impl snapstore::Backend for Hooked {
    fn create(&self) -> std::io::Result<Box<dyn snapstore::backend::ObjectWriter>> {
        self.inner.create()
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        (self.on_read)(name);
        self.inner.read_at(name, offset, buf)
    }
    fn size(&self, name: &str) -> std::io::Result<u64> {
        self.inner.size(name)
    }
    fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        (self.on_remove)(name);
        self.inner.remove(name)
    }
}

/// Commits three versions of a 3 MiB state stream (seeds `seed`, `seed + 1`, `seed + 2`), each sharing its first
/// MiB (seed `shared`) with the one before, so that GC has packs to rewrite, not only to delete; returns each
/// checkpoint with its bytes.
pub fn three_shared_versions(repo: &snapstore::Repository, seed: u64, shared: u64) -> Vec<(String, Vec<u8>)> {
    (0..3u64)
        .map(|v| {
            let mut state = pseudo_random(3 << 20, seed + v);
            state[..1 << 20].copy_from_slice(&pseudo_random(1 << 20, shared));
            (repo.commit_reader("state", &mut &state[..], &Default::default()).unwrap().id, state)
        })
        .collect()
}

/// Asserts that `verify --read-data` finds the repository clean and that each checkpoint holds its bytes at
/// `path` (`""` for a stream).
pub fn assert_whole(repo: &snapstore::Repository, held: &[(String, Vec<u8>)], path: &str, what: &str) {
    let opts = snapstore::VerifyOptions { read_data: snapstore::DataSubset::All, ..Default::default() };
    let report = repo.verify(&opts).unwrap();
    assert!(report.is_clean(), "{what}: {report:#?}");
    for (id, want) in held {
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut repo.open_file(id, path).unwrap(), &mut back).unwrap();
        assert!(&back == want, "{what}: checkpoint {id} changed");
    }
}

/// Copies a tree of directories and regular files (file permission bits included).
pub fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            fs::create_dir_all(&dest).unwrap();
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A temporary path as a command-line argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A number from the environment, for a test's long mode.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// Every tree entry in a catalog, with the id of the tree holding it (trees are stored encoded, one row each).
pub fn all_entries(conn: &rusqlite::Connection) -> Vec<(Vec<u8>, snapstore::Entry)> {
    tree_rows(conn)
        .into_iter()
        .flat_map(|(id, data)| snapstore::decode_tree(&data).unwrap().into_iter().map(move |e| (id.clone(), e)))
        .collect()
}

/// Rewrites trees in place, under their old ids (as damage would): `edit` changes a tree's entries and says
/// whether it did. Returns how many trees were rewritten.
pub fn edit_trees(
    conn: &rusqlite::Connection,
    mut edit: impl FnMut(&[u8], &mut Vec<snapstore::Entry>) -> bool,
) -> usize {
    let mut changed = 0;
    for (id, data) in tree_rows(conn) {
        let mut entries = snapstore::decode_tree(&data).unwrap();
        if edit(&id, &mut entries) {
            // Unsorted names are fine for the tests that rename: decoding refuses them, as damage.
            let data = snapstore::encode_tree(&entries);
            conn.execute("UPDATE trees SET data = ?1 WHERE id = ?2", (data, &id)).unwrap();
            changed += 1;
        }
    }
    changed
}

/// Rewrites trees as someone forging the catalog would: `edit` changes a tree's entries and says whether it
/// did; each changed tree, and every tree above it, is stored again under the id its new entries hash to, and
/// checkpoints point at their new roots. The tree ids then vouch for the forgery, so what stops it is the
/// checks on what the entries say. Returns how many trees `edit` changed.
pub fn forge_trees(
    conn: &rusqlite::Connection,
    mut edit: impl FnMut(&[u8], &mut Vec<snapstore::Entry>) -> bool,
) -> usize {
    use std::collections::HashMap;
    let mut trees: HashMap<Vec<u8>, Vec<snapstore::Entry>> =
        tree_rows(conn).into_iter().map(|(id, data)| (id, snapstore::decode_tree(&data).unwrap())).collect();
    let mut changed = 0;
    for (id, entries) in trees.iter_mut() {
        changed += usize::from(edit(id, entries));
    }
    fn rekey(
        id: &[u8],
        trees: &HashMap<Vec<u8>, Vec<snapstore::Entry>>,
        done: &mut HashMap<Vec<u8>, Vec<u8>>,
    ) -> Vec<u8> {
        if let Some(new) = done.get(id) {
            return new.clone();
        }
        let mut entries = trees[id].clone();
        for e in &mut entries {
            if e.kind == snapstore::EntryKind::Dir && trees.contains_key(&e.target) {
                e.target = rekey(&e.target.clone(), trees, done);
            }
        }
        let new = snapstore::tree_id(&entries).0.to_vec();
        done.insert(id.to_vec(), new.clone());
        new
    }
    let mut done = HashMap::new();
    let ids: Vec<Vec<u8>> = trees.keys().cloned().collect();
    for id in &ids {
        rekey(id, &trees, &mut done);
    }
    let roots = checkpoint_roots(conn);
    // Old rows out first: a forged tree may hash to what another tree's old id was.
    for id in ids.iter().filter(|id| done[*id] != **id) {
        conn.execute("DELETE FROM trees WHERE id = ?1", [id]).unwrap();
    }
    for id in &ids {
        let mut entries = trees[id].clone();
        for e in &mut entries {
            if let Some(new) = done.get(&e.target).filter(|_| e.kind == snapstore::EntryKind::Dir) {
                e.target = new.clone();
            }
        }
        let data = snapstore::encode_tree(&entries);
        conn.execute("INSERT OR REPLACE INTO trees (id, data) VALUES (?1, ?2)", (&done[id], data)).unwrap();
    }
    for (checkpoint, root) in roots {
        if let Some(new) = done.get(&root) {
            conn.execute("UPDATE checkpoints SET root = ?1 WHERE id = ?2", (new, &checkpoint)).unwrap();
        }
    }
    changed
}

/// Every checkpoint's id and root tree id.
pub fn checkpoint_roots(conn: &rusqlite::Connection) -> Vec<(String, Vec<u8>)> {
    let mut stmt = conn.prepare("SELECT id, root FROM checkpoints").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Every tree row: its id and encoded entries.
fn tree_rows(conn: &rusqlite::Connection) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut stmt = conn.prepare("SELECT id, data FROM trees").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Flips one byte in the middle of a pack's blob area (between the 16-byte header and the index, whose
/// offset the footer's first 8 bytes give).
pub fn corrupt_pack_blob(pack: &Path, fraction: f64) {
    let mut bytes = fs::read(pack).unwrap();
    let footer = bytes.len() - 40;
    let index_offset = u64::from_le_bytes(bytes[footer..footer + 8].try_into().unwrap()) as usize;
    assert!(index_offset > 16 && index_offset < footer, "unexpected pack layout");
    let at = 16 + ((index_offset - 16) as f64 * fraction) as usize;
    bytes[at] ^= 0x5a;
    // Packs are written owner-only and may be read-only: replace the file.
    fs::remove_file(pack).unwrap();
    fs::write(pack, bytes).unwrap();
}

/// How snapstore records process `pid` of this machine in a session or lock: (`BOOT/START`, pid namespace).
/// For a pid with no process, a start tick no process has, so that the holder reads as gone.
pub fn process_record(pid: u32) -> (String, String) {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let start = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19)).unwrap_or("0");
    let pidns = std::fs::read_link("/proc/self/ns/pid").unwrap().to_string_lossy().into_owned();
    (format!("{boot}/{start}"), pidns)
}

/// Hands everything below `dir` to uid and gid 4242 and returns how to run a program as that user
/// (`setpriv`); `None`, said, where that cannot be done (not root, or no `setpriv`).
pub fn hand_to_other_user(dir: &Path) -> Option<impl Fn(&str) -> std::process::Command> {
    let handed =
        std::process::Command::new("chown").args(["-R", "4242:4242", p(dir)]).status().is_ok_and(|s| s.success());
    let as_other = |program: &str| {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=4242", "--regid=4242", "--clear-groups", program]);
        c
    };
    if !handed || !as_other("true").status().is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot hand the files to another user (not root, or no setpriv); untested");
        return None;
    }
    Some(as_other)
}

/// Waits until process `pid` is stopped (a fault point's `stop`), at most 30 s; `what` names where it should
/// stop, for the failure.
/// Spawns `cmd` (snapstore, or a shell running it) with fault point `point` set to stop it there
/// (`SNAPSTORE_FAULT=POINT:1:stop`, see src/fault.rs), its output piped, and returns it once it has stopped;
/// [`resume`] lets it go on.
pub fn spawn_stopped_at(mut cmd: Command, point: &str) -> Child {
    let child = cmd
        .env("SNAPSTORE_FAULT", format!("{point}:1:stop"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_stopped(child.id(), point);
    child
}

/// Lets a process stopped at a fault point ([`spawn_stopped_at`]) go on.
pub fn resume(child: &Child) {
    assert!(Command::new("kill").args(["-CONT", &child.id().to_string()]).status().unwrap().success());
}

pub fn wait_until_stopped(pid: u32, what: &str) {
    let stat = format!("/proc/{pid}/stat");
    let start = std::time::Instant::now();
    while !fs::read_to_string(&stat).unwrap().rsplit(") ").next().unwrap().starts_with('T') {
        assert!(start.elapsed().as_secs() < 30, "the process never stopped at {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A connection to `repo`'s catalog that may change it, for tests that damage or forge rows
/// (`Repository::catalog` refuses writes).
pub fn catalog_rw(repo: &snapstore::Repository) -> snapstore::Result<snapstore::Catalog> {
    snapstore::Catalog::open(&repo.path().join(snapstore::CATALOG_FILE))
}
