//! Fuzzes the plan: input ordering (natural sort, steps from file names and metadata) and the
//! weights of every strategy. No panic; orders are permutations; weights are finite, in
//! [0, 1] and sum to 1; the natural order is a total order.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ema_tool::checkpoint::step::{find, SAFETENSORS_STEP_KEYS};
use ema_tool::plan::order::{natural_cmp, order_inputs, Order};
use ema_tool::schedule::{Schedule, Strategy};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use clap::ValueEnum;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    names: Vec<String>,
    metadata_steps: Vec<Option<String>>,
    order: u8,
    strategy: u8,
    momentum: f64,
    interval: u64,
    gamma: f64,
    warm_up: f64,
    total_iter: f64,
    power_gamma: f64,
    per_iter: bool,
}

const ORDERS: [Order; 4] = [Order::Auto, Order::Given, Order::Name, Order::Step];

fuzz_target!(|inp: Input| {
    let names: Vec<String> = inp.names.into_iter().take(64).collect();
    if names.is_empty() {
        return;
    }
    let paths: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    let steps: Vec<Option<u64>> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut meta = BTreeMap::new();
            if let Some(Some(s)) = inp.metadata_steps.get(i) {
                meta.insert(SAFETENSORS_STEP_KEYS[i % 5].to_string(), s.clone());
            }
            find(&meta, &SAFETENSORS_STEP_KEYS, p).map(|(s, _)| s)
        })
        .collect();

    // The natural order is a total order on these names.
    for a in &names {
        assert_eq!(natural_cmp(a, a), std::cmp::Ordering::Equal);
        for b in &names {
            assert_eq!(
                natural_cmp(a, b),
                natural_cmp(b, a).reverse(),
                "{a:?} {b:?}"
            );
            for c in names.iter().take(8) {
                if natural_cmp(a, b).is_le() && natural_cmp(b, c).is_le() {
                    assert!(natural_cmp(a, c).is_le(), "{a:?} <= {b:?} <= {c:?}");
                }
            }
        }
    }

    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let order = ORDERS[inp.order as usize % 4];
    let Ok(ord) = order_inputs(order, &refs, &steps) else {
        assert_eq!(order, Order::Step);
        return;
    };
    let mut seen = ord.perm.clone();
    seen.sort();
    assert_eq!(seen, (0..names.len()).collect::<Vec<_>>(), "a permutation");
    let ordered: Vec<Option<u64>> = ord.perm.iter().map(|&i| steps[i]).collect();
    if ord.used == Order::Step {
        assert!(ordered.windows(2).all(|w| w[0] <= w[1]));
    }

    let strategy = {
        let all = Strategy::value_variants();
        all[inp.strategy as usize % all.len()]
    };
    let schedule = Schedule {
        momentum: inp.momentum,
        interval: inp.interval,
        gamma: inp.gamma,
        warm_up: inp.warm_up,
        total_iter: inp.total_iter,
        power_gamma: inp.power_gamma,
        ..Schedule::new(strategy)
    };
    if schedule.validate().is_err() {
        return;
    }
    let per_iter_steps: Option<Vec<u64>> = if inp.per_iter {
        match ordered.iter().copied().collect::<Option<Vec<u64>>>() {
            Some(s) => Some(s),
            None => return,
        }
    } else {
        None
    };
    let Ok(w) = schedule.weights(names.len(), per_iter_steps.as_deref()) else {
        return;
    };
    assert_eq!(w.len(), names.len());
    let sum: f64 = w.iter().sum();
    assert!(
        w.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)),
        "{w:?}"
    );
    assert!(
        (sum - 1.0).abs() < 1e-9,
        "weights sum to {sum}: {schedule:?}"
    );
});
