"""How faithful is attention over the compressed cache, on a real checkpoint and real text?

Over ``--tokens`` tokens of natural text (the shipped haystack prose), the first
``tokens - tail`` are prefilled exactly and compressed (``TurboQuantCache.from_dense``); the
last ``--tail`` tokens then go through the compressed cache as one chunk, as a question
would. Per preset:

* per layer, from the q/k/v the Hugging Face model computes (captured through its attention
  interface): attention-output relative error, attention KL(exact ‖ compressed) and top-1
  key agreement of the tail queries;
* of the Flax model: next-token logit KL and top-1 agreement of the tail against the exact
  cache on the same tokens;
* bits per coordinate and the compression ratio against a bf16 cache, every overhead
  (scales, window, transforms) counted.

    python -m bench.fidelity --model smollm2-135m --out out/fidelity
    python -m bench.fidelity --model $(../shared/models/fetch-qwen05.sh) --out out/fidelity-qwen

prints a table and writes ``fidelity.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from tqjax import kvcache
from tqjax.dense_cache import DenseCache

DEFAULT_PRESETS = ["plain-k4v4", "k4v4", "k5v3", "k4v4-prod", "k3.5v3.5", "k3v3", "k4v2", "k2.5v2.5"]


def capture_qkv(hf_model, ids: np.ndarray) -> list[tuple[np.ndarray, ...]]:
  """Per layer (q [T, H, D], k [T, K, D], v [T, K, D]) float32 as the model attends."""
  import torch
  import transformers
  from transformers.integrations.sdpa_attention import sdpa_attention_forward
  from transformers.masking_utils import sdpa_mask

  captured = []

  def capture(module, query, key, value, attention_mask, **kwargs):
    # query [B, H, T, D], key/value [B, K, T, D], after RoPE.
    captured.append(tuple(x[0].transpose(0, 1).float().numpy() for x in (query, key, value)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

  transformers.AttentionInterface.register("tqjax_capture", capture)
  transformers.AttentionMaskInterface.register("tqjax_capture", sdpa_mask)
  previous = hf_model.config._attn_implementation
  hf_model.set_attn_implementation("tqjax_capture")
  try:
    with torch.no_grad():
      hf_model(torch.as_tensor(ids[None]), use_cache=False)
  finally:
    hf_model.set_attn_implementation(previous)
  return captured


def _softmax_kl_top1(exact_logits, approx_logits, mask):
  """Mean KL(p ‖ p̂) and top-1 agreement over the rows of [..., S] logits."""
  exact_logits = jnp.where(mask, exact_logits, -jnp.inf)
  approx_logits = jnp.where(mask, approx_logits, -jnp.inf)
  logp = jax.nn.log_softmax(exact_logits, axis=-1)
  logq = jax.nn.log_softmax(approx_logits, axis=-1)
  kl = jnp.sum(jnp.where(mask, jnp.exp(logp) * (logp - logq), 0.0), axis=-1)
  top1 = jnp.argmax(exact_logits, -1) == jnp.argmax(approx_logits, -1)
  return jnp.mean(kl), jnp.mean(top1)


@jax.jit
def _layer_metrics(cache: kvcache.TurboQuantCache, dense: DenseCache, q, k, v, scale):
  # q [1, T, H, D], k/v [1, T, K, D]: the tail chunk.
  t, h, d = q.shape[1:]
  cache = cache.update(k, v)
  dense = dense.update(k, v)
  out = cache.attend(q, scale=scale)
  ref = dense.attend(q, scale=scale)
  err = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
  kh = dense.k.shape[1]
  qg = q.reshape(1, t, kh, h // kh, d)
  exact = jnp.einsum("btkgd,bksd->btkgs", qg.astype(jnp.float32), dense.k.astype(jnp.float32)) * scale
  k_hat, _ = cache.dequantize()
  approx = jnp.einsum("btkgd,bksd->btkgs", cache.transform.queries(qg), k_hat) * scale
  q_pos = dense.lengths[:, None] - t + jnp.arange(t)
  mask = (jnp.arange(dense.capacity)[None, None, :] <= q_pos[:, :, None])[:, :, None, None, :]
  kl, top1 = _softmax_kl_top1(exact, approx, mask)
  return err, kl, top1


def attention_fidelity(captured, config: kvcache.CacheConfig, tail: int, scale: float) -> list[dict]:
  rows = []
  for layer, (q, k, v) in enumerate(captured):
    n = k.shape[0]
    dense = DenseCache.init(1, k.shape[1], k.shape[2], n, jnp.float32)
    dense = dense.update(jnp.asarray(k[None, :n - tail]), jnp.asarray(v[None, :n - tail]),
                         jnp.asarray(q[None, :n - tail]))
    cache = kvcache.TurboQuantCache.from_dense(dense, config, layer=layer)
    err, kl, top1 = _layer_metrics(cache, dense, jnp.asarray(q[None, n - tail:]),
                                   jnp.asarray(k[None, n - tail:]), jnp.asarray(v[None, n - tail:]),
                                   scale)
    rows.append(dict(layer=layer, output_rel_err=float(err), attn_kl=float(kl), top1=float(top1)))
  return rows


def logit_fidelity(runner, ids: np.ndarray, config: kvcache.CacheConfig | None, tail: int):
  """Logits [tail, V] of the last ``tail`` tokens, fed as one chunk after an exact prefill."""
  tokens = jnp.asarray(ids[None], jnp.int32)
  _, caches = runner.prefill(tokens[:, :-tail], capacity=tokens.shape[1])
  if config is not None:
    caches = kvcache.convert_caches(caches, config)
  logits, caches = runner.forward(tokens[:, -tail:], caches)
  return logits[0], caches


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="tqjax fidelity", description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="smollm2-135m", help="alias, hub id, folder or .gguf file")
  parser.add_argument("--gguf-file", default=None)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--tail", type=int, default=256, help="tokens read through the compressed cache")
  parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, choices=sorted(kvcache.PRESETS))
  parser.add_argument("--window", type=int, default=64)
  parser.add_argument("--skip-logits", action="store_true", help="attention metrics only")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out/fidelity"))
  args = parser.parse_args(argv)
  if not 0 < args.tail < args.tokens:
    parser.error(f"--tail must be in 1..--tokens-1, got {args.tail} with --tokens {args.tokens}")

  from importlib import resources
  from tqjax.models.loading import from_torch, load_hf
  from tqjax.models.generate import Runner

  start = time.perf_counter()
  hf_model, tokenizer = load_hf(args.model, gguf_file=args.gguf_file)
  text = resources.files("tqjax.data").joinpath("haystack.txt").read_text()
  ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
  while len(ids) < args.tokens:
    ids = np.concatenate([ids, ids])
  ids = ids[:args.tokens]
  captured = capture_qkv(hf_model, ids)
  head_dim = captured[0][0].shape[-1]
  scale = head_dim ** -0.5
  runner = Runner.from_model(from_torch(hf_model))
  base_logits = None
  if not args.skip_logits:
    base_logits, _ = logit_fidelity(runner, ids, None, args.tail)
    base_logits = np.asarray(base_logits)

  results = []
  for name in args.presets:
    config = kvcache.preset(name, window=args.window, flush_block=min(32, args.window))
    layers = attention_fidelity(captured, config, args.tail, scale)
    row = dict(
        preset=name, layers=layers,
        attn_kl=float(np.mean([r["attn_kl"] for r in layers])),
        attn_top1=float(np.mean([r["top1"] for r in layers])),
        output_rel_err=float(np.mean([r["output_rel_err"] for r in layers])),
        bits_per_coordinate=config.bits_per_coordinate(len(captured), head_dim))
    if base_logits is not None:
      logits, caches = logit_fidelity(runner, ids, config, args.tail)
      kl, top1 = _softmax_kl_top1(jnp.asarray(base_logits), logits, jnp.ones_like(logits, bool))
      row.update(logit_kl=float(kl), logit_top1=float(top1))
      dense_bytes = 2 * len(captured) * caches[0].num_kv_heads * head_dim * args.tokens * 2  # bf16
      cache_bytes = sum(c.memory_bytes() for c in caches)
      row.update(cache_bytes=cache_bytes, bf16_bytes=dense_bytes, ratio=dense_bytes / cache_bytes)
    results.append(row)
    print(f"{name}: attn KL {row['attn_kl']:.4f}, top-1 {row['attn_top1']:.3f}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)

  args.out.mkdir(parents=True, exist_ok=True)
  meta = dict(model=args.model, tokens=args.tokens, tail=args.tail, window=args.window,
              layers=len(captured), head_dim=head_dim, seconds=round(time.perf_counter() - start, 1))
  (args.out / "fidelity.json").write_text(json.dumps(dict(meta=meta, presets=results), indent=1))
  print(format_table(results))
  return results


def format_table(results: list[dict]) -> str:
  head = (f"{'preset':11} {'bits':>5} {'ratio':>6} {'attn KL':>8} {'top-1':>6} {'out err':>8} "
          f"{'worst layer KL':>15} {'logit KL':>9} {'top-1':>6}")
  lines = [head, "-" * len(head)]
  for r in results:
    worst = max(r["layers"], key=lambda x: x["attn_kl"])
    lines.append(
        f"{r['preset']:11} {r['bits_per_coordinate']:5.2f} {r.get('ratio', float('nan')):6.2f} "
        f"{r['attn_kl']:8.4f} {r['attn_top1']:6.3f} {r['output_rel_err']:8.4f} "
        f"{worst['attn_kl']:9.4f} (L{worst['layer']:<2}) {r.get('logit_kl', float('nan')):9.4f} "
        f"{r.get('logit_top1', float('nan')):6.3f}")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
