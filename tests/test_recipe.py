"""The W8A8 recipe file (quant/recipe.py): choices survive a round trip, old statistics-only files still load."""

from __future__ import annotations

import torch
from test_w8a8 import CALIB, IDS, logits, tiny_model

from duo_qserve.quant.recipe import make_recipe, quantize_with_recipe, save_recipe
from duo_qserve.quant.w8a8 import (
    DEFAULT_ALPHA,
    SiluMulHadamardQuant,
    SiluMulQuant,
    activation_absmax,
    quantize_model_w8a8,
    save_activation_absmax,
)


def test_statistics_only_file_is_smoothquant_at_the_default_alpha(tmp_path):
    """A file shipped before the recipe keys existed quantizes exactly as it always did."""
    save_activation_absmax(
        tmp_path / "old.safetensors", activation_absmax(tiny_model(), CALIB), {"text": "ids"}
    )
    model = quantize_with_recipe(tiny_model(), tmp_path / "old.safetensors")
    expected = quantize_model_w8a8(tiny_model(), CALIB, alpha=DEFAULT_ALPHA)
    assert model.w8a8 == {"alpha": DEFAULT_ALPHA, "smoothquant": True}
    torch.testing.assert_close(logits(model, IDS), logits(expected, IDS), rtol=0, atol=0)


def test_recipe_round_trip_gives_the_model_it_was_made_on(tmp_path):
    made = tiny_model()
    recipe = make_recipe(made, CALIB, rotate=True, per_layer_alpha=True, keep_16bit=2)
    assert (
        set(recipe) == {"rotation_seed", "act_absmax", "alpha", "keep_16bit"}
        and len(recipe["keep_16bit"]) == 2
    )
    save_recipe(tmp_path / "r.safetensors", recipe, {"text": "ids"})
    expected = quantize_model_w8a8(
        made, act_absmax=recipe["act_absmax"], alpha=recipe["alpha"], keep_16bit=recipe["keep_16bit"]
    )
    model = quantize_with_recipe(tiny_model(), tmp_path / "r.safetensors")
    assert model.w8a8 == expected.w8a8 and model.w8a8["rotation"] == {"seed": 0}
    torch.testing.assert_close(logits(model, IDS), logits(expected, IDS), rtol=0, atol=0)


def test_rotation_only_recipe_applies_no_smoothing(tmp_path):
    save_recipe(tmp_path / "r.safetensors", make_recipe(tiny_model(), CALIB, rotate=True, smooth=False), {})
    model = quantize_with_recipe(tiny_model(), tmp_path / "r.safetensors")
    assert not model.w8a8["smoothquant"] and model.w8a8["rotation"] == {"seed": 0}
    assert all(isinstance(b.mlp.act, SiluMulHadamardQuant) for b in model.layers)
    assert isinstance(quantize_model_w8a8(tiny_model()).layers[0].mlp.act, SiluMulQuant)
