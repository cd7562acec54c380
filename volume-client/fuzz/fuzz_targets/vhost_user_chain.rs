//! Any descriptor table contents, queue size and head give a chain or an error naming what is
//! wrong (a loop, an index past the table, a nested indirect table, memory outside the guest),
//! never a panic or an endless walk; a chain found is bounded by the tables it came from and
//! parses like any other.
#![no_main]

use basalt_volume_client::vhost_user::request::{Limits, Memory, chain_at, parse};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // 2 bytes of queue size, 2 of head, 4 of table address, then guest memory contents.
    if data.len() < 8 {
        return;
    }
    let queue_size = u16::from_le_bytes([data[0], data[1]]) % 1025;
    let head = u16::from_le_bytes([data[2], data[3]]);
    let table = u64::from(u32::from_le_bytes(data[4..8].try_into().expect("4 bytes"))) % (MEM + 256);
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
    let rest = &data[8..];
    let n = rest.len().min(MEM as usize);
    mem.write_slice(&rest[..n], GuestAddress(0)).expect("fill guest memory");
    if let Ok(descs) = chain_at(&mem, table, queue_size, head) {
        assert!(!descs.is_empty());
        // At most one table's worth of direct descriptors plus one indirect table's.
        assert!(descs.len() <= usize::from(queue_size) + 1 + 4096);
        let limits = Limits { capacity: 1 << 30, read_only: false, max_transfer: 1 << 20, max_ranges: 32, max_range_bytes: 1 << 30 };
        let _ = parse(&descs, &mem, &limits);
    }
});
