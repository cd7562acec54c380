//! Arbitrary client bytes during option negotiation: the handshake ends with an export, an
//! error, an abort or (FORCEDTLS) a STARTTLS, never a panic or a hang. The first byte picks
//! the mode: plaintext, FORCEDTLS, or the option haggling that follows a TLS upgrade.
#![no_main]

use basalt_volume_client::nbd::handshake::{ExportInfo, TlsMode, negotiate, negotiate_over_tls};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, data)) = input.split_first() else { return };
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
        match mode % 3 {
            0 => drop(negotiate(&mut server, &exports, TlsMode::Off).await),
            1 => drop(negotiate(&mut server, &exports, TlsMode::Forced).await),
            _ => drop(negotiate_over_tls(&mut server, &exports, mode & 0x80 != 0).await),
        }
        drop(server);
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    });
});
