"""NIAH prompts: a natural-text haystack, a needle that survives tokenization, scoring.

A prompt is two chunks of token ids, fed to the model separately (DESIGN §6):

* the **document**: the chat template's head, the haystack with the needle sentence
  inserted at a sentence boundary, up to the end of the document text;
* the **question**: the question, the template's tail (end of the user turn, start of the
  assistant turn) and the start of the answer ("The secret passkey is").

The whole prompt text is tokenized at once with the model's tokenizer, so the ids are
exactly what the model would see for that text; the split between the chunks is the
first token that starts at or after the question's first character. The context length
of a prompt is its total number of tokens (document + question), at most the length
asked for and within one haystack sentence of it.

The haystack (`tqjax/data/haystack.txt`) is original prose written for this project
(Apache-2.0 like the code): a few dozen paragraphs on everyday topics, about 8.7K tokens
with SmolLM2's tokenizer, and no digits, so a numeric code cannot occur in it by chance.
Documents take the paragraphs in a seeded shuffled order; longer ones continue with
another shuffled pass, never repeating a paragraph back to back.

Everything is deterministic from `(seed, length, depth, trial)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

NEEDLE_TEMPLATE = "The secret passkey is {code}. Remember it."
QUESTION = "What is the secret passkey in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret passkey is"
CODE_DIGITS = 7
PROMPT_VERSION = 1  # bump when the prompt format changes: old checkpoints then refuse to resume

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclasses.dataclass(frozen=True)
class Haystack:
  """Paragraphs of natural text, each a tuple of sentences."""
  paragraphs: tuple[tuple[str, ...], ...]

  @classmethod
  def from_text(cls, text: str) -> Haystack:
    """Paragraphs are separated by blank lines; sentences end in . ! or ? + space."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
      block = " ".join(block.split())
      if block:
        paragraphs.append(tuple(_SENTENCE_END.split(block)))
    if len(paragraphs) < 2:
      raise ValueError(f"a haystack needs at least 2 paragraphs, got {len(paragraphs)}")
    return cls(tuple(paragraphs))

  @classmethod
  def default(cls) -> Haystack:
    return _default_haystack()

  @property
  def digest(self) -> str:
    """Short hash of the text: recorded with every run, so a resumed run uses the same."""
    text = "\n\n".join(" ".join(p) for p in self.paragraphs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def paragraph_stream(self, rng: np.random.Generator) -> Iterator[int]:
    """Endless paragraph indices: shuffled passes over all paragraphs, none twice in a row."""
    last = -1
    while True:
      perm = [int(i) for i in rng.permutation(len(self.paragraphs))]
      if perm[0] == last:
        perm[0], perm[-1] = perm[-1], perm[0]
      yield from perm
      last = perm[-1]


@functools.cache
def _default_haystack() -> Haystack:
  text = importlib.resources.files("tqjax.data").joinpath("haystack.txt").read_text("utf-8")
  return Haystack.from_text(text)


def make_code(rng: np.random.Generator, digits: int = CODE_DIGITS) -> str:
  """A random decimal code of `digits` digits without a leading zero."""
  if digits < 2:
    raise ValueError(f"{digits=} must be at least 2")
  first = str(int(rng.integers(1, 10)))
  return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))


