"""NIAH: prompts with a real tokenizer, exact-match scoring, the Flax backend, resume, report."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

from tqjax.niah import (BASELINE, FlaxBackend, Haystack, NiahConfig, PromptBuilder, run,
                        score)
from tqjax.niah import prompt as prompt_lib
from tqjax.niah import report as report_lib

CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_tokenizer(vocab_size: int = 1999):
  """A byte-level BPE tokenizer (digits split, like SmolLM2's and Qwen2's) trained on the
  haystack: a real fast tokenizer with a chat template, built offline in a second."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = "\n\n".join(" ".join(p) for p in Haystack.default().paragraphs)
  tok.train_from_iterator([text], trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 bos_token="<|endoftext|>")
  fast.chat_template = CHAT_TEMPLATE
  return fast


def tiny_hf_model(vocab_size: int, seed: int = 0):
  """A random 3-layer Llama (GQA 2:1, head_dim 64) in transformers, float32."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
    vocab_size=vocab_size, hidden_size=128, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
    tie_word_embeddings=False)
  return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer()


@pytest.fixture(scope="module")
def tiny_torch(tokenizer):
  return tiny_hf_model(len(tokenizer))


@pytest.fixture(scope="module")
def tiny_model(tiny_torch):
  from tqjax.models import from_torch

  return from_torch(tiny_torch)


@pytest.fixture(scope="module")
def gguf_tokenizer():
  """SmolLM2's own tokenizer, only when the GGUF file is cached already (no download)."""
  from tqjax import hub

  spec = hub._ALIASES[hub.DEFAULT_MODEL]
  path = hub.cache_dir() / "models" / pathlib.PurePosixPath(spec.member).name
  if not path.is_file() or path.stat().st_size != spec.size:
    pytest.skip(f"the default model's GGUF file is not cached at {path}")
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# Haystack and needles.


def test_haystack_is_natural_varied_text_without_digits():
  hay = Haystack.default()
  assert len(hay.paragraphs) >= 40
  sentences = [s for p in hay.paragraphs for s in p]
  assert len(set(sentences)) == len(sentences)  # no repeated sentence
  words = " ".join(sentences).split()
  assert len(words) > 6000 and len(set(w.lower() for w in words)) > 2000
  assert not re.search(r"\d", " ".join(sentences))  # a numeric code cannot occur by chance
  assert "passkey" not in " ".join(sentences).lower()


def test_paragraph_stream_never_repeats_back_to_back():
  hay = Haystack.from_text("A one.\n\nB two.\n\nC three.")
  stream = hay.paragraph_stream(np.random.default_rng(7))
  order = [next(stream) for _ in range(301)]
  assert all(a != b for a, b in zip(order, order[1:]))
  for start in range(0, 300, 3):  # every pass is a permutation
    assert sorted(order[start:start + 3]) == [0, 1, 2]


def test_make_code_and_cell_rng_are_deterministic():
  a = prompt_lib.make_code(prompt_lib.cell_rng(3, 1024, 0.25, 1))
  b = prompt_lib.make_code(prompt_lib.cell_rng(3, 1024, 0.25, 1))
  c = prompt_lib.make_code(prompt_lib.cell_rng(3, 1024, 0.5, 1))
  assert a == b != c
  assert re.fullmatch(r"[1-9]\d{6}", a)


@pytest.mark.parametrize("which", ["trained", "gguf"])
def test_needle_survives_tokenization(which, request):
  tok = request.getfixturevalue("tokenizer" if which == "trained" else "gguf_tokenizer")
  builder = PromptBuilder(tok)
  for trial in range(11):
    p = builder.build(173 + 31 * trial, depth=trial / 10, trial=trial, seed=5)
    # The needle's tokens, cut from the prompt's ids, decode back to the code.
    needle_ids = p.doc_ids[p.needle_position:p.needle_position + 24]
    assert p.code in tok.decode(needle_ids)
    assert p.code in tok.decode(p.doc_ids)
    assert p.code not in tok.decode(p.question_ids)
    # The answer's ids: the code as the model would write it after the answer prefix.
    assert tok.decode(p.answer_ids) == " " + p.code
    whole = tok.decode(p.doc_ids + p.question_ids + p.answer_ids)
    assert tok(whole, add_special_tokens=False)["input_ids"] == list(
        p.doc_ids + p.question_ids + p.answer_ids)


