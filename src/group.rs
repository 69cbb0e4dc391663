//! Coordinated checkpoints: one checkpoint of a system of several processes (the ranks of a training job,
//! the shards of a service), made of one part per process.
//!
//! Each part is an ordinary commit that names its group and its place in it (`--group NAME --part I/N`). The
//! transaction that publishes a part also records it in `group_parts`, and the one that records the N-th part
//! marks the group complete: the group becomes a restore point atomically, when and only when every part is in.
//! Until then its parts are not offered as restore points at all (`log`, `latest`, id prefixes and retention
//! skip them). A part committed again (a retry after a crash) replaces the earlier one. GC drops the parts of a
//! group left incomplete for longer than [`crate::GcOptions::incomplete_after`]; their chunks stay if anything
//! else uses them.
//!
//! A group is keyed by its name and part count together ([`GroupPart::key`]). One machine refuses a part whose
//! count disagrees with its group's, but two machines of a bucket can each commit one before seeing the
//! other's; each such part must stay a checkpoint (a replica that left it out would collect its data) and a
//! part (forgotten alone on one replica, it would leave its writer's group incomplete everywhere). Keyed by
//! count too, every replica sorts every part into the same group whatever order it learns of them in, so
//! the two groups complete, are dropped as stale and are forgotten alike everywhere. Users name a group by
//! its name alone ([`group`] picks among the rare namesakes).

use rusqlite::{OptionalExtension, Transaction, params};

use crate::catalog::Catalog;
use crate::{Checkpoint, Error, Result};

/// Which part of which group a commit is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPart {
    /// The group's name, unique in the repository (e.g. `train-step-5000`).
    pub name: String,
    /// This part's index, from 0.
    pub part: u32,
    /// How many parts the group has.
    pub parts: u32,
}

/// Separates a group's name from its part count in its key. `parse` refuses control characters in names, so
/// the first one in a key ends the name.
const KEY_SEP: char = '\u{1}';

/// The name of the group with this key (`groups.name`, `group_parts.grp`).
pub(crate) fn name_of(key: &str) -> &str {
    key.split(KEY_SEP).next().unwrap_or(key)
}

/// SQL: the keys of the groups named `?1`.
const NAMED: &str = "name >= ?1 || char(1) AND name < ?1 || char(2)";

impl GroupPart {
    /// The key of the group this part belongs to: its name and part count.
    pub(crate) fn key(&self) -> String {
        format!("{}{KEY_SEP}{}", self.name, self.parts)
    }

    /// Parses `I/N` (0 ≤ I < N) for group `name`. A name must not read as a checkpoint id (`latest`, or 4 or
    /// more hex digits, either with `~N` after it), since `checkout` takes either.
    pub fn parse(name: &str, spec: &str) -> Result<GroupPart> {
        let bad = || Error::InvalidInput(format!("invalid part '{spec}': give I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let (part, parts): (u32, u32) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if part >= parts {
            return Err(bad());
        }
        // `ID~N` too, with `~` alone or digits after it.
        let base = crate::catalog::split_back(name).map_or(name, |(b, _)| b);
        let like_an_id = base == "latest" || (base.len() >= 4 && base.bytes().all(|b| b.is_ascii_hexdigit()));
        if name.is_empty() || name.chars().any(char::is_control) || like_an_id {
            return Err(Error::InvalidInput(format!(
                "invalid group name {name:?}: give a name that cannot be read as a checkpoint id, e.g. step-100"
            )));
        }
        Ok(GroupPart { name: name.to_string(), part, parts })
    }
}

/// A group and the parts it has so far.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// Its key in the catalog (name and part count).
    #[serde(skip)]
    pub(crate) key: String,
    /// How many parts it has when complete.
    pub parts: u32,
    /// The commit time of its earliest part (of all ever recorded, replaced ones included), in ns since the
    /// Unix epoch: the same on every machine that applied the same parts, whenever it synced. In JSON also as
    /// `created`, in RFC 3339.
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::created_ns")]
    pub created_ns: i64,
    /// Once every part is in, the latest commit time of its parts: the same on every machine, whatever order
    /// it learned of them in. In JSON also as `complete`, in RFC 3339 (both null while parts are missing).
    #[serde(flatten, serialize_with = "crate::checkpoint::json_time::complete_ns")]
    pub complete_ns: Option<i64>,
    /// The parts in, by index. In JSON each is its checkpoint with the part's index as `part`.
    #[serde(serialize_with = "members_json")]
    pub members: Vec<(u32, Checkpoint)>,
}

