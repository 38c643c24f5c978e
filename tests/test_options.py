"""The engine options: one parser for pattern names, defaults per tool, a saved book's settings kept unless an
option overrides them."""

from __future__ import annotations

import argparse

import pytest
import torch

from duo_qserve.__main__ import build_parser
from duo_qserve.engine import EngineSettings
from duo_qserve.models import demo_model
from duo_qserve.options import DEFAULTS, add_engine_args, parse_pattern, settings_from_args


def parser(defaults: EngineSettings | None = DEFAULTS) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_engine_args(p, defaults)
    return p


@pytest.mark.parametrize(
    "name, pattern", [("none", None), (" NONE ", None), ("", "auto"), (None, "auto"), (" dir/p ", "dir/p")]
)
def test_pattern_names_parse_in_one_place(name, pattern):
    assert parse_pattern(name) == pattern


def test_options_left_out_take_the_tools_defaults():
    assert settings_from_args(parser().parse_args([])) == EngineSettings()
    app = settings_from_args(parser(EngineSettings(model="x", w8a8=True)).parse_args(["--kv-bits", "8"]))
    assert (app.model, app.w8a8, app.kv_bits) == ("x", True, 8)


def test_given_options_override_a_books_settings_and_the_rest_are_kept():
    book = EngineSettings(model="m", pattern=None, sparsity=0.25, kv_bits=8, w8a8=True, dtype=torch.float16)
    args = parser(None).parse_args(["--sparsity", "0.75", "--no-w8a8"])
    s = settings_from_args(args, base=book)
    assert (s.model, s.pattern, s.sparsity, s.kv_bits, s.w8a8, s.dtype) == (
        "m",
        None,
        0.75,
        8,
        False,
        torch.float16,
    )
    assert settings_from_args(parser(None).parse_args(["--pattern", "none"]), base=book).pattern is None
    cpu = settings_from_args(parser(None).parse_args(["--cpu"]), base=book)
    assert (cpu.device, cpu.dtype, cpu.kv_bits) == (
        "cpu",
        None,
        8,
    )  # the CPU's dtype; a mismatch is load's to say


def test_w8a8_recipe_names_a_file_the_shipped_one_or_none():
    assert settings_from_args(parser().parse_args([])).smoothing == "auto"
    assert settings_from_args(parser().parse_args(["--w8a8-recipe", "None"])).smoothing is None
    assert (
        settings_from_args(parser().parse_args(["--w8a8-recipe", "r.safetensors"])).smoothing
        == "r.safetensors"
    )


def test_demo_names_the_devices_demo_model():
    assert settings_from_args(parser().parse_args(["--model", "demo", "--cpu"])).model == demo_model(cpu=True)


def test_sparsity_outside_0_1_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--sparsity", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err


def test_the_library_commands_are_part_of_the_command_line():
    a = build_parser().parse_args(["library", "--dir", "d", "load", "book-1", "--ask", "q", "--kv-bits", "8"])
    assert (a.dir, a.book, a.ask, a.kv_bits, a.model) == ("d", "book-1", ["q"], 8, None)
    a = build_parser().parse_args(["library", "save", "--doc", "f.txt"])
    assert (a.model, a.pattern, a.sparsity) == ("default", "auto", 0.5)
