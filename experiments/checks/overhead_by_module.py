"""Where a fused decode step's time outside the kernels goes, per kind of sparse module.

The ``step_overhead`` evaluator reports one figure per token; this breaks it down. One
model and sparsifier on ``backend=fused`` (calibrated as the experiment does, from the cache
when it can), a held-out prompt, then greedy decodes with ``ModuleClock`` around every sparse
module's forward and the backend's kernel clock read before and after each call. Per kind
(``mlp`` for an MLP module, else the projection: q, k, v, o, ...): calls per token, time per
call inside the forward, kernel time per call, time per call in the torch linears of projections
left dense (their own compute, clocked the same way), and the rest (the overhead) per call and
per token; medians over ``--repeats`` decodes. Run it on an idle machine:

    python -m sparsebench.experiments.checks.overhead_by_module --model smollm2-135m --sparsifier teal

Prints one JSON object. The numbers include the clock's own floor (about 0.1 µs per call,
``overhead/clock_floor_us`` of the evaluator).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsifier", default="teal")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. backend.weights=bfloat16)")
    args = ap.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_module

    from sparsebench.data.corpus import heldout_windows, load_corpus
    from sparsebench.evaluators.decode import ModuleClock, greedy_decode
    from sparsebench.evaluators.step_overhead import dense_linears
    from sparsebench.models.calibration import load_or_calibrate
    from sparsebench.models.loader import load_model, set_offline
    from sparsebench.models.patching import SparsityController
    from sparsebench.run import build_components, prefill_policy

    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=decode_fused", f"model={args.model}",
                                           f"sparsifier={args.sparsifier}", f"threads={args.threads}",
                                           *args.overrides])
    set_offline()
    torch.set_num_threads(args.threads)
    sparsifier, backend, _ = build_components(cfg)
    model, tokenizer, model_id = load_model(cfg.model, cfg.cache_dir, "cpu")
    splits = load_corpus(cfg.data, cfg.cache_dir)
    ctl = SparsityController(sparsifier, backend, prefill=prefill_policy(cfg), check_finite=False).attach(model)
    load_or_calibrate(sparsifier, ctl, model, tokenizer, splits, model_id, cfg.data, int(cfg.seed), cfg.cache_dir)
    prompt = heldout_windows(tokenizer, splits, 1, args.prompt_tokens).ids

    modules = {("mlp", site.layer_idx): site.installed for site in ctl.sites}
    for site, proj, wrapper in ctl.input_masked_linears():
        if proj not in ("gate", "up", "down"):  # those run inside the MLP module, already timed
            modules[(proj, site.layer_idx)] = wrapper
    # the torch linears inside each module: a projection left dense runs there, and its time
    # is the projection's own compute (as the step_overhead evaluator counts it), not overhead
    inner = {(*key, i): lin for key, m in modules.items() for i, lin in enumerate(dense_linears([m]))}
    steps = args.new_tokens - 1
    per_kind = collections.defaultdict(lambda: collections.defaultdict(list))
    step_ms = []
    with torch.no_grad():
        greedy_decode(model, prompt, 8)  # warm-up
        for _ in range(args.repeats):
            # the clock times each forward and adds up the backend's kernel seconds of the same calls
            clock = ModuleClock(modules, counter=lambda: backend.kernel_s)
            dense = ModuleClock(inner)
            try:
                _, _, decode_s = greedy_decode(model, prompt, args.new_tokens)
            finally:
                dense.remove()
                clock.remove()
            step_ms.append(1e3 * decode_s / steps)
            sums = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0])
            for key in modules:
                s = sums[key[0]]
                s[0] += clock.seconds[key]
                s[1] += clock.counted[key]
                s[3] += clock.calls[key]
            for key in inner:
                sums[key[0]][2] += dense.seconds[key]
                sums[key[0]][4] += dense.calls[key]
            for kind, (inside, kern, dense_s, calls, dense_calls) in sums.items():
                d = per_kind[kind]
                rest = inside - kern - dense_s
                d["calls_per_token"].append(calls / steps)
                d["inside_us_per_call"].append(1e6 * inside / max(calls, 1))
                d["kernel_us_per_call"].append(1e6 * kern / max(calls, 1))
                d["dense_linear_calls_per_token"].append(dense_calls / steps)
                d["dense_linear_us_per_call"].append(1e6 * dense_s / max(calls, 1))
                d["outside_us_per_call"].append(1e6 * rest / max(calls, 1))
                d["outside_ms_per_token"].append(1e3 * rest / steps)
    step = statistics.median(step_ms)
    kinds = {kind: {name: round(statistics.median(v), 2) for name, v in d.items()} for kind, d in per_kind.items()}
    total = sum(k["outside_ms_per_token"] for k in kinds.values())
    report = {"model": args.model, "sparsifier": args.sparsifier, "threads": args.threads,
              "overrides": args.overrides, "step_ms": round(step, 2), "outside_ms_per_token": round(total, 2),
              "outside_fraction_of_step": round(total / step, 4), "by_kind": kinds}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
