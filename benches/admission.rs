//! The pure core, body bytes to response bytes: `kips::webhook::review::review` for pod and
//! Deployment admission at three sizes, and the typical pod split into its stages.
//!
//! `cargo bench --bench admission`. Allocation counts: `cargo bench --bench admission_allocations`.

mod common;

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kips::inject::InjectConfig;
use kips::webhook::review as admission;
use serde::de::IgnoredAny;

fn review(c: &mut Criterion) {
    let config = InjectConfig::default();
    let mut group = c.benchmark_group("review");
    for fixture in common::all_fixtures() {
        common::assert_patched(&fixture, &config);
        group.throughput(Throughput::Bytes(fixture.body.len() as u64));
        group.bench_function(&fixture.name, |b| {
            b.iter(|| admission::review(black_box(&fixture.body), &config))
        });
    }
    let reinvoked = common::reinvoked_pod(&config);
    group.throughput(Throughput::Bytes(reinvoked.body.len() as u64));
    group.bench_function(&reinvoked.name, |b| {
        b.iter(|| admission::review(black_box(&reinvoked.body), &config))
    });
    group.finish();
}

/// Where one typical pod admission goes: reading JSON at all (the floor any parser pays),
/// deciding (borrowed views, plan, patch operations), and writing the response.
fn stages(c: &mut Criterion) {
    let config = InjectConfig::default();
    let fixture = common::fixture("pod", "typical");
    let mut group = c.benchmark_group("stages/pod-typical");
    group.bench_function("json-skim (IgnoredAny)", |b| {
        b.iter(|| serde_json::from_slice::<IgnoredAny>(black_box(&fixture.body)).unwrap())
    });
    group.bench_function("decide", |b| {
        b.iter(|| admission::decide(black_box(&fixture.body), &config))
    });
    group.bench_function("respond", |b| {
        b.iter_batched(
            || admission::decide(&fixture.body, &config),
            admission::Decision::respond,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, review, stages);
criterion_main!(benches);
