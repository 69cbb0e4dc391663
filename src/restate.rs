//! Restating, in new records, the checkpoints that only this machine's copy of a bucket's catalog holds.
//!
//! A machine that applied a record the bucket has since lost keeps what the record added: a commit's
//! checkpoint, with its trees, contents, segments and chunk rows. Once it accepts the loss, no marker holds
//! other machines' GC back any more, and they take that checkpoint's packs for orphans and delete them,
//! although the checkpoint still restored here (round 24 review, F5). So the accept builds a copy of the
//! catalog from the bucket alone, compares it with this one and publishes again, as records that only add,
//! every checkpoint only this copy has, with what it reaches that the bucket's records do not hold. Records that
//! only add commute with every other, so it does not matter where they land among concurrent ones.
//!
//! The other way round, a checkpoint the bucket's records still hold that a lost record forgot here is
//! forgotten again, for every machine ([`forget_again`]).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::catalog::{Batch, Catalog, KIND_CHUNK, KIND_CONTENT, KIND_SEGMENT, KIND_TREE, NewCheckpoint};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::remote::Remote;

/// Chunk entries per record, as GC's records are bounded (its `RECORD_ITEMS`).
const ITEMS: usize = 50_000;

/// What [`restate`] did.
#[derive(Debug, Default)]
pub(crate) struct Restated {
    /// The checkpoints published again.
    pub written: Vec<String>,
    /// Checkpoints only this copy holds that it cannot restore either (a tree, content or chunk row it
    /// reaches is gone: a GC's record applied here dropped it after a forget that never reached this copy; or
    /// a chunk it reaches lies in a pack a GC deleted or, by its trace, deletes):
    /// not published, since no machine could restore them from what they would name.
    pub damaged: Vec<String>,
    /// Checkpoints a lost record forgot here that the bucket's records still hold, and this copy cannot
    /// restore any more: forgotten again, in a record of their own.
    pub forgotten: Vec<String>,
    /// Such checkpoints this copy can still restore whole: listed here again.
    pub relisted: Vec<String>,
}

/// Publishes again, from `catalog`, each checkpoint that a copy built from the bucket's records alone lacks,
/// but those that a record waiting here (`forgotten`: the checkpoints such records forget) removes: applied
/// in order once the copy is built again, it forgets them everywhere (round 26 review). `scratch` is a
/// directory for that copy, removed afterwards.
pub(crate) fn restate(
    remote: &Remote,
    catalog: &mut Catalog,
    scratch: &Path,
    forgotten: &std::collections::HashSet<String>,
) -> Result<Restated> {
    let path = scratch.join(format!("restate-{}.db", std::process::id()));
    let remove = |p: &Path| {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    };
    remove(&path);
    let restated = (|| {
        {
            let mut fresh = Catalog::create(&path, &remote.params()?)?;
            // Only the records this copy applied: one waiting here (it came late) may forget a checkpoint that
            // this copy still lists, which would then look held here alone and be written back (round 25
            // review, R3). Without a directory for the copy: it has no replica id, so it writes and withdraws no
            // marker.
            let applied = crate::remote::applied_records(catalog)?;
            Remote { bucket: remote.bucket.clone(), cache: None }.sync_records(&mut fresh, Some(&applied))?;
        }
        restate_against(remote, catalog, &path, forgotten)
    })();
    remove(&path);
    restated
}

fn restate_against(
    remote: &Remote,
    catalog: &mut Catalog,
    fresh: &Path,
    forgotten: &std::collections::HashSet<String>,
) -> Result<Restated> {
    catalog.connection().execute("ATTACH DATABASE ?1 AS fresh", [fresh.to_string_lossy()])?;
    let out = (|| {
        let ids: Vec<String> = catalog
            .connection()
            .prepare("SELECT id FROM checkpoints WHERE id NOT IN (SELECT id FROM fresh.checkpoints) ORDER BY time_ns")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Restated::default();
        let mut asked = HashMap::new();
        for id in ids.into_iter().filter(|id| !forgotten.contains(id)) {
            let checkpoint = as_recorded(catalog, &id)?;
            let conn = catalog.connection_mut();
            // Leaves what the checkpoint reaches in `temp.restate`, read by the two checks and by restate_one.
            if whole_here(conn, checkpoint.root)? && !packs_gone(remote, conn, &mut asked)? {
                restate_one(remote, conn, checkpoint)?;
                out.written.push(id);
            } else {
                out.damaged.push(id);
            }
        }
        (out.forgotten, out.relisted) = forget_again(remote, catalog, fresh)?;
        Ok(out)
    })();
    catalog.connection().execute("DETACH DATABASE fresh", [])?;
    out
}

