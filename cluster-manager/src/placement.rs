//! Placement: which disks hold each placement group. A pure function of
//! (current assignment, disks), unit-tested beside the code.
//!
//! Version 1 assigns a placement group once, when it has no disk, and never
//! moves it (there is no data migration yet): groups are spread evenly by
//! capacity with a greedy choice — the disk whose (groups + 1) / capacity is
//! lowest — and a deterministic tie-break by hash, so the same inputs always
//! give the same map. Copies of one group go to distinct nodes when enough
//! nodes exist.

use tessera_wire::map::mix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub disk_id: u32,
    pub node_id: u32,
    pub capacity_bytes: u64,
}

/// Fill every empty acting set in `pgs` with up to `copies` disks chosen
/// from `disks`, primary first, on distinct nodes while enough nodes exist.
/// Groups that already have a set are left alone. Returns whether anything
/// changed.
pub fn assign(pgs: &mut [Vec<u32>], disks: &[Candidate], copies: usize) -> bool {
    assert!(copies >= 1);
    if disks.is_empty() {
        return false;
    }
    let mut nodes: Vec<u32> = disks.iter().map(|d| d.node_id).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut load: Vec<u64> = disks
        .iter()
        .map(|d| pgs.iter().filter(|s| s.contains(&d.disk_id)).count() as u64)
        .collect();
    let mut changed = false;
    for (pg, set) in pgs.iter_mut().enumerate() {
        if !set.is_empty() {
            continue;
        }
        let mut chosen: Vec<usize> = Vec::with_capacity(copies);
        while chosen.len() < copies.min(disks.len()) {
            // Node reuse is allowed only once every node holds a copy.
            let spread = chosen.len() < nodes.len();
            let eligible = |i: &usize| {
                let node_taken = chosen
                    .iter()
                    .any(|&c| disks[c].node_id == disks[*i].node_id);
                !chosen.contains(i) && (!spread || !node_taken)
            };
            let Some(i) = (0..disks.len())
                .filter(eligible)
                .min_by(|&a, &b| better(pg as u32, &disks[a], load[a], &disks[b], load[b]))
            else {
                break;
            };
            chosen.push(i);
            load[i] += 1;
        }
        *set = chosen.iter().map(|&i| disks[i].disk_id).collect();
        changed = true;
    }
    changed
}

/// Order two candidates for `pg`: the one whose share after taking the
/// group, (load + 1) / capacity, is lower comes first. Compared exactly by
/// cross-multiplication (no float or fixed-point rounding, which would turn
/// large disks into ties); equal shares fall back to a hash of (pg, disk id)
/// so ties spread instead of piling onto the lowest id.
fn better(pg: u32, a: &Candidate, load_a: u64, b: &Candidate, load_b: u64) -> std::cmp::Ordering {
    let share_a = u128::from(load_a + 1) * u128::from(b.capacity_bytes.max(1));
    let share_b = u128::from(load_b + 1) * u128::from(a.capacity_bytes.max(1));
    share_a
        .cmp(&share_b)
        .then_with(|| tie(pg, a.disk_id).cmp(&tie(pg, b.disk_id)))
        .then_with(|| a.disk_id.cmp(&b.disk_id))
}

fn tie(pg: u32, disk_id: u32) -> u64 {
    mix64((u64::from(pg) << 32) | u64::from(disk_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(id: u32, cap: u64) -> Candidate {
        Candidate {
            disk_id: id,
            node_id: id,
            capacity_bytes: cap,
        }
    }

    // Proves equal disks get an equal share (within one group).
    #[test]
    fn spreads_evenly() {
        let mut pgs = vec![Vec::new(); 128];
        assert!(assign(
            &mut pgs,
            &[disk(1, 100), disk(2, 100), disk(3, 100)],
            1
        ));
        for id in 1..=3 {
            let n = pgs.iter().filter(|s| s == &&vec![id]).count();
            assert!((42..=43).contains(&n), "disk {id} got {n}");
        }
    }

    // Proves shares follow capacity (2:1) and assignment is deterministic.
    #[test]
    fn weighted_by_capacity_and_deterministic() {
        let disks = [disk(1, 200), disk(2, 100)];
        let mut a = vec![Vec::new(); 96];
        assign(&mut a, &disks, 1);
        let n1 = a.iter().filter(|s| s[0] == 1).count();
        assert!((63..=65).contains(&n1), "disk 1 got {n1}");
        let mut b = vec![Vec::new(); 96];
        assign(&mut b, &disks, 1);
        assert_eq!(a, b);
    }

    // Proves capacity shares stay exact for large disks (16 TiB vs 8 TiB),
    // where fixed-point ratios would round into ties.
    #[test]
    fn large_disks_proportional() {
        let t = 1u64 << 40;
        let mut pgs = vec![Vec::new(); 128];
        assign(
            &mut pgs,
            &[disk(1, 16 * t), disk(2, 8 * t), disk(3, 8 * t)],
            1,
        );
        let n = |id| pgs.iter().filter(|s| s[0] == id).count();
        assert!((63..=65).contains(&n(1)), "disk 1 got {}", n(1));
        assert!((31..=33).contains(&n(2)), "disk 2 got {}", n(2));
        assert!((31..=33).contains(&n(3)), "disk 3 got {}", n(3));
    }

    // Proves existing load counts: a disk added later receives the new
    // groups until the shares even out.
    #[test]
    fn fills_around_existing_load() {
        let mut pgs = vec![vec![1], vec![1], Vec::new(), Vec::new()];
        assign(&mut pgs, &[disk(1, 100), disk(2, 100)], 1);
        assert_eq!(pgs, vec![vec![1], vec![1], vec![2], vec![2]]);
    }

    // Proves two disks on one node do not hold two copies of a group while
    // another node is available, and that one node still gets both copies
    // when it is all there is.
    #[test]
    fn copies_prefer_distinct_nodes() {
        let same_node = |id, node| Candidate {
            disk_id: id,
            node_id: node,
            capacity_bytes: 100,
        };
        let disks = [same_node(1, 1), same_node(2, 1), same_node(3, 2)];
        let mut pgs = vec![Vec::new(); 30];
        assign(&mut pgs, &disks, 2);
        for s in &pgs {
            assert!(s.contains(&3), "{s:?} puts both copies on node 1");
        }
        let mut pgs = vec![Vec::new(); 4];
        assign(&mut pgs, &disks[..2], 2);
        assert!(pgs.iter().all(|s| s.len() == 2));
    }

    // Proves assigned groups never move and copies land on distinct nodes.
    #[test]
    fn stable_and_distinct() {
        let mut pgs = vec![vec![7], Vec::new(), Vec::new()];
        let disks = [disk(1, 100), disk(2, 100), disk(7, 100)];
        assign(&mut pgs, &disks, 2);
        assert_eq!(pgs[0], vec![7]);
        for s in &pgs[1..] {
            assert_eq!(s.len(), 2);
            assert_ne!(s[0], s[1]);
        }
        assert!(!assign(&mut pgs, &[], 1));
    }
}