def test_prompt_ids_are_the_whole_texts_tokenization(tokenizer):
  builder = PromptBuilder(tokenizer)
  p = builder.build(300, depth=0.5, trial=0, seed=0)
  text = tokenizer.decode(p.doc_ids + p.question_ids)
  assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(p.doc_ids + p.question_ids)
  assert text.startswith("<|im_start|>user\n")
  question = tokenizer.decode(p.question_ids)
  assert question.lstrip("\n").startswith(prompt_lib.QUESTION)
  assert question.endswith("<|im_start|>assistant\n" + prompt_lib.ANSWER_PREFIX)


def test_prompt_without_chat_template(tokenizer):
  builder = PromptBuilder(tokenizer, use_chat_template=False)
  p = builder.build(257, depth=0.0, trial=0, seed=1)
  assert tokenizer.decode(p.doc_ids).startswith(p.needle)
  assert tokenizer.decode(p.question_ids).endswith("Answer: " + prompt_lib.ANSWER_PREFIX)


@pytest.mark.parametrize("length", [257, 509, 2053, 11003])
def test_prompt_length_in_tokens_and_depth(tokenizer, length):
  builder = PromptBuilder(tokenizer)
  longest_sentence = max(len(tokenizer(" " + s)["input_ids"])
                         for p in builder.haystack.paragraphs for s in p)
  for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
    p = builder.build(length, depth, trial=0, seed=11)
    assert length - longest_sentence - 2 <= p.num_tokens <= length
    assert abs(p.actual_depth - depth) < max(0.15, 2 * longest_sentence / length)
    again = builder.build(length, depth, trial=0, seed=11)
    assert again == p  # deterministic
  other = builder.build(length, 0.5, trial=0, seed=12)
  assert other.doc_ids != p.doc_ids and other.code != p.code


def test_long_document_repeats_paragraphs_not_back_to_back(tokenizer):
  builder = PromptBuilder(tokenizer)
  whole = "\n\n".join(" ".join(x) for x in builder.haystack.paragraphs)
  length = len(tokenizer(whole)["input_ids"]) * 3 // 2
  p = builder.build(length, 0.5, trial=0, seed=2)
  assert length - 100 < p.num_tokens <= length
  body = tokenizer.decode(p.doc_ids).split("<|im_start|>user\n", 1)[1]
  paragraphs = [x for x in body.split("\n\n")]
  assert len(paragraphs) > len(builder.haystack.paragraphs)  # the haystack was repeated
  assert all(a != b for a, b in zip(paragraphs, paragraphs[1:]))


def test_depth_out_of_range_and_too_short_length(tokenizer):
  builder = PromptBuilder(tokenizer)
  with pytest.raises(ValueError, match="depth must be in"):
    builder.build(300, 1.5, 0, 0)
  with pytest.raises(ValueError, match="cannot hold"):
    builder.build(40, 0.5, 0, 0)


def test_score_is_exact_match_of_the_whole_code():
  assert score("4829173", "4829173")
  assert score(" The passkey is 4829173.", "4829173")
  assert score("4829173 4829173", "4829173")
  assert not score("482917", "4829173")
  assert not score("48291735", "4829173")  # inside a longer number
  assert not score("4829 173", "4829173")
  assert not score("", "4829173")


# The Flax backend.


@pytest.fixture(scope="module")
def backend(tiny_model, tokenizer):
  return FlaxBackend(tiny_model, tokenizer, capacity=256, chunk=64, window=16,
                     model_name="tiny")


