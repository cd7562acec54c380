//! The framed data protocol as a node reads it once TLS is done: any byte stream yields frames
//! of bounded size, messages or decode errors, never a panic or an allocation beyond the
//! protocol's limit.
#![no_main]

use basalt_proto::data::{Hello, ReadRequest, WriteRequest, ZeroRequest};
use basalt_proto::wire::{self, Kind};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        let mut r = data;
        for _ in 0..64 {
            let header = match wire::read_header(&mut r).await {
                Ok(Some(h)) => h,
                Ok(None) | Err(_) => return,
            };
            assert!(header.body_len as usize <= wire::MAX_BODY);
            let Ok(body) = wire::read_body(&mut r, &header).await else { return };
            match Kind::from_u8(header.kind) {
                Some(Kind::Hello) => drop(Hello::decode(body)),
                Some(Kind::Write) => drop(WriteRequest::decode(body)),
                Some(Kind::Read) => drop(ReadRequest::decode(body)),
                Some(Kind::Zero) => drop(ZeroRequest::decode(body)),
                _ => {}
            }
        }
    });
});
