//! Per-sample cost of the hot loops, one block (256 readings) at a time: normal variates, the
//! sine generator, the clamped random walk and window accumulation.
//!
//! `cargo bench -p twin-benches --bench signals`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use twin_core::rng::Stream;
use twin_core::signal::{BLOCK, Block, Signal, Sine};
use twin_core::stats::WindowAcc;

fn hot_loops(c: &mut Criterion) {
    let mut group = c.benchmark_group("block of 256 readings");
    group.throughput(Throughput::Elements(BLOCK as u64));
    let mut stream = Stream::derive(1, &["bench"]);
    let mut block = Block::new();

    group.bench_function("normal variates", |b| {
        b.iter(|| stream.fill_normal(black_box(&mut block.scratch)))
    });

    let sine = Signal::Sine(Sine::new(5.0, 86_400.0, 0.0, 20.0, 1.0));
    let mut first = 0u64;
    group.bench_function("sine", |b| {
        b.iter(|| {
            let mut level = 0.0;
            sine.generate(&mut level, &mut stream, first, &mut block, BLOCK);
            first += BLOCK as u64;
            black_box(&block.values[0]);
        })
    });

    let walk = Signal::RandomWalk {
        start: 50.0,
        step_std_dev: 0.5,
        min: 0.0,
        max: 100.0,
    };
    let mut level = 50.0;
    group.bench_function("clamped random walk (with its normals)", |b| {
        b.iter(|| {
            walk.generate(&mut level, &mut stream, 0, &mut block, BLOCK);
            black_box(&block.values[0]);
        })
    });

    stream.fill_normal(&mut block.values[0]);
    group.bench_function("window accumulation", |b| {
        b.iter(|| {
            let mut window = WindowAcc::default();
            window.add_block(black_box(&block.values[0]), 0.0);
            black_box(window)
        })
    });
    group.finish();
}

criterion_group!(benches, hot_loops);
criterion_main!(benches);