def test_chunked_prefill_matches_one_shot_generation(tiny_model, tokenizer):
  """Padded chunks + wound-back lengths, then the question chunk and greedy decode, give
  exactly the greedy continuation of the whole prompt."""
  from tqjax.models import Runner

  p = PromptBuilder(tokenizer).build(283, 0.5, 0, 0)
  backend = FlaxBackend(tiny_model, tokenizer, capacity=320, chunk=67)
  answers = backend.answer(p.doc_ids, p.question_ids, [BASELINE], max_new_tokens=7)
  prompt_ids = np.asarray([p.doc_ids + p.question_ids], np.int32)
  expected = Runner.from_model(tiny_model).generate(prompt_ids, max_new_tokens=7)
  expected = [int(t) for t in np.asarray(expected)[0]]
  eos = tokenizer.eos_token_id
  expected = expected[:expected.index(eos)] if eos in expected else expected
  assert answers[BASELINE].ids == expected and answers[BASELINE].margin is None


def _teacher_forced_margins(model, p, target):
  """Margins of `target` after the whole prompt, from one exact forward pass (float64)."""
  from tqjax.models import Runner

  ids = np.asarray([p.doc_ids + p.question_ids + tuple(target[:-1])], np.int32)
  logits, _ = Runner.from_model(model).prefill(ids, ids.shape[1])
  logits = np.asarray(logits[0, -len(target):], np.float64)  # [len(target), V]
  out = []
  for row, want in zip(logits, target):
    out.append(row[want] - np.max(np.delete(row, want)))
  return np.array(out)


def test_margin_is_the_teacher_forced_margin_along_the_greedy_answer(tiny_model, tokenizer):
  """Along its own greedy answer every step's margin is > 0 and the answer's margin is the
  smallest; on the code (which a random model does not know) it stops at the first step
  that leaves it, whose margin is <= 0."""
  p = PromptBuilder(tokenizer).build(283, 0.5, 0, 0)
  backend = FlaxBackend(tiny_model, tokenizer, capacity=320, chunk=67)
  greedy = backend.answer(p.doc_ids, p.question_ids, [BASELINE], 6)[BASELINE].ids
  assert len(greedy) == 6
  own = backend.answer(p.doc_ids, p.question_ids, [BASELINE], 6, target=greedy)[BASELINE]
  assert own.ids == greedy
  reference = _teacher_forced_margins(tiny_model, p, greedy)
  assert np.all(reference > 0)
  np.testing.assert_allclose(own.margin, reference.min(), rtol=1e-4, atol=1e-5)

  code = backend.answer(p.doc_ids, p.question_ids, [BASELINE], 6, target=p.answer_ids)[BASELINE]
  reference = _teacher_forced_margins(tiny_model, p, p.answer_ids)
  first_out = int(np.argmax(reference <= 0))  # the step the greedy answer leaves the code
  assert reference[first_out] <= 0 and np.all(reference[:first_out] > 0)
  np.testing.assert_allclose(code.margin, reference[:first_out + 1].min(), rtol=1e-4, atol=1e-5)
  assert code.ids == greedy  # the target does not steer the answer


def test_margin_tracker():
  from tqjax.niah import MarginTracker

  tracker = MarginTracker([2, 0, 1])
  tracker.feed([0.0, 1.0, 3.5])  # 3.5 - 1.0
  tracker.feed([2.0, 1.75, -1.0])  # 2.0 - 1.75
  assert tracker.margin == pytest.approx(0.25) and tracker.wants_logits
  tracker.feed([0.0, -1.0, 0.5])  # leaves the target: -1.5, and stops
  assert tracker.margin == pytest.approx(-1.5) and not tracker.wants_logits
  tracker.feed([9.0, 0.0, 0.0])  # ignored
  assert tracker.margin == pytest.approx(-1.5)
  none = MarginTracker(None)
  none.feed([1.0, 2.0])
  assert none.margin is None and not none.wants_logits
  with pytest.raises(ValueError, match="outside the vocabulary"):
    MarginTracker([5]).feed([0.0, 1.0])


