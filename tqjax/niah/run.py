"""The NIAH run: the matrix of cells, a JSONL checkpoint, resume, and the report.

A **cell** is (preset, length, depth, trial). Cells of one (length, depth, trial) share a
prompt and its prefill. Each cell records the greedy answer, whether it holds the code,
the code's margin (`tqjax.niah.backends.MarginTracker`) and the preset's resolved cache
config. After every prompt its cells are appended to
``<out>/cells.jsonl`` (flushed and fsynced), so an interrupted run loses at most the
prompt in flight; a rerun with the same ``--out`` skips every finished cell.

The checkpoint starts with a ``run`` record holding the run's *identity*: everything that
decides a cell's answer (model, backend, dtype, seed, window, max_new_tokens, haystack,
prompt format). A rerun with another identity refuses to mix results (``force=True``
discards the old checkpoint). The *matrix* (presets, lengths, depths, trials) may change
between reruns: cells already done are reused, the report covers the matrix asked for.
A cell is done only if its recorded cache config is the preset's current one: after a
preset's defaults change, its cells are run again (the newest record of a cell wins).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqjax.niah import backends
from tqjax.niah.prompt import PROMPT_VERSION, Haystack, PromptBuilder, score

CHECKPOINT = "cells.jsonl"
PREFILL_CHUNK = 512  # tokens per prefill step of the Flax backend


@dataclasses.dataclass(frozen=True)
class NiahConfig:
  """One NIAH run. Depths are fractions of the document in [0, 1]."""
  model: str = "smollm2-135m"
  gguf_file: str | None = None
  backend: str = "flax"
  # A 4-bit preset that spends the bits on keys (k5v3: the bytes of k4v4), a 3-bit one
  # that spends them on the widest channels (k3.5v2.5) and a 128-token exact window: the
  # settings of the README's measured matrices (SmolLM2 both 15/15, where k4v4 answers 14
  # and k4v2 13; Qwen2.5-0.5B every preset 15/15 up to 8K).
  presets: tuple[str, ...] = ("baseline", "k5v3", "k3.5v2.5")
  lengths: tuple[int, ...] = (1024, 2048, 4096)
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  trials: int = 1
  seed: int = 0
  window: int | None = 128  # exact window of the compressed presets (None: preset default)
  max_new_tokens: int = 12
  dtype: str = "float32"

  def __post_init__(self):
    backends.check_presets(self.presets)
    if self.backend not in backends.BACKENDS:
      raise ValueError(f"backend must be one of {backends.BACKENDS}, got {self.backend!r}")
    if self.dtype not in backends.DTYPES:
      raise ValueError(f"dtype must be one of {sorted(backends.DTYPES)}, got {self.dtype!r}")
    if not self.lengths or any(n < 64 for n in self.lengths):
      raise ValueError(f"lengths must be >= 64 tokens, got {self.lengths}")
    if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
      raise ValueError(f"depths must be in [0, 1], got {self.depths}")
    if len(set(self.lengths)) != len(self.lengths) or len(set(self.depths)) != len(self.depths):
      raise ValueError(f"lengths and depths must not repeat: {self.lengths}, {self.depths}")
    if self.trials < 1:
      raise ValueError(f"trials must be >= 1, got {self.trials}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    for p in self.presets:
      backends.describe(p, self.window)  # validates the window and the presets' options

  def identity(self, haystack: Haystack) -> dict[str, Any]:
    """Everything that decides a cell's answer: runs with equal identities share cells."""
    return {"model": self.model, "gguf_file": self.gguf_file, "backend": self.backend,
            "dtype": self.dtype, "seed": self.seed, "window": self.window,
            "max_new_tokens": self.max_new_tokens, "haystack": haystack.digest,
            "prompt_version": PROMPT_VERSION}

  def prompts(self) -> list[tuple[int, float, int]]:
    """(length, depth, trial) of every prompt, shortest first."""
    return [(n, d, t) for n in sorted(self.lengths) for d in self.depths
            for t in range(self.trials)]


def cell_key(preset: str, length: int, depth: float, trial: int) -> tuple[str, int, int, int]:
  return (preset, int(length), round(float(depth) * 1000), int(trial))


