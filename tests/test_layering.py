"""The package's layers, listed once: a module imports only from its own layer or the layers below it (imports
inside functions count too), and every module has a layer."""

from __future__ import annotations

import ast
from pathlib import Path

from duo_qserve.environment import REPO_ROOT

# lowest first; a name covers its sub-modules ("kernels": every duo_qserve/kernels/*.py)
LAYERS = [
    ["environment", "documents", "conversation", "eta"],  # no torch state: settings, files, bookkeeping
    ["kernels", "quant.kv_quant", "sampling"],  # functions of tensors and numbers
    # the network, its int8 linears and how they are prepared (rotation, calibration choices), the text tools read
    ["model", "quant.w8a8", "quant.rotation", "quant.search", "quant.recipe", "data"],
    ["cache", "distributed", "patterns", "planner"],  # what the model attends over (on 1 or N ranks), sizes
    ["loading", "models", "decode_graph", "evidence"],  # models from disk, the captured decode step, evidence
    ["engine"],
    # the book library (book_format: its files on disk and their checks), the engine options, the tools on top
    ["library", "book_format", "options", "eval", "train_patterns", "score_patterns", "quant.cli", "bench"],
    ["library_cli", "__main__"],  # the command line
    ["app"],  # the UI
]


def layer_of(module: str) -> int | None:
    """The layer of a module named from the repository root (``duo_qserve.cache``, ``app.main``), by the longest
    listed name that is it or a package holding it; None if it is no layer's."""
    name = module.removeprefix("duo_qserve.") if module != "duo_qserve" else ""
    if module.startswith("app"):
        name = "app"
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> list[str]:
    parts = module_name(path).split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports(source: str, package: list[str]) -> set[str]:
    """The repository modules ``source`` (a module of ``package``) imports, relative imports resolved."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(p for p in (base, node.module or "") if p)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}  # "from duo_qserve import cache"
    return {m for m in out if m.split(".")[0] in ("duo_qserve", "app") and m != "duo_qserve"}


def sources() -> list[Path]:
    return sorted([*(REPO_ROOT / "duo_qserve").rglob("*.py"), *(REPO_ROOT / "app").rglob("*.py")])


def test_every_module_has_a_layer():
    unplaced = [
        module_name(p) for p in sources() if p.name != "__init__.py" and layer_of(module_name(p)) is None
    ]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sources():
        me = layer_of(module_name(path))
        for target in imports(path.read_text(), package_of(path)):
            theirs = layer_of(target)
            if me is not None and theirs is not None and theirs > me:
                upward.append(f"{module_name(path)} (layer {me}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import():
    """The check itself: a kernel importing the cache inside a function, and a relative import, are both found
    and placed above the kernels."""
    source = "def f():\n    from duo_qserve.cache import DuoKVCache\n    from ..engine import Engine\n"
    found = imports(source, ["duo_qserve", "kernels"])
    assert {"duo_qserve.cache", "duo_qserve.engine"} <= found
    kernels = layer_of("duo_qserve.kernels.decode_step")
    assert all(layer_of(m) > kernels for m in ("duo_qserve.cache", "duo_qserve.engine"))
    assert layer_of("duo_qserve.quant.w8a8") > layer_of("duo_qserve.quant.kv_quant")
