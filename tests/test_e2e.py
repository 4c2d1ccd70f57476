"""bench/e2e.py end to end on the CPU at tiny shapes: complete, consistent rows; the bench's
decode step is the Runner's; caches are built at their context with random contents; rows
tensor-parallel over 2 devices reproduce one device's tokens.

The tests run in two child processes at once (`test_in_subprocesses`; here they skip): XLA
fixes the number of CPU devices when jax starts and the suite runs with one, and the
children compile with LLVM's optimizations off (3-4x faster compiles of these tiny
programs; one core each).
"""

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import e2e
from tqjax import kvcache
from tqjax.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART = os.environ.get("TQJAX_TEST_E2E_PART")  # set in the children: "flax" or "other"
DEVICES = 2
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
TINY = ["--models", "tiny", "--batches", "2", "--presets", "bf16,k4v4", "--warmup", "1",
        "--headroom-gib", "0", "--in-process"]


@pytest.fixture(autouse=True)
def _in_its_process(request):
  """Each test runs in one child: those reading `flax_run` in the "flax" one, the others
  in the "other" one; the launcher only in the parent."""
  if request.node.name == "test_in_subprocesses":
    if PART is not None:
      pytest.skip("the launcher runs in the parent")
    return
  part = "flax" if "flax_run" in request.fixturenames else "other"
  if PART != part:
    pytest.skip(f"runs in the {part!r} subprocess (test_in_subprocesses)")