def test_preset_options():
  from tqjax import kvcache
  from tqjax.niah import backends

  assert backends.parse_preset("k4v4") == ("k4v4", {})
  assert backends.parse_preset("k3v3:window=128:sink_tokens=0:norm_correction=false") == (
      "k3v3", {"window": 128, "sink_tokens": 0, "norm_correction": False})
  config = backends.cache_config("k4v2:window=16:sink_tokens=8", window=100)
  assert (config.window, config.flush_block, config.sink_tokens) == (16, 16, 8)  # option wins
  assert config.keys == kvcache.preset("k4v2").keys
  config = backends.cache_config("k4v2:sink_tokens=8", window=24)  # the run's window
  assert (config.window, config.flush_block) == (24, 24)
  assert backends.describe(BASELINE, 16) is None
  assert backends.describe("k4v4:seed=3", None)["seed"] == 3
  for bad, match in [("k4v4:window", "name=value"), ("k4v4:bits=3", "name=value"),
                     ("k4v4:window=x", "window must be int"), ("baseline:window=8", "no options"),
                     ("k4v4:window=8:window=9", "given twice"), ("k9v9", "unknown preset"),
                     ("k4v4:window=0", "window must be >= 1"),
                     ("k4v4:key_transform=magic", "key_transform must be one of"),
                     ("k4v4:norm_correction=maybe", "true or false")]:
    with pytest.raises(ValueError, match=match):
      backends.cache_config(bad, None)
  with pytest.raises(ValueError, match="presets repeat"):
    backends.check_presets(["k4v4:window=8", "k4v4:window=8"])
  assert report_lib.heatmap_name("k4v4:window=128") == "heatmap-k4v4_window_128.png"


def test_compressed_presets_share_the_prefill(backend, tokenizer):
  from tqjax import kvcache

  p = PromptBuilder(tokenizer).build(211, 0.25, 0, 0)
  answers = backend.answer(p.doc_ids, p.question_ids, [BASELINE, "k4v4"], 5)
  assert list(answers) == [BASELINE, "k4v4"]
  assert all(len(a.ids) <= 5 for a in answers.values())
  # The compressed answer starts with the question read over the converted prefill.
  dense = backend.prefill(p.doc_ids)
  caches = kvcache.convert_caches(dense, kvcache.preset("k4v4", window=16, flush_block=16))
  logits, _ = backend.runner.forward(np.asarray([p.question_ids], np.int32), caches)
  first = int(np.argmax(np.asarray(logits[0, -1])))
  assert answers["k4v4"].ids[:1] == ([] if first == tokenizer.eos_token_id else [first])


def test_backend_errors(tiny_model, tokenizer):
  backend = FlaxBackend(tiny_model, tokenizer, capacity=128, chunk=64)
  with pytest.raises(ValueError, match="unknown preset"):
    backend.answer([1, 2, 3], [4], ["k5v5"], 3)
  with pytest.raises(ValueError, match="capacity"):
    backend.answer(list(range(120)), [4, 5, 6], [BASELINE], 8)
  from tqjax.niah import make_backend

  with pytest.raises(ValueError, match="backend must be one of"):
    make_backend("tpu", "smollm2-135m", capacity=128)


