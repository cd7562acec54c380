//! Picking loopback ports for processes started by tools and tests.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Ports already handed out by this process (a port is free until its user binds it, so the
/// same one must not be given twice in the meantime).
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The kernel's ephemeral port range, from which outgoing connections take their local ports.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A TCP port on 127.0.0.1 that is free now, for a process that will bind it shortly.
///
/// Chosen *outside* the ephemeral range: a port from `bind(0)` comes from that range, and
/// between picking it and the process binding it, any outgoing connection on the machine may
/// take it as its local port ("Address already in use").
pub fn free_local_port() -> std::io::Result<u16> {
    let (eph_lo, eph_hi) = ephemeral_range();
    let candidates: Vec<(u16, u16)> =
        [(10000u16, eph_lo.min(30000)), (eph_hi.saturating_add(1).max(10000), u16::MAX)].into_iter().filter(|(lo, hi)| lo < hi).collect();
    // Start at a place that differs between processes, so concurrent tools rarely race.
    let seed =
        std::process::id() as u64 ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for (lo, hi) in candidates {
        let span = u64::from(hi - lo);
        for i in 0..span {
            let port = lo + ((seed.wrapping_mul(2654435761).wrapping_add(i)) % span) as u16;
            if given.contains(&port) {
                continue;
            }
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    // Everything outside the ephemeral range is taken: fall back to the kernel's choice.
    TcpListener::bind("127.0.0.1:0")?.local_addr().map(|a| a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_not_ephemeral() {
        let (lo, hi) = ephemeral_range();
        let ports: Vec<u16> = (0..20).map(|_| free_local_port().unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        for p in ports {
            assert!(!(lo..=hi).contains(&p), "{p} is in the ephemeral range {lo}-{hi}");
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