def test_in_subprocesses():
  flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} " \
          f"--xla_force_host_platform_device_count={DEVICES}"
  procs = {}
  for part in ("flax", "other"):
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               TQJAX_TEST_E2E_PART=part)
    procs[part] = subprocess.Popen(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for part, proc in procs.items():
    out = proc.communicate(timeout=900)[0]
    summary = out.strip().splitlines()[-1]
    assert proc.returncode == 0, f"{part}:\n{out[-8000:]}"
    assert not re.search(r"failed|error", summary), f"{part}:\n{out[-8000:]}"
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 6, f"{part}:\n{out[-8000:]}"


@pytest.fixture(scope="module")
def flax_run(tmp_path_factory):
  """One Flax run on 2 devices (`--devices 1,2`): two contexts that fit, one (1M tokens)
  beyond a 64 MiB device, a 20 MiB fit budget verified for both presets, every row again
  over 2 devices ("tiny-tp": a vocabulary that splits in two). (returncode, e2e.json, out
  dir, printed lines)."""
  if PART != "flax":  # (module fixtures are set up before the autouse one above)
    pytest.skip("runs in the 'flax' subprocess (test_in_subprocesses)")
  assert jax.device_count() == DEVICES
  out = tmp_path_factory.mktemp("e2e")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    rc = e2e.main([
      "--models", "tiny-tp", "--batches", "2", "--presets", "bf16,k4v4", "--warmup", "1",
      "--headroom-gib", "0", "--in-process", "--paths", "flax", "--devices", f"1,{DEVICES}",
      "--contexts", "256,384,1048576", "--budget-gib", str(20 / 1024),
      "--memory-limit-gib", str(64 / 1024), "--out", str(out)])
  with open(out / "e2e.json") as f:
    return rc, json.load(f), out, printed.getvalue().strip().splitlines()


# ---- the "other" child ----


@pytest.mark.parametrize("preset", ["bf16", "k4v4"])
def test_bench_step_equals_runner_decode_step(preset):
  config = e2e.tiny_config()
  runner = e2e.random_runner(config)
  # 40 steps from 64 exact + 96 compressed tokens: the window flushes once on the way.
  spec = e2e.CacheSpec(config, preset, 3, 448, jnp.bfloat16, "xla")
  (tokens, caches), (want_tokens, want_caches) = e2e.check_step_matches_runner(
    runner, spec, 160, steps=40)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert jax.tree.structure(caches) == jax.tree.structure(want_caches)
  for a, b in zip(jax.tree.leaves(caches), jax.tree.leaves(want_caches)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(caches[0].lengths) == 200).all()
  if preset == "k4v4":
    assert (np.asarray(caches[0].compressed) > 96).all()  # a flush happened


def test_built_caches_hold_the_context_with_random_contents():
  config = e2e.tiny_config()
  dense = e2e.CacheSpec(config, "bf16", 2, 512, jnp.bfloat16, "xla")
  quant = e2e.CacheSpec(config, "k3v3", 2, 512, jnp.bfloat16, "xla")
  caches = tuple(jax.jit(dense.builder(i))(jax.random.key(i), jnp.int32(300)) for i in range(2))
  for c in caches:
    assert (np.asarray(c.lengths) == 300).all()
    k = np.asarray(c.k.astype(jnp.float32))
    assert (k != 0).mean() > 0.99 and 0.5 < np.abs(k).mean() < 1.5  # uniform(-2, 2)
  assert not np.array_equal(np.asarray(caches[0].k), np.asarray(caches[1].k))
  assert e2e.cache_memory_bytes(caches) == e2e.CacheLayout.measure(dense).bytes(512)
  config_k3 = kvcache.preset("k3v3")
  q = jax.jit(quant.builder(0))(jax.random.key(0), jnp.int32(300))
  held = 300 - np.asarray(q.compressed)
  assert (np.asarray(q.lengths) == 300).all() and (held == config_k3.window).all()
  for codes in q.k_codes + q.v_codes:
    values = np.asarray(codes)
    assert values.shape[2] == 512 and len(np.unique(values)) == 256  # random bytes
  for scales in q.k_scales + q.v_scales:
    assert (np.asarray(scales, np.float32) > 0).all()
  assert q.memory_bytes() == e2e.CacheLayout.measure(quant).bytes(512) // 2


def test_a_preset_may_name_its_implementation():
  # "k4v4@mosaic": one run compares the kernels against bf16 (Flax path).
  assert e2e.split_preset("k4v4@mosaic") == ("k4v4", "mosaic")
  assert e2e.split_preset("k4v4") == ("k4v4", None)
  assert e2e.split_preset("k4v4-e4m3@pallas") == ("k4v4-e4m3", "pallas")
  with pytest.raises(SystemExit, match="may take @ one of"):
    e2e.split_preset("k4v4@mosaic-e4m3")
  config = e2e.tiny_config()
  impl = lambda preset: e2e.CacheSpec(config, preset, 2, 512, jnp.bfloat16,
                                      "pallas").builder(0).keywords["implementation"]
  assert impl("k4v4@xla") == "xla" and impl("k4v4") == "pallas"
  assert e2e.cache_config("k4v4@mosaic") == kvcache.preset("k4v4")
  for bad in ("k4v4@cuda", "bf16@mosaic"):
    with pytest.raises(SystemExit, match="may take @ one of"):
      e2e.split_preset(bad)
  parse = lambda *argv: e2e.resolve(e2e.build_parser().parse_args(list(argv)))
  with pytest.raises(SystemExit, match="Flax path only"):
    parse("--presets", "bf16,k4v4@mosaic", "--paths", "flax,bridge")
  assert parse("--presets", "bf16,k4v4,k4v4@mosaic", "--paths", "flax").presets == [
      "bf16", "k4v4", "k4v4@mosaic"]


def test_targets_are_judged_per_4bit_kernel():
  row = lambda preset, batch, context, x: dict(
      status="ok", path="flax", kind="decode", model="m", preset=preset, batch=batch,
      context=context, speedup_vs_bf16=x)
  fit = lambda preset, batch, x: dict(status="ok", path="flax", kind="fit", model="m",
                                      preset=preset, batch=batch, context_ratio_vs_bf16=x)
  rows = [row("bf16", 8, 32768, 1.0), row("k4v4", 8, 32768, 1.19),
          row("k4v4@mosaic", 8, 32768, 1.41), row("k4v4@mosaic", 8, 131072, 1.71),
          row("k4v4@mosaic", 1, 32768, 1.23), row("k4v4@mosaic", 1, 131072, 0.99),
          row("k3v3", 8, 32768, 2.0), fit("k4v4@mosaic", 8, 3.89), fit("k4v4@mosaic", 1, 3.95)]
  t = e2e.targets(rows)["m"]
  assert set(t) == {"k4v4", "k4v4@mosaic"}
  assert t["k4v4"]["b8_32k"] == dict(value=1.19, target=1.4, met=False)
  assert t["k4v4"]["b8_128k"]["met"] is None and t["k4v4"]["context"]["value"] is None
  mosaic = t["k4v4@mosaic"]
  assert mosaic["b8_32k"]["met"] is True and mosaic["b8_128k"] == dict(value=1.71,
                                                                        target=2.5, met=False)
  assert mosaic["b1_min"] == dict(value=0.99, target=1.0, met=False)
  assert mosaic["context"] == dict(value=3.89, target=3.8, met=True)


@pytest.mark.parametrize("model", ["qwen2.5-7b", "llama3-8b"])
@pytest.mark.parametrize("preset", ["k4v4", "k3v3", "k5v3", "k2.5v2.5"])
def test_layout_at_model_shapes(model, preset):
  """Bytes per token at the benchmark's real shapes (shapes only, nothing allocated)."""
  config = e2e.model_config(model)
  bits = kvcache.preset(preset).bits_per_coordinate(config.num_layers, config.head_dim)
  layouts = {p: e2e.CacheLayout.measure(e2e.CacheSpec(config, p, 8, 0, jnp.bfloat16, "pallas"))
             for p in ("bf16", preset)}
  per_token_bf16 = 8 * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
  assert layouts["bf16"].per_token == per_token_bf16
  assert layouts[preset].per_token / per_token_bf16 == bits / 16
  if preset == "k4v4":  # 4 bits + a float16 norm per 128 coordinates: 3.88x the context
    assert 16 / bits == pytest.approx(3.879, abs=1e-3)


@pytest.mark.parametrize("stack", [True, False])
def test_step_lowers_for_cuda_with_the_pallas_kernel(stack):
  """The bench's whole decode step with compressed caches lowers for the GPU, one fused
  decode kernel per layer (a CPU smoke test of what the H200 compiles), over one
  `StackedCache` (the default) or per-layer caches (``--per-layer-caches``)."""
  config = e2e.tiny_config()
  runner = e2e.random_runner(config)
  spec = e2e.CacheSpec(config, "k4v4", 8, 4096, jnp.bfloat16, "pallas", stack=stack)
  caches = kvcache.with_auto_flush(spec.abstract(), False)  # as the bench runs them
  assert isinstance(caches, kvcache.StackedCache) == stack
  lowered = e2e.step_function(runner).lower(
    runner.params, jax.ShapeDtypeStruct((8, 1), jnp.int32), caches, jax.random.key(0),
    lowering_platforms=("cuda",))
  text = lowered.lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == config.num_layers
  assert "stablehlo.case" not in text  # no flush branch in the step
  # Codes, scales, sinks and tables are read only: the step donates and returns the window
  # keys, values and lengths (stacked: one array each for all layers).
  layers = 1 if stack else config.num_layers
  assert sum(lowered.changed) == 3 * layers
  per_layer = len(jax.tree.leaves(spec.unsharded()[0]))
  assert len(lowered.changed) == per_layer * layers


def test_hf_config_matches_the_flax_shapes():
  for name in ("qwen2.5-7b", "llama3-8b", "tiny"):
    config = e2e.model_config(name)
    back = ModelConfig.from_hf(e2e.hf_config(config))
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "qkv_bias", "rope_theta"):
      assert getattr(back, field) == getattr(config, field), (name, field)


