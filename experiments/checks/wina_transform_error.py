"""What WINA's orthogonal transform does to each linear's error, per linear: the relative
output error of per-token top-k masking of the linear's input in the model's own basis
(``sparsifier.orthogonalize=false``) and in WINA's rotated basis (``orthogonalize=true``,
both of WINA's scores), at the same kept count, on held-out windows.

    python -m sparsebench.experiments.checks.wina_transform_error --model gemma3-270m

Both bases are the sparsifier's own (``WINA.attach``); only q, k, v, gate and up see a
rotated input (o and down are unchanged by the transform). Also printed per block input:
how concentrated the normalized input x̂ = x / rms(x) is (median over tokens of
max|x̂_i| / rms(x̂); √d for a one-hot vector). A rotation spreads one dominant channel over
every rotated coordinate, so dropping coordinates no longer drops whole channels: where the
norm's scale suppresses that channel, its leak into the kept coordinates lands on channels
the scale amplifies. Prints one JSON line after the table (``--per-layer``: every layer's).
"""
from __future__ import annotations

import argparse
import json
from importlib import resources

import torch
from omegaconf import OmegaConf

from sparsebench.backends.dense import DenseBackend
from sparsebench.data.corpus import heldout_windows, load_corpus, prefix_tokens
from sparsebench.models.loader import load_model
from sparsebench.models.patching import SparsityController
from sparsebench.sparsifiers import SPARSIFIERS
from sparsebench.sparsifiers.wina import _norm_scale as wina_norm_scale  # the scale the transform folds

ROTATED = ("q", "k", "v", "gate", "up")


def masked_error(x: torch.Tensor, weight: torch.Tensor, score: torch.Tensor, keep: int) -> float:
    """‖(x ⊙ m) Wᵀ − x Wᵀ‖ / ‖x Wᵀ‖ over all rows, m keeping each row's ``keep`` largest scores."""
    x, weight = x.double(), weight.double()
    mask = torch.zeros_like(x).scatter(-1, score.topk(keep, dim=-1).indices, 1.0)
    y = x @ weight.T
    return ((x * mask) @ weight.T - y).norm().item() / y.norm().item()


def concentration(x: torch.Tensor) -> float:
    """Median over rows of max|x_i| / rms(x) (scale-free, so the norm's output or its input)."""
    x = x.double()
    return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).median().item()


def norm_gain(norm: torch.nn.Module) -> torch.Tensor:
    """The RMSNorm's elementwise scale, as the transform folds it (Gemma: 1 + weight)."""
    return wina_norm_scale(norm)[0]


def wina_controller(model, orthogonalize: bool) -> SparsityController:
    cfg = OmegaConf.merge(OmegaConf.load(resources.files("sparsebench.conf") / "sparsifier" / "wina.yaml"),
                          {"sparsity": 0.5, "allocation": "uniform", "orthogonalize": orthogonalize})
    return SparsityController(SPARSIFIERS.get("wina")(cfg), DenseBackend()).attach(model)


@torch.no_grad()
def module_inputs(model, ctl: SparsityController, ids: torch.Tensor, modules: dict, skip: int) -> dict:
    """key → the inputs [tokens, d] each module of ``modules`` saw while the model ran dense
    over ``ids``; the first ``skip`` positions of each row (the BOS) are left out."""
    got, hooks = {}, []
    for key, module in modules.items():
        hooks.append(module.register_forward_pre_hook(
            lambda _m, args, key=key: got.setdefault(key, []).append(args[0][:, skip:].reshape(-1, args[0].shape[-1]))))
    try:
        with ctl.dense():
            for row in ids.split(2):
                model(input_ids=row)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def linear_inputs(model, ctl: SparsityController, ids: torch.Tensor, skip: int) -> dict:
    """(layer, proj) → (inputs [tokens, d_in], weight) of every rotated-side linear."""
    linears = {(site.layer_idx, p): site.projection(p) for site in ctl.sites for p in ROTATED}
    return {k: (x, linears[k].weight.detach()) for k, x in module_inputs(model, ctl, ids, linears, skip).items()}


