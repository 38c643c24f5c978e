"""Write a checkpoint directory of random weights in a named shape, with a real tokenizer taken from another
checkpoint directory, so that benchmarks that need text (``bench.engine_speed``) can time a model whose weights
are not on the machine. Only speed means anything with it: the answers are noise. Its name should say so, since
result files record the model by its directory's name.

    python -m duo_qserve.bench.synthetic_checkpoint qwen2.5-coder-1.5b \\
        --tokenizer models/qwen2.5-coder-0.5b --out /tmp/qwen2.5-coder-1.5b-synthetic-weights
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from duo_qserve.loading import load_tokenizer, synthetic_model
from duo_qserve.model import PRESETS, ModelArgs


def write_synthetic_checkpoint(shape: str, tokenizer_dir: Path, out: Path, device: str = "cpu") -> None:
    """``out`` gets config.json (``shape``), model.safetensors (``synthetic_model``'s fp16 weights) and the
    tokenizer of ``tokenizer_dir``, whose vocabulary must be the shape's."""
    args = ModelArgs.from_name(shape)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > args.vocab_size:
        raise ValueError(
            f"{tokenizer_dir}'s tokenizer has {len(tokenizer)} tokens; {shape} has {args.vocab_size}"
        )
    model = synthetic_model(shape, torch.device(device), torch.float16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight")  # shared with the embedding; safetensors refuses aliases
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((tokenizer_dir / "config.json").read_text())
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    (out / "config.json").write_text(json.dumps(args.to_hf_config() | ids, indent=2))
    tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(PRESETS))
    p.add_argument("--tokenizer", type=Path, required=True, help="a checkpoint directory with a tokenizer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    write_synthetic_checkpoint(a.shape, a.tokenizer, a.out, a.device)
    print(f"wrote {a.out} ({a.shape}, synthetic weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