def cell_rng(seed: int, length: int, depth: float, trial: int) -> np.random.Generator:
  """The generator of one NIAH cell; depth enters in thousandths of the document."""
  return np.random.default_rng([seed, length, round(depth * 1000), trial])


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One NIAH prompt, as token ids in two chunks."""
  doc_ids: tuple[int, ...]  # template head + haystack with needle
  question_ids: tuple[int, ...]  # question + template tail + answer prefix
  code: str  # the needle's code, to find in the answer
  needle: str  # the needle sentence
  needle_position: int  # index of the needle's first token in doc_ids
  length: int  # context length asked for
  depth: float  # needle depth asked for, in [0, 1]
  actual_depth: float  # needle position / document tokens after the template head
  trial: int
  seed: int
  # The code as the model would write it after the answer prefix: the ids that " <code>"
  # adds to the whole prompt's tokenization (None when appending it retokenizes the
  # prompt's end: then no margin is measured).
  answer_ids: tuple[int, ...] | None = None

  @property
  def num_tokens(self) -> int:
    return len(self.doc_ids) + len(self.question_ids)


class PromptBuilder:
  """Builds NIAH prompts for one tokenizer (a Hugging Face fast tokenizer)."""

  def __init__(self, tokenizer: Any, haystack: Haystack | None = None,
               use_chat_template: bool | None = None):
    if not getattr(tokenizer, "is_fast", False):
      raise ValueError(
        f"NIAH prompts need a fast tokenizer (offset mappings), got {type(tokenizer).__name__}")
    self.tokenizer = tokenizer
    self.haystack = haystack if haystack is not None else Haystack.default()
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
      use_chat_template = has_template
    elif use_chat_template and not has_template:
      raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    self.use_chat_template = use_chat_template
    self.head, self.tail = self._frame()
    # Token estimates per sentence (with its leading space), to fill a length quickly;
    # the exact count always comes from tokenizing the whole prompt.
    flat = [s for p in self.haystack.paragraphs for s in p]
    counts = tokenizer([" " + s for s in flat], add_special_tokens=False)["input_ids"]
    it = iter(len(c) for c in counts)
    self._estimates = tuple(tuple(next(it) for _ in p) for p in self.haystack.paragraphs)

  def _frame(self) -> tuple[str, str]:
    """Text before the document and after it (question, template tail, answer prefix)."""
    question = "\n\n" + QUESTION
    if not self.use_chat_template:
      return "", question + "\nAnswer: " + ANSWER_PREFIX
    marker = "\x00DOCUMENT\x00"
    text = self.tokenizer.apply_chat_template(
      [{"role": "user", "content": marker + question}], tokenize=False,
      add_generation_prompt=True)
    if not isinstance(text, str) or text.count(marker) != 1:
      raise ValueError(f"the chat template did not render the user message once: {text!r}")
    head, tail = text.split(marker)
    return head, tail + ANSWER_PREFIX

  def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self.tokenizer(text, add_special_tokens=not self.use_chat_template,
                         return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

  def needle_code(self, rng: np.random.Generator) -> tuple[str, str]:
    """A code whose needle sentence decodes back with the code intact (a few draws)."""
    for _ in range(32):
      code = make_code(rng)
      needle = NEEDLE_TEMPLATE.format(code=code)
      ids = self.tokenizer(" " + needle, add_special_tokens=False)["input_ids"]
      if code in self.tokenizer.decode(ids):
        return code, needle
    raise ValueError(f"no {CODE_DIGITS}-digit code survived a round trip through "
                     f"{type(self.tokenizer).__name__} in 32 draws")

  def build(self, length: int, depth: float, trial: int, seed: int) -> Prompt:
    """The prompt of cell (length, depth, trial): at most `length` tokens in all."""
    if not 0.0 <= depth <= 1.0:
      raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = cell_rng(seed, length, depth, trial)
    code, needle = self.needle_code(rng)
    overhead = len(self._encode(self.head + " " + needle + self.tail)[0])
    if overhead + 16 > length:
      raise ValueError(f"{length=} tokens cannot hold the template, needle and question "
                       f"({overhead} tokens) and a haystack")
    # Sentences (paragraph, index) of the haystack stream, a little more than the budget.
    sentences: list[tuple[int, int]] = []
    estimate = overhead
    paragraphs = self.haystack.paragraph_stream(rng)
    while estimate < length + 64:
      p = next(paragraphs)
      sentences += [(p, s) for s in range(len(self._estimates[p]))]
      estimate += sum(self._estimates[p])
    cum = np.cumsum([0] + [self._estimates[p][s] for p, s in sentences])
    # Sentence count n: start from the estimate, then correct by exact tokenization.
    n = max(int(np.searchsorted(cum, length - overhead, side="right")) - 1, 1)
    too_long: set[int] = set()
    while True:
      prompt = self._assemble(sentences[:n], cum, code, needle, length, depth, trial, seed)
      if prompt.num_tokens > length:
        too_long.add(n)
        n -= 1
        if n < 1:
          raise ValueError(f"{length=} is too short for any haystack sentence")
      elif n + 1 in too_long or n + 1 > len(sentences) or (
          prompt.num_tokens + cum[n + 1] - cum[n] > length):
        return prompt
      else:
        n += 1

  def _assemble(self, sentences: Sequence[tuple[int, int]], cum: np.ndarray, code: str,
                needle: str, length: int, depth: float, trial: int, seed: int) -> Prompt:
    # The needle goes before sentence i: the boundary nearest depth * document tokens.
    i = int(np.argmin(np.abs(cum[:len(sentences) + 1] - depth * cum[len(sentences)])))
    items = [(p, self.haystack.paragraphs[p][s]) for p, s in sentences]
    items.insert(i, (sentences[min(i, len(sentences) - 1)][0], needle))
    document = ""
    needle_char = -1
    for j, (p, text) in enumerate(items):
      if j:
        document += " " if p == items[j - 1][0] else "\n\n"
      if j == i:
        needle_char = len(self.head) + len(document)
      document += text
    split_char = len(self.head) + len(document)
    ids, offsets = self._encode(self.head + document + self.tail)
    # Offsets are character spans; tokens added by the tokenizer (BOS) have (0, 0).
    head_tokens = next(t for t, (_, b) in enumerate(offsets) if b > len(self.head))
    split = next(t for t, (a, _) in enumerate(offsets) if a >= split_char)
    needle_pos = next(t for t, (_, b) in enumerate(offsets) if b > needle_char)
    needle_end = next(t for t, (_, b) in enumerate(offsets) if b >= needle_char + len(needle))
    if code not in self.tokenizer.decode(ids[needle_pos:needle_end + 1]):
      raise ValueError(f"the needle code {code} does not decode back from the prompt's ids")
    answered = self._encode(self.head + document + self.tail + " " + code)[0]
    answer_ids = None
    if answered[:len(ids)] == ids and len(answered) > len(ids):
      answer_ids = tuple(answered[len(ids):])
    return Prompt(
      doc_ids=tuple(ids[:split]), question_ids=tuple(ids[split:]), code=code, needle=needle,
      needle_position=needle_pos, length=length, depth=depth,
      actual_depth=(needle_pos - head_tokens) / max(split - head_tokens, 1), trial=trial,
      seed=seed, answer_ids=answer_ids)


def score(answer: str, code: str) -> bool:
  """Exact match: the code appears in the answer as a whole number (not inside a longer one)."""
  return code in re.findall(r"\d+", answer)
