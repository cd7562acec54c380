//! Every 28-byte request header, with any export limits, parses to a request or an error:
//! never a panic, and accepted requests always lie inside the export.
#![no_main]

use basalt_volume_client::nbd::request::{Limits, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 28 + 13 {
        return;
    }
    let header: [u8; 28] = data[..28].try_into().expect("28 bytes");
    let size = u64::from_le_bytes(data[28..36].try_into().expect("8 bytes"));
    let max_len = u32::from_le_bytes(data[36..40].try_into().expect("4 bytes"));
    let limits = Limits { size, max_len, read_only: data[40] & 1 == 1, block_status: data[40] & 2 == 2 };
    if let Ok(r) = parse_request(&header, &limits) {
        use basalt_volume_client::nbd::request::Command;
        if !matches!(r.command, Command::Flush | Command::Disconnect) {
            assert!(r.length > 0);
            assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|end| end <= size));
            assert!(!(limits.read_only && matches!(r.command, Command::Write | Command::Trim | Command::WriteZeroes)));
        }
        if r.command == Command::Write || r.command == Command::Read {
            assert!(r.length <= max_len);
        }
    }
});
