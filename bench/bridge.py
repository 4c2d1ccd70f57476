"""Decode-step time of a Hugging Face model: stock caches vs the tqjax bridge.

    PYTHONPATH=. python bench/bridge.py --out DIR            # GPU: Qwen2.5-7B shapes, bf16
    PYTHONPATH=. python bench/bridge.py --quick --out DIR    # CPU: tiny config, float32

A transformers Qwen2 model at Qwen2.5-7B shapes (28 layers, 28 q / 4 kv heads, head_dim
128, random weights, bf16, CUDA) decodes one token at a time after a prompt of S tokens
(8K..64K), with
* ``stock-dynamic``: transformers' default `DynamicCache` (concatenates every step),
* ``stock-static``: a preallocated `StaticCache` (filled from the same prefill),
* ``bridge-<preset>``: `bridge.TurboQuantHFCache` with the "tqjax" attention; ``exact`` is
  the bridge over the exact `DenseCache` (its overhead without compression), other presets
  are converted from the same exact prefill (`TurboQuantHFCache.convert`).

Correctness first: at the smallest context the bridge's exact decode logits are compared
with the stock model's (same prefill, same token). Then each variant is warmed up and
timed (device-synchronized wall clock per step, median). Where the time goes, per step:
* ``torch``: the model's torch layers alone (attention replaced by a no-op, no cache),
* ``handoff``: per layer, the q/k/v concatenation, the torch->JAX import and the JAX->torch
  export (DLPack), times the number of layers,
* ``jax``: per layer, the jitted cache update + attention (dispatch included), times the
  number of layers,
* ``glue``: the rest of the bridge step (transformers' cache and mask bookkeeping, Python).
For stock variants ``attention`` = step - torch (attention and cache writes).

torch and JAX share the GPU: JAX must not preallocate (XLA_PYTHON_CLIENT_PREALLOCATE=false,
set here before JAX starts). Writes ``bridge.json`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  sys.path.pop(0)  # run as `python bench/bridge.py`, this file would shadow the package

import argparse  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AttentionInterface, DynamicCache, StaticCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import bridge  # noqa: E402
from bridge import cache as bridge_cache  # noqa: E402

NULL_ATTENTION = "tqjax_bench_null"
MARGIN = 256  # cache room beyond the prompt for the timed steps


def _null_attention(module, query, key, value, attention_mask, **kwargs):
  return query.transpose(1, 2), None  # [B, T, H, D]: the torch layers without attention


AttentionInterface.register(NULL_ATTENTION, _null_attention)
AttentionMaskInterface.register(NULL_ATTENTION, sdpa_mask)


def model_config(quick: bool) -> transformers.Qwen2Config:
  if quick:
    return transformers.Qwen2Config(
      vocab_size=1009, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
      max_position_embeddings=4096)
  return transformers.Qwen2Config(  # Qwen2.5-7B shapes
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, head_dim=128,
    max_position_embeddings=131072, tie_word_embeddings=False)


def build_model(config, device: str, dtype: torch.dtype):
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         attn_implementation="sdpa")
  return model.eval()


def sync(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize()  # the whole device: torch's and JAX's streams


def median_time(fn, device: str, *, steps: int, warmup: int) -> float:
  """Median seconds of fn() over `steps` calls, device-synchronized around each."""
  for _ in range(warmup):
    fn()
  sync(device)
  times = []
  for _ in range(steps):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class Bench:

  def __init__(self, args, config=None):
    """`config`: a transformers config to build (default: `model_config(args.quick)`)."""
    self.args = args
    self.device = "cpu" if args.quick else "cuda"
    self.dtype = torch.float32 if args.quick else torch.bfloat16
    self.config = model_config(args.quick) if config is None else config
    torch.manual_seed(0)
    self.model = build_model(self.config, self.device, self.dtype)
    forward_params = inspect.signature(self.model.forward).parameters
    self.cache_arg = "cache" if "cache" in forward_params else "past_key_values"
    c = self.config
    self.layers, self.heads, self.kv_heads = (c.num_hidden_layers, c.num_attention_heads,
                                              c.num_key_value_heads)
    self.head_dim = c.head_dim

  # ---- model calls ----

  @torch.no_grad()
  def forward(self, ids, cache, **kw):
    return self.model(ids, **{self.cache_arg: cache}, **kw)

  @torch.no_grad()
  def prefill(self, ids, cache):
    """Fills `cache` with the prompt; only the last position's logits are computed."""
    return self.forward(ids, cache, logits_to_keep=1).logits[:, -1]

  def timed_steps(self, token, cache) -> float:
    return median_time(lambda: self.forward(token, cache), self.device,
                       steps=self.args.steps, warmup=self.args.warmup)

  # ---- the breakdown ----

  def torch_only(self, token) -> float:
    previous = self.model.config._attn_implementation
    self.model.set_attn_implementation(NULL_ATTENTION)
    try:
      return median_time(lambda: self.forward(token, None, use_cache=False), self.device,
                         steps=self.args.steps, warmup=self.args.warmup)
    finally:
      self.model.set_attn_implementation(previous)

  def sample_qkv(self, batch: int):
    """q [B, H, 1, D], k, v [B, K, 1, D] laid out as transformers makes them."""
    shape = lambda n: torch.randn(batch, 1, n, self.head_dim, device=self.device,
                                  dtype=self.dtype).transpose(1, 2)
    return shape(self.heads), shape(self.kv_heads), shape(self.kv_heads)

  def handoffs(self, batch: int) -> float:
    q, k, v = self.sample_qkv(batch)
    out = bridge.to_jax(torch.zeros(batch, 1, self.heads, self.head_dim, device=self.device,
                                    dtype=self.dtype))

    def run():
      for _ in range(self.layers):
        qkv = torch.cat([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], dim=2)
        bridge.to_jax(qkv)
        bridge.to_torch(out)

    return median_time(run, self.device, steps=self.args.steps, warmup=self.args.warmup)

  def jax_attention(self, cache, batch: int) -> float:
    q, k, v = self.sample_qkv(batch)
    qkv = bridge.to_jax(torch.cat([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)],
                                  dim=2))

    def run():
      outs = []
      for layer in cache.layers:
        layer.state, out = bridge_cache._update_attend(
          layer.state, qkv, num_heads=self.heads, num_kv_heads=self.kv_heads,
          scale=self.head_dim ** -0.5, sliding_window=None)
        layer.seen += 1
        outs.append(out)
      jax.block_until_ready(outs)

    return median_time(run, self.device, steps=self.args.steps, warmup=self.args.warmup)

  # ---- one (batch, context) cell ----

  def new_bridge_cache(self, context: int):
    return bridge.TurboQuantHFCache.from_model(
      self.model, preset=None, max_cache_len=context + MARGIN,
      implementation=self.args.implementation)

  def cell(self, batch: int, context: int) -> list[dict]:
    gen = torch.Generator(device=self.device).manual_seed(context + batch)
    ids = torch.randint(0, self.config.vocab_size, (batch, context), device=self.device,
                        generator=gen)
    token = torch.randint(0, self.config.vocab_size, (batch, 1), device=self.device,
                          generator=gen)
    rows = []
    base = dict(batch=batch, context=context)
    torch_s = self.torch_only(token)
    handoff_s = self.handoffs(batch)

    dynamic = DynamicCache(config=self.config)
    self.prefill(ids, dynamic)
    kv_bytes = sum(l.keys.nbytes + l.values.nbytes for l in dynamic.layers)
    step = self.timed_steps(token, dynamic)
    rows.append(dict(base, variant="stock-dynamic", step_ms=1e3 * step, kv_bytes=kv_bytes,
                     breakdown_ms=dict(torch=1e3 * torch_s, attention=1e3 * (step - torch_s))))
    static = StaticCache(config=self.config, max_cache_len=context + MARGIN)
    for i, layer in enumerate(dynamic.layers):  # the same prefill, context tokens
      static.update(layer.keys[:, :, :context], layer.values[:, :, :context], i)
    del dynamic
    self.free()
    step = self.timed_steps(token, static)
    rows.append(dict(base, variant="stock-static", step_ms=1e3 * step,
                     kv_bytes=sum(l.keys.nbytes + l.values.nbytes for l in static.layers),
                     breakdown_ms=dict(torch=1e3 * torch_s, attention=1e3 * (step - torch_s))))
    del static
    self.free()

    exact = self.new_bridge_cache(context)
    with bridge.tqjax_attention(self.model):
      self.prefill(ids, exact)
      caches = {"exact": exact}
      for name in self.args.presets:
        caches[name] = exact.convert(name, implementation=self.args.implementation)
      for name, cache in caches.items():
        step = self.timed_steps(token, cache)
        jax_s = self.jax_attention(cache, batch)
        rows.append(dict(
          base, variant=f"bridge-{name}", step_ms=1e3 * step, kv_bytes=cache.memory_bytes(),
          breakdown_ms=dict(torch=1e3 * torch_s, handoff=1e3 * handoff_s, jax=1e3 * jax_s,
                            glue=1e3 * (step - torch_s - handoff_s - jax_s))))
    del caches, exact
    self.free()
    stock = rows[0]["step_ms"]
    for row in rows:
      row["speedup_vs_stock_dynamic"] = stock / row["step_ms"]
    return rows

  def free(self) -> None:
    gc.collect()
    if self.device.startswith("cuda"):
      torch.cuda.empty_cache()

  # ---- correctness ----

  def check(self, context: int) -> dict:
    """Exact bridge vs stock: logits of one decode step after the same prefill."""
    gen = torch.Generator(device=self.device).manual_seed(1)
    ids = torch.randint(0, self.config.vocab_size, (1, context), device=self.device,
                        generator=gen)
    token = torch.randint(0, self.config.vocab_size, (1, 1), device=self.device, generator=gen)
    stock = DynamicCache(config=self.config)
    self.prefill(ids, stock)
    want = self.forward(token, stock).logits.float()
    del stock
    exact = self.new_bridge_cache(context)
    with bridge.tqjax_attention(self.model):
      self.prefill(ids, exact)
      compressed = {name: exact.convert(name, implementation=self.args.implementation)
                    for name in self.args.presets}
      got = self.forward(token, exact).logits.float()
      others = {name: self.forward(token, c).logits.float() for name, c in compressed.items()}
    rel = lambda a: float(torch.linalg.norm(a - want) / torch.linalg.norm(want))
    result = dict(context=context, exact_rel_err=rel(got),
                  exact_top1_agrees=bool((got.argmax(-1) == want.argmax(-1)).all()))
    for name, logits in others.items():
      result[f"{name}_rel_err"] = rel(logits)
    # bf16 through 28 random-weight layers: the two attention paths round differently
    # (JAX keeps the softmax in float32); top-1 agreement is checked as well.
    tolerance = 1e-4 if self.dtype == torch.float32 else 0.1
    if not result["exact_rel_err"] < tolerance:
      raise SystemExit(f"bridge (exact cache) disagrees with stock: relative logit error "
                       f"{result['exact_rel_err']:.3g} >= {tolerance} at S={context}")
    del exact, compressed
    self.free()
    return result


