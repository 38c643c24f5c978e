"""Gate training and fast scoring on a tiny model with one planted long-range (retrieval) head."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duo_qserve.data import Sample
from duo_qserve.model import CausalAttention, ModelArgs, Transformer
from duo_qserve.patterns import load_pattern, save_pattern
from duo_qserve.score_patterns import score_heads
from duo_qserve.train_patterns import (
    GatedAttention,
    TrainSettings,
    deployed_loss,
    lr_multiplier,
    select_best,
    streaming_attention,
    train_gates,
)

BOS, SPECIAL, FILLER = 0, range(1, 9), range(9, 40)
SINK, RECENT, LENGTH, ANSWER = 4, 16, 96, 8
SLOW = 7  # the RoPE pair with the lowest frequency: at rope_theta 1e6 it barely turns, so scores there are content-only


def planted_model() -> Transformer:
    """Layer 0 head 0 attends to the one "special" token wherever it is and copies its identity (a retrieval head);
    every other head attends to BOS, which streaming heads keep as a sink (so streaming changes nothing for them).

    Residual layout: 0 constant 1, 1 special flag, 2 BOS flag, 3..18 token identity, 19..34 / 35..50 the outputs
    of layer 0's heads, 51..63 part of layer 1 head 0's output. MLPs are zero.
    """
    args = ModelArgs(vocab_size=40, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                     intermediate_size=8, rope_theta=1e6)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in [model.norm] + [
            n for b in model.layers for n in (b.input_layernorm, b.post_attention_layernorm)
        ]:
            norm.weight.fill_(1.0)
        emb = model.embed_tokens.weight
        emb[:, 0] = 1.0
        emb[list(SPECIAL), 1] = 1.0
        emb[BOS, 2] = 1.0
        emb[:, 3:19] = torch.randn(args.vocab_size, 16)
        outputs = {(0, 0): range(19, 35), (0, 1): range(35, 51), (1, 0): range(51, 64)}
        for layer, block in enumerate(model.layers):
            attn = block.self_attn
            for head in range(2):
                key_flag = 1 if (layer, head) == (0, 0) else 2  # special token or BOS
                attn.q_proj.weight[head * 16 + SLOW, 0] = 15.0
                attn.k_proj.weight[head * 16 + SLOW, key_flag] = 1.0
                attn.v_proj.weight[head * 16 : head * 16 + 16, 3:19] = torch.eye(16)
                for i, dim in enumerate(outputs.get((layer, head), ())):
                    attn.o_proj.weight[dim, head * 16 + i] = 1.0
    return model


def copy_task(rng: random.Random) -> Sample:
    """BOS, filler with one special token far outside the recent window, then supervised filler at the end."""
    ids = [BOS] + [rng.choice(FILLER) for _ in range(LENGTH - 1)]
    at = rng.randrange(SINK + 2, LENGTH - RECENT - ANSWER)
    ids[at] = rng.choice(SPECIAL)
    supervised = torch.zeros(LENGTH, dtype=torch.bool)
    supervised[-ANSWER:] = True
    needle = torch.zeros(LENGTH, dtype=torch.bool)
    needle[at] = True
    return Sample(torch.tensor(ids), supervised, needle)


def settings(**kw) -> TrainSettings:
    base = dict(steps=30, sink_size=SINK, recent_size=RECENT, checkpoint_every=5, seed=0)
    return TrainSettings(**(base | kw))


def streaming_mask(t: int, sink: int, recent: int) -> torch.Tensor:
    """The definition: boolean [T, T], key j visible to query i iff causal and (j < sink or j > i - recent)."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    return (j <= i) & ((j < sink) | (j > i - recent))


def test_streaming_mask_is_token_exact():
    m = streaming_mask(8, sink=2, recent=3)
    assert m[7].tolist() == [True, True, False, False, False, True, True, True]
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]
    assert not m.triu(1).any()


