//! Invariants over generated checkpoints: swa of identical checkpoints is that checkpoint,
//! the `--dry-run` weights sum to 1 and reproduce the fold, swapping twice is the identity.

mod common;

use common::*;
use proptest::prelude::*;
use safetensors::Dtype;
use serde_json::Value;

fn write_series(dir: &std::path::Path, series: &[Vec<f32>]) -> Vec<String> {
    series
        .iter()
        .enumerate()
        .map(|(i, vals)| {
            let p = dir.join(format!("iter_{}.safetensors", (i + 1) * 10));
            save(
                &p,
                &[("x", Dtype::F32, vec![vals.len()], f32_bytes(vals))],
                &[],
            );
            p.display().to_string()
        })
        .collect()
}

fn series() -> impl Strategy<Value = Vec<Vec<f32>>> {
    (1usize..6, 1usize..40).prop_flat_map(|(n, len)| {
        prop::collection::vec(prop::collection::vec(-1e3f32..1e3, len), n)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn swa_of_identical_checkpoints_is_that_checkpoint(vals in prop::collection::vec(-1e6f32..1e6, 1..50), n in 1usize..7, interval in 1u64..4) {
        let dir = tempfile::tempdir().unwrap();
        let inputs = write_series(dir.path(), &vec![vals.clone(); n]);
        let out = dir.path().join("swa.safetensors");
        let mut args = vec!["swa".to_string(), "-q".into(), "--interval".into(), interval.to_string(), "-o".into(), out.display().to_string()];
        args.extend(inputs);
        ok(&run(&args));
        let (t, _) = load(&out);
        prop_assert_eq!(&t["x"].data, &f32_bytes(&vals));
    }

    #[test]
    fn dry_run_weights_sum_to_one_and_reproduce_the_fold(
        s in series(),
        strategy in prop::sample::select(vec!["exponential", "annealing", "mmcv", "exp-momentum", "linear-momentum"]),
        momentum in 0.01f64..0.9,
        interval in 1u64..3,
        per_iter in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let inputs = write_series(dir.path(), &s);
        let out = dir.path().join("ema.safetensors");
        let mut common_args = vec!["ema".to_string(), "-q".into(), "--strategy".into(), strategy.into(), "--momentum".into(), momentum.to_string(), "--interval".into(), interval.to_string(), "--warm-up".into(), "2".into(), "--gamma".into(), "3".into(), "--total-iter".into(), "5".into()];
        if per_iter {
            common_args.push("--per-iter".into());
        }
        common_args.extend(inputs);
        let mut dry = common_args.clone();
        dry.extend(["--dry-run".into(), "--json".into()]);
        let o = run(&dry);
        ok(&o);
        let plan: Value = serde_json::from_str(&stdout(&o)).unwrap();
        let weights: Vec<f64> = plan["inputs"].as_array().unwrap().iter().map(|i| i["weight"].as_f64().unwrap()).collect();
        prop_assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{:?}", weights);
        prop_assert!(!out.exists(), "--dry-run wrote a file");

        let mut wet = common_args.clone();
        wet.extend(["-o".into(), out.display().to_string()]);
        ok(&run(&wet));
        let (t, _) = load(&out);
        // Inputs were written in step order, which is the fold order.
        let want: Vec<f64> = (0..s[0].len())
            .map(|i| s.iter().zip(&weights).map(|(x, w)| w * x[i] as f64).sum())
            .collect();
        close("x", "F32", &t["x"].values(), &want).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn swap_twice_is_the_identity(vals in prop::collection::vec(any::<u32>(), 1..20), layout in 0usize..3) {
        // Arbitrary bit patterns (NaNs included) must survive bit for bit.
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = vals.iter().flat_map(|v| (!v).to_le_bytes()).collect();
        let n = vals.len();
        let (model, shadow) = [
            ("state_dict.layer.w", "ema_state_dict.module.layer.w"),
            ("state_dict.layer.w", "state_dict.ema_layer_w"),
            ("state_dict.layer.w", "state_dict_ema.layer.w"),
        ][layout];
        let input = dir.path().join("in.safetensors");
        save(&input, &[(model, Dtype::F32, vec![n], a.clone()), (shadow, Dtype::F32, vec![n], b.clone()), ("other", Dtype::I64, vec![1], vec![7, 0, 0, 0, 0, 0, 0, 0])], &[("note", "kept")]);
        let once = dir.path().join("once.safetensors");
        let twice = dir.path().join("twice.safetensors");
        ok(&run(["swap", "-q", input.to_str().unwrap(), "-o", once.to_str().unwrap()]));
        ok(&run(["swap", "-q", once.to_str().unwrap(), "-o", twice.to_str().unwrap()]));
        let (t1, _) = load(&once);
        prop_assert_eq!(&t1[model].data, &b);
        prop_assert_eq!(&t1[shadow].data, &a);
        let (t2, m2) = load(&twice);
        let (t0, _) = load(&input);
        prop_assert_eq!(t2, t0);
        prop_assert_eq!(m2.get("note").map(String::as_str), Some("kept"));
    }
}
