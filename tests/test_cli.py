"""The `tqjax` command line: jobs, --help of each, and `tqjax niah` end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tqjax import cli
from test_niah import tiny_hf_model, train_tokenizer


def test_top_level_help_lists_the_jobs(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for job in ("niah", "distortion", "fidelity", "kernels", "e2e"):
    assert f"\n    {job}" in out


def test_niah_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["niah", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for option in ("--model", "--gguf-file", "--backend", "--presets", "--lengths", "--depths",
                 "--trials", "--seed", "--window", "--out", "--max-new-tokens", "--force"):
    assert option in out
  assert "baseline,k5v3,k3.5v2.5" in out and "1K,2K,4K" in out and "(default: 128)" in out


@pytest.mark.parametrize("job", sorted(cli.BENCH_JOBS))
def test_bench_job_help(job, capsys):
  module = cli.BENCH_JOBS[job][0]
  available = (importlib.util.find_spec("bench") is not None
               and importlib.util.find_spec(module) is not None)
  if available:
    with pytest.raises(SystemExit) as exit_info:
      cli.main([job, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
  else:
    assert cli.main([job, "--help"]) == 2
    assert f"tqjax {job}: not available yet" in capsys.readouterr().err


def test_missing_bench_module_says_so(monkeypatch, capsys):
  monkeypatch.setitem(cli.BENCH_JOBS, "e2e", ("bench.no_such_job", "x"))
  assert cli.main(["e2e"]) == 2
  assert "not available yet" in capsys.readouterr().err


@pytest.mark.parametrize("value,expected", [("1024", 1024), ("4K", 4096), ("2k", 2048)])
def test_length_parsing(value, expected):
  assert cli._length(value) == expected


def test_bad_arguments(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["niah", "--depths", "0,150"])
  assert exit_info.value.code == 2
  assert cli.main(["niah", "--presets", "baseline,k5v5", "--out", "/nonexistent/x"]) == 2
  err = capsys.readouterr().err
  assert "unknown preset 'k5v5'" in err and "choose from baseline, k4v4" in err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A random Llama and a trained tokenizer saved as a local Hugging Face folder."""
  path = tmp_path_factory.mktemp("tiny-llama")
  tokenizer = train_tokenizer()
  tokenizer.save_pretrained(path)
  tiny_hf_model(len(tokenizer)).save_pretrained(path)
  return path


def test_niah_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
  out = tmp_path / "out"
  args = ["niah", "--model", str(tiny_model_dir), "--presets", "baseline,k4v4",
          "--lengths", "149,211", "--depths", "0,100", "--window", "16",
          "--max-new-tokens", "3", "--out", str(out), "--no-progress"]
  assert cli.main(args) == 0
  assert "| k4v4 |" in capsys.readouterr().out
  data = json.loads((out / "niah.json").read_text())
  assert data["metadata"]["cells_done"] == data["metadata"]["cells_expected"] == 8
  assert {c["length"] for c in data["cells"]} == {149, 211}
  assert {c["depth"] for c in data["cells"]} == {0.0, 1.0}
  assert data["metadata"]["identity"]["window"] == 16
  for name in ("niah.md", "heatmap-baseline.png", "heatmap-k4v4.png", "cells.jsonl"):
    assert (out / name).is_file()
  lines = (out / "cells.jsonl").read_text().splitlines()
  # A rerun finds every cell done: nothing is appended.
  assert cli.main(args) == 0
  assert (out / "cells.jsonl").read_text().splitlines() == lines
  # Other settings refuse to mix with this run, unless forced.
  assert cli.main(args + ["--seed", "7"]) == 2
  assert "different settings (seed: 0 -> 7)" in capsys.readouterr().err
  assert cli.main(args + ["--seed", "7", "--force"]) == 0
  assert {c["seed"] for c in json.loads((out / "niah.json").read_text())["cells"]} == {7}


def test_niah_hf_backend(tiny_model_dir, tmp_path):
  out = tmp_path / "out"
  args = ["niah", "--model", str(tiny_model_dir), "--backend", "hf", "--presets",
          "baseline,k4v4", "--lengths", "149", "--depths", "50", "--window", "16",
          "--max-new-tokens", "3", "--out", str(out), "--no-progress"]
  assert cli.main(args) == 0
  data = json.loads((out / "niah.json").read_text())
  assert data["metadata"]["identity"]["backend"] == "hf"
  assert len(data["cells"]) == 2
