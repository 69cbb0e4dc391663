//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

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
