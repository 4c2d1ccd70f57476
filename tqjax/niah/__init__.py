"""Paired needle-in-a-haystack: does retrieval survive KV-cache compression?

    from tqjax.niah import NiahConfig, run
    result = run(NiahConfig(lengths=(1024, 2048), presets=("baseline", "k4v4")), "out")

Presets take `CacheConfig` overrides after their name: ``"k4v4:window=128:sink_tokens=8"``.

See `tqjax.niah.run` (matrix, checkpoint, resume), `tqjax.niah.prompt` (haystack, needle,
scoring), `tqjax.niah.backends` (the strict protocol per backend), `tqjax.niah.report`.
"""

from tqjax.niah.backends import (BASELINE, PRESET_OPTIONS, Answer, Backend, FlaxBackend,
                                 HFBackend, MarginTracker, ModelInfo, cache_accounting,
                                 make_backend, parse_preset, preset_names)
from tqjax.niah.prompt import Haystack, Prompt, PromptBuilder, score
from tqjax.niah.run import Checkpoint, NiahConfig, run


def defaults() -> NiahConfig:
  """The configuration of a bare `tqjax niah`."""
  return NiahConfig()


__all__ = [
  "BASELINE", "PRESET_OPTIONS", "Answer", "Backend", "FlaxBackend", "HFBackend", "MarginTracker",
  "ModelInfo", "cache_accounting", "make_backend", "parse_preset", "preset_names", "Haystack",
  "Prompt", "PromptBuilder", "score", "Checkpoint", "NiahConfig", "run", "defaults",
]