/// One checkpoint, whose objects [`whole_here`] left in `temp.restate`: its chunk rows the bucket's records
/// lack as they are here, a record per [`ITEMS`], then its trees, contents and segments they lack, with the
/// checkpoint, in the last.
fn restate_one(remote: &Remote, conn: &mut Connection, checkpoint: NewCheckpoint) -> Result<()> {
    let mut batch = Batch::default();
    let mut items = 0;
    let tx = conn.transaction()?;
    {
        // Every row the bucket's records lack as it is here: a chunk they lack, or one they place elsewhere.
        // The latter is a heal a lost record carried (a commit that stored a damaged or lost chunk afresh and
        // re-pointed the row): published again as a locate item too, which moves every machine's row, or the
        // heal is undone and the fresh copy is an orphan to every other GC (round 38 review, F1).
        let mut chunks = tx.prepare(
            "SELECT p.name, c.offset, c.stored_len, c.raw_len, c.flags, p.size, c.id,
                    EXISTS (SELECT 1 FROM fresh.chunks f WHERE f.id = c.id)
             FROM temp.restate r JOIN chunks c ON c.id = r.id JOIN packs p ON p.id = c.pack
             WHERE r.kind = ?1 AND NOT EXISTS (SELECT 1 FROM fresh.chunks f JOIN fresh.packs fp ON fp.id = f.pack
                                               WHERE f.id = c.id AND fp.name = p.name AND f.offset = c.offset)
             ORDER BY p.name, c.offset",
        )?;
        let mut rows = chunks.query([KIND_CHUNK])?;
        while let Some(row) = rows.next()? {
            let id = ObjectId::from_slice(&row.get::<_, Vec<u8>>(6)?).ok_or_else(|| Error::corrupt("malformed id"))?;
            let size: i64 = row.get(5)?;
            let elsewhere: bool = row.get(7)?;
            let (pack, entry) = crate::gc::placed(row, id)?;
            if elsewhere {
                batch.locates.push((pack.clone(), entry.clone()));
            }
            match batch.packs.last_mut() {
                Some((name, _, entries)) if *name == pack => entries.push(entry),
                _ => batch.packs.push((pack, size as u64, vec![entry])),
            }
            items += 1;
            if items >= ITEMS {
                remote.publish(&tx, &std::mem::take(&mut batch))?;
                items = 0;
            }
        }
    }
    let objects = |table: &str, kind: i64, columns: &str| {
        format!(
            "SELECT {columns} FROM temp.restate r JOIN {table} t ON t.id = r.id
             WHERE r.kind = {kind} AND NOT EXISTS (SELECT 1 FROM fresh.{table} f WHERE f.id = t.id)"
        )
    };
    let id_of = |v: Vec<u8>| ObjectId::from_slice(&v).ok_or_else(|| Error::corrupt("malformed id"));
    for (id, data) in query_pairs(&tx, &objects("trees", KIND_TREE, "t.id, t.data"))? {
        batch.trees.push((id_of(id)?, data));
    }
    for (id, data) in query_pairs(&tx, &objects("segments", KIND_SEGMENT, "t.id, t.data"))? {
        batch.segments.push((id_of(id)?, data));
    }
    let mut contents = tx.prepare(&objects("contents", KIND_CONTENT, "t.id, t.size, t.segments"))?;
    let rows =
        contents.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))?;
    for row in rows {
        let (id, size, segments) = row?;
        batch.contents.push((id_of(id)?, size as u64, segments));
    }
    drop(contents);
    batch.checkpoint = Some(checkpoint);
    remote.publish(&tx, &batch)?;
    tx.commit()?;
    Ok(())
}