def test_hf_backend_through_the_bridge(tiny_torch, tiny_model, tokenizer):
  """Baseline: exactly transformers' greedy answer; compressed: one exact prefill, converted."""
  import torch

  from tqjax.niah import HFBackend

  p = PromptBuilder(tokenizer).build(211, 0.5, 0, 0)
  backend = HFBackend(tiny_torch, tokenizer, capacity=256, window=16)
  greedy = FlaxBackend(tiny_model, tokenizer, capacity=256, chunk=64).answer(
      p.doc_ids, p.question_ids, [BASELINE], 5)[BASELINE].ids
  answers = backend.answer(p.doc_ids, p.question_ids, ["k4v4", BASELINE], 5, target=greedy)
  assert list(answers) == ["k4v4", BASELINE] and len(answers["k4v4"].ids) <= 5
  full = torch.tensor([p.doc_ids + p.question_ids])
  with torch.no_grad():
    ref = tiny_torch.generate(full, max_new_tokens=5, do_sample=False, pad_token_id=0)
  ref = [int(t) for t in ref[0, full.shape[1]:]]
  eos = tokenizer.eos_token_id
  assert answers[BASELINE].ids == (ref[:ref.index(eos)] if eos in ref else ref)
  # The margin of the exact cache's answer: the Flax model's, on the same tokens.
  reference = _teacher_forced_margins(tiny_model, p, greedy)
  if answers[BASELINE].ids == greedy:
    np.testing.assert_allclose(answers[BASELINE].margin, reference.min(), rtol=1e-3, atol=1e-4)
  assert answers["k4v4"].margin is not None
  assert backend.info.num_layers == 3 and backend.info.dtype == "float32"


# Runs: checkpoint, resume, report.


SMALL = dict(presets=(BASELINE, "k4v4"), lengths=(149, 211), depths=(0.0, 1.0),
             trials=1, seed=3, window=16, max_new_tokens=4)


class Interrupting:
  """Wraps a backend; raises KeyboardInterrupt on the call after `after` prompts."""

  def __init__(self, backend, after: int):
    self.backend, self.after, self.calls = backend, after, 0
    self.name, self.tokenizer, self.info = backend.name, backend.tokenizer, backend.info

  def answer(self, *args, **kwargs):
    if self.calls == self.after:
      raise KeyboardInterrupt
    self.calls += 1
    return self.backend.answer(*args, **kwargs)


def _cells(out):
  lines = (pathlib.Path(out) / "cells.jsonl").read_text().splitlines()
  return [json.loads(x) for x in lines if json.loads(x)["kind"] == "cell"]


def _strip_time(cells):
  return sorted((tuple(sorted((k, str(v)) for k, v in c.items() if k != "prompt_seconds"))
                 for c in cells))


@pytest.fixture(scope="module")
def full_run(backend, tmp_path_factory):
  out = tmp_path_factory.mktemp("full")
  return out, run(NiahConfig(model="tiny", **SMALL), out, backend=backend, progress=False)


def test_resume_after_interrupt_skips_done_cells_and_loses_nothing(backend, full_run, tmp_path):
  config = NiahConfig(model="tiny", **SMALL)
  full_out, full = full_run
  assert full["metadata"]["cells_done"] == 8

  out = tmp_path / "resumed"
  with pytest.raises(KeyboardInterrupt):
    run(config, out, backend=Interrupting(backend, after=1), progress=False)
  assert len(_cells(out)) == 2  # one prompt x two presets, on disk
  # A kill in the middle of a write leaves half a line: it is dropped, nothing else.
  with open(out / "cells.jsonl", "a") as f:
    f.write('{"kind": "cell", "preset": "base')
  counting = Interrupting(backend, after=10**9)
  resumed = run(config, out, backend=counting, progress=False)
  assert counting.calls == 3  # only the prompts not done
  assert resumed["metadata"]["cells_done"] == 8
  assert _strip_time(_cells(out)) == _strip_time(_cells(full_out))
  # A finished run does not even need a backend.
  again = run(config, out, backend=lambda *a: pytest.fail("backend built"), progress=False)
  assert again["cells"] == resumed["cells"]


