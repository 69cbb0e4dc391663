//! Automatic checkpoints: `snapstore watch` and `Repository::watch`.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use snapstore::{CommitOptions, Repository};

use crate::util::{assert_same_tree, bin, listed, p, pseudo_random, run, spawn, succeeded, text};

fn sigterm(pid: u32) {
    succeeded(&Command::new("kill").args(["-TERM", &pid.to_string()]).output().unwrap(), "kill -TERM");
}

/// A commit that finds nothing changed makes no checkpoint and leaves no session behind; a changed mtime is a
/// change.
#[test]
fn an_unchanged_commit_can_make_no_checkpoint() {
    let t = tempfile::tempdir().unwrap();
    let repo = Repository::init(t.path().join("repo")).unwrap();
    let run_dir = t.path().join("run");
    fs::create_dir(&run_dir).unwrap();
    fs::write(run_dir.join("state"), pseudo_random(300_000, 5)).unwrap();
    let opts = CommitOptions { skip_unchanged: true, ..Default::default() };
    let first = repo.commit(&run_dir, &opts).unwrap();
    assert!(!first.unchanged);
    let again = repo.commit(&run_dir, &opts).unwrap();
    assert!(again.unchanged && again.id == first.id && again.bytes_read == 0, "{again:?}");
    assert_eq!(repo.checkpoints().unwrap().len(), 1);
    let sessions: i64 =
        repo.catalog().unwrap().connection().query_row("SELECT count(*) FROM sessions", [], |r| r.get(0)).unwrap();
    assert_eq!(sessions, 0, "an unchanged commit left its session");
    let f = fs::File::options().write(true).open(run_dir.join("state")).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
    let touched = repo.commit(&run_dir, &opts).unwrap();
    assert!(!touched.unchanged && touched.id != first.id);
    // Without the option every commit is a checkpoint, as before.
    assert!(!repo.commit(&run_dir, &Default::default()).unwrap().unchanged);
    assert_eq!(repo.checkpoints().unwrap().len(), 3);
}

