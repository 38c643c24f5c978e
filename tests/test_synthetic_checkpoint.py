"""A synthetic-weights checkpoint directory loads as any checkpoint does: the named shape's random weights, bit for
bit, and the tokenizer it was given."""

from __future__ import annotations

import dataclasses

import torch

from duo_qserve.bench.synthetic_checkpoint import write_synthetic_checkpoint
from duo_qserve.loading import ensure_default_model, load_model, synthetic_model


def test_the_checkpoint_loads_as_the_synthetic_model_with_the_given_tokenizer(tmp_path):
    source = ensure_default_model(log=lambda *_: None)
    out = tmp_path / "smollm2-135m-synthetic-weights"
    write_synthetic_checkpoint("smollm2-135m", source, out)
    loaded = load_model(str(out), "cpu", torch.float16)
    reference = synthetic_model("smollm2-135m", torch.device("cpu"), torch.float16)
    shape = dataclasses.replace(loaded.model.args, extra={})  # extra adds the source's bos/eos token ids
    assert loaded.name == out.name and shape == dataclasses.replace(reference.args, extra={})
    for (name, got), (_, want) in zip(
        loaded.model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name
    text = "Chapter 2: the whale."
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    assert loaded.model.args.extra.get("eos_token_id") is not None
