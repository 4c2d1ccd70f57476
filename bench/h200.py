"""Everything that needs the GPU, checked and timed in one call; a short table last.

    PYTHONPATH=. python bench/h200.py --out DIR [--jobs tests,kernels,bridge,e2e]
        [--budget 540] [--sweep] [--layer-sweep]

Runs each job as its own process (one JAX/torch client at a time, a crash stays in its
job) under a share of the time budget, writes each job's JSON and log to DIR, and ends
with one line per job: status, seconds, and its headline numbers.

Jobs:
  tests    the GPU tests of the cache's kernel path and the bridge's kernel path vs its
           jnp path (`pytest -m gpu`; the kernels' own GPU tests are in
           tests/test_kernels.py, and `kernels` checks every preset before timing)
  mosaic-tests  the GPU tests of the Mosaic kernel alone (`-k mosaic`: the kernel, the
           cache and the bridge on it)
  kernels  bench/kernels.py --quick (B = 8 and 1, S = 64K, D = 128, every preset against
           the fp16 baselines of the same run) plus the tiling sweep with --sweep and
           the Mosaic splits at the e2e model's layer with --layer-sweep
  kernels64  the grid at head_dim 64 (k4v4, k3v3; B = 8 and 1, 4K-128K) against the fp16
           baselines of the same run, in DIR/kernels64/ (several minutes: a call of its own)
  ab64     bench/ab_mosaic.py --head-dim 64 --baselines: the 4-bit Mosaic kernel at 64
           coordinates with the tuned 264 programs against 132 and 66 and 3 stages, at
           16K B = 1 (0.93x fp16 on the H100, session 21: the target's one miss for k4v4),
           64K B = 1 and B = 8; the table of us and x fastest fp16 last
  profile  bench/decode_profile.py: the device time of one B = 1, 16K decode call by
           program (kernel, query layout, split merge), D = 64 and 128, both kernels
  bridge   bench/bridge.py (Qwen2.5-7B shapes, stock cache vs the bridge, 8K-64K)
  e2e      bench/e2e.py --quick --presets bf16,k4v4,k4v4@mosaic (the Flax model end to
           end, the Triton and the Mosaic kernel; several minutes with its
           compiles: give it a call of its own, `--jobs e2e --budget 540`, for the full grid
           see bench/e2e.py)
  e2e2     the same with --devices 1,2 on two GPUs (sharded rows, scaling vs one GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

JOBS = {
  "tests": (["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/test_kvcache.py", "tests/test_kernels.py", "tests/test_bridge.py"], None),
  # The Mosaic kernel's GPU tests alone (~50 s).
  "mosaic-tests": (["-m", "pytest", "-q", "-m", "gpu", "-k", "mosaic", "-p",
                    "no:cacheprovider", "tests/test_kvcache.py", "tests/test_kernels.py",
                    "tests/test_bridge.py"], None),
  "kernels": (["bench/kernels.py", "--quick"], "kernels.json"),
  "kernels64": (["bench/kernels.py", "--dims", "64", "--presets", "k4v4,k3v3", "--no-encode"],
                "kernels64/kernels.json"),
  "ab64": (["bench/ab_mosaic.py", "--head-dim", "64", "--baselines", "--rounds", "2",
            "--shapes", "16K B1,64K B1,64K B8", "--variants",
            json.dumps({"264 tuned": {}, "132": {"programs": 132}, "66": {"programs": 66},
                        "3 stages": {"num_stages": 3}})], None),
  "profile": (["bench/decode_profile.py", "--dims", "64,128", "--presets", "k4v4,k3v3",
               "--implementations", "mosaic,pallas"], "decode_profile.json"),
  "bridge": (["bench/bridge.py", "--contexts", "8192,32768,65536"], "bridge.json"),
  # The quick rows plus the Mosaic kernel's (k4v4@mosaic) on the same shapes.
  "e2e": (["bench/e2e.py", "--quick", "--presets", "bf16,k4v4,k4v4@mosaic",
           "--compile-cache", "out/jax-cache"], "e2e.json"),
  # Two GPUs (nvidia-h200-x2): the quick rows on one, then tensor-parallel over both.
  "e2e2": (["bench/e2e.py", "--quick", "--devices", "1,2", "--compile-cache", "out/jax-cache"],
           "e2e.json"),
}
# Share of the budget each job may take (the rest of a finished job's share carries over).
# Measured on the H200: the GPU tests 239 s (session 3; in session 4 a 140 s share ran out
# before they finished; session 6: 27 of 51 in 370 s — give them a call of their own,
# `--jobs tests --budget 560`), kernels --quick 117-140 s (with --layer-sweep more: session 13
# on the H100 it ran out of a 169 s share before its encode rows), e2e --quick 110 s (session
# 4, weights drawn per layer; 206 s before), bridge 95 s.
# kernels64: session 19's grid (k4v4, k3v3, checked) ran out of ~400 s at B = 1, 64K.
SHARE = {"tests": 0.45, "mosaic-tests": 0.15, "kernels": 0.25, "kernels64": 0.9,
         "ab64": 0.3, "profile": 0.15, "bridge": 0.2, "e2e": 0.3, "e2e2": 0.6}


def headline(job: str, path: str | None, log: str) -> str:
  """A few numbers from a job's JSON (or the tail of its log)."""
  if job.endswith("tests"):
    lines = [l for l in log.splitlines() if " passed" in l or " failed" in l or "error" in l]
    return lines[-1].strip() if lines else log.strip().splitlines()[-1:][0] if log else ""
  if job.startswith("ab"):  # bench/ab_mosaic.py: its table, the last lines of the log
    at = log.rfind("\nshape ")
    table = log[at:].strip().splitlines() if at >= 0 else []
    return " | ".join(" ".join(l.split()) for l in table)[:400] if table else "no table"
  if path is None or not os.path.exists(path):
    return "no json"
  with open(path) as f:
    data = json.load(f)
  if job == "profile":
    return " ".join(f"D{r['D']}/{r['preset']}/{r['implementation']}:{r['us']:.1f}us"
                    for r in data.get("rows", []) if "us" in r)
  if job in ("kernels", "kernels64"):
    rows = [r for r in data.get("rows", []) if "speedup" in r and r["kind"] == "tq_decode"]
    return " ".join(f"{r['name']}@B{r['B']}:{r['speedup']:.2f}x" for r in rows[:6])
  if job == "bridge":
    rows = data.get("rows", [])
    return " ".join(f"{r.get('variant')}@{r.get('context')}:{r.get('step_ms', 0):.1f}ms"
                    for r in rows if "step_ms" in r)[:300]
  if job in ("e2e", "e2e2"):
    rows = data.get("rows", [])
    return f"{len(rows)} rows" + "".join(
      f" {r.get('preset')}@B{r.get('batch')}/S{r.get('context')}:"
      f"{r.get('tokens_per_s', float('nan')):.0f}tok/s" for r in rows[:6] if "tokens_per_s" in r)
  return ""


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--jobs", default=",".join(
      j for j in JOBS if j not in ("mosaic-tests", "kernels64", "ab64", "profile")))
  ap.add_argument("--budget", type=float, default=540.0, help="seconds for all jobs")
  ap.add_argument("--sweep", action="store_true", help="kernels: the tiling sweep too")
  ap.add_argument("--layer-sweep", action="store_true",
                  help="kernels: the Mosaic splits at the e2e layer too")
  args = ap.parse_args(argv)
  jobs = [j for j in args.jobs.split(",") if j]
  unknown = sorted(set(jobs) - set(JOBS))
  if unknown:
    raise SystemExit(f"--jobs: unknown {unknown}; choose from {sorted(JOBS)}")
  os.makedirs(args.out, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=".", XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONUNBUFFERED="1")
  total = sum(SHARE[j] for j in jobs)
  left = args.budget
  summary = []
  for i, job in enumerate(jobs):
    cmd, json_name = JOBS[job]
    cmd = [sys.executable, *cmd]
    path = os.path.join(args.out, json_name) if json_name else None
    if path:
      cmd += ["--out", os.path.dirname(path)]
    if job == "kernels" and args.sweep:
      cmd.append("--sweep")
    if job == "kernels" and args.layer_sweep:
      cmd.append("--layer-sweep")
    share = sum(SHARE[j] for j in jobs[i:])
    limit = max(30.0, left * SHARE[job] / share)
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
      status, log = ("ok" if proc.returncode == 0 else f"rc={proc.returncode}",
                     proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as e:
      status = "timeout"
      log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - start
    left -= seconds
    with open(os.path.join(args.out, f"{job}.log"), "w") as f:
      f.write(log)
    print(f"--- {job}: {status} in {seconds:.0f} s; log tail:\n" + "\n".join(log.splitlines()[-15:]),
          flush=True)
    summary.append((job, status, seconds, headline(job, path, log)))
  print(f"\n{'job':8s} {'status':8s} {'s':>5s}  headline")
  for job, status, seconds, text in summary:
    print(f"{job:8s} {status:8s} {seconds:5.0f}  {text}")
  return 0 if all(s == "ok" for _, s, _, _ in summary) else 1


if __name__ == "__main__":
  sys.exit(main())