/// The watch commits each change once, logs one JSON line per event, applies --keep-last after each
/// checkpoint, and ends cleanly on SIGTERM with exit 0.
#[test]
fn watch_commits_each_change_once_applies_retention_and_stops_on_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let dir = t.path().join("run");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("state"), pseudo_random(200_000, 1)).unwrap();
    let child = Command::new(bin())
        .args(["--repo", p(&repo), "--json", "watch", p(&dir), "--every", "150ms", "--keep-last", "2"])
        .args(["--gc-every", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Three changes, each given several intervals to be seen in. Each is one rename, as a careful writer
    // does: written in place, a poll could land between the truncate and the write (or between two files)
    // and rightly commit that state too.
    for step in 2..=4u64 {
        std::thread::sleep(Duration::from_millis(700));
        let staged = t.path().join("staged");
        fs::write(&staged, pseudo_random(200_000, step)).unwrap();
        fs::rename(&staged, dir.join("state")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(700));
    sigterm(child.id());
    let o = child.wait_with_output().unwrap();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{err}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kind = |e: &serde_json::Value| e["event"].as_str().unwrap().to_string();
    assert!(events.iter().all(|e| kind(e) != "error"), "{out}");
    let made: Vec<String> = events
        .iter()
        .filter(|e| kind(e) == "checkpoint")
        .map(|e| e["commit"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(made.len(), 4, "one checkpoint per state, no more: {out}");
    assert!(events.iter().filter(|e| kind(e) == "unchanged").count() >= 4, "{out}");
    assert!(events.iter().any(|e| kind(e) == "gc"), "{out}");
    let forgotten: Vec<String> = events
        .iter()
        .flat_map(|e| e["forgotten"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(forgotten, made[..2].to_vec(), "--keep-last 2 forgets the oldest, one after each new checkpoint");
    assert_eq!(listed(&repo), vec![made[3].clone(), made[2].clone()]);
    let dest = t.path().join("out");
    succeeded(&run(&repo, &["-q", "checkout", &made[3], p(&dest)]), "checkout");
    assert_same_tree(&dir, &dest, true);
}

/// SIGTERM while a commit is under way lets it finish: the checkpoint is whole, the exit clean. A second
/// signal ends the process at once, and the repository is still sound.
#[test]
fn a_signal_during_a_commit_lets_it_finish_and_a_second_ends_it_at_once() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let dir = t.path().join("run");
    fs::create_dir(&dir).unwrap();
    // 256 MiB, so that the commit outlasts both signals: 128 MiB took 0.13 s here (AMD EPYC), and the second
    // signal, 0.12 s after the start, sometimes came after the commit had ended.
    for k in 0..4 {
        fs::write(dir.join(format!("part{k}")), pseudo_random(64 << 20, 10 + k)).unwrap();
    }
    let delay = Duration::from_millis(100);
    let watch = |repo: &Path| {
        Command::new(bin())
            .args(["--repo", p(repo), "--json", "watch", p(&dir), "--every", "1h"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Signalled only once it has made its repository, so that a slow start under a loaded machine is not
    // mistaken for a watch that ignored the signal.
    let started = |repo: &Path| {
        let since = std::time::Instant::now();
        while !repo.join("catalog.db").exists() {
            assert!(since.elapsed() < Duration::from_secs(30), "the watch never made its repository");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay);
    };
    let child = watch(&repo);
    started(&repo);
    sigterm(child.id());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let events: Vec<serde_json::Value> = text(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let id = events[0]["commit"]["id"].as_str().unwrap();
    // The commit began after the process started, so one that outlasted the delay was running at the signal.
    let took = events[0]["commit"]["seconds"].as_f64().unwrap();
    assert!(took > delay.as_secs_f64(), "the commit ({took} s) ended before the signal: nothing was shown");
    assert_eq!(listed(&repo), vec![id.to_string()]);
    let dest = t.path().join("out");
    succeeded(&run(&repo, &["-q", "checkout", id, p(&dest)]), "checkout");
    assert_same_tree(&dir, &dest, true);

    // Two signals: the second ends it mid-commit with 130, leaving no checkpoint and nothing to repair.
    let second = t.path().join("repo2");
    let child = watch(&second);
    started(&second);
    sigterm(child.id());
    std::thread::sleep(Duration::from_millis(20));
    sigterm(child.id());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{:?}: {}", o.status, text(&o.stderr));
    assert!(listed(&second).is_empty(), "the commit cut short published a checkpoint");
    if second.join("catalog.db").exists() {
        succeeded(&run(&second, &["-q", "verify", "--read-data"]), "verify after a second signal");
        succeeded(&run(&second, &["-q", "commit", p(&dir)]), "commit after a second signal");
    }
}

/// A watch whose repository disappears (moved, deleted, unmounted) stops with exit 4 instead of retrying for
/// ever, and makes nothing where the repository was; one given a policy that keeps only tags its own
/// commits lack is refused before it starts.
#[test]
fn a_watch_stops_when_its_repository_goes_and_refuses_a_policy_it_cannot_keep() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let dir = t.path().join("run");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("state"), b"one").unwrap();
    succeeded(&run(&repo, &["commit", p(&dir)]), "first commit");

    let o = run(&repo, &["watch", p(&dir), "--every", "100ms", "--keep-tag", "release"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("keeps only checkpoints tagged release"), "{}", text(&o.stderr));

    let mut child = spawn(&repo, &["watch", p(&dir), "--every", "100ms"]);
    std::thread::sleep(Duration::from_millis(400));
    fs::rename(&repo, t.path().join("moved")).unwrap();
    fs::write(dir.join("state"), b"two").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the watch kept running without its repository");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        !repo.exists(),
        "the watch made {} again: {:?}",
        repo.display(),
        fs::read_dir(&repo).ok().map(|d| d.count())
    );
    assert_eq!(listed(&t.path().join("moved")).len(), 1);
}