def test_bridge_rows(tmp_path):
  import torch

  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a loaded 2-core machine: 2 OpenMP threads wait on each other
  try:
    rc = e2e.main([*TINY, "--paths", "bridge", "--contexts", "300", "--steps", "2",
                   "--out", str(tmp_path)])
  finally:
    torch.set_num_threads(threads)
  assert rc == 0
  with open(tmp_path / "e2e.json") as f:
    doc = json.load(f)
  rows = {r["variant"]: r for r in doc["rows"]}
  assert set(rows) == {"stock-dynamic", "stock-static", "bridge-exact", "bridge-k4v4"}
  for r in rows.values():
    assert r["status"] == "ok", r
    assert r["path"] == "bridge" and r["batch"] == 2 and r["context"] == 300
    assert r["tokens_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
    assert r["speedup_vs_stock_static"] == pytest.approx(
      rows["stock-static"]["step_ms"] / r["step_ms"])
  kv = 2 * 2 * 2 * 64 * 4  # layers x (K, V) x kv heads x head_dim x float32, per token and row
  assert rows["stock-dynamic"]["kv_bytes"] == 2 * kv * 300  # before the timed steps
  assert rows["stock-static"]["kv_bytes"] == 2 * kv * (300 + 256)  # its capacity
  config = e2e.tiny_config()
  for preset, variant in (("bf16", "bridge-exact"), ("k4v4", "bridge-k4v4")):
    spec = e2e.CacheSpec(config, preset, 2, 300 + 256, jnp.float32, "xla")
    assert rows[variant]["kv_bytes"] == e2e.CacheLayout.measure(spec).bytes(300 + 256)
  check = doc["meta"]["bridge"]["check"]["tiny"]
  assert check["exact_rel_err"] < 1e-4 and check["exact_top1_agrees"]
  assert math.isfinite(check["k4v4_rel_err"])


# ---- the "flax" child: the rows of one 2-device run ----


def test_decode_rows_are_complete(flax_run):
  rc, doc, _, _ = flax_run
  assert rc == 0
  rows = {(r["context"], r["preset"]): r for r in doc["rows"] if r["kind"] == "decode"}
  assert set(rows) == {(s, p) for s in (256, 384, 1 << 20) for p in ("bf16", "k4v4")}
  for context in (256, 384):
    for preset in ("bf16", "k4v4"):
      r = rows[context, preset]
      assert r["status"] == "ok", r
      assert r["path"] == "flax" and r["model"] == "tiny-tp" and r["batch"] == 2
      assert r["capacity"] == context + e2e.MARGIN
      assert r["cache_layout"] == (None if preset == "bf16" else "stacked")
      assert len(r["step_ms_all"]) == r["steps"] == 32
      assert r["step_ms_min"] <= r["step_ms"] <= max(r["step_ms_all"])
      assert r["tokens_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
      assert r["compile_s"] > 0 and r["lower_s"] > 0
      layers, kv_heads, head_dim = 2, 2, 64
      assert r["cache_bytes_per_token"] == pytest.approx(
        layers * 2 * kv_heads * head_dim * r["bits_per_coordinate"] / 8)
      memory = r["memory"]
      assert memory["step_temp_bytes"] > 0
      assert memory["estimated_peak_bytes"] > r["cache_bytes"] + r["weights_bytes"] - 1
    assert rows[context, "bf16"]["speedup_vs_bf16"] == 1.0
    assert rows[context, "k4v4"]["speedup_vs_bf16"] == pytest.approx(
      rows[context, "k4v4"]["tokens_per_s"] / rows[context, "bf16"]["tokens_per_s"])
  for preset in ("bf16", "k4v4"):  # 1M tokens cannot fit 64 MiB: skipped before allocating
    r = rows[1 << 20, preset]
    assert r["status"] == "skipped"
    assert "out of memory (estimated before allocating)" in r["reason"]


def test_compressed_bytes_per_token_match_bits_per_coordinate(flax_run):
  _, doc, _, _ = flax_run
  rows = [r for r in doc["rows"] if r["kind"] == "decode" and r["status"] == "ok"]
  bf16 = next(r for r in rows if r["preset"] == "bf16")
  k4v4 = next(r for r in rows if r["preset"] == "k4v4")
  bits = kvcache.preset("k4v4").bits_per_coordinate(2, 64)
  assert k4v4["bits_per_coordinate"] == bits == 4.25  # 4-bit codes + a float16 norm per 64
  assert k4v4["cache_bytes_per_token"] / bf16["cache_bytes_per_token"] == bits / 16


def test_fit_rows_are_consistent_and_verified(flax_run):
  _, doc, _, _ = flax_run
  fits = {r["preset"]: r for r in doc["rows"] if r["kind"] == "fit"}
  assert set(fits) == {"bf16", "k4v4"}
  budget = 20 * 2**20
  for preset, r in fits.items():
    assert r["status"] == "ok" and r["budget_bytes"] == budget
    context = r["max_context"]
    assert context > 0 and context % 256 == 0
    temp = r["temp_fit"]
    per_token = 2 * (r["cache_bytes_per_token"] + temp["bytes_per_token"])  # batch 2

    def total(s):
      return r["weights_bytes"] + r["cache_fixed_bytes"] + temp["bytes_at_0"] + per_token * (
        s + e2e.MARGIN)

    assert total(context) <= budget < total(context + 256)
    # Allocated at that context and decoded: caches + temporaries within the budget.
    assert r["verified"] is True, r
    assert r["verify_context"] == context and "verify_note" not in r
    verify = r["verify"]
    assert verify["status"] == "ok" and verify["within_budget"] is True
    assert verify["memory"]["estimated_peak_bytes"] <= budget
  assert fits["bf16"]["context_ratio_vs_bf16"] == 1.0
  assert fits["k4v4"]["context_ratio_vs_bf16"] == pytest.approx(
    fits["k4v4"]["max_context"] / fits["bf16"]["max_context"])
  assert set(doc["targets"]["tiny-tp"]) == {"k4v4"}
  assert set(doc["targets"]["tiny-tp"]["k4v4"]) == {"b8_32k", "b8_128k", "b1_min", "context"}


def test_table_is_printed_last(flax_run):
  _, _, out, lines = flax_run
  assert lines[-1] == f"wrote {out / 'e2e.json'}"
  assert lines[-2].startswith("targets k4v4 tiny-tp:")
  header = next(i for i, line in enumerate(lines) if line.startswith("sharded "))
  assert lines[header].split()[1:12] == ["B", "S", "preset", "dev", "ms", "pipe", "tok/s",
                                         "x", "1", "dev", "x"]
  sharded = [line.split() for line in lines[header + 1:header + 7]]
  assert [(r[2], r[3], r[4]) for r in sharded[:4]] == [
    ("256", "bf16", "2"), ("256", "k4v4", "2"), ("384", "bf16", "2"), ("384", "k4v4", "2")]
  for r in sharded[:4]:
    assert float(r[8]) > 0 and r[10] == "1.00"  # scaling; tokens match


def test_rows_replace_only_their_configuration(flax_run, tmp_path):
  """A later run into the same folder replaces the rows of the configurations it ran and
  keeps the others; a row over 2 devices is another configuration than over 1."""
  _, doc, out, _ = flax_run
  shutil.copy(out / "e2e.json", tmp_path / "e2e.json")
  results = e2e.Results(str(tmp_path))
  one = next(r for r in results.rows if r["kind"] == "decode" and r["status"] == "ok")
  two = next(r for r in results.rows if r["kind"] == "sharded" and r["status"] == "ok"
             and r["context"] == one["context"] and r["preset"] == one["preset"])
  assert e2e.row_key(one) != e2e.row_key(two)
  step_ms, scaling = two["step_ms"], two["scaling"]
  results.add(dict(one, steps=2, step_ms=2 * one["step_ms"],
                   tokens_per_s=one["tokens_per_s"] / 2))
  with open(tmp_path / "e2e.json") as f:
    rows = json.load(f)["rows"]
  keys = [e2e.row_key(r) for r in rows]
  assert len(keys) == len(set(keys)) == len(doc["rows"])
  again = next(r for r in rows if e2e.row_key(r) == e2e.row_key(one))
  assert again["steps"] == 2
  kept = next(r for r in rows if e2e.row_key(r) == e2e.row_key(two))
  assert kept["step_ms"] == step_ms
  assert kept["scaling"] == pytest.approx(2 * scaling)  # against the new 1-device row


def test_sharded_rows_reproduce_one_device(flax_run):
  """``--devices 1,2``: every row again tensor-parallel over 2 (fake CPU) devices from the
  same weights, caches and tokens: the same greedy tokens as one device, half the cache
  and weight bytes on each device, scaling against the 1-device row."""
  _, doc, _, _ = flax_run
  single = {(r["context"], r["preset"]): r for r in doc["rows"] if r["kind"] == "decode"}
  sharded = {(r["context"], r["preset"]): r for r in doc["rows"] if r["kind"] == "sharded"}
  assert set(sharded) == set(single)
  assert doc["meta"]["flax"]["devices"] == [1, 2]
  for (context, preset), r in sharded.items():
    one = single[context, preset]
    if context == 1 << 20:  # half of 1M tokens per device still exceeds the 64 MiB
      assert r["status"] == "skipped" and "per device" in r["reason"], r
      continue
    assert r["status"] == "ok" and r["devices"] == 2 and r["batch"] == 2, r
    assert r["implementation"] == "xla" and r["check_steps"] == 3
    assert np.asarray(one["check_tokens"]).shape == (2, 3)
    # Teacher-forced from the 1-device tokens: every greedy token reproduced.
    assert r["tokens_match"] == 1.0 and r["check_tokens"] == one["check_tokens"]
    assert r["scaling"] == pytest.approx(r["tokens_per_s"] / one["tokens_per_s"])
    assert r["scaling_pipelined"] == pytest.approx(
      one["step_ms_pipelined"] / r["step_ms_pipelined"])
    assert len(r["step_ms_all"]) == 32 and r["compile_s"] > 0
    # The same caches: the same total bytes, split over KV heads (the per-row lengths and
    # the quantizers' tables, 18% of a tiny k4v4 cache, on both devices).
    assert r["cache_bytes"] == one["cache_bytes"]
    per_device = r["cache_bytes_per_device"]
    assert len(per_device) == 2 and per_device[0] == per_device[1]
    split = 0.51 if preset == "bf16" else 0.6
    assert r["cache_bytes"] / 2 < per_device[0] < split * r["cache_bytes"]
    assert [d["cache_bytes"] for d in r["memory"]["per_device"]] == per_device
    assert r["weights_bytes"] / 2 < max(r["weights_bytes_per_device"]) < 0.51 * r["weights_bytes"]
    if preset == "k4v4":
      assert r["speedup_vs_bf16"] == pytest.approx(
        r["tokens_per_s"] / sharded[context, "bf16"]["tokens_per_s"])


def test_merge_of_separate_runs(flax_run, tmp_path, capsys):
  """Rows of runs made in separate device calls merge into one e2e.json, no device used."""
  _, doc, _, _ = flax_run
  first = {**doc, "rows": doc["rows"][:3]}
  second = {**doc, "rows": doc["rows"][2:]}  # row 2 in both: kept once
  for name, part in (("a.json", first), ("b.json", second)):
    with open(tmp_path / name, "w") as f:
      json.dump(part, f)
  merged_dir = tmp_path / "merged"
  assert e2e.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
                   "--out", str(merged_dir)]) == 0
  with open(merged_dir / "e2e.json") as f:
    merged = json.load(f)
  assert sorted(map(e2e.row_key, merged["rows"])) == sorted(map(e2e.row_key, doc["rows"]))
  assert merged["meta"]["flax"] == doc["meta"]["flax"]
  assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {merged_dir / 'e2e.json'}"
