//! Arbitrary client bytes during option negotiation: the handshake ends with an export, an
//! error or an abort, never a panic or a hang.
#![no_main]

use basalt_volume_client::nbd::handshake::{ExportInfo, negotiate};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(data).await.expect("write input");
        client.shutdown().await.expect("close input");
        let exports = vec![ExportInfo {
            name: "demo".into(),
            description: "fuzz".into(),
            size: 1 << 30,
            read_only: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        }];
        let _ = negotiate(&mut server, &exports).await;
        drop(server);
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    });
});
