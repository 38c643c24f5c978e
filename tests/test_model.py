import pytest
import torch
from conftest import tiny_args, tiny_model

from duo_qserve.cache import FullKVCache
from duo_qserve.loading import load_model

transformers = pytest.importorskip("transformers")


def hf_reference(args, model):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config())).eval()
    hf.load_state_dict(
        {"model." + k if not k.startswith("lm_head") else k: v for k, v in model.state_dict().items()}
    )
    return hf


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # GQA
        {"n_kv_heads": 4},  # MHA
        {"tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ],
    ids=["gqa", "mha", "tied", "linear-rope", "llama3-rope"],
)
@torch.no_grad()
def test_logits_match_transformers_on_random_configs(overrides):
    args = tiny_args(**overrides)
    model = tiny_model(args)
    hf = hf_reference(args, model)
    ids = torch.randint(0, args.vocab_size, (70,))
    ref = hf(ids[None]).logits[0]
    cache = FullKVCache(args, 80, "cpu", torch.float32)
    # chunked pre-fill of uneven chunks, then token-by-token decode
    out = torch.cat(
        [
            model(ids[:30], cache),
            model(ids[30:61], cache),
            *(model(ids[i : i + 1], cache) for i in range(61, 70)),
        ]
    )
    assert (out - ref).abs().max().item() < 1e-4  # float32 throughout; measured ~2e-7


@pytest.mark.slow
@torch.no_grad()
def test_logits_match_transformers_on_default_model():
    loaded = load_model("default")
    hf = transformers.AutoModelForCausalLM.from_pretrained(loaded.source, dtype=torch.float32).eval()
    ids = torch.tensor(loaded.tokenizer("Paul Graham wrote essays about startups. " * 25)["input_ids"])
    ref = hf(ids[None]).logits[0]
    cache = FullKVCache(loaded.model.args, 512, "cpu", torch.float32)
    out = torch.cat([loaded.model(ids[:100], cache), loaded.model(ids[100:], cache)])
    # logits reach ~30 in magnitude; float32 summation order differs from transformers' (measured max 7e-5)
    assert (out - ref).abs().max().item() < 5e-4
