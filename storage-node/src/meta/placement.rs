//! Placement: which nodes hold each placement group's replicas.
//!
//! A pure function, so it can be tested on any topology without a cluster. Rules:
//! - the replicas of a PG sit in pairwise different failure domains at the configured level;
//! - replica counts per node follow node capacity (weight), greedily least-loaded first, so a
//!   skewed topology still spreads as evenly as the domain rule allows;
//! - the first replica (the PG's initial leader) is spread the same way, so leadership starts
//!   balanced too.

use std::collections::{BTreeMap, BTreeSet};

use basalt_common::{DomainLevel, NodeId};
use thiserror::Error;

/// A node that may hold replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Its failure domain at the placement level (see `Labels::domain`).
    pub domain: String,
    /// Relative share of replicas it should get (its capacity; 0 counts as 1).
    pub weight: u64,
}

/// Why no placement exists.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    /// Fewer distinct failure domains than replicas.
    #[error(
        "cannot place {replicas} replicas in distinct {level} domains: found {} domain(s): {}",
        domains.len(),
        describe(domains)
    )]
    NotEnoughDomains {
        /// Replicas per PG.
        replicas: usize,
        /// The placement level.
        level: DomainLevel,
        /// Domain → nodes in it.
        domains: BTreeMap<String, Vec<NodeId>>,
    },
}

