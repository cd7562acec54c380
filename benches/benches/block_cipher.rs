//! Sealing and opening an encrypted volume's blocks (volume-client `crypt`, the `aes-gcm`
//! crate), 1 MiB at a time as a large read or write does. Beside it in the same run: a plain
//! copy of the same bytes (what any data path pays) and *ring*'s AES-256-GCM over the same
//! blocks (the TLS provider's implementation), so the ratio shows what the cipher costs and
//! what a faster implementation would save.

use basalt_common::VolumeId;
use basalt_volume_client::crypt::{DataKey, Kek, VolumeCipher};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const LEN: usize = 1 << 20;

mod yardstick {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

    /// Seals `data` in 4 KiB blocks with *ring*: same nonce and associated-data sizes.
    pub fn seal_with_ring(key: &LessSafeKey, data: &mut [u8]) {
        for (i, block) in data.chunks_mut(4096).enumerate() {
            let mut nonce = [0u8; 12];
            nonce[4..12].copy_from_slice(&(i as u64).to_be_bytes());
            let aad = [0u8; 21];
            let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), block).expect("seal");
            let _ = std::hint::black_box(tag);
        }
    }

    pub fn key() -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("key"))
    }
}

fn bench(c: &mut Criterion) {
    let kek = Kek::from_bytes([1u8; 32]);
    let (key, _) = DataKey::generate(1, &kek, "bench").expect("key");
    let cipher = VolumeCipher::new(VolumeId(1), vec![key], 1).expect("cipher");
    let plain = vec![0x5au8; LEN];
    let mut g = c.benchmark_group("block_cipher_1MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_function("copy (baseline)", |b| {
        b.iter(|| {
            let buf = plain.clone();
            std::hint::black_box(buf);
        })
    });
    g.bench_function("seal (aes-gcm)", |b| {
        b.iter(|| {
            let mut buf = plain.clone();
            let ctx = cipher.seal(1, 0, &mut buf).expect("seal");
            std::hint::black_box((buf, ctx));
        })
    });
    let mut sealed = plain.clone();
    let contexts: Vec<_> = cipher.seal(1, 0, &mut sealed).expect("seal").into_iter().map(Some).collect();
    g.bench_function("open (aes-gcm)", |b| {
        b.iter(|| {
            let mut buf = sealed.clone();
            cipher.open(0, &mut buf, &contexts).expect("open");
            std::hint::black_box(buf);
        })
    });
    let ring_key = yardstick::key();
    g.bench_function("seal (ring, yardstick)", |b| {
        b.iter(|| {
            let mut buf = plain.clone();
            yardstick::seal_with_ring(&ring_key, &mut buf);
            std::hint::black_box(buf);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