def block_input_concentration(model, ctl: SparsityController, ids: torch.Tensor, skip: int) -> dict:
    """Per layer and block input (the norms' inputs): its concentration, the channel largest in
    most tokens, in how many, and the norm's scale on it over the median scale."""
    norms = {}
    for site in ctl.sites:
        layer = site.layer
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
        norms[(site.layer_idx, "attn")], norms[(site.layer_idx, "mlp")] = layer.input_layernorm, mlp_norm
    got = module_inputs(model, ctl, ids, norms, skip)
    out = {}
    for key, x in got.items():
        top = x.abs().argmax(-1)
        channel = int(top.mode().values)
        gamma = norm_gain(norms[key])
        out[key] = {"concentration": concentration(x), "dominant_channel": channel,
                    "dominant_share_of_tokens": (top == channel).double().mean().item(),
                    "dominant_scale_over_median": (gamma[channel] / gamma.median()).item()}
    return out


def compare(plain: dict, rotated: dict, sparsities) -> list[dict]:
    rows = []
    for (layer, proj), (x, w) in sorted(plain.items()):
        xr, wr = rotated[(layer, proj)]
        cn = wr.double().norm(dim=0)
        for s in sparsities:
            keep = round((1 - s) * x.shape[-1])
            rows.append({"layer": layer, "proj": proj, "sparsity": s,
                         "own_basis": masked_error(x, w, x.abs(), keep),
                         "rotated_reference_score": masked_error(xr, wr, xr.abs() * cn if proj in ("k", "gate") else xr.abs(), keep),
                         "rotated_paper_score": masked_error(xr, wr, xr.abs() * cn, keep)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5, 0.65])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-layer", action="store_true", help="add every layer's errors to the JSON line")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    conf = resources.files("sparsebench.conf")
    model_cfg = OmegaConf.load(conf / "model" / f"{a.model}.yaml")
    model, tok, _ = load_model(model_cfg)
    splits = load_corpus(OmegaConf.load(conf / "data" / "shakespeare.yaml"))
    skip = len(prefix_tokens(tok))
    ids = heldout_windows(tok, splits, a.windows, a.seq_len).ids
    ctl = wina_controller(model, orthogonalize=False)
    plain = linear_inputs(model, ctl, ids, skip)
    conc = block_input_concentration(model, ctl, ids, skip)
    rotated_model, _, _ = load_model(model_cfg)
    rotated = linear_inputs(rotated_model, wina_controller(rotated_model, orthogonalize=True), ids, skip)
    rows = compare(plain, rotated, a.sparsity)

    def median(vals):
        return float(torch.tensor(vals).median())

    summary = {}
    print(f"{a.model}: relative output error of top-k input masking, median over layers "
          f"({a.windows} held-out windows × {a.seq_len} tokens)")
    print(f"{'sparsity':>8} {'linear':>6} {'own basis':>10} {'rotated (reference score)':>26} {'rotated (paper score)':>22}")
    for s in a.sparsity:
        for proj in ROTATED:
            sel = [r for r in rows if r["sparsity"] == s and r["proj"] == proj]
            cell = {k: median([r[k] for r in sel]) for k in ("own_basis", "rotated_reference_score", "rotated_paper_score")}
            summary[f"{s}/{proj}"] = cell
            print(f"{s:>8} {proj:>6} {cell['own_basis']:>10.3f} {cell['rotated_reference_score']:>26.3f} {cell['rotated_paper_score']:>22.3f}")
    d = next(iter(plain.values()))[0].shape[-1]
    conc_summary = {name: {k: median([v[k] for (_, n), v in conc.items() if n == name])
                           for k in ("concentration", "dominant_share_of_tokens", "dominant_scale_over_median")}
                    for name in ("attn", "mlp")}
    for name, label in (("attn", "attention"), ("mlp", "MLP")):
        c = conc_summary[name]
        print(f"{label} block input, median over layers: max|x_i|/rms(x) {c['concentration']:.1f} (one-hot: √{d} = {d ** 0.5:.1f}); "
              f"one channel is the largest in {100 * c['dominant_share_of_tokens']:.0f}% of tokens; "
              f"the norm's scale on it ÷ the median scale: {c['dominant_scale_over_median']:.3f}")
    print(json.dumps({"model": a.model, "windows": a.windows, "seq_len": a.seq_len, "median_over_layers": summary,
                      "block_input_concentration": conc_summary, **({"rows": rows} if a.per_layer else {})}))


if __name__ == "__main__":
    main()
