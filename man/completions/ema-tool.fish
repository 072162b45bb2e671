# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_ema_tool_global_optspecs
    string join \n h/help V/version
end

function __fish_ema_tool_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_ema_tool_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_ema_tool_using_subcommand
    set -l cmd (__fish_ema_tool_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c ema-tool -n "__fish_ema_tool_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "ema" -d 'Fold a series of checkpoints into an exponential moving average'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "swa" -d 'Fold a series of checkpoints into a stochastic weight average (mmengine StochasticWeightAverage: the mean of the inputs taken every --interval)'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "swap" -d 'Exchange the EMA and raw weights inside a checkpoint, or extract deployable weights'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "posthoc" -d 'Synthesise post-hoc EMAs from snapshots of power-function EMAs (EDM2, ema-pytorch PostHocEMA)'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "inspect" -d 'Show what a checkpoint holds: format, tensors, dtypes, metadata, step, EMA layout'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "completions" -d 'Print a shell completion script to stdout'
complete -c ema-tool -n "__fish_ema_tool_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s s -l strategy -d 'Averaging strategy; the libraries\' class names are accepted too' -r -f -a "exponential\t'mmengine `ExponentialMovingAverage`: m_k = momentum'
annealing\t'mmengine `MomentumAnnealingEMA`: m_k = max(momentum, gamma / (gamma + k))'
mmcv\t'mmcv `EMAHook`: updates when it % interval == 0, m = min(momentum^interval, (1+it)/(warm_up+it))'
exp-momentum\t'mmdet `ExpMomentumEMAHook`: updates when (it+1) % interval == 0, m = (1 − momentum)·exp(−(1+it)/total_iter) + momentum'
linear-momentum\t'mmdet `LinearMomentumEMAHook`: updates when (it+1) % interval == 0, m = min(momentum^interval, (1+it)/(warm_up+it))'
swa\t'mmengine `StochasticWeightAverage`: m_k = 1 / (k // interval + 1)'
power\t'EDM2 power-function EMA (`PowerFunctionEMA`, batch 1): decay (1 − 1/u)^(γ+1) at update u; γ from --sigma-rel or --power-gamma'
timm\t'timm `ModelEmaV3`: decay, or its warm-up 1 − (1 + s/warmup_gamma)^−warmup_power clamped to [min_decay, decay], from update_after_step on'
diffusers\t'diffusers `EMAModel`: (1 + s)/(10 + s), or the warm-up 1 − (1 + s/inv_gamma)^−power, clamped to [min_decay, decay], from update_after_step on'
ultralytics\t'ultralytics / YOLOv5 `ModelEMA`: decay · (1 − exp(−u/tau))'
ema-pytorch\t'lucidrains ema-pytorch `EMA`: every update_every-th update after update_after_step, 1 − (1 + e/inv_gamma)^−power clamped to [min_decay, decay]; copies before'
wma\t'Weighted moving average: weights proportional to the update\'s index (LLM checkpoint merging)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s m -l momentum -d 'Weight of the newer checkpoint in each update (mmengine convention) [default: 0.0002]. A comma-separated list sweeps, as every numeric option does' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l decay -d 'Decay of the average (timm/torch convention): momentum = 1 - DECAY' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l interval -d 'Update every INTERVAL-th step (mmengine/mmcv `interval`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l gamma -d '`annealing`: momentum = max(momentum, gamma / (gamma + k))' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l warm-up -d '`mmcv`, `linear-momentum`: warm-up iterations of the momentum' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l total-iter -d '`exp-momentum`: iterations over which the momentum decays' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l sigma-rel -d '`power`: relative standard deviation of the power-function profile (EDM2\'s `std`), 0 < S < 0.2887; its exponent γ is the largest root of γ³ + 7γ² + (16 − S⁻²)γ + (12 − S⁻²)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l power-gamma -d '`power`: exponent γ of the power function (EDM2\'s `exp`), instead of --sigma-rel' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l min-decay -d '`timm`, `diffusers`, `ema-pytorch`: the smallest decay (ema-pytorch `min_value`) [default: 0]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l update-after-step -d '`timm`, `diffusers`, `ema-pytorch`: updates before the average starts (it copies the model until then) [default: 0; ema-pytorch: 100]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l update-every -d '`ema-pytorch`: update the average every N-th update [default: 10]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l warmup-gamma -d '`timm`: the warm-up\'s gamma [default: 1]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l warmup-power -d '`timm`: the warm-up\'s power [default: 2/3]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l inv-gamma -d '`diffusers`, `ema-pytorch`: the warm-up\'s inverse gamma [default: 1]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l power -d '`diffusers`, `ema-pytorch`: the warm-up\'s power [default: 2/3]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l tau -d '`ultralytics`: the decay\'s ramp, decay · (1 − exp(−u/tau)) [default: 2000]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s o -l output -d 'Output file: `.safetensors`, or a PyTorch state dict when it ends in `.pth`, `.pt`, `.bin`, `.ckpt` or `.pth.tar` (loadable with `torch.load(path, weights_only=True)`; metadata is not kept there). `swap` from a PyTorch checkpoint to one keeps every other entry of the checkpoint. With a sweep, a template: `{decay}`, `{sigma_rel}`, ... (the option\'s name) are replaced by each value as typed' -r -F
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l max-shard-size -d 'Split a safetensors output into Hugging Face-style shards of at most SIZE (`5GB`, `500MB`, `2GiB`): `<stem>-00001-of-0000N.safetensors` and `<stem>.safetensors.index.json` beside the output name. When everything fits in one shard, the output is one file' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l format -d 'The output\'s format: `safetensors` (the default; a PyTorch state dict by the output\'s extension), or `dcp`, a torch distributed checkpoint directory `-o DIR` that `torch.distributed.checkpoint.load` reads back into the state dict\'s structure (for `ema`, `swa` and `posthoc`)' -r -f -a "safetensors\t''
dcp\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l dtype -d 'Dtype of floating-point output tensors (default: each tensor\'s input dtype)' -r -f -a "f32\t''
f16\t''
bf16\t''
f64\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l buffer-pattern -d 'Glob of buffer names for --skip-buffers (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l include -d 'Only output tensors whose names match GLOB (repeatable; `*` matches any characters)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l exclude -d 'Leave out tensors whose names match GLOB (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l order -d 'How to order the inputs' -r -f -a "auto\t'By step when every input has one, otherwise as given'
given\t'As given on the command line'
name\t'Natural sort of the file names (`iter_200` before `iter_1000`)'
step\t'By step; an input without a step is an error'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l steps -d 'Keep the inputs whose step is in [A, B] (`1000:5000`; either end may be left out)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l last -d 'Keep the last N inputs (after --steps)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l best -d 'Keep the N inputs with the best --metric (after --steps and --last), folded in their order' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l metric -d 'The number that --best ranks by: a metadata entry (safetensors `__metadata__`, a plain value of a `.pth` such as timm\'s `metric`) or a one-element tensor (a Lightning ModelCheckpoint score); the end of a dotted name is enough when only one name ends so' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l mode -d 'Whether --best keeps the largest (accuracy) or the smallest (loss) values' -r -f -a "max\t'The largest values (accuracy, mAP)'
min\t'The smallest values (loss)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l ema-on -d 'Which side holds the EMA weights (default: from the file\'s ema-tool metadata, else the layout\'s: mmengine, mmcv, lightning → model; the others → shadow)' -r -f -a "model\t'The model\'s own tensors (`state_dict.<n>`, or `<n>` for mmcv without prefix)'
shadow\t'The EMA copy\'s tensors (`ema_state_dict.module.<n>`, `ema_<n>`, `state_dict_ema.<n>`)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l layout -d 'Layout of the EMA/raw pair (default: detected)' -r -f -a "mmengine\t'mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`)'
mmcv\t'mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`'
timm\t'timm: `state_dict.<n>` and `state_dict_ema.<n>`'
lightning\t'Lightning ≥ 2.6 `EMAWeightAveraging`: `state_dict.<n>` (the average) and `current_model_state.<n>` (the raw weights)'
swa-utils\t'torch `AveragedModel` saved beside the model: `<P>.<n>` and `<Q>.module.<n>` (+ `<Q>.n_averaged`)'
ema-pytorch\t'ema-pytorch `EMA`/`KarrasEMA`/`PostHocEMA` state: `<P>.<n>` or `<Q>.online_model.<n>`, and `<Q>.ema_model.<n>` (+ `<Q>.initted`, `<Q>.step`)'
ultralytics\t'ultralytics / YOLOv5 trainer checkpoints: `model.<n>` (may be absent) and `ema.<n>`'
custom\t'`--model-prefix P` and `--shadow-prefix Q`: `P<n>` and `Q<n>`'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l model-prefix -d '`--layout custom`: the prefix of the model side\'s names (`net.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l shadow-prefix -d '`--layout custom`: the prefix of the shadow side\'s names (`net_ema.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l strip-prefix -d 'Prefix stripped from deployed names wherever it leads them, again and again (repeatable) [default: module. and _orig_mod.]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l device -d 'Device that folds: cpu, cuda or cuda:N' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s j -l threads -d 'Worker threads (default: one per core)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l mapped-inputs -d 'How many inputs (the first ones) the CPU fold reads through memory maps; the others are read with pread. A mapping costs less CPU on page-cached inputs, each keeps about 4 MiB resident; 0 reads every input with pread' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l warmup -d '`timm` (`use_warmup`), `diffusers` (`use_ema_warmup`): warm the decay up as 1 − (1 + s/gamma)^−power'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s f -l force -d 'Replace the output file if it exists'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s q -l quiet -d 'Print no progress bar, summary or warnings'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l json -d 'Print a machine-readable JSON summary on stdout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l check-finite -d 'Fail if any input or output value of a float tensor is NaN or infinite'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l per-iter -d 'Treat momentum as per training iteration: x_k holds over the iterations between the steps of x_{k-1} and x_k, and the schedule is applied at every one of them'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l skip-buffers -d 'Copy buffers (see --buffer-pattern) from the last checkpoint instead of averaging them (mmengine update_buffers=False, mmdet skip_buffers=True)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l deploy -d 'Fold each input\'s deployable weights (the EMA side under the model\'s own names; for an input without EMA pairs, its model tensors) into a plain state dict: no optimizer, no counters'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -l raw -d 'With --deploy: fold the raw (non-EMA) side of each input instead'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s n -l dry-run -d 'Print the plan (order, steps, weights) and write nothing'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand ema" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l interval -d 'Average every INTERVAL-th checkpoint (mmengine `interval`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s o -l output -d 'Output file: `.safetensors`, or a PyTorch state dict when it ends in `.pth`, `.pt`, `.bin`, `.ckpt` or `.pth.tar` (loadable with `torch.load(path, weights_only=True)`; metadata is not kept there). `swap` from a PyTorch checkpoint to one keeps every other entry of the checkpoint. With a sweep, a template: `{decay}`, `{sigma_rel}`, ... (the option\'s name) are replaced by each value as typed' -r -F
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l max-shard-size -d 'Split a safetensors output into Hugging Face-style shards of at most SIZE (`5GB`, `500MB`, `2GiB`): `<stem>-00001-of-0000N.safetensors` and `<stem>.safetensors.index.json` beside the output name. When everything fits in one shard, the output is one file' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l format -d 'The output\'s format: `safetensors` (the default; a PyTorch state dict by the output\'s extension), or `dcp`, a torch distributed checkpoint directory `-o DIR` that `torch.distributed.checkpoint.load` reads back into the state dict\'s structure (for `ema`, `swa` and `posthoc`)' -r -f -a "safetensors\t''
dcp\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l dtype -d 'Dtype of floating-point output tensors (default: each tensor\'s input dtype)' -r -f -a "f32\t''
f16\t''
bf16\t''
f64\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l buffer-pattern -d 'Glob of buffer names for --skip-buffers (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l include -d 'Only output tensors whose names match GLOB (repeatable; `*` matches any characters)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l exclude -d 'Leave out tensors whose names match GLOB (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l order -d 'How to order the inputs' -r -f -a "auto\t'By step when every input has one, otherwise as given'
given\t'As given on the command line'
name\t'Natural sort of the file names (`iter_200` before `iter_1000`)'
step\t'By step; an input without a step is an error'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l steps -d 'Keep the inputs whose step is in [A, B] (`1000:5000`; either end may be left out)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l last -d 'Keep the last N inputs (after --steps)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l best -d 'Keep the N inputs with the best --metric (after --steps and --last), folded in their order' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l metric -d 'The number that --best ranks by: a metadata entry (safetensors `__metadata__`, a plain value of a `.pth` such as timm\'s `metric`) or a one-element tensor (a Lightning ModelCheckpoint score); the end of a dotted name is enough when only one name ends so' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l mode -d 'Whether --best keeps the largest (accuracy) or the smallest (loss) values' -r -f -a "max\t'The largest values (accuracy, mAP)'
min\t'The smallest values (loss)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l ema-on -d 'Which side holds the EMA weights (default: from the file\'s ema-tool metadata, else the layout\'s: mmengine, mmcv, lightning → model; the others → shadow)' -r -f -a "model\t'The model\'s own tensors (`state_dict.<n>`, or `<n>` for mmcv without prefix)'
shadow\t'The EMA copy\'s tensors (`ema_state_dict.module.<n>`, `ema_<n>`, `state_dict_ema.<n>`)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l layout -d 'Layout of the EMA/raw pair (default: detected)' -r -f -a "mmengine\t'mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`)'
mmcv\t'mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`'
timm\t'timm: `state_dict.<n>` and `state_dict_ema.<n>`'
lightning\t'Lightning ≥ 2.6 `EMAWeightAveraging`: `state_dict.<n>` (the average) and `current_model_state.<n>` (the raw weights)'
swa-utils\t'torch `AveragedModel` saved beside the model: `<P>.<n>` and `<Q>.module.<n>` (+ `<Q>.n_averaged`)'
ema-pytorch\t'ema-pytorch `EMA`/`KarrasEMA`/`PostHocEMA` state: `<P>.<n>` or `<Q>.online_model.<n>`, and `<Q>.ema_model.<n>` (+ `<Q>.initted`, `<Q>.step`)'
ultralytics\t'ultralytics / YOLOv5 trainer checkpoints: `model.<n>` (may be absent) and `ema.<n>`'
custom\t'`--model-prefix P` and `--shadow-prefix Q`: `P<n>` and `Q<n>`'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l model-prefix -d '`--layout custom`: the prefix of the model side\'s names (`net.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l shadow-prefix -d '`--layout custom`: the prefix of the shadow side\'s names (`net_ema.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l strip-prefix -d 'Prefix stripped from deployed names wherever it leads them, again and again (repeatable) [default: module. and _orig_mod.]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l device -d 'Device that folds: cpu, cuda or cuda:N' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s j -l threads -d 'Worker threads (default: one per core)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l mapped-inputs -d 'How many inputs (the first ones) the CPU fold reads through memory maps; the others are read with pread. A mapping costs less CPU on page-cached inputs, each keeps about 4 MiB resident; 0 reads every input with pread' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s f -l force -d 'Replace the output file if it exists'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s q -l quiet -d 'Print no progress bar, summary or warnings'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l json -d 'Print a machine-readable JSON summary on stdout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l check-finite -d 'Fail if any input or output value of a float tensor is NaN or infinite'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l per-iter -d 'Treat momentum as per training iteration: x_k holds over the iterations between the steps of x_{k-1} and x_k, and the schedule is applied at every one of them'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l skip-buffers -d 'Copy buffers (see --buffer-pattern) from the last checkpoint instead of averaging them (mmengine update_buffers=False, mmdet skip_buffers=True)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l deploy -d 'Fold each input\'s deployable weights (the EMA side under the model\'s own names; for an input without EMA pairs, its model tensors) into a plain state dict: no optimizer, no counters'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -l raw -d 'With --deploy: fold the raw (non-EMA) side of each input instead'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s n -l dry-run -d 'Print the plan (order, steps, weights) and write nothing'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swa" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s o -l output -d 'Output file: `.safetensors`, or a PyTorch state dict when it ends in `.pth`, `.pt`, `.bin`, `.ckpt` or `.pth.tar` (loadable with `torch.load(path, weights_only=True)`; metadata is not kept there). `swap` from a PyTorch checkpoint to one keeps every other entry of the checkpoint. With a sweep, a template: `{decay}`, `{sigma_rel}`, ... (the option\'s name) are replaced by each value as typed' -r -F
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l max-shard-size -d 'Split a safetensors output into Hugging Face-style shards of at most SIZE (`5GB`, `500MB`, `2GiB`): `<stem>-00001-of-0000N.safetensors` and `<stem>.safetensors.index.json` beside the output name. When everything fits in one shard, the output is one file' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l format -d 'The output\'s format: `safetensors` (the default; a PyTorch state dict by the output\'s extension), or `dcp`, a torch distributed checkpoint directory `-o DIR` that `torch.distributed.checkpoint.load` reads back into the state dict\'s structure (for `ema`, `swa` and `posthoc`)' -r -f -a "safetensors\t''
dcp\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l dtype -d 'Dtype of floating-point output tensors (default: each tensor\'s input dtype)' -r -f -a "f32\t''
f16\t''
bf16\t''
f64\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l ema-on -d 'Which side holds the EMA weights (default: from the file\'s ema-tool metadata, else the layout\'s: mmengine, mmcv, lightning → model; the others → shadow)' -r -f -a "model\t'The model\'s own tensors (`state_dict.<n>`, or `<n>` for mmcv without prefix)'
shadow\t'The EMA copy\'s tensors (`ema_state_dict.module.<n>`, `ema_<n>`, `state_dict_ema.<n>`)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l layout -d 'Layout of the EMA/raw pair (default: detected)' -r -f -a "mmengine\t'mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`)'
mmcv\t'mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`'
timm\t'timm: `state_dict.<n>` and `state_dict_ema.<n>`'
lightning\t'Lightning ≥ 2.6 `EMAWeightAveraging`: `state_dict.<n>` (the average) and `current_model_state.<n>` (the raw weights)'
swa-utils\t'torch `AveragedModel` saved beside the model: `<P>.<n>` and `<Q>.module.<n>` (+ `<Q>.n_averaged`)'
ema-pytorch\t'ema-pytorch `EMA`/`KarrasEMA`/`PostHocEMA` state: `<P>.<n>` or `<Q>.online_model.<n>`, and `<Q>.ema_model.<n>` (+ `<Q>.initted`, `<Q>.step`)'
ultralytics\t'ultralytics / YOLOv5 trainer checkpoints: `model.<n>` (may be absent) and `ema.<n>`'
custom\t'`--model-prefix P` and `--shadow-prefix Q`: `P<n>` and `Q<n>`'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l model-prefix -d '`--layout custom`: the prefix of the model side\'s names (`net.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l shadow-prefix -d '`--layout custom`: the prefix of the shadow side\'s names (`net_ema.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l strip-prefix -d 'Prefix stripped from deployed names wherever it leads them, again and again (repeatable) [default: module. and _orig_mod.]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s f -l force -d 'Replace the output file if it exists'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s q -l quiet -d 'Print no progress bar, summary or warnings'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l json -d 'Print a machine-readable JSON summary on stdout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l check-finite -d 'Fail if any input or output value of a float tensor is NaN or infinite'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s d -l deploy -d 'Write only the EMA weights, under the model\'s own names, as a plain state dict'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -l raw -d 'With --deploy: write the raw (non-EMA) weights instead'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand swap" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l sigma-rel -d 'Relative standard deviation of the EMA profile to synthesise (0 < S < 0.2887); a comma-separated list writes one output per value, from one read of the snapshots' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l step -d 'Training step to synthesise the EMA at [default: the latest snapshot\'s]; snapshots of later steps are left out, as EDM2 does' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l snapshot-sigma-rels -d 'The sigma_rel of each profile of a PostHocEMA folder, by `ind`, in the order given to `PostHocEMA(sigma_rels=…)` (its files do not record them)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l snapshot-gammas -d 'The exponent γ of each profile of a PostHocEMA folder, by `ind`, instead of --snapshot-sigma-rels' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l buffer-pattern -d 'Glob of buffer names for --skip-buffers (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l include -d 'Only output tensors whose names match GLOB (repeatable; `*` matches any characters)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l exclude -d 'Leave out tensors whose names match GLOB (repeatable)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l steps -d 'Keep the inputs whose step is in [A, B] (`1000:5000`; either end may be left out)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l last -d 'Keep the last N inputs (after --steps)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l best -d 'Keep the N inputs with the best --metric (after --steps and --last), folded in their order' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l metric -d 'The number that --best ranks by: a metadata entry (safetensors `__metadata__`, a plain value of a `.pth` such as timm\'s `metric`) or a one-element tensor (a Lightning ModelCheckpoint score); the end of a dotted name is enough when only one name ends so' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l mode -d 'Whether --best keeps the largest (accuracy) or the smallest (loss) values' -r -f -a "max\t'The largest values (accuracy, mAP)'
min\t'The smallest values (loss)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l ema-on -d 'Which side holds the EMA weights (default: from the file\'s ema-tool metadata, else the layout\'s: mmengine, mmcv, lightning → model; the others → shadow)' -r -f -a "model\t'The model\'s own tensors (`state_dict.<n>`, or `<n>` for mmcv without prefix)'
shadow\t'The EMA copy\'s tensors (`ema_state_dict.module.<n>`, `ema_<n>`, `state_dict_ema.<n>`)'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l layout -d 'Layout of the EMA/raw pair (default: detected)' -r -f -a "mmengine\t'mmengine EMAHook: `state_dict.<n>` and `ema_state_dict.module.<n>` (+ `ema_state_dict.steps`)'
mmcv\t'mmcv/mmdet 1.x hooks: `[state_dict.]<n>` and `[state_dict.]ema_<n with . → _>`'
timm\t'timm: `state_dict.<n>` and `state_dict_ema.<n>`'
lightning\t'Lightning ≥ 2.6 `EMAWeightAveraging`: `state_dict.<n>` (the average) and `current_model_state.<n>` (the raw weights)'
swa-utils\t'torch `AveragedModel` saved beside the model: `<P>.<n>` and `<Q>.module.<n>` (+ `<Q>.n_averaged`)'
ema-pytorch\t'ema-pytorch `EMA`/`KarrasEMA`/`PostHocEMA` state: `<P>.<n>` or `<Q>.online_model.<n>`, and `<Q>.ema_model.<n>` (+ `<Q>.initted`, `<Q>.step`)'
ultralytics\t'ultralytics / YOLOv5 trainer checkpoints: `model.<n>` (may be absent) and `ema.<n>`'
custom\t'`--model-prefix P` and `--shadow-prefix Q`: `P<n>` and `Q<n>`'"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l model-prefix -d '`--layout custom`: the prefix of the model side\'s names (`net.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l shadow-prefix -d '`--layout custom`: the prefix of the shadow side\'s names (`net_ema.`)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l strip-prefix -d 'Prefix stripped from deployed names wherever it leads them, again and again (repeatable) [default: module. and _orig_mod.]' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s o -l output -d 'Output file: `.safetensors`, or a PyTorch state dict when it ends in `.pth`, `.pt`, `.bin`, `.ckpt` or `.pth.tar` (loadable with `torch.load(path, weights_only=True)`; metadata is not kept there). `swap` from a PyTorch checkpoint to one keeps every other entry of the checkpoint. With a sweep, a template: `{decay}`, `{sigma_rel}`, ... (the option\'s name) are replaced by each value as typed' -r -F
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l max-shard-size -d 'Split a safetensors output into Hugging Face-style shards of at most SIZE (`5GB`, `500MB`, `2GiB`): `<stem>-00001-of-0000N.safetensors` and `<stem>.safetensors.index.json` beside the output name. When everything fits in one shard, the output is one file' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l format -d 'The output\'s format: `safetensors` (the default; a PyTorch state dict by the output\'s extension), or `dcp`, a torch distributed checkpoint directory `-o DIR` that `torch.distributed.checkpoint.load` reads back into the state dict\'s structure (for `ema`, `swa` and `posthoc`)' -r -f -a "safetensors\t''
dcp\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l dtype -d 'Dtype of floating-point output tensors (default: each tensor\'s input dtype)' -r -f -a "f32\t''
f16\t''
bf16\t''
f64\t''"
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l device -d 'Device that folds: cpu, cuda or cuda:N' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s j -l threads -d 'Worker threads (default: one per core)' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l mapped-inputs -d 'How many inputs (the first ones) the CPU fold reads through memory maps' -r
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l no-normalize -d 'Leave the solved weights as they are instead of normalising them to sum 1 (what ema-pytorch\'s `synthesize_ema_model` does)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l skip-buffers -d 'Copy buffers (see --buffer-pattern) from the last snapshot instead of averaging them (EDM2\'s reconstruction; ema-pytorch averages them)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l deploy -d 'Fold each input\'s deployable weights (the EMA side under the model\'s own names; for an input without EMA pairs, its model tensors) into a plain state dict: no optimizer, no counters'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l raw -d 'With --deploy: fold the raw (non-EMA) side of each input instead'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s f -l force -d 'Replace the output file if it exists'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s q -l quiet -d 'Print no progress bar, summary or warnings'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l json -d 'Print a machine-readable JSON summary on stdout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -l check-finite -d 'Fail if any input or output value of a float tensor is NaN or infinite'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s n -l dry-run -d 'Print the plan (snapshots, weights, condition number) and write nothing'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand posthoc" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand inspect" -s t -l tensors -d 'List every tensor: name, dtype, shape, bytes'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand inspect" -l stats -d 'Read values: min, max, mean, std and NaN/Inf counts per tensor'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand inspect" -l json -d 'Print one JSON document on stdout: `{"version", "files": [...]}`, one entry per checkpoint with `path`, `format`, `tensors`, `parameters`, `bytes`, `file_bytes`, `dtypes`, `metadata`, `step`, `step_source`, `layout`, `skipped` (`[{name, kind}]`: entries of a PyTorch checkpoint that are neither tensors nor plain values), for PyTorch checkpoints `tree` (`[{key, kind, tensors, bytes, values, skipped}]`, the top-level entries), for sharded ones `shards` (the files), for DCP directories `dcp` (`{files, chunks, sharded_tensors}`), and with --tensors or --stats `tensor_list` (with `chunks` per tensor of a DCP directory)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand inspect" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand inspect" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand completions" -s h -l help -d 'Print help'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand completions" -s V -l version -d 'Print version'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "ema" -d 'Fold a series of checkpoints into an exponential moving average'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "swa" -d 'Fold a series of checkpoints into a stochastic weight average (mmengine StochasticWeightAverage: the mean of the inputs taken every --interval)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "swap" -d 'Exchange the EMA and raw weights inside a checkpoint, or extract deployable weights'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "posthoc" -d 'Synthesise post-hoc EMAs from snapshots of power-function EMAs (EDM2, ema-pytorch PostHocEMA)'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "inspect" -d 'Show what a checkpoint holds: format, tensors, dtypes, metadata, step, EMA layout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "completions" -d 'Print a shell completion script to stdout'
complete -c ema-tool -n "__fish_ema_tool_using_subcommand help; and not __fish_seen_subcommand_from ema swa swap posthoc inspect completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
