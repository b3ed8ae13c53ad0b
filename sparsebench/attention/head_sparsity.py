"""Deja Vu attention-head sparsity (Liu et al. 2023, "Deja Vu: Contextual Sparsity for
Efficient LLMs at Inference Time"): per token, a low-rank predictor scores every query head
of a layer from the hidden state and only the top heads run; a dropped head contributes zero.

What the reference does (FMInference/DejaVu, OPT only, i.e. multi-head attention):
- data (``Decentralized_FM_alpha/modules/hf_opt_module_save.py``): a dense forward over C4
  stores, per token and layer, the block's input (the residual stream before the attention
  layer norm) and, as the label source, the L2 norm over ``head_dim`` of each head's
  attention output softmax(q·K/√d)·V, i.e. *before* ``out_proj``;
- training (``sparse_predictor/main_att.py``, ``trainer_att.py``, ``run_c4_att.sh``): one
  predictor per layer, ``Linear(d, 1000, bias=False) → Linear(1000, heads, bias=False)``
  (no nonlinearity), fed layer l−1's block input (look-ahead: it can run one layer early).
  Labels: per token the top ``int(k · heads)`` heads by that norm (k = 0.3 in the run
  script; the predictor is trained once for that k, whatever k is used at inference).
  Loss: BCE on sigmoid(logits), element weight 1 for positives and w = mean(y) (= k) for
  negatives, mean over the mini-batch. AdamW (lr 1e-4, weight decay 0.01), mini-batches of
  1024 tokens, 20 epochs, a 95/5 train/validation split, the epoch with the best
  validation recall (sigmoid ≥ 0.5) is kept, early stop after 5 epochs without gain; seed 0;
- inference (``hf_opt_sparse_mlp_attention.py``, ``pipeline_parallel/*_sparse*``): the
  predictor's logits on the previous block's input, top ``ATTN_TOPK`` heads per token
  (24/96 heads in layers 5–33 and 63–94, 48/96 in 34–62 of OPT-175B; layers 0–4 and 95
  dense); the mask multiplies the per-head attention outputs before ``out_proj`` for every
  token of a forward, the prompt included (its C4 perplexity is teacher-forced).

Here (``attention=head_sparsity``), as the reference: the predictor's shape (hidden → rank
→ heads, no bias, no nonlinearity), the labels (top ``label_heads`` of the per-head output
norm before ``o_proj``, ``label: output``; trained once, independent of the run-time
``heads``), the loss weighting, AdamW with weight decay 0.01, mini-batches of 1024 tokens,
per-token top-k of the logits at run time, masks on every token of a multi-token forward
(``prefill: sparse``), and a dense forward for the training data.

Named deviations:
- **Input**: the predictor reads ``call.hidden``, this layer's attention input *after* its
  input norm (what the session hands a method), not layer l−1's pre-norm block input: no
  look-ahead, so prediction cannot overlap the previous layer (``AttentionCall`` carries
  neither the pre-norm residual nor an earlier layer's input). Every full-attention layer
  gets its own predictor, layer 0 and ``dense_layers`` too (so the trained state does not
  depend on them).
- **Rank**: ``rank`` is a fraction of the hidden size (0.1, as the project's Deja Vu MLP
  predictor) instead of 1000 (≈ 0.08 / 0.11 of the hidden size of OPT-175B / 66B).
- **Schedule**: a fixed number of ``steps`` at ``lr`` 5e-3 (the calibration text is a few
  thousand tokens, not 400k × 20 epochs) with no best-epoch selection or early stopping, so
  the result depends on the seed only (per layer: the layer index). The last 5 % of the
  calibration tokens are held back (the reference's split) and only report recall.
- **Loss form**: BCE on logits (``binary_cross_entropy_with_logits``, the same value, stable).
- **Counts**: ``heads`` is one fraction for every layer (the reference sets an integer per
  layer range); kept heads = floor(heads · n), at least 1, the reference's rule for labels.
- **Layers**: ``dense_layers: [0]`` by default (the reference keeps 0–4 and the last of 96
  dense; its layer 0 has no previous input). Sliding-window layers stay dense (the session's
  rule) and get no predictor.
- **Ours**: ``unit: kv`` scores a KV group by the sum of its query heads' probabilities
  (sigmoid of the logits: the expected number of label heads in the group) and keeps whole
  groups, the only choice that saves K/V reads on a GQA model (``unit: query``, the
  default, is the reference's per-head rule). ``label: projected`` labels a head by the norm
  of its contribution through its slice of ``o_proj`` (||W_o[:, h] x_h||) instead.
  ``prefill: dense`` leaves multi-token forwards dense (decode steps only).
- **Reported recall**: ``summary`` gives the recall of the label heads by the run-time
  top-k (kept heads, or the heads of the kept groups) on the held-back tokens, not the
  reference's recall at sigmoid ≥ 0.5.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..sparsifiers.base import topk_mask
from . import ATTENTION_METHODS
from .base import AttentionCall, AttentionMethod, Selection, _layer_types, attention_modules

HOLDOUT = 0.05  # the reference's validation share (main_att.py: 95 % train, 5 % test)
BATCH_TOKENS = 1024  # the reference's mini-batch


def keep_count(fraction: float, n: int) -> int:
    """Units kept out of ``n``: floor(fraction · n) (the reference's label rule), in [1, n]."""
    return max(1, min(n, int(math.floor(float(fraction) * n + 1e-6))))


def group_scores(logits: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., q_heads] logits → [..., kv_heads]: the sum of each group's probabilities."""
    p = torch.sigmoid(logits)
    return p.unflatten(-1, (p.shape[-1] // groups, groups)).sum(-1)


def select_heads(logits: torch.Tensor, k: int, groups: int, unit: str) -> torch.Tensor:
    """bool [..., q_heads]: the top ``k`` heads (``unit: query``) or the heads of the top
    ``k`` KV groups (``unit: kv``; query head j belongs to group j // groups)."""
    if unit == "query":
        return topk_mask(logits, k)
    return topk_mask(group_scores(logits, groups), k).repeat_interleave(groups, dim=-1)


def head_labels(norms: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's labels: the ``k`` heads with the largest output norm per token."""
    return topk_mask(norms, k)


def recall_curve(logits: torch.Tensor, labels: torch.Tensor, groups: int, unit: str) -> torch.Tensor:
    """Recall of the label heads when the top k units are kept, for k = 1 … units:
    [units] (units = q_heads, or kv_heads for ``unit: kv``)."""
    scores = logits if unit == "query" else group_scores(logits, groups)
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # [N, units]
    lab = labels if unit == "query" else labels.unflatten(-1, (scores.shape[-1], groups)).sum(-1)
    hits = lab.float().gather(-1, order).cumsum(-1).sum(0)  # label heads covered by the top k
    return hits / labels.sum().clamp(min=1)


def head_grams(weight: torch.Tensor, q_heads: int) -> torch.Tensor:
    """W_hᵀ W_h per head [heads, head_dim, head_dim] of an output projection's weight
    [out, heads · head_dim] (head h owns input columns h·head_dim … (h+1)·head_dim − 1)."""
    w = weight.detach().float()
    w = w.view(w.shape[0], q_heads, -1)
    return torch.einsum("ohd,ohe->hde", w, w)


def head_norms(x: torch.Tensor, q_heads: int, grams: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token, per-head label norms [tokens, heads] from the output projection's input
    ``x`` [..., heads · head_dim] (the concatenated head outputs): ||x_h|| (the reference),
    or with ``grams`` the norm of the head's contribution through its slice of the
    projection, ||W_h x_h|| = sqrt(x_hᵀ (W_hᵀ W_h) x_h)."""
    x = x.detach().float()
    x = x.reshape(-1, q_heads, x.shape[-1] // q_heads)
    if grams is None:
        return x.norm(dim=-1)
    return torch.einsum("thd,hde,the->th", x, grams.to(x.device), x).clamp(min=0).sqrt()


def predictor_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's weighted BCE (trainer_att.py): w = mean(y) of the mini-batch,
    element weight 1 for positives and w for negatives, mean over elements."""
    w = y.mean()
    return F.binary_cross_entropy_with_logits(logits, y, weight=y * (1 - w) + w)


def train_head_predictor(X: torch.Tensor, Y: torch.Tensor, rank: int, steps: int, lr: float, seed: int):
    """Fit logits = B(A x) to boolean labels Y [N, heads] (weighted BCE, AdamW as the
    reference); returns A [rank, d], B [heads, rank] on X's device, float32 whatever X's dtype.
    Deja Vu's MLP predictor trainer with the attention trainer's loss: deterministic for a
    seed on every device (``sparsifiers.dejavu.train_predictor``)."""
    from ..sparsifiers.dejavu import train_predictor

    A, B, _ = train_predictor(X, Y, rank, steps, lr, seed, batch_size=BATCH_TOKENS, loss=predictor_loss)
    return A, B


def _out_projection(attn):
    for name in ("o_proj", "out_proj"):
        mod = getattr(attn, name, None)
        if mod is not None:
            return mod
    raise ConfigError(f"attention=head_sparsity cannot find the output projection of {type(attn).__name__}")


@ATTENTION_METHODS.register("head_sparsity")
class HeadSparsity(AttentionMethod):
    needs_calibration = True
    calibration_params = ("label_heads", "label", "rank", "steps", "lr")
    calibration_version = 1
    UNITS = ("query", "kv")
    LABELS = ("output", "projected")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.A: torch.Tensor | None = None  # [layers, r, d]
        self.B: torch.Tensor | None = None  # [layers, q_heads, r]
        self.trained: torch.Tensor | None = None  # bool [layers]
        self.report: dict[str, torch.Tensor] = {}
        self._on: dict = {}  # device -> (A, B) there

    # -- options ----------------------------------------------------------------------------
    @property
    def prefill(self) -> str:
        return str(self.cfg.get("prefill", "sparse"))  # the reference masks every token

    @property
    def unit(self) -> str:
        return str(self.cfg.get("unit", "query"))

    @property
    def heads(self) -> float:
        return float(self.cfg.get("heads", 1.0))

    def validate(self) -> None:
        super().validate()
        for key in ("heads", "label_heads", "rank"):
            v = self.cfg.get(key, 0.5)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ConfigError(f"attention.{key}={v!r} must be a fraction in (0, 1], e.g. attention.{key}=0.5")
        steps = self.cfg.get("steps", 400)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"attention.steps={steps!r} must be a positive integer, e.g. attention.steps=400")
        lr = self.cfg.get("lr", 5e-3)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ConfigError(f"attention.lr={lr!r} must be a positive number, e.g. attention.lr=0.005")
        if self.unit not in self.UNITS:
            raise ConfigError(f"attention.unit={self.unit!r} must be query or kv, e.g. attention.unit=query")
        if self.cfg.get("label", "output") not in self.LABELS:
            raise ConfigError(f"attention.label={self.cfg.get('label')!r} must be output or projected, "
                              "e.g. attention.label=output")

    # -- training ---------------------------------------------------------------------------
    def calibrate(self, model, session, batches: list[torch.Tensor]) -> dict:
        """One dense forward over ``batches`` records, per full-attention layer, the
        attention input (``call.hidden``) and the per-head output norms (from the input of
        ``o_proj``); then one predictor per layer is trained on them."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        q_heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
        groups = q_heads // kv_heads
        modules = attention_modules(model)
        layers = [i for i, t in enumerate(_layer_types(model)) if t in (None, "full_attention")]
        projected = self.cfg.get("label", "output") == "projected"
        hidden: dict[int, list] = {i: [] for i in layers}
        norms: dict[int, list] = {i: [] for i in layers}
        grams: dict[int, torch.Tensor] = {}

        def take_hidden(module, args, kwargs, i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            hidden[i].append(x.detach().reshape(-1, x.shape[-1]).cpu())

        def take_heads(module, args, i):
            if projected and i not in grams:
                grams[i] = head_grams(module.weight, q_heads)
            norms[i].append(head_norms(args[0], q_heads, grams.get(i)).cpu())

        hooks = []
        try:
            for i in layers:
                hooks.append(modules[i].register_forward_pre_hook(
                    lambda m, a, k, i=i: take_hidden(m, a, k, i), with_kwargs=True))
                hooks.append(_out_projection(modules[i]).register_forward_pre_hook(
                    lambda m, a, i=i: take_heads(m, a, i)))
            device = next(model.parameters()).device
            dense = session.dense() if session is not None else contextlib.nullcontext()
            with torch.no_grad(), dense:
                for batch in batches:
                    model(batch.to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()

        n_layers = len(modules)
        d = int(cfg.hidden_size)
        r = max(1, int(round(float(self.cfg.get("rank", 0.1)) * d)))
        k_label = keep_count(float(self.cfg.get("label_heads", 0.3)), q_heads)
        # the state is kept on the CPU (cached on disk; ``_weights`` moves it to the K/V's device)
        A, B = torch.zeros(n_layers, r, d, device="cpu"), torch.zeros(n_layers, q_heads, r, device="cpu")
        trained = torch.zeros(n_layers, dtype=torch.bool, device="cpu")
        report = {f"{part}_recall{u}": torch.zeros(n_layers, n, device="cpu")
                  for part in ("train", "holdout") for u, n in (("", q_heads), ("_kv", kv_heads))}
        train_device = device if device.type != "meta" else torch.device("cpu")
        for i in layers:
            X = torch.cat(hidden.pop(i)).to(train_device).float()
            Y = head_labels(torch.cat(norms.pop(i)).to(train_device), k_label)
            n_hold = min(X.shape[0] - 1, max(1, int(round(HOLDOUT * X.shape[0])))) if X.shape[0] > 1 else 0
            n_train = X.shape[0] - n_hold
            a, b = train_head_predictor(X[:n_train], Y[:n_train], r, steps=int(self.cfg.get("steps", 400)),
                                        lr=float(self.cfg.get("lr", 5e-3)), seed=i)
            A[i], B[i], trained[i] = a.cpu(), b.cpu(), True
            with torch.no_grad():
                logits = (X @ a.T) @ b.T
                for part, sl in (("train", slice(0, n_train)), ("holdout", slice(n_train, None))):
                    if logits[sl].shape[0]:
                        report[f"{part}_recall"][i] = recall_curve(logits[sl], Y[sl], groups, "query").cpu()
                        report[f"{part}_recall_kv"][i] = recall_curve(logits[sl], Y[sl], groups, "kv").cpu()
        state = {"A": A, "B": B, "trained": trained, **report}
        self.load_state(state)
        return {k: v.clone() for k, v in state.items()}

    def load_state(self, state: dict) -> None:
        self.A, self.B, self.trained = state["A"], state["B"], state["trained"].bool()
        self.report = {k: v for k, v in state.items() if k.endswith(("_recall", "_recall_kv"))}
        self._on = {}

    # -- inference --------------------------------------------------------------------------
    def _weights(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.A.to(device), self.B.to(device))
        A, B = self._on[device]
        return A[layer], B[layer]

    def scores(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Predictor logits [..., q_heads] of ``hidden`` [..., hidden] (float32, as the
        reference runs its predictor)."""
        A, B = self._weights(layer, hidden.device)
        return (hidden.float() @ A.T) @ B.T

    def select(self, call: AttentionCall) -> Selection | None:
        q_heads, groups = call.query.shape[1], call.groups
        n_units = q_heads if self.unit == "query" else q_heads // groups
        k = keep_count(self.heads, n_units)
        if self.heads >= 1.0 or k >= n_units:
            return None
        if self.A is None:
            raise RuntimeError("attention=head_sparsity has no trained predictor: calibrate or load_state first")
        if not bool(self.trained[call.layer]):
            return None
        if call.hidden is None:
            raise RuntimeError("attention=head_sparsity needs the attention block's input (call.hidden)")
        logits = self.scores(call.layer, call.hidden)  # [b, q_len, q_heads]
        heads = select_heads(logits, k, groups, self.unit)
        # ``keep`` says the same per head ([b, q_heads, q_len, 1]: a dropped head reads no
        # key), so the session's statistics count the K/V rows of a group as read only when
        # one of its heads runs (and a heads-only Selection is not recorded with one mask row)
        return Selection(keep=heads.transpose(1, 2)[..., None], heads=heads)

    # -- reporting --------------------------------------------------------------------------
    def selection_bytes(self, n_keys: int, kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """The predictor's weights, read once per decode step (A: r × d, B: heads × r)."""
        if self.A is None or self.heads >= 1.0:
            return 0
        _, r, d = self.A.shape
        return (r * d + self.B.shape[1] * r) * elem_bytes

    def summary(self) -> dict:
        out = {"heads": self.heads, "unit": self.unit, "label_heads": float(self.cfg.get("label_heads", 0.3)),
               "label": str(self.cfg.get("label", "output")), "prefill": self.prefill}
        if self.A is None:
            return out
        out["rank"] = int(self.A.shape[1])
        layers = [i for i in range(self.A.shape[0]) if bool(self.trained[i]) and self.applies(i, None)]
        for part in ("train", "holdout"):
            curve = self.report.get(f"{part}_recall" + ("_kv" if self.unit == "kv" else ""))
            if curve is None or not layers:
                continue
            per = [float(curve[i, keep_count(self.heads, curve.shape[1]) - 1]) for i in layers]
            out[f"{part}_recall"] = sum(per) / len(per)
            out[f"{part}_recall_per_layer"] = per
        return out

