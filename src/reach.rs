//! Reachability: every object a set of root trees leads to (trees, contents, segments, chunks).
//!
//! GC marks with it; a commit that publishes after GC condemned objects claims back what its checkpoint
//! reaches with it. It reads the catalog through any connection or transaction, holding one tree's entries
//! and one segment at a time.

use rusqlite::{Connection, OptionalExtension};

use crate::catalog::{KIND_CHUNK, KIND_CONTENT, KIND_SEGMENT, KIND_TREE};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::tree::{EntryKind, decode_segment, decode_tree};

/// Visits every object reachable from `roots`. `visit(kind, id)` returns whether the object is new to the
/// caller; objects below an object already seen are not visited again.
pub(crate) fn walk(
    conn: &Connection,
    roots: &[ObjectId],
    visit: &mut dyn FnMut(i64, &ObjectId) -> Result<bool>,
) -> Result<()> {
    let mut stack = Vec::new();
    for root in roots {
        if visit(KIND_TREE, root)? {
            stack.push(*root);
        }
    }
    let mut tree_data = conn.prepare_cached("SELECT data FROM trees WHERE id = ?1")?;
    let mut content = conn.prepare_cached("SELECT segments FROM contents WHERE id = ?1")?;
    let mut segment = conn.prepare_cached("SELECT data FROM segments WHERE id = ?1")?;
    let chunk_max = crate::catalog::chunk_max(conn)?;
    let bad_id = || Error::corrupt("a tree entry holds a malformed id");
    while let Some(tree) = stack.pop() {
        let data: Vec<u8> = tree_data
            .query_row([&tree.0[..]], |r| r.get(0))
            .optional()?
            .ok_or_else(|| Error::corrupt(format!("tree {tree} is referenced but missing from the catalog")))?;
        for e in decode_tree(&data)? {
            match e.kind {
                EntryKind::Dir => {
                    let id = ObjectId::from_slice(&e.target).ok_or_else(bad_id)?;
                    if visit(KIND_TREE, &id)? {
                        stack.push(id);
                    }
                }
                EntryKind::File => {
                    let id = ObjectId::from_slice(&e.target).ok_or_else(bad_id)?;
                    if !visit(KIND_CONTENT, &id)? {
                        continue;
                    }
                    let Some(segs): Option<Vec<u8>> = content.query_row([&id.0[..]], |r| r.get(0)).optional()? else {
                        // A content of one chunk has no row: it is the chunk (docs/format.md). Whether that chunk
                        // is indexed matters no more here than for a chunk a segment lists (verify reports it,
                        // `repair index` may bring it back); a file too large to be one chunk has lost its row.
                        if e.size > chunk_max {
                            return Err(Error::corrupt(format!("content {id} is referenced but missing")));
                        }
                        visit(KIND_CHUNK, &id)?;
                        continue;
                    };
                    for seg in segs.chunks(ObjectId::LEN) {
                        let seg = ObjectId::from_slice(seg).ok_or_else(|| Error::corrupt("malformed segment list"))?;
                        if !visit(KIND_SEGMENT, &seg)? {
                            continue;
                        }
                        let data: Vec<u8> = segment
                            .query_row([&seg.0[..]], |r| r.get(0))
                            .optional()?
                            .ok_or_else(|| Error::corrupt(format!("segment {seg} is referenced but missing")))?;
                        for r in decode_segment(&data)? {
                            visit(KIND_CHUNK, &r.id)?;
                        }
                    }
                }
                EntryKind::Symlink => {}
            }
        }
    }
    Ok(())
}
