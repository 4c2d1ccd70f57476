"""NIAH outputs: ``niah.json`` (every cell + metadata), ``niah.md`` and one heatmap per preset.

Accuracy is the share of cells whose answer contains the needle's code; the delta of a
preset is its accuracy minus the baseline's, in percentage points (negative: retrieval
lost to compression). The **margin** of a cell (`tqjax.niah.backends.MarginTracker`, in
logits; > 0: the greedy answer spells the code) is the continuous measure behind
pass/fail: per preset its median and minimum over cells, and the median over prompts of
the preset's margin minus the baseline's on the same prompt. Bits per coordinate and
memory come from the cache configs (`tqjax.niah.backends.cache_accounting`), for the
longest context of the matrix.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tqjax.niah import backends

if TYPE_CHECKING:
  from tqjax.niah.prompt import Haystack
  from tqjax.niah.run import Checkpoint, NiahConfig


def _versions() -> dict[str, str]:
  import importlib.metadata as md

  out = {"python": platform.python_version()}
  for name in ("tqjax", "jax", "jaxlib", "flax", "transformers", "torch"):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def summarize(config: NiahConfig, cells: Sequence[dict[str, Any]],
              info: backends.ModelInfo | None) -> dict[str, dict[str, Any]]:
  """Per preset: accuracy, cells, delta vs baseline (pp), per-(length, depth) grid, and
  cache accounting (when the model is known)."""
  lengths, depths = sorted(config.lengths), list(config.depths)
  summary: dict[str, dict[str, Any]] = {}
  as_list = lambda grid: [[None if np.isnan(x) else round(float(x), 4) for x in row]
                          for row in grid]
  for preset in config.presets:
    mine = [c for c in cells if c["preset"] == preset]
    grid = np.full((len(depths), len(lengths)), np.nan)
    margin_grid = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
      for j, n in enumerate(lengths):
        here = [c for c in mine if c["length"] == n and c["depth"] == d]
        if here:
          grid[i, j] = float(np.mean([c["correct"] for c in here]))
        margins = [c["margin"] for c in here if c.get("margin") is not None]
        if margins:
          margin_grid[i, j] = float(np.mean(margins))
    margins = [c["margin"] for c in mine if c.get("margin") is not None]
    entry: dict[str, Any] = {
      "cells": len(mine), "correct": sum(c["correct"] for c in mine),
      "accuracy": float(np.mean([c["correct"] for c in mine])) if mine else None,
      "margin_median": round(float(np.median(margins)), 4) if margins else None,
      "margin_min": round(float(np.min(margins)), 4) if margins else None,
      "grid_depths": depths, "grid_lengths": lengths, "grid": as_list(grid),
      "margin_grid": as_list(margin_grid)}
    if info is not None:
      entry.update(backends.cache_accounting(preset, info, config.window, max(lengths)))
    summary[preset] = entry
  base = summary.get(backends.BASELINE, {}).get("accuracy")
  base_margins = {(c["length"], c["depth"], c["trial"]): c.get("margin") for c in cells
                  if c["preset"] == backends.BASELINE}
  for preset, entry in summary.items():
    acc = entry["accuracy"]
    entry["delta_pp"] = None if base is None or acc is None else round(100 * (acc - base), 2)
    paired = [c["margin"] - base_margins[key] for c in cells if c["preset"] == preset
              for key in [(c["length"], c["depth"], c["trial"])]
              if c.get("margin") is not None and base_margins.get(key) is not None]
    entry["margin_delta_median"] = round(float(np.median(paired)), 4) if paired else None
  return summary


def write(config: NiahConfig, ckpt: Checkpoint, out: pathlib.Path, haystack: Haystack
          ) -> dict[str, Any]:
  """Writes niah.json, niah.md and heatmap-<preset>.png for the cells of `config`'s matrix."""
  from tqjax.niah.run import cell_key

  wanted = {cell_key(p, n, d, t) for n, d, t in config.prompts() for p in config.presets}
  caches = {p: backends.describe(p, config.window) for p in config.presets}
  cells = {}
  for r in ckpt.of_kind("cell"):  # the newest record of a cell wins
    key = cell_key(r["preset"], r["length"], r["depth"], r["trial"])
    if key in wanted and r.get("cache", False) == caches[r["preset"]]:
      cells[key] = {k: v for k, v in r.items() if k != "kind"}
  cells = [cells[k] for k in sorted(cells)]
  models = ckpt.of_kind("model")
  info = None
  if models:
    info = backends.ModelInfo(**{f.name: models[0][f.name]
                                 for f in dataclasses.fields(backends.ModelInfo)})
  summary = summarize(config, cells, info)
  prompt_seconds = {(c["length"], c["depth"], c["trial"], c["prompt_seconds"]) for c in cells}
  metadata = {
    "identity": ckpt.of_kind("run")[0]["identity"],
    "config": dataclasses.asdict(config),
    "model": None if info is None else dataclasses.asdict(info),
    "cells_expected": len(wanted), "cells_done": len(cells),
    "compute_seconds": round(sum(s for *_, s in prompt_seconds), 1),
    "haystack_paragraphs": len(haystack.paragraphs),
    "versions": _versions(), "platform": platform.platform(),
  }
  result = {"metadata": metadata, "presets": summary, "cells": cells}
  (out / "niah.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
  (out / "niah.md").write_text(markdown(result), encoding="utf-8")
  for preset, entry in summary.items():
    heatmap(entry, preset, out / heatmap_name(preset))
  return result


def heatmap_name(preset: str) -> str:
  """``heatmap-<preset>.png``, with the characters of preset options (``:`` ``=``) that
  some file systems refuse replaced."""
  return "heatmap-" + re.sub(r"[^A-Za-z0-9._+-]", "_", preset) + ".png"


def _fmt_margin(x: float | None) -> str:
  return "–" if x is None else f"{x:+.2f}"


def _fmt_pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict[str, Any]) -> str:
  meta, summary = result["metadata"], result["presets"]
  cfg, model = meta["config"], meta["model"]
  lines = ["# Needle in a haystack: baseline vs TurboQuant", ""]
  what = f"Model `{cfg['model']}`" + (f" ({model['model_type']}, {model['num_layers']} layers, "
                                      f"{model['num_heads']} q / {model['num_kv_heads']} kv "
                                      f"heads, head_dim {model['head_dim']}, {model['dtype']})"
                                      if model else "")
  lines += [what + f", backend `{cfg['backend']}`, seed {cfg['seed']}, "
            f"window {cfg['window'] if cfg['window'] is not None else 'preset default'}, "
            f"{cfg['trials']} trial(s) per cell, greedy answers of up to "
            f"{cfg['max_new_tokens']} tokens.",
            "Strict paired protocol: one exact prefill of the document per prompt, converted "
            "per preset; the question is a separate chunk that reads the (compressed) cache.",
            f"Cells done: {meta['cells_done']} / {meta['cells_expected']}; compute "
            f"{meta['compute_seconds']:.0f} s.", ""]
  longest = max(cfg["lengths"])
  lines += ["| preset | accuracy | Δ vs baseline (pp) | margin: median / min | "
            "Δ margin vs baseline | code bits/coord | bits/coord at "
            f"{longest} tokens | compression vs fp16 | cache memory at {longest} tokens |",
            "|---|---|---|---|---|---|---|---|---|"]
  for preset, e in summary.items():
    delta = "–" if e["delta_pp"] is None else f"{e['delta_pp']:+.1f}"
    code_bits = f"{e['code_bits_per_coordinate']:.3g}" if "code_bits_per_coordinate" in e else "–"
    bits = f"{e['bits_per_coordinate']:.3g}" if "bits_per_coordinate" in e else "–"
    ratio = f"{e['compression_vs_fp16']:.2f}×" if "compression_vs_fp16" in e else "–"
    mem = f"{e['memory_bytes'] / 2**20:.1f} MiB" if "memory_bytes" in e else "–"
    margin = f"{_fmt_margin(e.get('margin_median'))} / {_fmt_margin(e.get('margin_min'))}"
    lines.append(f"| {preset} | {_fmt_pct(e['accuracy'])} ({e['correct']}/{e['cells']}) | "
                 f"{delta} | {margin} | {_fmt_margin(e.get('margin_delta_median'))} | "
                 f"{code_bits} | {bits} | {ratio} | {mem} |")
  lines += ["", "Margin: logit of the code's token minus the best other token, the smallest "
            "along the greedy answer (> 0: the code is spelled out); Δ margin: median over "
            "prompts of preset − baseline. Code bits: codes and norms only (the rate of long "
            f"contexts); bits at {longest} tokens add the exact sink tokens and the exact "
            "window buffer spread over that context, in the cache dtype.", "",
            "Accuracy per context length (columns, tokens) and needle depth (rows), then "
            "the mean margin of each cell.", ""]
  for preset, e in summary.items():
    header = ["| depth | " + " | ".join(map(str, e["grid_lengths"])) + " |",
              "|---|" + "---|" * len(e["grid_lengths"])]
    lines += [f"## {preset}", ""] + header
    for d, row in zip(e["grid_depths"], e["grid"]):
      lines.append(f"| {100 * d:g}% | " + " | ".join(_fmt_pct(x) for x in row) + " |")
    if any(x is not None for row in e.get("margin_grid", []) for x in row):
      lines += ["", "Margin:", ""] + header
      for d, row in zip(e["grid_depths"], e["margin_grid"]):
        lines.append(f"| {100 * d:g}% | " + " | ".join(_fmt_margin(x) for x in row) + " |")
    lines += ["", f"![{preset}]({heatmap_name(preset)})", ""]
  return "\n".join(lines)


def heatmap(entry: dict[str, Any], preset: str, path: pathlib.Path) -> None:
  """Context length (x) × needle depth (y) heatmap of accuracy, annotated."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  grid = np.array([[np.nan if x is None else x for x in row] for row in entry["grid"]], float)
  lengths, depths = entry["grid_lengths"], entry["grid_depths"]
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.2 + 0.55 * len(depths)),
                         layout="constrained")
  im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  for i in range(len(depths)):
    for j in range(len(lengths)):
      text = "–" if np.isnan(grid[i, j]) else f"{100 * grid[i, j]:.0f}"
      ax.text(j, i, text, ha="center", va="center", fontsize=9)
  ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n)
                                      for n in lengths])
  ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  title = f"{preset}: {_fmt_pct(entry['accuracy'])}"
  if "bits_per_coordinate" in entry and preset != backends.BASELINE:
    title += f", {entry['bits_per_coordinate']:.3g} bits/coord"
  if entry.get("delta_pp") is not None and preset != backends.BASELINE:
    title += f", Δ {entry['delta_pp']:+.0f} pp"
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, label="accuracy", fraction=0.05)
  fig.savefig(path, dpi=110)
  plt.close(fig)