fn describe(domains: &BTreeMap<String, Vec<NodeId>>) -> String {
    if domains.is_empty() {
        return "none (no storage nodes registered)".into();
    }
    domains
        .iter()
        .map(|(d, nodes)| {
            let name = if d.is_empty() { "(unlabeled)".to_string() } else { d.clone() };
            let ids: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
            format!("{name} [{}]", ids.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Stable tie-breaker so equal candidates are not always taken in id order.
fn spread(pg: u32, node: NodeId) -> u64 {
    let mut z = (u64::from(pg) << 32) ^ node.0;
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Places `pg_count` PGs of `replicas` replicas each. Returns, per PG, its replicas with the
/// intended initial leader first.
pub fn place(pg_count: u32, replicas: usize, level: DomainLevel, nodes: &[Candidate]) -> Result<Vec<Vec<NodeId>>, PlacementError> {
    let mut domains: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
    for n in nodes {
        domains.entry(n.domain.clone()).or_default().push(n.id);
    }
    if domains.len() < replicas || replicas == 0 {
        return Err(PlacementError::NotEnoughDomains { replicas, level, domains });
    }
    let weight: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (n.id, n.weight.max(1))).collect();
    let mut load: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (n.id, 0)).collect();
    let mut leads: BTreeMap<NodeId, u64> = nodes.iter().map(|n| (n.id, 0)).collect();

    let mut out = Vec::with_capacity(pg_count as usize);
    for pg in 0..pg_count {
        let mut chosen: Vec<NodeId> = Vec::with_capacity(replicas);
        let mut used: BTreeSet<&str> = BTreeSet::new();
        for _ in 0..replicas {
            // Least (load+1)/weight first, compared exactly as (load+1)*other_weight.
            let best = nodes
                .iter()
                .filter(|n| !used.contains(n.domain.as_str()) && !chosen.contains(&n.id))
                .min_by(|a, b| {
                    let la = u128::from(load[&a.id] + 1) * u128::from(weight[&b.id]);
                    let lb = u128::from(load[&b.id] + 1) * u128::from(weight[&a.id]);
                    la.cmp(&lb).then_with(|| spread(pg, a.id).cmp(&spread(pg, b.id)))
                })
                .expect("enough domains checked above");
            used.insert(best.domain.as_str());
            chosen.push(best.id);
            *load.get_mut(&best.id).expect("known node") += 1;
        }
        // Initial leader: the chosen replica that leads least relative to its weight.
        let leader_pos = (0..chosen.len())
            .min_by(|&a, &b| {
                let (na, nb) = (chosen[a], chosen[b]);
                let la = u128::from(leads[&na] + 1) * u128::from(weight[&nb]);
                let lb = u128::from(leads[&nb] + 1) * u128::from(weight[&na]);
                la.cmp(&lb).then_with(|| spread(pg ^ 0x5a5a, na).cmp(&spread(pg ^ 0x5a5a, nb)))
            })
            .unwrap_or(0);
        chosen.swap(0, leader_pos);
        *leads.get_mut(&chosen[0]).expect("known node") += 1;
        out.push(chosen);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u64, domain: &str, weight: u64) -> Candidate {
        Candidate { id: NodeId(id), domain: domain.into(), weight }
    }

    fn check(placement: &[Vec<NodeId>], nodes: &[Candidate], replicas: usize) {
        let domain: BTreeMap<NodeId, &str> = nodes.iter().map(|n| (n.id, n.domain.as_str())).collect();
        for (pg, r) in placement.iter().enumerate() {
            assert_eq!(r.len(), replicas, "pg {pg}");
            let ds: BTreeSet<&str> = r.iter().map(|n| domain[n]).collect();
            assert_eq!(ds.len(), replicas, "pg {pg} replicas {r:?} share a domain");
        }
    }

    fn counts(placement: &[Vec<NodeId>]) -> BTreeMap<NodeId, usize> {
        let mut c = BTreeMap::new();
        for r in placement {
            for n in r {
                *c.entry(*n).or_default() += 1;
            }
        }
        c
    }

    #[test]
    fn three_hosts_each_get_every_pg() {
        let nodes = vec![cand(1, "host=a", 1), cand(2, "host=b", 1), cand(3, "host=c", 1)];
        let p = place(32, 3, DomainLevel::Host, &nodes).unwrap();
        check(&p, &nodes, 3);
        assert!(counts(&p).values().all(|c| *c == 32));
        // Initial leaders spread evenly: 32 PGs over 3 nodes → 10 or 11 each.
        let mut leads = BTreeMap::new();
        for r in &p {
            *leads.entry(r[0]).or_insert(0) += 1;
        }
        assert!(leads.values().all(|c| (10..=11).contains(c)), "{leads:?}");
    }

    #[test]
    fn balanced_over_many_nodes() {
        let nodes: Vec<Candidate> = (1..=9).map(|i| cand(i, &format!("rack=r{}", i % 3), 1)).collect();
        let p = place(300, 3, DomainLevel::Rack, &nodes).unwrap();
        check(&p, &nodes, 3);
        let c = counts(&p);
        let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(max - min <= 1, "{c:?}");
    }

    #[test]
    fn skewed_domains_respect_the_rule() {
        // Three racks: one node, one node, four nodes. Each PG needs one replica per rack, so the
        // lone nodes carry every PG and the big rack shares its third evenly.
        let nodes =
            vec![cand(1, "rack=a", 1), cand(2, "rack=b", 1), cand(3, "rack=c", 1), cand(4, "rack=c", 1), cand(5, "rack=c", 1), cand(6, "rack=c", 1)];
        let p = place(64, 3, DomainLevel::Rack, &nodes).unwrap();
        check(&p, &nodes, 3);
        let c = counts(&p);
        assert_eq!(c[&NodeId(1)], 64);
        assert_eq!(c[&NodeId(2)], 64);
        for n in 3..=6 {
            assert_eq!(c[&NodeId(n)], 16, "{c:?}");
        }
    }

    #[test]
    fn four_domains_uneven_sizes_spread_load() {
        // 4 zones with 1, 2, 3 and 6 nodes: 12 nodes, 3 replicas, 120 PGs → 360 replicas.
        let mut nodes = vec![cand(1, "zone=a", 1)];
        nodes.extend((2..=3).map(|i| cand(i, "zone=b", 1)));
        nodes.extend((4..=6).map(|i| cand(i, "zone=c", 1)));
        nodes.extend((7..=12).map(|i| cand(i, "zone=d", 1)));
        let p = place(120, 3, DomainLevel::Zone, &nodes).unwrap();
        check(&p, &nodes, 3);
        let c = counts(&p);
        // Zone d can hold at most one replica per PG: its six nodes share ≤120 replicas.
        let zone_d: usize = (7..=12).map(|i| c[&NodeId(i)]).sum();
        assert!(zone_d <= 120);
        // Nobody is overloaded beyond what the domain rule forces.
        assert!(c[&NodeId(1)] <= 120);
        assert!(c.values().all(|v| *v > 0), "{c:?}");
    }

    #[test]
    fn capacity_weights_shift_load() {
        let nodes = vec![cand(1, "host=a", 1), cand(2, "host=b", 1), cand(3, "host=c", 1), cand(4, "host=d", 3)];
        let p = place(120, 3, DomainLevel::Host, &nodes).unwrap();
        check(&p, &nodes, 3);
        let c = counts(&p);
        // Node 4 has half the capacity; it cannot hold more than one replica per PG (120).
        assert!(c[&NodeId(4)] > c[&NodeId(1)], "{c:?}");
        assert_eq!(c.values().sum::<usize>(), 360);
    }

    #[test]
    fn too_few_domains_names_them() {
        let nodes = vec![cand(1, "zone=z1", 1), cand(2, "zone=z1", 1), cand(3, "zone=z2", 1)];
        let err = place(8, 3, DomainLevel::Zone, &nodes).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("found 2 domain(s)"), "{msg}");
        assert!(msg.contains("zone=z1 [node-1, node-2]") && msg.contains("zone=z2 [node-3]"), "{msg}");
        let err = place(8, 3, DomainLevel::Host, &[]).unwrap_err();
        assert!(err.to_string().contains("no storage nodes"), "{err}");
    }
}
