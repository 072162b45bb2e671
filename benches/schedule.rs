//! Planning: the weights of 10^5 checkpoints over T = 10^8 training iterations (one every 1000),
//! for every strategy, per checkpoint and with `--per-iter`. Run `cargo bench --bench
//! schedule`; every one must take well under 100 ms (BENCHMARKS.md), since planning never
//! loops over the iterations.

use clap::ValueEnum;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ema_tool::schedule::{Schedule, Strategy};

const CHECKPOINTS: u64 = 100_000;
const EVERY: u64 = 1000;

/// Each strategy with parameters that put its ramps and clamps inside the run.
fn schedule(strategy: Strategy) -> Schedule {
    let mut s = Schedule::new(strategy);
    s.power_gamma = 6.94;
    s.warmup = true;
    s.min_decay = 0.5;
    s.update_after_step = 5000;
    s
}

fn planning(c: &mut Criterion) {
    let steps: Vec<u64> = (1..=CHECKPOINTS).map(|k| k * EVERY).collect();
    let mut group = c.benchmark_group("plan 1e5 checkpoints, T = 1e8");
    group.sample_size(10);
    for &strategy in Strategy::value_variants() {
        let s = schedule(strategy);
        s.validate().expect("valid parameters");
        for per_iter in [false, true] {
            let id = BenchmarkId::new(
                strategy.name(),
                if per_iter {
                    "per-iter"
                } else {
                    "per-checkpoint"
                },
            );
            group.bench_function(id, |b| {
                b.iter(|| {
                    s.weights(steps.len(), per_iter.then_some(&steps[..]))
                        .expect("weights")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