/// A group's parts as JSON objects rather than `[index, checkpoint]` pairs, which a script would have to
/// index by position.
fn members_json<S: serde::Serializer>(members: &[(u32, Checkpoint)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(serde::Serialize)]
    struct Member<'a> {
        part: u32,
        #[serde(flatten)]
        checkpoint: &'a Checkpoint,
    }
    s.collect_seq(members.iter().map(|(part, checkpoint)| Member { part: *part, checkpoint }))
}

impl Group {
    /// Whether every part is in. A group completed once can lose a part since (another machine forgot it
    /// by id); it is then incomplete, rather than restored without that part.
    pub fn is_complete(&self) -> bool {
        self.complete_ns.is_some() && self.members.len() == self.parts as usize
    }
}

/// A condition on a `checkpoints` row (its id column `id`): not a part of a group that is still incomplete.
pub(crate) const NOT_PENDING: &str =
    "id NOT IN (SELECT p.checkpoint FROM group_parts p JOIN groups g ON g.name = p.grp WHERE g.complete_ns IS NULL)";

/// A condition on a `checkpoints` row: not a part of any group.
pub(crate) const UNGROUPED: &str = "id NOT IN (SELECT checkpoint FROM group_parts)";

/// Refuses a part that its group can no longer take, before any data is read.
pub(crate) fn check_part(catalog: &Catalog, part: &GroupPart) -> Result<()> {
    check_against(catalog.connection(), part)
}

