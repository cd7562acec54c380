//! Any descriptor chain over any guest memory contents parses to a request, a refusal or "no
//! status": never a panic, and an accepted request stays inside the device and guest memory.
#![no_main]

use basalt_volume_client::vhost_user::request::{Desc, Limits, Memory, Op, Parsed, parse, total};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    // 16 bytes of limits, then up to 16 descriptors of 13 bytes, then guest memory contents.
    if data.len() < 16 {
        return;
    }
    let capacity = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes")) % (1 << 40);
    let max_transfer = u64::from(u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")));
    let limits = Limits { capacity, read_only: data[12] & 1 == 1, max_transfer, max_ranges: u32::from(data[13]), max_range_bytes: 1 << 30 };
    let count = usize::from(data[14] % 17);
    let mut rest = &data[16..];
    let mut descs = Vec::new();
    for _ in 0..count {
        if rest.len() < 13 {
            return;
        }
        let raw = u64::from_le_bytes(rest[0..8].try_into().expect("8 bytes"));
        // Mostly inside guest memory, sometimes anywhere.
        let addr = if rest[12] & 2 == 0 { raw % (MEM + 64) } else { raw };
        let len = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) % (2 * MEM as u32);
        descs.push(Desc { addr, len, writable: rest[12] & 1 == 1 });
        rest = &rest[13..];
    }
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
    let n = rest.len().min(MEM as usize);
    mem.write_slice(&rest[..n], GuestAddress(0)).expect("fill guest memory");

    match parse(&descs, &mem, &limits) {
        Parsed::Request(req) => {
            assert!(req.status < MEM);
            match req.op {
                Op::Read { offset, len, into } => {
                    assert_eq!(total(&into), len);
                    assert!(offset + len <= capacity && len <= max_transfer);
                    assert!(into.iter().all(|s| s.addr + u64::from(s.len) <= MEM));
                }
                Op::Write { offset, len, from } => {
                    assert!(!limits.read_only);
                    assert_eq!(total(&from), len);
                    assert!(offset + len <= capacity && len <= max_transfer);
                    assert!(from.iter().all(|s| s.addr + u64::from(s.len) <= MEM));
                }
                Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
                    assert!(!limits.read_only);
                    assert!(!ranges.is_empty() && ranges.len() <= usize::from(data[13]));
                    assert!(ranges.iter().all(|r| r.offset + r.len <= capacity));
                }
                Op::GetId { into } => assert!(total(&into) <= 20),
                Op::Flush => {}
            }
        }
        Parsed::Fail { status, code, .. } => {
            assert!(status < MEM);
            assert!(code == 1 || code == 2);
        }
        Parsed::NoStatus { .. } => {}
    }
});
