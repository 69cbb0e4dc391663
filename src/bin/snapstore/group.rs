//! Group checkpoints on the command line: their listing, and what `commit --group` reports.

use std::io;

use snapstore::Group;

use crate::output::{Out, human_bytes, human_time};

/// One line per group, then one per part: complete groups as restore points, incomplete ones marked.
pub fn list(out: &mut Out, groups: &[Group]) -> io::Result<()> {
    for g in groups {
        let state = if g.is_complete() {
            format!("{} parts", g.parts)
        } else {
            format!("INCOMPLETE: {} of {} parts in, not a restore point", g.members.len(), g.parts)
        };
        let size: u64 = g.members.iter().map(|(_, c)| c.logical_bytes).sum();
        out.line(&format!("group {}  {}  {}  {}", g.name, human_time(g.created_ns), human_bytes(size), state))?;
        for (i, c) in &g.members {
            out.line(&format!("  part {i}  {}  {}  {}", c.short_id(), human_time(c.time_ns), c.path))?;
        }
    }
    Ok(())
}

/// After a part is committed: where its group stands.
pub fn part_status(out: &mut Out, g: &Group, part: u32) -> io::Result<()> {
    if g.is_complete() {
        out.line(&format!("part {part} of group {}: the group is complete ({} parts)", g.name, g.parts))
    } else {
        out.line(&format!("part {part} of group {}: {} of {} parts in", g.name, g.members.len(), g.parts))
    }
}
