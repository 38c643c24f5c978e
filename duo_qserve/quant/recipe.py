"""How a model is prepared for on-the-fly W8A8, in the one file shipped per model (``quant/calibration/``).

The file is what ``w8a8.save_activation_absmax`` writes (safetensors: tensors ``group.{i}``, SmoothQuant's
``activation_absmax`` of calibration text; metadata ``text``/``tokens``, what text that was) plus the choices made
on that text, as metadata:

- ``rotation_seed``: rotate the model first (``rotation.rotate_model(seed)``); the statistics, if any, are those of
  the rotated model;
- ``alpha``: SmoothQuant's alpha per smoothing group (``search.choose_alphas``), a JSON list;
- ``keep_16bit``: linears left in 16-bit (``search.most_sensitive``), a JSON list.

A file with no tensors applies no SmoothQuant. A file without the choice keys (those shipped before them) is
SmoothQuant at ``w8a8.DEFAULT_ALPHA``, as it always was. ``make_recipe`` makes the choices on calibration text,
``save_recipe`` writes them, ``quantize_with_recipe`` applies a file to a float model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .rotation import rotate_model
from .search import choose_alphas, linear_sensitivity, most_sensitive
from .w8a8 import (
    DEFAULT_ALPHA,
    activation_absmax,
    load_activation_absmax,
    quantize_model_w8a8,
    save_activation_absmax,
    smooth_model,
)


def make_recipe(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    rotate: bool = False,
    smooth: bool = True,
    per_layer_alpha: bool = False,
    keep_16bit: int = 0,
    seed: int = 0,
) -> dict:
    """Make the choices on calibration text for a float model and return them (the module docstring's keys, plus
    ``act_absmax`` when ``smooth``). The model is rotated in place if ``rotate``; it is not smoothed or quantized."""
    recipe: dict = {}
    if rotate:
        rotate_model(model, seed)
        recipe["rotation_seed"] = seed
    alpha = DEFAULT_ALPHA
    if smooth:
        recipe["act_absmax"] = activation_absmax(model, calibration_ids)
        if per_layer_alpha:
            alpha = recipe["alpha"] = choose_alphas(model, calibration_ids, recipe["act_absmax"])
    if keep_16bit:
        probe = copy.deepcopy(model)  # sensitivity of the model as it will be quantized: smoothed
        if smooth:
            smooth_model(probe, recipe["act_absmax"], alpha)
        recipe["keep_16bit"] = most_sensitive(linear_sensitivity(probe, calibration_ids), keep_16bit)
    return recipe


_CHOICES = ("rotation_seed", "alpha", "keep_16bit")


def save_recipe(path: str | Path, recipe: dict, meta: dict[str, str]) -> None:
    """Write ``make_recipe``'s result with ``meta`` (what calibration text it comes from)."""
    choices = {k: json.dumps(recipe[k]) for k in _CHOICES if k in recipe}
    save_activation_absmax(path, recipe.get("act_absmax", []), meta | choices)


def quantize_with_recipe(model: nn.Module, path: str | Path) -> nn.Module:
    """Rotate (if the file says so), smooth (if it holds statistics) and quantize a float model in place."""
    with safe_open(str(path), "pt") as f:
        meta, smoothed = f.metadata() or {}, bool(list(f.keys()))
    choices = {k: json.loads(meta[k]) for k in _CHOICES if k in meta}
    if "rotation_seed" in choices:
        rotate_model(model, choices["rotation_seed"])
    return quantize_model_w8a8(
        model,
        act_absmax=load_activation_absmax(path, model) if smoothed else None,
        alpha=choices.get("alpha", DEFAULT_ALPHA),
        keep_16bit=choices.get("keep_16bit", ()),
    )
