"""Peak host memory that a sparsifier's calibration adds on top of the loaded model.

Calibration runs layer by layer (``sparsifiers.base.capture_layer_inputs``) and holds
one layer of hidden states at a time, so what it adds grows with calibration tokens ×
hidden size, not × layers. This prints the resident memory after the model is loaded
and the peak during ``calibrate`` (sampled every 5 ms from /proc/self/statm):

    python -m sparsebench.experiments.checks.calibration_memory --model smollm2-135m --sparsifier cats
    python -m sparsebench.experiments.checks.calibration_memory --model tiny-llama --data tiny

Calibration runs uncached here (the point is to measure it) on the data config's
calibration windows, on the CPU unless ``--device`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import threading
import time


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples resident memory in a thread while the block runs."""

    def __init__(self, period_s: float = 0.005):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.period_s)

    def __enter__(self):
        self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsifier", default="cats")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for <model>-<sparsifier>.json (the docs table reads "
                                                "experiments/results/calibration_memory/)")
    ap.add_argument("--label", default="streamed", help="what is measured, e.g. the code's capture scheme")
    ap.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. data.calibration.num_sequences=8")
    a = ap.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_module

    from sparsebench.data.corpus import calibration_windows, load_corpus
    from sparsebench.core.device import resolve_device
    from sparsebench.models.loader import load_model, set_offline
    from sparsebench.models.patching import SparsityController
    from sparsebench.run import build_components, prefill_policy

    set_offline()
    torch.set_num_threads(a.threads)
    with initialize_config_module(config_module="sparsebench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={a.model}", f"sparsifier={a.sparsifier}",
                                                       f"data={a.data}", f"device={a.device}", *a.overrides])
    sparsifier, backend, _ = build_components(cfg)
    device = resolve_device(cfg.device)
    model, tokenizer, model_id = load_model(cfg.model, cfg.cache_dir, device)
    controller = SparsityController(sparsifier, backend, prefill=prefill_policy(cfg)).attach(model)
    splits = load_corpus(cfg.data, cfg.cache_dir)
    cal = cfg.data.calibration
    windows = calibration_windows(tokenizer, splits, int(cal.num_sequences), int(cal.seq_len), int(cfg.seed))
    batches = windows.to(device).split(int(cal.batch_size))
    loaded = resident_bytes()
    t0 = time.time()
    with PeakSampler() as peak:
        sparsifier.calibrate(controller, model, batches)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = model.config.hidden_size
    report = {"model": model_id, "sparsifier": sparsifier.name, "layers": len(controller.sites),
              "calibration_tokens": int(windows.numel()), "model_weights_mib": params / 2**20,
              "resident_after_load_mib": loaded / 2**20, "calibration_peak_added_mib": (peak.peak - loaded) / 2**20,
              "one_layer_of_hidden_states_mib": windows.numel() * hidden * 4 / 2**20,
              "calibration_s": time.time() - t0}
    for k, v in report.items():
        print(f"{k:34s} {v:.1f}" if isinstance(v, float) else f"{k:34s} {v}")
    if a.out:
        import json
        from pathlib import Path

        from sparsebench.store.provenance import code_version

        out = Path(a.out) / f"{model_id}-{sparsifier.name}-{a.label}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report, "label": a.label, "threads": a.threads, "code": code_version()}, indent=1))
        print(f"[calibration_memory] {out}")
    return report


if __name__ == "__main__":
    main()