def test_rerun_with_a_larger_matrix_reuses_cells(backend, tmp_path):
  small = NiahConfig(model="tiny", **{**SMALL, "lengths": (149,), "presets": (BASELINE,)})
  run(small, tmp_path, backend=backend, progress=False)
  counting = Interrupting(backend, after=10**9)
  big = dataclasses.replace(small, depths=(0.0, 0.5, 1.0), presets=(BASELINE, "k4v4"))
  result = run(big, tmp_path, backend=counting, progress=False)
  assert counting.calls == 3  # every prompt lacks k4v4; 0.5 lacks the baseline too
  assert result["metadata"]["cells_done"] == 6
  assert len(_cells(tmp_path)) == 6


def test_other_settings_refuse_to_resume_unless_forced(backend, tmp_path):
  config = NiahConfig(model="tiny", **{**SMALL, "lengths": (149,), "depths": (0.5,)})
  run(config, tmp_path, backend=backend, progress=False)
  other = dataclasses.replace(config, seed=4)
  with pytest.raises(ValueError, match=r"different settings \(seed: 3 -> 4\)"):
    run(other, tmp_path, backend=backend, progress=False)
  result = run(other, tmp_path, backend=backend, progress=False, force=True)
  assert {c["seed"] for c in result["cells"]} == {4} and len(_cells(tmp_path)) == 2


