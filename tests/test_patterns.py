import json

import numpy as np
import pytest
import torch
from conftest import UPSTREAM_PATTERNS, tiny_args, tiny_model

from duo_qserve.cache import FullKVCache
from duo_qserve.engine import PATTERNS_DIR
from duo_qserve.model import ModelArgs
from duo_qserve.patterns import PatternError, load_pattern, reorder_heads, save_pattern, sparsify

UPSTREAM = sorted(UPSTREAM_PATTERNS.glob("*")) if UPSTREAM_PATTERNS.is_dir() else []


@pytest.mark.parametrize("model_dir", UPSTREAM, ids=[p.name for p in UPSTREAM])
def test_upstream_patterns_load(model_dir):
    p = load_pattern(model_dir)  # the model-level directory holds one nested pattern directory
    assert p.gates.shape in ((32, 8), (32, 32))
    assert p.gates.min() >= 0 and p.gates.max() <= 1  # tiny negatives from training are clipped
    assert (p.sink_size, p.recent_size) == (128, 256)
    mask, achieved = p.retrieval_mask(0.5)
    assert achieved == 0.5 and mask.sum() == mask.size // 2


SHIPPED = sorted(d for d in PATTERNS_DIR.iterdir() if d.is_dir())
SHIPPED_SHAPES = {  # layers x KV heads of each model a pattern ships for
    "SmolLM2-135M-Instruct": (30, 3), "Qwen2.5-Coder-0.5B-Instruct": (24, 2), "Qwen2.5-Coder-1.5B-Instruct": (28, 2),
}  # fmt: skip


@pytest.mark.parametrize("pattern_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_patterns_fit_their_model_and_were_selected_on_held_out_loss(pattern_dir):
    """Every pattern in attn_patterns/ is for the model it is named after, is served with the windows it was
    validated at, and records a held-out deployed loss well below a random pattern's (what training selects on)."""
    p = load_pattern(pattern_dir)
    assert p.config["model_name"] == pattern_dir.name
    assert p.gates.shape == SHIPPED_SHAPES[pattern_dir.name]
    assert p.gates.min() >= 0 and p.gates.max() <= 1
    assert (p.sink_size, p.recent_size) == (p.config["deploy_sink_size"], p.config["deploy_recent_size"])
    val = p.config["validation"]
    assert val["sparsity"] == 0.5 and val["distill_trained"] < val["distill_random"] / 2


def test_sparsify_is_global_deterministic_and_reports_ratio():
    gates = np.array([[1.0, 1.0, 0.2], [1.0, 0.5, 0.0]])
    mask, achieved = sparsify(gates, 0.5)
    # the three lowest become streaming: 0.0, 0.2, 0.5; ties among the 1.0s never matter here
    assert mask.tolist() == [[True, True, False], [True, False, False]] and achieved == 0.5
    # ties broken by position: of four equal gates, the first two become streaming, every time
    mask, achieved = sparsify(np.ones((2, 2)), 0.5)
    assert mask.tolist() == [[False, False], [True, True]]
    assert sparsify(gates, 0.4)[1] == pytest.approx(2 / 6)  # the real ratio reached is reported


def test_pattern_that_does_not_fit_is_refused():
    p = load_pattern(UPSTREAM_PATTERNS / "Llama-3-8B-Instruct-Gradient-4194k")
    with pytest.raises(PatternError, match="32 layers x 8 KV heads.*30 layers x 3 KV heads"):
        p.check_fits(ModelArgs.from_name("smollm2-135m"))
    with pytest.raises(PatternError, match="no attention pattern"):
        load_pattern("/nonexistent")


def test_save_load_round_trip(tmp_path):
    gates = np.random.default_rng(0).random((4, 2))
    save_pattern(tmp_path / "p", gates, {"sink_size": 16, "recent_size": 32, "note": "x"})
    p = load_pattern(tmp_path / "p")
    assert np.allclose(p.gates, gates) and (p.sink_size, p.recent_size) == (16, 32)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["note"] == "x"


@torch.no_grad()
def test_head_reordering_leaves_logits_unchanged():
    args = tiny_args(n_layers=3, n_kv_heads=4, n_heads=8)
    model = tiny_model(args)
    ids = torch.randint(0, args.vocab_size, (20,))
    before = model(ids, FullKVCache(args, 32, "cpu", torch.float32))
    mask = np.array([[False, True, False, True], [True, False, False, False], [False, False, True, True]])
    counts = reorder_heads(model, mask)
    after = model(ids, FullKVCache(args, 32, "cpu", torch.float32))
    assert counts == [2, 1, 2]
    assert (before - after).abs().max().item() < 1e-5