/// Its own group (of its name and part count) refuses a part once complete. Without one, a group of its name
/// refuses it too: complete (name each group checkpoint after its step), or still incomplete with another
/// part count (a typo in `--part`, caught before it makes a second group of that name). A group of its own
/// that exists beside such a namesake (two machines of a bucket began one each) goes on taking its parts.
fn check_against(conn: &rusqlite::Connection, part: &GroupPart) -> Result<()> {
    let mismatch =
        |expected| Error::PartMismatch { name: part.name.clone(), part: part.part, parts: part.parts, expected };
    // The fields are public: a part built by hand is checked here, not only by `parse`.
    if part.part >= part.parts {
        return Err(mismatch(part.parts));
    }
    let namesakes: Vec<(u32, Option<i64>)> = conn
        .prepare(&format!("SELECT parts, complete_ns FROM groups WHERE {NAMED}"))?
        .query_map([&part.name], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    match namesakes.iter().find(|(parts, _)| *parts == part.parts) {
        Some((_, Some(_))) => Err(Error::GroupComplete(part.name.clone())),
        Some(_) => Ok(()),
        None if namesakes.iter().any(|(_, complete)| complete.is_some()) => {
            Err(Error::GroupComplete(part.name.clone()))
        }
        None => namesakes.first().map_or(Ok(()), |(parts, _)| Err(mismatch(*parts))),
    }
}

/// Records checkpoint `id` (committed at `time_ns`) as `part`, in the transaction that publishes it; marks the
/// group complete when this was its last missing part. Of two checkpoints for one part, the later `(time_ns,
/// id)` is kept and the other's rows deleted, whichever arrives first, so that replicas of a bucket that
/// apply them in different orders agree. A commit (not `applying` another replica's record) is refused
/// instead of recorded when the part it would replace is later, or its group cannot take it
/// ([`check_part`]).
pub(crate) fn record_part(
    tx: &Transaction<'_>,
    part: &GroupPart,
    id: &str,
    time_ns: i64,
    applying: bool,
) -> Result<()> {
    if !applying {
        check_against(tx, part)?;
    }
    let key = part.key();
    // Times are the parts' commit times, not this machine's clock at applying them: a machine that syncs late
    // or rebuilds its catalog must count `--incomplete-after` from the same instant as the others.
    tx.execute(
        "INSERT INTO groups (name, parts, created_ns) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET created_ns = min(created_ns, excluded.created_ns)",
        params![key, part.parts, time_ns],
    )?;
    let replaced: Option<(String, Option<i64>)> = tx
        .query_row(
            "SELECT g.checkpoint, c.time_ns FROM group_parts g LEFT JOIN checkpoints c ON c.id = g.checkpoint
             WHERE g.grp = ?1 AND g.part = ?2",
            params![key, part.part],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((old, old_time)) = replaced {
        if (old_time.unwrap_or(i64::MIN), old.as_str()) > (time_ns, id) {
            if !applying {
                return Err(Error::InvalidInput(format!(
                    "part {} of group '{}' was committed again meanwhile, later than this commit (by this clock); \
                     nothing was published",
                    part.part, part.name
                )));
            }
            crate::catalog::delete_checkpoint_rows(tx, id)?;
            return Ok(());
        }
        tx.execute("DELETE FROM group_parts WHERE grp = ?1 AND part = ?2", params![key, part.part])?;
        crate::catalog::delete_checkpoint_rows(tx, &old)?;
    }
    tx.execute("INSERT INTO group_parts (grp, part, checkpoint) VALUES (?1, ?2, ?3)", params![key, part.part, id])?;
    let have: u32 = tx.query_row("SELECT count(*) FROM group_parts WHERE grp = ?1", [&key], |r| r.get(0))?;
    if have == part.parts {
        // Its parts' latest commit time, not that of the part that happened to arrive last here: replicas
        // learn of parts in different orders, and `group` picks among namesakes by this time.
        tx.execute(
            "UPDATE groups SET complete_ns = coalesce((SELECT max(c.time_ns) FROM group_parts p
               JOIN checkpoints c ON c.id = p.checkpoint WHERE p.grp = ?1), ?2) WHERE name = ?1",
            params![key, time_ns],
        )?;
    }
    Ok(())
}

/// The checkpoints that are parts of the groups with these keys.
pub(crate) fn part_ids(tx: &Transaction<'_>, names: &[String]) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut stmt = tx.prepare("SELECT checkpoint FROM group_parts WHERE grp = ?1")?;
    for name in names {
        for id in stmt.query_map([name], |r| r.get(0))? {
            ids.push(id?);
        }
    }
    Ok(ids)
}

/// Forgets checkpoints that may be group parts (applying another replica's forget, which names them), and
/// the groups named: each group they leave with no part goes. One left short of a part (a part of a complete
/// group forgotten alone, which only a build from before groups were keyed by count could do) is incomplete
/// again, so that nothing restores it without that part and a commit of the part can complete it again.
pub(crate) fn forget_parts(tx: &Transaction<'_>, ids: &[String], groups: &[String]) -> Result<()> {
    let mut touched: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for id in ids {
        let key: Option<String> =
            tx.query_row("SELECT grp FROM group_parts WHERE checkpoint = ?1", [id], |r| r.get(0)).optional()?;
        touched.extend(key);
        crate::catalog::delete_checkpoint_rows(tx, id)?;
        tx.execute("DELETE FROM group_parts WHERE checkpoint = ?1", [id])?;
    }
    for name in groups {
        touched.insert(name.clone());
        // A record written before groups were keyed by count names a group by its name alone.
        touched.extend(keys_named(tx, name)?);
    }
    for key in &touched {
        tx.execute(
            "DELETE FROM groups WHERE name = ?1 AND NOT EXISTS (SELECT 1 FROM group_parts WHERE grp = ?1)",
            [key],
        )?;
        tx.execute(
            "UPDATE groups SET complete_ns = NULL WHERE name = ?1 AND parts > (SELECT count(*) FROM group_parts WHERE grp = ?1)",
            [key],
        )?;
    }
    Ok(())
}

