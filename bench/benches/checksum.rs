//! CRC32C over a 4 KiB block: the `crc32c` crate (SSE4.2 / ARMv8 CRC
//! instructions) against the `crc` crate named on the design card (table
//! driven). The result decided docs/dependencies.md.
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let block = vec![0xA5u8; 4096];
    let mut g = c.benchmark_group("crc32c_4k");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("crc32c_crate", |b| {
        b.iter(|| crc32c::crc32c(black_box(&block)))
    });
    let table = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    g.bench_function("crc_crate", |b| {
        b.iter(|| table.checksum(black_box(&block)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