/// Settles each checkpoint that a lost record forgot here and the bucket's records (`fresh`) still hold. Left
/// alone, other machines kept listing it, but not whole: this copy's GC, which no longer saw it, swept what it
/// alone reached and rewrote its packs without those chunks, publishing both (round 32 review, F1). One this
/// copy can still restore whole (no chunk marked damaged or in a pack a GC's trace names) is listed here
/// again, everything it reaches claimed back from GC: a retention run elsewhere may have kept it as its path's
/// survivor and forgotten the rest, and forgetting it again would leave the path with nothing (round 33
/// review, F1). One it cannot restore any more is forgotten again for
/// every machine, in a record of its own, under the forget lock and after a sync under it, as any forget; its
/// groups go with it when no part of theirs is listed here again. Returns the checkpoints forgotten again and
/// those listed here again.
fn forget_again(remote: &Remote, catalog: &mut Catalog, fresh: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let lost = |catalog: &Catalog| -> Result<Vec<String>> {
        Ok(catalog
            .connection()
            .prepare(
                "SELECT id FROM fresh.checkpoints WHERE id NOT IN (SELECT id FROM main.checkpoints) ORDER BY time_ns",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    };
    // The lock only where there is something to settle: it makes the accept wait for any forget elsewhere.
    if lost(catalog)?.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let lock = remote.forget_lock(&|_| {})?;
    remote.sync(catalog)?;
    // The scratch copy learns what that sync applied too: a forget published meanwhile (the one the lock
    // waited for, say) would otherwise leave its checkpoint looking forgotten here alone, and listed here again
    // while every other copy has forgotten it (round 34 review, F3).
    let applied = crate::remote::applied_records(catalog)?;
    Remote { bucket: remote.bucket.clone(), cache: None }.sync_records(&mut Catalog::open(fresh)?, Some(&applied))?;
    let lost = lost(catalog)?;
    if lost.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let theirs = Catalog::open(fresh)?;
    // Asked afresh after the sync above.
    let mut asked = HashMap::new();
    let (mut forget, mut relisted) = (Vec::new(), Vec::new());
    for id in lost {
        let checkpoint = as_recorded(&theirs, &id)?;
        let conn = catalog.connection_mut();
        // A chunk marked damaged does not stop it: forgetting it again could leave its path with nothing on any
        // machine, where its other files restore and the next commit of the data heals it (round 38, F8).
        if whole_here(conn, checkpoint.root)? && !packs_gone(remote, conn, &mut asked)? {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            crate::catalog::relist(&tx, &checkpoint)?;
            // Not where a later commit of its group part is listed here, which replaces it as it goes in (round
            // 34 review, F4): then it is neither listed again nor to forget.
            let listed: bool =
                tx.query_row("SELECT EXISTS (SELECT 1 FROM checkpoints WHERE id = ?1)", [&id], |r| r.get(0))?;
            tx.commit()?;
            if listed {
                relisted.push(id);
            }
        } else {
            forget.push(id);
        }
    }
    let conn = catalog.connection();
    let mut groups = conn.prepare("SELECT name FROM fresh.groups WHERE name NOT IN (SELECT name FROM main.groups)")?;
    let mut parts = conn.prepare("SELECT checkpoint FROM fresh.group_parts WHERE grp = ?1")?;
    let mut forget_groups = Vec::new();
    for name in groups.query_map([], |r| r.get::<_, String>(0))? {
        let name = name?;
        let ids = parts.query_map([&name], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
        if !ids.iter().any(|id| relisted.contains(id)) {
            forget_groups.push(name);
        }
    }
    drop((groups, parts));
    if !forget.is_empty() || !forget_groups.is_empty() {
        let tx = catalog.connection_mut().transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        remote.check_lock(&lock)?;
        remote.publish(&tx, &Batch { forget: forget.clone(), forget_groups, ..Default::default() })?;
        tx.commit()?;
    }
    Ok((forget, relisted))
}

/// Whether a pack holding chunks of `temp.restate` (see [`whole_here`]), as this copy places them, is gone:
/// named by a GC's trace this copy applied (that GC deletes it), or no longer in the bucket (asked, a request
/// per pack, each once per pass over the checkpoints: `asked`). A GC deletes a pack only once nothing it
/// knows uses it, so the checkpoint was forgotten where it ran, in a record lost with the checkpoint's own:
/// published or listed again, it would undo that forget and be listed everywhere, restoring nowhere (round 33
/// review, F2). Every chunk counts, not only those the records lack: a commit of data stored before adds no
/// row of its own (round 36 review, F2). This copy's rows, not the records': a restated checkpoint publishes
/// them where they differ (round 38 review, F1). Asked while this copy's markers hold every GC back, so the
/// answers stand until the accept publishes.
fn packs_gone(remote: &Remote, conn: &Connection, asked: &mut HashMap<String, bool>) -> Result<bool> {
    let packs: Vec<String> = conn
        .prepare(
            "SELECT DISTINCT p.name FROM temp.restate r JOIN chunks c ON c.id = r.id JOIN packs p ON p.id = c.pack
             WHERE r.kind = ?1",
        )?
        .query_map([KIND_CHUNK], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut traced = conn.prepare("SELECT EXISTS (SELECT 1 FROM remote_records WHERE name = ?1)")?;
    for name in packs {
        let gone = match asked.get(&name) {
            Some(&gone) => gone,
            None => {
                let gone = traced.query_row([&name], |r| r.get::<_, bool>(0))?
                    || match remote.bucket.head(&name) {
                        Ok(found) => found.is_none(),
                        Err(e) => return Err(Error::backend(name, e)),
                    };
                asked.insert(name, gone);
                gone
            }
        };
        if gone {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether every object `root` reaches is in this catalog, every chunk with a row; what it reaches is left in
/// `temp.restate`.
fn whole_here(conn: &mut Connection, root: ObjectId) -> Result<bool> {
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS restate (kind INTEGER NOT NULL, id BLOB NOT NULL, PRIMARY KEY (kind, id))",
        [],
    )?;
    conn.execute("DELETE FROM temp.restate", [])?;
    let walked = {
        let mut add = conn.prepare_cached("INSERT OR IGNORE INTO temp.restate (kind, id) VALUES (?1, ?2)")?;
        crate::reach::walk(conn, &[root], &mut |kind, id| Ok(add.execute(params![kind, &id.0[..]])? == 1))
    };
    match walked {
        Err(e) if e.is_corruption() => return Ok(false),
        other => other?,
    }
    let chunk_lost: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM temp.restate r WHERE r.kind = ?1 AND NOT EXISTS
                        (SELECT 1 FROM chunks c WHERE c.id = r.id))",
        [KIND_CHUNK],
        |r| r.get(0),
    )?;
    Ok(!chunk_lost)
}

fn query_pairs(conn: &Connection, sql: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(conn.prepare(sql)?.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?)
}

/// Checkpoint `id` of `catalog` as a record carries it.
fn as_recorded(catalog: &Catalog, id: &str) -> Result<NewCheckpoint> {
    Ok(NewCheckpoint {
        record: catalog.checkpoint_by_id(id)?,
        root: catalog.checkpoint_root(id)?,
        skipped: catalog.skipped(id)?,
        group: group_part(catalog.connection(), id)?,
        // As for any checkpoint learnt from a record, which does not say.
        xattrs: false,
    })
}

/// The group checkpoint `id` is a part of, if any.
fn group_part(conn: &Connection, id: &str) -> Result<Option<crate::group::GroupPart>> {
    let row: Option<(String, i64, i64)> = conn
        .query_row(
            "SELECT gp.grp, gp.part, g.parts FROM group_parts gp JOIN groups g ON g.name = gp.grp WHERE gp.checkpoint = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    Ok(row.map(|(key, part, parts)| crate::group::GroupPart {
        name: crate::group::name_of(&key).to_string(),
        part: part as u32,
        parts: parts as u32,
    }))
}

#[cfg(test)]
mod tests {
    use super::whole_here;
    use crate::testutil::pseudo_random;
    use crate::{CommitOptions, Repository};

    /// A checkpoint is whole here only where every chunk it reaches has a row.
    #[test]
    fn a_rowless_chunk_keeps_a_checkpoint_from_being_whole_here() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        let id = repo.commit_reader("a", &mut &pseudo_random(300_000, 7)[..], &CommitOptions::default()).unwrap().id;
        let mut cat = repo.open_catalog().unwrap();
        let root = cat.checkpoint_root(&id).unwrap();
        let conn = cat.connection_mut();
        assert!(whole_here(conn, root).unwrap());
        let chunk: Vec<u8> = conn.query_row("SELECT id FROM chunks LIMIT 1", [], |r| r.get(0)).unwrap();
        conn.execute("DELETE FROM chunks WHERE id = ?1", [&chunk]).unwrap();
        assert!(!whole_here(conn, root).unwrap());
    }
}