def test_report_files(full_run):
  tmp_path, result = full_run
  config = NiahConfig(model="tiny", **SMALL)
  data = json.loads((tmp_path / "niah.json").read_text())
  assert data == json.loads(json.dumps(result))
  assert len(data["cells"]) == 8
  cell = data["cells"][0]
  for key in ("preset", "length", "depth", "trial", "seed", "needle", "code", "answer",
              "correct", "prompt_tokens", "needle_position"):
    assert key in cell
  assert data["metadata"]["model"]["num_layers"] == 3
  k4 = data["presets"]["k4v4"]
  # 4-bit codes, a float16 norm per 64 coordinates; at 211 tokens, 4 exact float32 sink
  # tokens and the window buffer (window 16 + flush block 16) too
  assert k4["code_bits_per_coordinate"] == 4 + 16 / 64
  assert k4["bits_per_coordinate"] == pytest.approx(4 + 16 / 64 + (4 + 16 + 16) * 32 / 211)
  assert k4["compression_vs_fp16"] == pytest.approx(16 / k4["bits_per_coordinate"])
  assert cell["cache"] is None or cell["cache"]["window"] == 16
  margins = [c["margin"] for c in data["cells"]]
  assert all(isinstance(m, float) for m in margins)
  # The margin decides the greedy answer: > 0 exactly when it spells the code.
  assert all((c["margin"] > 0) == c["answer"].startswith(c["code"]) for c in data["cells"])
  assert data["presets"][BASELINE]["margin_delta_median"] == 0.0
  assert k4["memory_bytes"] < data["presets"][BASELINE]["memory_bytes"]
  md = (tmp_path / "niah.md").read_text()
  assert "| k4v4 |" in md and "Δ vs baseline (pp)" in md and "Margin:" in md
  for preset in config.presets:
    png = (tmp_path / f"heatmap-{preset}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_changed_preset_defaults_rerun_their_cells(backend, tmp_path, monkeypatch):
  """Cells record their resolved cache config: after a preset's defaults change, a rerun
  computes its cells again (the baseline's are reused) and the report shows the new ones."""
  from tqjax import kvcache

  config = NiahConfig(model="tiny", **{**SMALL, "lengths": (149,), "depths": (0.5,),
                                       "presets": (BASELINE, "k4v4", "k4v4:sink_tokens=0")})
  first = run(config, tmp_path, backend=backend, progress=False)
  assert first["metadata"]["cells_done"] == 3
  assert {c["preset"]: c["cache"]["sink_tokens"] for c in first["cells"] if c["cache"]} == {
      "k4v4": 4, "k4v4:sink_tokens=0": 0}
  assert (tmp_path / "heatmap-k4v4_sink_tokens_0.png").is_file()
  monkeypatch.setitem(kvcache.PRESETS, "k4v4",
                      lambda **kw: kvcache.CacheConfig.k4v4(**{"sink_tokens": 2, **kw}))
  counting = Interrupting(backend, after=10**9)
  again = run(config, tmp_path, backend=counting, progress=False)
  assert counting.calls == 1 and len(_cells(tmp_path)) == 4  # k4v4 again, not its variant
  assert {c["preset"]: c["cache"]["sink_tokens"] for c in again["cells"] if c["cache"]} == {
      "k4v4": 2, "k4v4:sink_tokens=0": 0}
  assert again["metadata"]["cells_done"] == 3


def test_summary_accuracy_and_delta():
  config = NiahConfig(presets=(BASELINE, "k4v4"), lengths=(1024, 2048), depths=(0.0, 1.0))
  cells = []
  for i, n in enumerate(config.lengths):
    for j, d in enumerate(config.depths):
      base, k4 = 1.0 + i + 2 * j, 0.5 + i - 2 * j * i  # (1K, 2K) x (0, 1): 1 3 2 4; .5 .5 1.5 -.5
      cells.append({"preset": BASELINE, "length": n, "depth": d, "trial": 0, "correct": True,
                    "margin": base})
      cells.append({"preset": "k4v4", "length": n, "depth": d, "trial": 0,
                    "correct": (n, d) != (2048, 1.0), "margin": k4})
  summary = report_lib.summarize(config, cells, None)
  assert summary[BASELINE]["accuracy"] == 1.0 and summary[BASELINE]["delta_pp"] == 0.0
  assert summary["k4v4"]["accuracy"] == 0.75 and summary["k4v4"]["delta_pp"] == -25.0
  assert summary["k4v4"]["grid"] == [[1.0, 1.0], [1.0, 0.0]]  # rows: depths, cols: lengths
  assert summary["k4v4"]["margin_grid"] == [[0.5, 1.5], [0.5, -0.5]]
  assert summary["k4v4"]["margin_min"] == -0.5 and summary["k4v4"]["margin_median"] == 0.5
  # Paired: -0.5, -2.5, -0.5, -4.5 -> median -1.5
  assert summary["k4v4"]["margin_delta_median"] == -1.5
  assert summary[BASELINE]["margin_delta_median"] == 0.0


def test_prefill_padding_stays_out_of_the_query_statistics(tiny_model, tokenizer):
  """The padded last chunk adds only its real tokens' queries: the statistics equal those
  of one unpadded prefill of the document."""
  from tqjax.models import Runner

  p = PromptBuilder(tokenizer).build(233, 0.5, 0, 0)
  backend = FlaxBackend(tiny_model, tokenizer, capacity=320, chunk=67)
  assert len(p.doc_ids) % 67  # the last chunk really is padded
  chunked = backend.prefill(p.doc_ids)
  _, whole = Runner.from_model(tiny_model).prefill(np.asarray([p.doc_ids], np.int32), 320)
  for a, b in zip(chunked, whole):
    assert float(a.query_count) == float(b.query_count) == len(p.doc_ids) * 2  # G = 2
    np.testing.assert_allclose(a.query_sq, b.query_sq, rtol=1e-5)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_prefill_chunks_compute_no_vocabulary_logits(tiny_model, tokenizer):
  import jax
  import jax.numpy as jnp

  from tqjax.niah import backends

  backend = FlaxBackend(tiny_model, tokenizer, capacity=256, chunk=64)
  runner = backend.runner
  caches, tokens = runner.init_caches(1, 128), jnp.zeros((1, 64), jnp.int32)
  chunk = backends._prefill_chunk.lower(runner.graph, runner.params, caches, tokens,
                                        jnp.int32(64)).as_text()
  full = jax.jit(lambda params, caches, tokens: runner.graph.merge(params)(tokens, caches)).lower(
      runner.params, caches, tokens).as_text()
  logits = f"tensor<1x64x{runner.config.vocab_size}xf32>"  # [B, T, V]
  assert logits in full and logits not in chunk
