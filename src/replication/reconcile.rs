//! Reconciliation at takeover: which bytes to copy between an extent's
//! replicas so they read the same before a new owner serves it.
//!
//! Every change the old owner acknowledged reached every member of the
//! committed set, and every flushed one is durable there; replicas can only
//! differ where a change was in flight or unflushed when the owner stopped,
//! and those blocks lie in regions each replica keeps durably marked dirty.
//! So one member's version of the union of the dirty regions, copied to the
//! others, makes them identical and keeps every flushed write (Crucible
//! reconciles at activation the same way, by flush number and dirty bit).
//! A member whose extent does not exist while another's does lost its copy
//! (or never made one before a crash): it receives the whole extent. That
//! copy is marked incomplete on the target until it is durable, and an
//! incomplete copy reports itself absent: a crash midway leaves a replica
//! that gets the whole extent again and is never taken as the source (its
//! dirty regions cover only the pieces that arrived, so reporting it as
//! existing would copy too little to it, or its holes to the others).

use crate::types::NodeId;

/// What one replica reported ([`crate::proto::peer`] `ExtentStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub node: NodeId,
    /// The replica holds the extent at all.
    pub exists: bool,
    /// Byte ranges (offset, len) inside the extent marked dirty.
    pub dirty: Vec<(u64, u64)>,
}

/// Copy `ranges` of the extent from `source` to each of `targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub source: NodeId,
    pub target: NodeId,
    /// Sorted, disjoint (offset, len) ranges.
    pub ranges: Vec<(u64, u64)>,
    /// The target does not hold the extent (or holds an incomplete copy):
    /// it receives all of it, as a whole-extent copy that it marks
    /// incomplete until the copy is durable.
    pub whole: bool,
}

/// The copies that make the reported replicas identical. `prefer` is the
/// source when it reported and exists (the owner's local replica: reading
/// it is free); otherwise the lowest node id that exists.
pub fn plan(reports: &[Report], extent_size: u64, prefer: Option<NodeId>) -> Vec<Copy> {
    let existing: Vec<&Report> = reports.iter().filter(|r| r.exists).collect();
    let Some(source) = existing
        .iter()
        .find(|r| Some(r.node) == prefer)
        .or_else(|| existing.iter().min_by_key(|r| r.node))
        .map(|r| r.node)
    else {
        return Vec::new(); // nobody has it: every replica reads zeros
    };
    let dirty = union(reports.iter().flat_map(|r| r.dirty.iter().copied()), extent_size);
    let mut out = Vec::new();
    for r in reports {
        if r.node == source {
            continue;
        }
        let ranges = if r.exists { dirty.clone() } else { vec![(0, extent_size)] };
        if !ranges.is_empty() {
            out.push(Copy { source, target: r.node, ranges, whole: !r.exists });
        }
    }
    out
}

/// Sorted, merged, clipped to `[0, limit)`.
fn union(ranges: impl Iterator<Item = (u64, u64)>, limit: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .filter_map(|(o, l)| {
            let end = o.saturating_add(l).min(limit);
            (o < end).then_some((o, end))
        })
        .collect();
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(node: u64, exists: bool, dirty: &[(u64, u64)]) -> Report {
        Report { node: NodeId(node), exists, dirty: dirty.to_vec() }
    }

    #[test]
    fn copies_the_union_of_dirty_regions_from_one_member() {
        let plan =
            plan(&[r(3, true, &[(0, 10)]), r(1, true, &[(5, 10), (100, 1)]), r(2, true, &[])], 1000, None);
        let want = vec![(0, 15), (100, 1)];
        assert_eq!(
            plan,
            vec![
                Copy { source: NodeId(1), target: NodeId(3), ranges: want.clone(), whole: false },
                Copy { source: NodeId(1), target: NodeId(2), ranges: want, whole: false },
            ]
        );
    }

    #[test]
    fn a_member_without_the_extent_gets_all_of_it() {
        let p = plan(&[r(1, false, &[]), r(2, true, &[])], 64, Some(NodeId(1)));
        assert_eq!(
            p,
            vec![Copy { source: NodeId(2), target: NodeId(1), ranges: vec![(0, 64)], whole: true }]
        );
        assert!(plan(&[r(1, false, &[]), r(2, false, &[])], 64, None).is_empty());
        // Every region dirty is still a copy of ranges to a member that
        // holds the extent, not a whole copy that marks it incomplete.
        let p = plan(&[r(1, true, &[(0, 64)]), r(2, true, &[])], 64, Some(NodeId(1)));
        assert_eq!(
            p,
            vec![Copy { source: NodeId(1), target: NodeId(2), ranges: vec![(0, 64)], whole: false }]
        );
    }

    #[test]
    fn clean_replicas_need_nothing_and_ranges_are_clipped() {
        assert!(plan(&[r(1, true, &[]), r(2, true, &[])], 64, None).is_empty());
        let p = plan(&[r(1, true, &[(60, u64::MAX)]), r(2, true, &[])], 64, Some(NodeId(2)));
        assert_eq!(
            p,
            vec![Copy { source: NodeId(2), target: NodeId(1), ranges: vec![(60, 4)], whole: false }]
        );
    }
}