class Checkpoint:
  """Append-only JSONL of records: ``run`` (identity), ``model`` (ModelInfo), ``cell``."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.records: list[dict[str, Any]] = []
    if path.exists():
      self._read()

  def _read(self) -> None:
    data = self.path.read_bytes()
    lines = data.split(b"\n")
    # A run killed mid-write leaves a last line without its newline: drop that one only.
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, 1):
      if not line.strip():
        continue
      try:
        self.records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{self.path}:{number} is not valid JSON ({e}); the checkpoint is "
                         f"damaged: fix or remove it, or pass --force") from e
    if tail.strip():
      with open(self.path, "r+b") as f:
        f.truncate(len(data) - len(tail))

  def append(self, records: Sequence[dict[str, Any]]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.records.extend(records)

  def of_kind(self, kind: str) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get("kind") == kind]


def open_checkpoint(out: pathlib.Path, identity: dict[str, Any], force: bool) -> Checkpoint:
  out.mkdir(parents=True, exist_ok=True)
  path = out / CHECKPOINT
  if force and path.exists():
    path.unlink()
  ckpt = Checkpoint(path)
  runs = ckpt.of_kind("run")
  if not runs:
    if ckpt.records:
      raise ValueError(f"{path} has records but no run record; remove it or pass --force")
    ckpt.append([{"kind": "run", "identity": identity}])
  elif runs[0]["identity"] != identity:
    old = runs[0]["identity"]
    diff = {k: (old.get(k), identity.get(k)) for k in sorted(set(old) | set(identity))
            if old.get(k) != identity.get(k)}
    raise ValueError(
      f"{out} holds a run with different settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
      f"use another --out, or --force to discard its {len(ckpt.of_kind('cell'))} cells")
  return ckpt


def _default_backend(config: NiahConfig, capacity: int) -> backends.Backend:
  return backends.make_backend(config.backend, config.model, gguf_file=config.gguf_file,
                               dtype=config.dtype, capacity=capacity, window=config.window,
                               chunk=PREFILL_CHUNK)


def run(config: NiahConfig, out: str | os.PathLike, *, force: bool = False,
        progress: bool = True, haystack: Haystack | None = None,
        backend: backends.Backend | Callable[[NiahConfig, int], backends.Backend] | None = None,
        ) -> dict[str, Any]:
  """Runs (or resumes) the matrix of `config` into `out` and writes the report.

  `backend` is a ready backend or a factory `(config, capacity) -> backend`; by default
  the model named in `config` is loaded, and only when some cell is left to run.
  Returns the report (the content of ``niah.json``).
  """
  from tqdm.auto import tqdm

  from tqjax.niah import report

  out = pathlib.Path(out)
  haystack = haystack if haystack is not None else Haystack.default()
  ckpt = open_checkpoint(out, config.identity(haystack), force)
  caches = {p: backends.describe(p, config.window) for p in config.presets}
  done = {cell_key(r["preset"], r["length"], r["depth"], r["trial"]) for r in ckpt.of_kind("cell")
          if r["preset"] in caches and r.get("cache", False) == caches[r["preset"]]}
  todo = []
  for length, depth, trial in config.prompts():
    missing = [p for p in config.presets if cell_key(p, length, depth, trial) not in done]
    if missing:
      todo.append((length, depth, trial, missing))

  if todo:
    # One cache capacity for the whole run (one set of compiled programs): the longest
    # prompt plus the answer, and the longest document padded to whole prefill chunks.
    longest = max(config.lengths)
    capacity = max(longest + config.max_new_tokens, -(-longest // PREFILL_CHUNK) * PREFILL_CHUNK)
    if backend is None:
      backend = _default_backend(config, capacity)
    elif callable(backend) and not hasattr(backend, "answer"):
      backend = backend(config, capacity)
    if not ckpt.of_kind("model"):
      ckpt.append([{"kind": "model", **dataclasses.asdict(backend.info)}])
    builder = PromptBuilder(backend.tokenizer, haystack)
    total_tokens = sum(n * len(m) / len(config.presets) for n, _, _, m in todo)
    correct: dict[str, list[bool]] = {p: [] for p in config.presets}
    bar = tqdm(total=round(total_tokens), unit="tok", unit_scale=True, disable=not progress,
               desc=f"niah {len(todo)} prompts", dynamic_ncols=True)
    try:
      for i, (length, depth, trial, missing) in enumerate(todo):
        prompt = builder.build(length, depth, trial, config.seed)
        start = time.perf_counter()
        answers = backend.answer(prompt.doc_ids, prompt.question_ids, missing,
                                 config.max_new_tokens, target=prompt.answer_ids)
        seconds = time.perf_counter() - start
        records = []
        for preset in missing:
          answer = answers[preset]
          text = backend.tokenizer.decode(answer.ids, skip_special_tokens=True).strip()
          ok = score(text, prompt.code)
          correct[preset].append(ok)
          records.append({
            "kind": "cell", "preset": preset, "length": length, "depth": depth,
            "trial": trial, "seed": config.seed, "needle": prompt.needle,
            "code": prompt.code, "answer": text, "answer_ids": list(answer.ids),
            "correct": ok,
            "margin": None if answer.margin is None else round(answer.margin, 4),
            "cache": caches[preset], "prompt_tokens": prompt.num_tokens,
            "doc_tokens": len(prompt.doc_ids), "question_tokens": len(prompt.question_ids),
            "needle_position": prompt.needle_position,
            "actual_depth": round(prompt.actual_depth, 4),
            "prompt_seconds": round(seconds, 3)})
        ckpt.append(records)
        bar.update(round(length * len(missing) / len(config.presets)))
        bar.set_postfix_str(" ".join(
          f"{p} {100 * sum(v) / len(v):.0f}%" for p, v in correct.items() if v))
        bar.set_description(f"niah {i + 1}/{len(todo)} prompts")
    finally:
      bar.close()

  return report.write(config, ckpt, out, haystack)