@pytest.mark.parametrize(
    "t, sink, recent", [(1, 4, 8), (7, 4, 8), (64, 4, 8), (100, 4, 8), (100, 0, 16), (37, 40, 5), (96, 8, 1)]
)
def test_streaming_attention_is_the_masked_attention(t, sink, recent):
    """Blockwise sink + band attention against SDPA under the [T, T] mask, in float64 on random inputs: the same
    keys with the same weights, so they agree to float64 rounding (1e-12 on O(1) values). Lengths below, at and
    off a multiple of the block, a sink longer than the sequence, no sink, and a window of one."""
    g = torch.Generator().manual_seed(t * 1000 + sink * 10 + recent)
    q, k, v = (torch.randn(3, t, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=streaming_mask(t, sink, recent))
    torch.testing.assert_close(streaming_attention(q, k, v, sink, recent), ref, rtol=0, atol=1e-12)
    if t > sink + recent > sink + 1:  # the control: a window one token shorter is another function
        assert (streaming_attention(q, k, v, sink, recent - 1) - ref).abs().max() > 1e-3


def test_gates_at_one_reproduce_full_attention_and_at_zero_differ():
    model, sample = planted_model(), copy_task(random.Random(0))
    full = model.hidden_states(sample.ids, CausalAttention())
    ones = model.hidden_states(sample.ids, GatedAttention(torch.ones(2, 2), SINK, RECENT))
    zeros = model.hidden_states(sample.ids, GatedAttention(torch.zeros(2, 2), SINK, RECENT))
    torch.testing.assert_close(ones, full)
    assert (zeros[-ANSWER:] - full[-ANSWER:]).abs().max() > 0.1


def test_recompute_gives_the_gradients_of_a_plain_backward():
    """Activation recompute changes memory only: the gates' gradient equals a plain backward's to float32
    rounding (the same operations run twice; only their order of accumulation may differ)."""
    model, sample = planted_model(), copy_task(random.Random(1))
    model.requires_grad_(False)
    grads = []
    for recompute in (False, True):
        gates = torch.full((2, 2), 0.5, requires_grad=True)
        h = model.hidden_states(sample.ids, GatedAttention(gates, SINK, RECENT), recompute=recompute)
        h[-ANSWER:].pow(2).sum().backward()
        grads.append(gates.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_lr_schedule_warms_up_plateaus_and_decays():
    assert [round(lr_multiplier(s, 10), 2) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5]
    assert lr_multiplier(0, 2000) == 0.1


def test_training_keeps_the_planted_retrieval_head_and_streams_the_others():
    gates = train_gates(planted_model(), copy_task, settings(), log=lambda _: None)
    others = np.delete(gates.ravel(), 0)
    assert gates[0, 0] > 0.9, gates
    assert others.max() < gates[0, 0] - 0.3, gates
    assert (gates >= 0).all() and (gates <= 1).all()


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    s = settings(steps=8, checkpoint_every=4)
    straight = train_gates(planted_model(), copy_task, s, tmp_path / "a", log=lambda _: None)
    train_gates(planted_model(), copy_task, s, tmp_path / "b", stop_at=4, log=lambda _: None)
    resumed = train_gates(planted_model(), copy_task, s, tmp_path / "b", resume=True, log=lambda _: None)
    np.testing.assert_allclose(resumed, straight, atol=1e-7)
    assert not np.allclose(straight, 1.0)


def test_deployed_loss_is_small_when_the_retrieval_head_stays_full_and_large_when_it_streams():
    model, s = planted_model(), settings()
    keep = np.array([[1.0, 0.2], [0.1, 0.3]])  # at 50%: (0, 0) and (1, 1) stay full
    drop = np.array([[0.0, 1.0], [0.1, 0.3]])  # at 50%: (0, 1) and (1, 1) stay full, (0, 0) streams
    good = deployed_loss(model, keep, 0.5, copy_task, s, n_samples=4, seed=1)
    bad = deployed_loss(model, drop, 0.5, copy_task, s, n_samples=4, seed=1)
    # the BOS-reading heads spread a little mass beyond BOS, so streaming them is cheap but not free
    assert bad > 50 * good > 0, (good, bad)


def test_fast_scoring_ranks_the_planted_retrieval_head_first():
    scores = score_heads(planted_model(), copy_task, n_samples=4, sink=SINK, recent=RECENT)
    others = np.delete(scores.ravel(), 0)
    assert scores[0, 0] > 0.5 and others.max() < 0.1, scores


def test_select_best_takes_the_lowest_held_out_loss_and_records_all(tmp_path):
    for name, loss, gate in (("a", 0.3, 0.1), ("b", 0.1, 0.7), ("c", 0.2, 0.4)):
        save_pattern(tmp_path / name, np.full((2, 2), gate), {"validation": {"distill_trained": loss}})
    best = select_best([tmp_path / n for n in "abc"], tmp_path / "out")
    chosen = load_pattern(tmp_path / "out")
    assert best == tmp_path / "b" and np.allclose(chosen.gates, 0.7)
    assert chosen.config["selected_from"] == {
        str(tmp_path / n): v for n, v in zip("abc", (0.3, 0.1, 0.2), strict=True)
    }
