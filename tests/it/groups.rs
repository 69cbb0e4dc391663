//! Coordinated checkpoints: parts committed by several processes, visible as one restore point only when all
//! are in.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{assert_same_tree, bin, listed, p, pseudo_random, run, succeeded, text};

/// Rank `i`'s state: its own 1 MiB and a 2 MiB file every rank shares.
fn rank_dir(root: &Path, i: u64) -> PathBuf {
    let d = root.join(format!("rank{i}"));
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("own.bin"), pseudo_random(1 << 20, 100 + 2 * i)).unwrap();
    fs::write(d.join("shared.bin"), pseudo_random(2 << 20, 7)).unwrap();
    d
}

fn groups(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&succeeded(&run(repo, &["--json", "groups"]), "groups")).unwrap()
}

#[test]
fn parts_committed_at_once_with_one_killed_become_a_restore_point_only_when_retried() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    succeeded(&run(&repo, &["init"]), "init");
    let dirs: Vec<PathBuf> = (0..3).map(|i| rank_dir(t.path(), i)).collect();
    // Three ranks commit their parts at once; rank 1 dies after its first pack is durable.
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut cmd = Command::new(bin());
            cmd.args(["--repo", p(&repo), "--json", "commit", p(d), "--group", "step-100", "--part"]);
            cmd.arg(format!("{i}/3")).stdout(Stdio::piped()).stderr(Stdio::piped());
            if i == 1 {
                cmd.env("SNAPSTORE_FAULT", "pack-published:1");
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    assert_eq!(outs[1].status.signal(), Some(9), "{}", text(&outs[1].stderr));
    let mut ids = Vec::new();
    for i in [0, 2] {
        assert!(outs[i].status.success(), "part {i}: {}", text(&outs[i].stderr));
        let v: serde_json::Value = serde_json::from_slice(&outs[i].stdout).unwrap();
        // A part's commit says what any commit says, where any commit says it, and its group beside that.
        ids.push(v["id"].as_str().unwrap().to_string());
        assert_eq!(v["group"]["name"], "step-100", "{v}");
    }

    // Not a restore point: listed as incomplete, not checked out, its parts not offered one by one.
    let g = &groups(&repo)[0];
    assert_eq!(
        (g["name"].as_str(), g["complete_ns"].is_null(), g["members"].as_array().unwrap().len()),
        (Some("step-100"), true, 2)
    );
    let members: Vec<_> =
        g["members"].as_array().unwrap().iter().map(|m| (m["part"].as_u64().unwrap(), m["id"].clone())).collect();
    assert_eq!(members, [(0, ids[0].as_str().into()), (2, ids[1].as_str().into())], "{g}");
    let dest = t.path().join("restored");
    let o = run(&repo, &["checkout", "step-100", p(&dest)]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("incomplete: 2 of 3 parts"), "{}", text(&o.stderr));
    assert!(listed(&repo).is_empty());
    for id in &ids {
        assert_eq!(run(&repo, &["checkout", id, p(&t.path().join("one"))]).status.code(), Some(4));
    }
    assert!(text(&run(&repo, &["log"]).stdout).contains("INCOMPLETE: 2 of 3 parts in"));

    // The retry completes it; the shared file is not stored again.
    let o = run(&repo, &["--json", "commit", p(&dirs[1]), "--group", "step-100", "--part", "1/3"]);
    let v: serde_json::Value = serde_json::from_str(&succeeded(&o, "retried part")).unwrap();
    assert!(v["group"]["complete_ns"].is_i64(), "{v}");
    // Its own 1 MiB is new; of the 2 MiB shared file at most the chunks cut across its edges.
    assert!(v["bytes_new"].as_u64().unwrap() < (1 << 20) + (256 << 10), "the shared file was stored again: {v}");
    let o = run(&repo, &["--json", "checkout", "step-100", p(&dest)]);
    let v: serde_json::Value = serde_json::from_str(&succeeded(&o, "checkout of the complete group")).unwrap();
    for (i, d) in dirs.iter().enumerate() {
        let to = dest.join(format!("part-{i}"));
        assert_same_tree(d, &to, true);
        let part = &v["parts"][i];
        assert_eq!((part["part"].as_u64(), part["dest"].as_str()), (Some(i as u64), Some(p(&to))), "{v}");
        assert!(part["files"].as_u64().unwrap() > 0, "{v}");
    }
    assert!(text(&run(&repo, &["log"]).stdout).contains("group step-100"));
    succeeded(&run(&repo, &["-q", "verify", "--read-data"]), "verify");

    // A complete group takes no more parts, and its parts are forgotten only together.
    let o = run(&repo, &["commit", p(&dirs[0]), "--group", "step-100", "--part", "0/3"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(run(&repo, &["forget", &ids[0]]).status.code(), Some(2));
    // Forgetting a group says in JSON what forgetting by id or by policy says: the checkpoints that go.
    let o = run(&repo, &["--json", "forget", "--group", "step-100", "--dry-run"]);
    let v: serde_json::Value = serde_json::from_str(&succeeded(&o, "forget --group --dry-run")).unwrap();
    assert_eq!((v["keep"].as_array().map(Vec::len), v["forget"].as_array().map(Vec::len)), (Some(0), Some(3)), "{v}");
    assert!(
        v["forget"].as_array().unwrap().iter().all(|d| d["time"].is_string() && d["reasons"] == serde_json::json!([]))
    );
    assert_eq!(v["forget_groups"][0]["name"], "step-100", "{v}");
    succeeded(&run(&repo, &["forget", "--group", "step-100"]), "forget the group");
    assert!(groups(&repo).as_array().unwrap().is_empty());
}

/// A group past its timeout is not dropped by a gc that runs while a commit does: that commit may be of the
/// group's late part, which then completes it. (Before, the gc dropped the group and its first part, and the
/// late part's commit started a group of that name afresh, which could never be complete, and exited 0.)
#[test]
fn gc_keeps_a_stale_group_while_a_commit_runs() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let dirs: Vec<PathBuf> = (0..2).map(|i| rank_dir(t.path(), i)).collect();
    succeeded(&run(&repo, &["-q", "commit", p(&dirs[0]), "--group", "late", "--part", "0/2"]), "part 0");
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The last part's commit, large enough for a catalog batch before its last, stopped there: its session
    // alive, its checkpoint not yet recorded.
    fs::write(dirs[1].join("large.bin"), pseudo_random(40 << 20, 11)).unwrap();
    let mut commit = Command::new(bin());
    commit.args(["--repo", p(&repo), "-q", "commit", p(&dirs[1]), "--group", "late", "--part", "1/2"]);
    let child = crate::util::spawn_stopped_at(commit, "catalog-batch");
    let gc = succeeded(&run(&repo, &["--json", "gc", "--incomplete-after", "10ms"]), "gc while the part commits");
    let gc: serde_json::Value = serde_json::from_str(&gc).unwrap();
    assert_eq!(gc["groups_dropped"], 0, "{gc}");
    crate::util::resume(&child);
    succeeded(&child.wait_with_output().unwrap(), "the last part's commit");
    let g = &groups(&repo)[0];
    assert!(g["name"] == "late" && g["complete"].is_string() && g["members"].as_array().unwrap().len() == 2, "{g}");
    let dest = t.path().join("restored");
    succeeded(&run(&repo, &["checkout", "late", p(&dest)]), "checkout");
    for (i, d) in dirs.iter().enumerate() {
        assert_same_tree(d, &dest.join(format!("part-{i}")), true);
    }
    // With no commit running, a stale group goes as before.
    succeeded(&run(&repo, &["-q", "commit", p(&dirs[0]), "--group", "never", "--part", "0/2"]), "part");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let gc = succeeded(&run(&repo, &["--json", "gc", "--incomplete-after", "10ms"]), "gc");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&gc).unwrap()["groups_dropped"], 1);
}

