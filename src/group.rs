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

/// Joins a group's name and a part count into the name under which a replica keeps parts whose count
/// disagrees with its group's ([`GroupPart::set_apart`]). `parse` refuses control characters in names, so no
/// group a user names can be one of these.
const SET_APART: char = '\u{1}';

impl GroupPart {
    /// This part as a replica keeps it when its group there has another part count (two writers gave one
    /// group name different counts at once): in a group of its own, named after both, that no command lists
    /// or drops as stale. It stays a checkpoint, as every replica must hold every checkpoint another writer
    /// was told it committed (else that replica's GC deletes its data), and a part, as a part must not be
    /// forgotten on its own: a forget is applied on every replica, where it may complete a group.
    pub(crate) fn set_apart(&self) -> GroupPart {
        GroupPart { name: format!("{}{SET_APART}{}", self.name, self.parts), ..self.clone() }
    }

    /// Parses `I/N` (0 ≤ I < N) for group `name`. A name must not read as a checkpoint id (`latest`, or 4 or
    /// more hex digits), since `checkout` takes either.
    pub fn parse(name: &str, spec: &str) -> Result<GroupPart> {
        let bad = || Error::InvalidInput(format!("invalid part '{spec}': give I/N with 0 <= I < N, e.g. 0/4"));
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let (part, parts): (u32, u32) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if part >= parts {
            return Err(bad());
        }
        let like_an_id = name == "latest" || (name.len() >= 4 && name.bytes().all(|b| b.is_ascii_hexdigit()));
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
    /// How many parts it has when complete.
    pub parts: u32,
    /// The commit time of its earliest part (of all ever recorded, replaced ones included), in ns since the
    /// Unix epoch: the same on every machine that applied the same parts, whenever it synced.
    pub created_ns: i64,
    /// The commit time of the part that completed it, if it is complete.
    pub complete_ns: Option<i64>,
    /// The parts in, by index.
    pub members: Vec<(u32, Checkpoint)>,
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
    let existing: Option<(u32, Option<i64>)> = catalog
        .connection()
        .query_row("SELECT parts, complete_ns FROM groups WHERE name = ?1", [&part.name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    check_against(part, existing)
}

fn check_against(part: &GroupPart, existing: Option<(u32, Option<i64>)>) -> Result<()> {
    let mismatch =
        |expected| Error::PartMismatch { name: part.name.clone(), part: part.part, parts: part.parts, expected };
    // The fields are public: a part built by hand is checked here, not only by `parse`.
    if part.part >= part.parts {
        return Err(mismatch(part.parts));
    }
    match existing {
        Some((_, Some(_))) => Err(Error::GroupComplete(part.name.clone())),
        Some((parts, None)) if parts != part.parts => Err(mismatch(parts)),
        _ => Ok(()),
    }
}

/// Whether a part another replica recorded can join its group here: only a part count that disagrees with
/// the group's cannot (that record's checkpoint is then set apart: [`GroupPart::set_apart`]).
pub(crate) fn part_fits(tx: &Transaction<'_>, part: &GroupPart) -> Result<bool> {
    let parts: Option<u32> =
        tx.query_row("SELECT parts FROM groups WHERE name = ?1", [&part.name], |r| r.get(0)).optional()?;
    Ok(part.part < part.parts && parts.is_none_or(|p| p == part.parts))
}

/// Records checkpoint `id` (committed at `time_ns`) as `part`, in the transaction that publishes it; marks the
/// group complete when this was its last missing part. Of two checkpoints for one part, the later `(time_ns,
/// id)` is kept and the other's rows deleted, whichever arrives first, so that replicas of a bucket that
/// apply them in different orders agree. A commit (not `applying` another replica's record) is refused
/// instead of recorded when the part it would replace is later, or its group is complete.
pub(crate) fn record_part(
    tx: &Transaction<'_>,
    part: &GroupPart,
    id: &str,
    time_ns: i64,
    applying: bool,
) -> Result<()> {
    let existing: Option<(u32, Option<i64>)> = tx
        .query_row("SELECT parts, complete_ns FROM groups WHERE name = ?1", [&part.name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    if !applying {
        check_against(part, existing)?;
    }
    // Times are the parts' commit times, not this machine's clock at applying them: a machine that syncs late
    // or rebuilds its catalog must count `--incomplete-after` from the same instant as the others.
    if existing.is_none() {
        tx.execute(
            "INSERT INTO groups (name, parts, created_ns) VALUES (?1, ?2, ?3)",
            params![part.name, part.parts, time_ns],
        )?;
    } else {
        tx.execute("UPDATE groups SET created_ns = min(created_ns, ?1) WHERE name = ?2", params![time_ns, part.name])?;
    }
    let replaced: Option<(String, Option<i64>)> = tx
        .query_row(
            "SELECT g.checkpoint, c.time_ns FROM group_parts g LEFT JOIN checkpoints c ON c.id = g.checkpoint
             WHERE g.grp = ?1 AND g.part = ?2",
            params![part.name, part.part],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((old, old_time)) = replaced {
        if (old_time.unwrap_or(i64::MIN), old.as_str()) > (time_ns, id) {
            if !applying {
                return Err(Error::InvalidInput(format!(
                    "part {} of group '{}' was committed again meanwhile, later than this commit (by this clock);                      nothing was published",
                    part.part, part.name
                )));
            }
            crate::catalog::delete_checkpoint_rows(tx, id)?;
            return Ok(());
        }
        tx.execute("DELETE FROM group_parts WHERE grp = ?1 AND part = ?2", params![part.name, part.part])?;
        crate::catalog::delete_checkpoint_rows(tx, &old)?;
    }
    tx.execute(
        "INSERT INTO group_parts (grp, part, checkpoint) VALUES (?1, ?2, ?3)",
        params![part.name, part.part, id],
    )?;
    let have: u32 = tx.query_row("SELECT count(*) FROM group_parts WHERE grp = ?1", [&part.name], |r| r.get(0))?;
    if have == part.parts {
        tx.execute(
            "UPDATE groups SET complete_ns = coalesce(complete_ns, ?1) WHERE name = ?2",
            params![time_ns, part.name],
        )?;
    }
    Ok(())
}

/// The checkpoints that are parts of the named groups.
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

/// Forgets checkpoints that may be group parts (applying another replica's forget, which names them): their
/// part rows go too, and a group left with no part.
pub(crate) fn forget_parts(tx: &Transaction<'_>, ids: &[String], groups: &[String]) -> Result<()> {
    for id in ids {
        crate::catalog::delete_checkpoint_rows(tx, id)?;
        tx.execute("DELETE FROM group_parts WHERE checkpoint = ?1", [id])?;
    }
    for name in groups {
        tx.execute(
            "DELETE FROM groups WHERE name = ?1 AND NOT EXISTS (SELECT 1 FROM group_parts WHERE grp = ?1)",
            [name],
        )?;
    }
    // Parts set apart here are forgotten by the forget of their own group, written on another replica under
    // its plain name.
    tx.execute(
        "DELETE FROM groups WHERE instr(name, char(1)) > 0 AND NOT EXISTS (SELECT 1 FROM group_parts WHERE grp = name)",
        [],
    )?;
    Ok(())
}

/// Every group, complete or not, newest first.
pub(crate) fn groups(catalog: &Catalog) -> Result<Vec<Group>> {
    let names: Vec<String> = catalog
        .connection()
        .prepare("SELECT name FROM groups WHERE instr(name, char(1)) = 0 ORDER BY created_ns DESC, name")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    names.iter().map(|n| group(catalog, n)).collect()
}

/// The group named `name`.
pub(crate) fn group(catalog: &Catalog, name: &str) -> Result<Group> {
    let (parts, created_ns, complete_ns) = catalog
        .connection()
        .query_row("SELECT parts, created_ns, complete_ns FROM groups WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?
        .ok_or_else(|| Error::GroupNotFound(name.to_string()))?;
    let ids: Vec<(u32, String)> = catalog
        .connection()
        .prepare("SELECT part, checkpoint FROM group_parts WHERE grp = ?1 ORDER BY part")?
        .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let members = ids.into_iter().map(|(i, id)| Ok((i, catalog.checkpoint_by_id(&id)?))).collect::<Result<_>>()?;
    Ok(Group { name: name.to_string(), parts, created_ns, complete_ns, members })
}

/// Deletes a group and its parts' checkpoint rows, in one transaction; their data is GC's.
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

/// Names of the groups still incomplete whose first part is older than `older_than_ns`.
pub(crate) fn stale(tx: &Transaction<'_>, older_than_ns: i64) -> Result<Vec<String>> {
    Ok(tx
        .prepare("SELECT name FROM groups WHERE complete_ns IS NULL AND created_ns < ?1 AND instr(name, char(1)) = 0")?
        .query_map([older_than_ns], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse_as_index_over_count() {
        assert_eq!(GroupPart::parse("g", "0/3").unwrap(), GroupPart { name: "g".into(), part: 0, parts: 3 });
        assert_eq!(GroupPart::parse("g", "2/3").unwrap().part, 2);
        for bad in ["3/3", "1", "a/2", "1/0", "-1/2", ""] {
            assert!(GroupPart::parse("g", bad).is_err(), "{bad}");
        }
        assert!(GroupPart::parse("", "0/1").is_err());
        for like_an_id in ["latest", "cafe", "0123abcd"] {
            assert!(GroupPart::parse(like_an_id, "0/1").is_err(), "{like_an_id}");
        }
        assert!(GroupPart::parse("cab", "0/1").is_ok());
        let by_hand = GroupPart { name: "g".into(), part: 7, parts: 2 };
        assert!(matches!(check_against(&by_hand, None), Err(Error::PartMismatch { .. })));
        assert!(GroupPart::parse("a\nb", "0/1").is_err());
    }
}
