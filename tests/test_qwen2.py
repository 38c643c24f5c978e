"""Qwen2: q/k/v biases in the float and W8A8 models, a tiny random Qwen2 checkpoint against transformers, the named
models' assembly and checks on small fake parts, and (slow, when their parts are installed) the real Qwen2.5-Coder
models against transformers and in the engine."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
import torch
from torch import nn

from duo_qserve import models
from duo_qserve.cache import FullKVCache
from duo_qserve.loading import ModelLoadError, load_model
from duo_qserve.model import CausalAttention, ModelArgs, Transformer
from duo_qserve.quant import w8a8
from duo_qserve.quant.w8a8 import W8A8Linear, quantize_model_w8a8

transformers = pytest.importorskip("transformers")
EPS32 = torch.finfo(torch.float32).eps


def tiny_qwen2_args(**overrides) -> ModelArgs:
    base = dict(
        vocab_size=97, dim=64, n_layers=2, n_heads=7, n_kv_heads=1, head_dim=16, intermediate_size=96,
        norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, attention_bias=True, extra={"model_type": "qwen2"},
    )  # fmt: skip
    base.update(overrides)
    return ModelArgs(**base)


def save_tiny_qwen2(path, args: ModelArgs, seed: int = 0):
    """A random transformers Qwen2ForCausalLM with visible biases and peaked attention, saved with a word-level
    tokenizer as a checkpoint directory: what ``load_model`` reads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**args.to_hf_config())).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            attn = layer.self_attn
            assert attn.o_proj.bias is None
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.mul_(4.0)
                proj.bias.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(args.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return hf


def fp32_order_bound(args: ModelArgs, ref: torch.Tensor) -> float:
    """How far two fp32 computations of the same logits may differ by summation order alone. Each logit is a
    chain of dot products of at most K = max(dim, intermediate_size) terms, about 4 per layer (q/k/v, scores,
    o, MLP); the rounding errors of a K-term sum add like a random walk, ~sqrt(K) * eps of its magnitude.
    Relative to the largest logit: 4 * n_layers * sqrt(K) * eps * max|logit|. A lost bias or a wrong RoPE
    moves logits by whole units, far above it."""
    depth = max(args.dim, args.intermediate_size)
    return 4 * args.n_layers * depth**0.5 * EPS32 * ref.abs().max().item()


def chunked_logits(model: Transformer, ids: torch.Tensor, cache) -> torch.Tensor:
    """Uneven pre-fill chunks then token-by-token decode: every cache path the engine uses."""
    n = ids.shape[0]
    return torch.cat(
        [model(ids[: n // 2], cache), model(ids[n // 2 : n - 4], cache)]
        + [model(ids[i : i + 1], cache) for i in range(n - 4, n)]
    )


@torch.no_grad()
def test_tiny_qwen2_checkpoint_matches_transformers(tmp_path):
    """q_per_kv 7 (as the 0.5B model), tied embeddings, biases: fp32 logits equal transformers' to rounding."""
    args = tiny_qwen2_args()
    hf = save_tiny_qwen2(tmp_path, args)
    loaded = load_model(str(tmp_path))
    assert loaded.model.args.attention_bias and loaded.model.args.q_per_kv == 7
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, args.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ref = hf(ids[None]).logits[0]
    out = chunked_logits(loaded.model, ids, FullKVCache(loaded.model.args, 48, "cpu", torch.float32))
    assert (out - ref).abs().max().item() <= fp32_order_bound(args, ref)


def test_qwen2_config_round_trip():
    args = tiny_qwen2_args()
    back = ModelArgs.from_hf_config(transformers.Qwen2Config(**args.to_hf_config()).to_dict())
    assert back.attention_bias and back.rope_theta == 1e6 and back.tie_word_embeddings
    with pytest.raises(ValueError, match="only as Qwen2"):
        tiny_qwen2_args(extra={}).to_hf_config()


def test_w8a8_linear_bias_before_residual():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        lin.bias.normal_(0.0, 2.0)  # large against the product, so a lost bias fails
    x, residual = torch.randn(5, 128), torch.randn(5, 96)
    qlin = W8A8Linear.from_linear(lin)
    assert qlin.bias is not None and qlin.bias.dtype == torch.float32
    y = lin(x)
    err = (qlin(x) - y).norm() / y.norm()
    assert err < 0.02  # int8 x int8 error, as for bias-free linears (test_w8a8)
    torch.testing.assert_close(qlin(x, residual=residual), qlin(x) + residual)
    group = W8A8Linear.forward_group(x, [qlin, W8A8Linear.from_linear(nn.Linear(128, 32, bias=False))])
    torch.testing.assert_close(group[0], qlin(x))


@torch.no_grad()
def test_w8a8_qwen2_model_keeps_biases_and_round_trips(tmp_path):
    args = tiny_qwen2_args(n_heads=6, n_kv_heads=1)  # q_per_kv 6, as the 1.5B model
    torch.manual_seed(0)
    model = Transformer(args).eval()
    for block in model.layers:
        for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            proj.bias.normal_(0.0, 0.5)
    ids = torch.arange(30) % args.vocab_size
    ref = model(ids, CausalAttention())
    quantize_model_w8a8(model)
    attn = model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    out = model(ids, CausalAttention())
    assert (out - ref).norm() / ref.norm() < 0.03
    w8a8.save_quantized(model, args.as_dict(), tmp_path)
    other = quantize_model_w8a8(Transformer(args).eval())
    w8a8.load_quantized(tmp_path, other)
    torch.testing.assert_close(other(ids, CausalAttention()), out)


# ---- named models: assembly and checks on small fake parts -----------------------------------------------------


def fake_parts(tmp_path, monkeypatch, chunks: list[bytes]) -> list[models.Part]:
    """Packages ``fakepart<n>`` on sys.path, each holding ``data/part<n>.bin``: what pip installs for a model."""
    parts = []
    for n, data in enumerate(chunks, 1):
        pkg = tmp_path / "site" / f"fakepart{n}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{n}.bin").write_bytes(data)
        parts.append(models.Part(f"fakepart{n}", "1.0", f"fakepart{n}", f"data/part{n}.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return parts


def fake_model(parts, size: int, sha256: str) -> models.NamedModel:
    return models.NamedModel("fake-model", "Fake-Model", tuple(parts), size, sha256)


CHUNKS = [b"GGUF" + bytes(range(200)), bytes(range(256)) * 3, b"tail"]


def test_assemble_concatenates_parts_in_order(tmp_path, monkeypatch):
    whole = b"".join(CHUNKS)
    model = fake_model(
        fake_parts(tmp_path, monkeypatch, CHUNKS), len(whole), hashlib.sha256(whole).hexdigest()
    )
    models.assemble(model, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == whole


def test_assemble_refuses_wrong_size_and_wrong_hash(tmp_path, monkeypatch):
    whole = b"".join(CHUNKS)
    parts = fake_parts(tmp_path, monkeypatch, CHUNKS)
    with pytest.raises(ModelLoadError, match=f"add up to {len(whole):,} bytes, expected {len(whole) + 1:,}"):
        models.assemble(fake_model(parts, len(whole) + 1, "0" * 64), tmp_path / "out.gguf")
    wrong = hashlib.sha256(whole[::-1]).hexdigest()
    with pytest.raises(ModelLoadError, match=f"sha256 {hashlib.sha256(whole).hexdigest()}, expected {wrong}"):
        models.assemble(fake_model(parts, len(whole), wrong), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()  # no half-verified file left behind


def test_missing_part_names_the_package_and_the_command(tmp_path, monkeypatch):
    parts = fake_parts(tmp_path, monkeypatch, CHUNKS[:2])
    parts.append(models.Part("fakepart-absent", "2.0", "fakepart_absent", "data/x.bin"))
    model = fake_model(parts, 1, "0" * 64)
    with pytest.raises(ModelLoadError) as err:
        models.assemble(model, tmp_path / "out.gguf")
    assert "1 of its 3 part packages" in str(err.value) and "fakepart-absent==2.0" in str(err.value)
    assert "python -m duo_qserve models install fake-model" in str(err.value)


def test_registry_names():
    assert models.named_model("default") is models.named_model("smollm2-135m")
    assert models.named_model("Qwen2.5-Coder-0.5B-Instruct").name == "qwen2.5-coder-0.5b"
    assert models.named_model("qwen9") is None
    # the demo's model follows the machine
    expected = models.DEMO_MODELS["gpu" if torch.cuda.is_available() else "cpu"]
    assert models.named_model("demo").name == models.demo_model() == expected
    assert models.demo_model(cpu=True) == "qwen2.5-coder-0.5b"
    assert models.DEMO_MODELS["gpu"] == "qwen2.5-coder-1.5b"
    for m in models.NAMED_MODELS.values():
        assert len(m.sha256) == 64 and m.size > 0 and len({p.package for p in m.parts}) == len(m.parts)
    with pytest.raises(ModelLoadError, match=r"a named model \(default, demo, smollm2-135m"):
        load_model("qwen9")


# ---- the real models (slow; skipped unless their parts are installed) ---------------------------------------------

REAL = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def installed(name: str) -> models.NamedModel:
    model = models.NAMED_MODELS[name]
    try:
        models.part_files(model)
    except ModelLoadError as e:
        pytest.skip(str(e))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
@torch.no_grad()
def test_real_qwen_logits_match_transformers_from_the_gguf(name, tmp_path):
    """Our converted checkpoint against transformers reading the GGUF itself: checks the conversion too."""
    record = installed(name)
    loaded = load_model(name)
    models.assemble(record, tmp_path / "model.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    ids = torch.tensor(
        loaded.tokenizer("def fibonacci(n):\n    # the n-th Fibonacci number\n" * 8)["input_ids"]
    )
    ref = hf(ids[None]).logits[0]
    del hf
    out = chunked_logits(
        loaded.model, ids, FullKVCache(loaded.model.args, ids.shape[0] + 8, "cpu", torch.float32)
    )
    diff = (out - ref).abs().max().item()
    print(
        f"{name}: max |logit diff| {diff:.2e} over {ids.shape[0]} tokens, max |logit| {ref.abs().max():.1f}"
    )
    assert diff <= fp32_order_bound(loaded.model.args, ref)


@pytest.mark.slow
def test_real_qwen_engine_finds_a_planted_fact():
    from conftest import haystack_text

    from duo_qserve.engine import Engine

    installed("qwen2.5-coder-0.5b")
    rng = random.Random(11)
    text, number = haystack_text(6000), str(rng.randint(10000, 99999))
    cut = text.rfind(". ", 0, len(text) // 2) + 2
    doc = text[:cut] + f"The secret number is {number}. " + text[cut:]
    engine = Engine.from_pretrained(
        "qwen2.5-coder-0.5b", max_tokens=4096, kv_bits=16, pattern=None, device="cpu"
    )
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine._stop_ids  # the end of a chat turn
    start = time.perf_counter()
    info = engine.ingest(doc)
    answer = engine.answer("According to the document, what is the secret number?", max_new_tokens=16)
    print(f"{info.tokens} tokens, answer {answer!r} in {time.perf_counter() - start:.1f} s")
    assert 1000 < info.tokens < 2500
    assert number in answer
