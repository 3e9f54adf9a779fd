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

/// Fill every empty acting set in `pgs` with `copies` disks chosen from
/// `disks`. Returns whether anything changed.
pub fn assign(pgs: &mut [Vec<u32>], disks: &[Candidate], copies: usize) -> bool {
    assert!(copies >= 1);
    if disks.is_empty() {
        return false;
    }
    let mut load: Vec<u64> = disks
        .iter()
        .map(|d| pgs.iter().filter(|s| s.contains(&d.disk_id)).count() as u64)
        .collect();
    let mut changed = false;
    for (pg, set) in pgs.iter_mut().enumerate() {
        if !set.is_empty() {
            continue;
        }
        let mut chosen: Vec<usize> = Vec::new();
        for _ in 0..copies.min(disks.len()) {
            let mut best: Option<(u128, u64, usize)> = None;
            for (i, d) in disks.iter().enumerate() {
                if chosen.contains(&i) {
                    continue;
                }
                let node_taken = chosen.iter().any(|&c| disks[c].node_id == d.node_id);
                let distinct_nodes = {
                    let mut n: Vec<u32> = disks.iter().map(|d| d.node_id).collect();
                    n.sort_unstable();
                    n.dedup();
                    n.len()
                };
                if node_taken && chosen.len() < distinct_nodes {
                    continue;
                }
                // Compare (load+1)/capacity without floats: scale by 2^40.
                let cap = d.capacity_bytes.max(1) as u128;
                let score = ((load[i] as u128 + 1) << 40) / cap;
                let tie = mix64((pg as u64) << 32 ^ u64::from(d.disk_id));
                let better = match best {
                    None => true,
                    Some((s, t, _)) => score < s || (score == s && tie < t),
                };
                if better {
                    best = Some((score, tie, i));
                }
            }
            let Some((_, _, i)) = best else { break };
            chosen.push(i);
            load[i] += 1;
        }
        *set = chosen.iter().map(|&i| disks[i].disk_id).collect();
        changed = true;
    }
    changed
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