/// The keys of the groups named `name`: the complete ones first, the last completed first, then the newest.
fn keys_named(conn: &rusqlite::Connection, name: &str) -> Result<Vec<String>> {
    Ok(conn
        .prepare(&format!(
            "SELECT name FROM groups WHERE {NAMED} ORDER BY complete_ns IS NULL, complete_ns DESC, created_ns DESC, name"
        ))?
        .query_map([name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

/// Every group, complete or not, newest first.
pub(crate) fn groups(catalog: &Catalog) -> Result<Vec<Group>> {
    let keys: Vec<String> = catalog
        .connection()
        .prepare("SELECT name FROM groups ORDER BY created_ns DESC, name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    keys.iter().map(|k| group_by_key(catalog, k)).collect()
}

/// The group named `name`. Two machines of a bucket may each have made one of that name with another part
/// count; of those, every machine picks the same: a complete one before an incomplete one, the last
/// completed, else the newest.
pub(crate) fn group(catalog: &Catalog, name: &str) -> Result<Group> {
    let key = keys_named(catalog.connection(), name)?.into_iter().next();
    group_by_key(catalog, &key.ok_or_else(|| Error::GroupNotFound(name.to_string()))?)
}

/// Every group named `name` (at least one), in [`group`]'s order.
pub(crate) fn groups_named(catalog: &Catalog, name: &str) -> Result<Vec<Group>> {
    let keys = keys_named(catalog.connection(), name)?;
    if keys.is_empty() {
        return Err(Error::GroupNotFound(name.to_string()));
    }
    keys.iter().map(|k| group_by_key(catalog, k)).collect()
}

pub(crate) fn group_by_key(catalog: &Catalog, key: &str) -> Result<Group> {
    let (parts, created_ns, complete_ns) = catalog
        .connection()
        .query_row("SELECT parts, created_ns, complete_ns FROM groups WHERE name = ?1", [key], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?
        .ok_or_else(|| Error::GroupNotFound(name_of(key).to_string()))?;
    let ids: Vec<(u32, String)> = catalog
        .connection()
        .prepare("SELECT part, checkpoint FROM group_parts WHERE grp = ?1 ORDER BY part")?
        .query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let members = ids.into_iter().map(|(i, id)| Ok((i, catalog.checkpoint_by_id(&id)?))).collect::<Result<_>>()?;
    Ok(Group { name: name_of(key).to_string(), key: key.to_string(), parts, created_ns, complete_ns, members })
}

/// Deletes the groups with these keys and their parts' checkpoint rows, in one transaction; their data is
/// GC's.
pub(crate) fn delete_groups(tx: &Transaction<'_>, names: &[String]) -> Result<()> {
    for name in names {
        let ids: Vec<String> = tx
            .prepare("SELECT checkpoint FROM group_parts WHERE grp = ?1")?
            .query_map([name], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        for id in &ids {
            crate::catalog::delete_checkpoint_rows(tx, id)?;
        }
        tx.execute("DELETE FROM group_parts WHERE grp = ?1", [name])?;
        tx.execute("DELETE FROM groups WHERE name = ?1", [name])?;
    }
    Ok(())
}

/// Keys of the groups still incomplete whose first part is older than `older_than_ns`.
pub(crate) fn stale(tx: &Transaction<'_>, older_than_ns: i64) -> Result<Vec<String>> {
    Ok(tx
        .prepare("SELECT name FROM groups WHERE complete_ns IS NULL AND created_ns < ?1")?
        .query_map([older_than_ns], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part count that disagrees with its name's group is a typo, refused; but where another machine's
    /// record already made a group of this part's own count, that group goes on taking its parts.
    #[test]
    fn a_group_of_the_parts_own_count_takes_it_beside_a_namesake() {
        let dir = tempfile::tempdir().unwrap();
        let mut cat = Catalog::create(&dir.path().join("c.db"), &crate::params::RepoParams::default()).unwrap();
        let tx = cat.connection_mut().transaction().unwrap();
        let part = |spec: &str| GroupPart::parse("g", spec).unwrap();
        record_part(&tx, &part("0/2"), "a", 1, false).unwrap();
        assert!(matches!(record_part(&tx, &part("1/3"), "b", 2, false), Err(Error::PartMismatch { expected: 2, .. })));
        record_part(&tx, &part("1/3"), "b", 2, true).unwrap();
        check_against(&tx, &part("2/3")).unwrap();
        record_part(&tx, &part("1/2"), "c", 3, false).unwrap();
        assert!(matches!(check_against(&tx, &part("0/4")), Err(Error::GroupComplete(_))));
        assert!(matches!(check_against(&tx, &part("0/2")), Err(Error::GroupComplete(_))));
        check_against(&tx, &part("2/3")).unwrap();
    }

    /// A group's completion time is its parts' latest commit time, whichever part a replica learned of last:
    /// `group` picks among namesakes by it, the same on every replica.
    #[test]
    fn completion_time_does_not_depend_on_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for (n, order) in [[(0, "a", 20), (1, "b", 10)], [(1, "b", 10), (0, "a", 20)]].iter().enumerate() {
            let path = dir.path().join(format!("c{n}.db"));
            let mut cat = Catalog::create(&path, &crate::params::RepoParams::default()).unwrap();
            let tx = cat.connection_mut().transaction().unwrap();
            for (i, id, t) in order {
                tx.execute(
                    "INSERT INTO checkpoints (id, time_ns, message, host, path, root, files, dirs, symlinks,
                         logical_bytes, new_bytes, stored_bytes, skipped) VALUES (?1, ?2, '', 'h', 'p', x'00', 0, 0, 0, 0, 0, 0, 0)",
                    params![*id, *t],
                )
                .unwrap();
                record_part(&tx, &GroupPart::parse("g", &format!("{i}/2")).unwrap(), id, *t, true).unwrap();
            }
            tx.commit().unwrap();
            let complete: Option<i64> =
                cat.connection().query_row("SELECT complete_ns FROM groups", [], |r| r.get(0)).unwrap();
            seen.push(complete);
        }
        assert_eq!(seen, [Some(20), Some(20)]);
    }

    #[test]
    fn parts_parse_as_index_over_count() {
        assert_eq!(GroupPart::parse("g", "0/3").unwrap(), GroupPart { name: "g".into(), part: 0, parts: 3 });
        assert_eq!(GroupPart::parse("g", "2/3").unwrap().part, 2);
        for bad in ["3/3", "1", "a/2", "1/0", "-1/2", ""] {
            assert!(GroupPart::parse("g", bad).is_err(), "{bad}");
        }
        assert!(GroupPart::parse("", "0/1").is_err());
        for like_an_id in ["latest", "cafe", "0123abcd", "latest~", "latest~2", "cafe~10"] {
            assert!(GroupPart::parse(like_an_id, "0/1").is_err(), "{like_an_id}");
        }
        for name in ["cab", "cab~1", "step~x", "latest~1a"] {
            assert!(GroupPart::parse(name, "0/1").is_ok(), "{name}");
        }
        let by_hand = GroupPart { name: "g".into(), part: 7, parts: 2 };
        let empty = rusqlite::Connection::open_in_memory().unwrap();
        assert!(matches!(check_against(&empty, &by_hand), Err(Error::PartMismatch { .. })));
        assert!(GroupPart::parse("a\nb", "0/1").is_err());
    }
}