#[test]
fn gc_drops_a_group_left_incomplete_after_its_timeout_and_keeps_shared_chunks() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let dirs: Vec<PathBuf> = (0..2).map(|i| rank_dir(t.path(), i)).collect();
    // "old" never gets its second part; "new" is complete. Both hold the shared file.
    succeeded(&run(&repo, &["-q", "commit", p(&dirs[0]), "--group", "old", "--part", "0/2"]), "part");
    for (i, d) in dirs.iter().enumerate() {
        succeeded(&run(&repo, &["-q", "commit", p(d), "--group", "new", "--part", &format!("{i}/2")]), "part");
    }
    let gc = |after: &str| -> serde_json::Value {
        serde_json::from_str(&succeeded(&run(&repo, &["--json", "gc", "--incomplete-after", after]), "gc")).unwrap()
    };
    assert_eq!(gc("1h")["groups_dropped"], 0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let g = gc("10ms");
    assert_eq!(g["groups_dropped"], 1, "{g}");
    let names: Vec<String> =
        groups(&repo).as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec!["new".to_string()]);
    succeeded(&run(&repo, &["-q", "verify", "--read-data"]), "verify");
    let dest = t.path().join("restored");
    succeeded(&run(&repo, &["checkout", "new", p(&dest)]), "checkout");
    for (i, d) in dirs.iter().enumerate() {
        assert_same_tree(d, &dest.join(format!("part-{i}")), true);
    }
}