def parse_ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default=".", help="directory for bridge.json")
  ap.add_argument("--quick", action="store_true", help="tiny float32 model on CPU")
  ap.add_argument("--contexts", default=None, help="comma-separated S (default 8K..64K)")
  ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
  ap.add_argument("--presets", default="k4v4", help="comma-separated compression presets")
  ap.add_argument("--implementation", default=None, choices=list(bridge_cache.IMPLEMENTATIONS),
                  help="default: pallas on GPU, xla on CPU")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--warmup", type=int, default=3)
  args = ap.parse_args(argv)
  default_contexts = "256,512" if args.quick else "8192,16384,32768,65536"
  args.contexts = parse_ints(args.contexts or default_contexts)
  args.batch = parse_ints(args.batch)
  args.presets = [p for p in args.presets.split(",") if p]
  args.steps = args.steps or (3 if args.quick else 20)
  if not args.quick and not torch.cuda.is_available():
    raise SystemExit("the full benchmark needs CUDA; use --quick on CPU")
  warnings.filterwarnings("ignore", category=FutureWarning)

  bench = Bench(args)
  meta = dict(
    torch=torch.__version__, jax=jax.__version__, transformers=transformers.__version__,
    device=torch.cuda.get_device_name() if bench.device == "cuda" else "cpu",
    jax_backend=jax.default_backend(), dtype=str(bench.dtype).removeprefix("torch."),
    implementation=args.implementation or bridge_cache.default_implementation(),
    model=dict(layers=bench.layers, heads=bench.heads, kv_heads=bench.kv_heads,
               head_dim=bench.head_dim, hidden=bench.config.hidden_size,
               vocab=bench.config.vocab_size),
    steps=args.steps, warmup=args.warmup)
  print(json.dumps(meta), flush=True)
  check = bench.check(min(args.contexts))
  print("check:", json.dumps(check), flush=True)
  rows = []
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bridge.json")
  for batch in args.batch:
    for context in args.contexts:
      rows.extend(bench.cell(batch, context))
      with open(path, "w") as f:  # after every cell: a cut-off run keeps what it measured
        json.dump(dict(meta=meta, check=check, rows=rows), f, indent=1)
      print(f"done B={batch} S={context}", flush=True)

  header = (f"{'variant':<16}{'B':>3}{'S':>7}{'step ms':>9}{'vs stock':>9}{'KV MB':>9}  "
            "breakdown ms")
  print(header)
  for r in rows:
    parts = " ".join(f"{k}={v:.2f}" for k, v in r["breakdown_ms"].items())
    print(f"{r['variant']:<16}{r['batch']:>3}{r['context']:>7}{r['step_ms']:>9.2f}"
          f"{r['speedup_vs_stock_dynamic']:>8.2f}x{r['kv_bytes'] / 2**20:>9.1f}  {parts}")
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
