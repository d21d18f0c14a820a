//! Per-core costs that bound what consensus can do: `cargo bench -p bulwark-crypto`.

use bulwark_crypto::{ChainId, Committee, Digest, Domain, KeyPair, QuorumSignatures, ReplicaId, codec};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use std::hint::black_box;

/// A transaction whose payload serde sees as a sequence of u8 values.
#[derive(Serialize, Deserialize)]
struct Transaction {
    client: u64,
    sequence: u64,
    payload: Vec<u8>,
}

/// The same transaction with its payload encoded as one byte string (`serde_bytes`).
#[derive(Serialize, Deserialize)]
struct ByteTransaction {
    client: u64,
    sequence: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

fn signatures(c: &mut Criterion) {
    let key = KeyPair::generate();
    let chain = ChainId::from_name("bench");
    let message = [7u8; 80];
    let sig = key.sign(Domain::Vote, chain, &message[..]);
    c.bench_function("ed25519_sign", |b| b.iter(|| key.sign(Domain::Vote, chain, black_box(&message[..]))));
    c.bench_function("ed25519_verify", |b| {
        b.iter(|| key.public().verify(Domain::Vote, chain, black_box(&message[..]), &sig))
    });

    let mut group = c.benchmark_group("quorum_batch_verify");
    for n in [3usize, 5, 64] {
        // n signers need a committee of at least n members (and at least 4).
        let (committee, keys) = Committee::deterministic("bench", n.max(4), 7000).expect("committee");
        let set = QuorumSignatures::new(
            (0..n)
                .map(|i| {
                    (ReplicaId(i as u16), keys[i].sign(Domain::Vote, committee.chain_id(), &message[..]))
                })
                .collect(),
        );
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| set.verify(&committee, Domain::Vote, &message[..], n).expect("valid"))
        });
    }
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sha256");
    for size in [512usize, 500_000] {
        let data = vec![0xabu8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| Digest::of(black_box(data)))
        });
    }
    group.finish();
}

fn codec_batch(c: &mut Criterion) {
    let batch: Vec<Transaction> = (0..1000)
        .map(|i| Transaction { client: i % 17, sequence: i, payload: vec![(i % 251) as u8; 512] })
        .collect();
    let bytes = codec::encode(&batch).expect("encode");
    let mut group = c.benchmark_group("codec_1000_tx_batch");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("encode", |b| b.iter(|| codec::encode(black_box(&batch)).expect("encode")));
    group.bench_function("decode", |b| {
        b.iter(|| {
            codec::decode::<Vec<Transaction>>(black_box(&bytes), codec::MAX_DECODE_BYTES).expect("decode")
        })
    });
    let batch: Vec<ByteTransaction> = (0..1000)
        .map(|i| ByteTransaction { client: i % 17, sequence: i, payload: vec![(i % 251) as u8; 512] })
        .collect();
    let bytes = codec::encode(&batch).expect("encode");
    group.bench_function("encode_serde_bytes", |b| {
        b.iter(|| codec::encode(black_box(&batch)).expect("encode"))
    });
    group.bench_function("decode_serde_bytes", |b| {
        b.iter(|| {
            codec::decode::<Vec<ByteTransaction>>(black_box(&bytes), codec::MAX_DECODE_BYTES).expect("decode")
        })
    });
    group.finish();
}

criterion_group!(benches, signatures, hashing, codec_batch);
criterion_main!(benches);
