"""flashnumba.train at a tiny size on the CPU: the loss falls, and the two attentions' curves agree.

One layer, 2 heads, dim 32, seq-len 16, batch 2: flashnumba's attention runs on
the simulator at a few seconds per step, so the runs here are a handful of steps.
"""

import json
import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from flashnumba import train

TINY = ["--device", "cpu", "--layers", "1", "--heads", "2", "--dim", "32", "--seq-len", "16",
        "--batch", "2", "--eval-batches", "1"]


def test_shipped_text_loads_and_is_english():
    text = train.load_text()
    chars = train.Characters(text)
    assert 10_000 <= len(text) <= 30_000
    assert len(chars) < 100 and " " in chars.chars and "\n" in chars.chars
    assert text.count(" the ") > 50                       # words, not noise
    assert chars.decode(chars.encode(text[:200])) == text[:200]


def test_batches_are_windows_shifted_by_one_and_fixed_by_seed():
    ids = torch.arange(1000)
    starts = train.training_starts(len(ids), steps=3, batch=2, T=16, seed=5)
    assert torch.equal(starts, train.training_starts(len(ids), 3, 2, 16, seed=5))
    assert not torch.equal(starts, train.training_starts(len(ids), 3, 2, 16, seed=6))
    x, y = train.windows(ids, starts, 16)
    assert x.shape == y.shape == (3, 2, 16)
    assert torch.equal(y[..., :-1], x[..., 1:]) and torch.equal(y[..., -1], x[..., -1] + 1)
    assert int(starts.max()) + 16 < len(ids)              # every target inside the text


def test_both_attentions_train_the_same_curve(tmp_path, capsys):
    """Four AdamW steps, once per attention, from the same weights on the same batches."""
    path, png = tmp_path / "curves.json", tmp_path / "curves.png"
    # FA1's kernels, the cheapest on the simulator (one block per head, no register tiles); the
    # default kernels under autograd are tested in test_torch_modules
    result = train.run(train.parse_args(TINY + ["--steps", "4", "--eval-every", "100", "--algorithm", "fa1",
                                                "--json", str(path), "--plot", str(png)]))
    flash, ref = result["curves"]
    assert (flash["attention"], ref["attention"]) == ("flashnumba", "torch")
    for c in (flash, ref):
        losses = c["train_loss"]
        assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
        assert abs(losses[0] - math.log(result["vocabulary"])) < 0.3   # starts near uniform
        assert losses[-1] < losses[0] - 0.1                            # and learns
        assert [s for s, _ in c["held_out"]] == [0, 4]                 # before and after training
        assert c["ms_per_step"] > 0
    # fp32, no dropout: the curves differ only by the attention's rounding, step by step
    for a, b in zip(flash["train_loss"], ref["train_loss"]):
        assert abs(a - b) <= 1e-4
    assert result["gap"]["max_abs_diff"] <= 1e-4
    assert json.loads(path.read_text())["curves"][1]["train_loss"] == ref["train_loss"]
    out = capsys.readouterr().out
    assert "summary" in out and "gap between the curves" in out and "|diff| vs flashnumba" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --from-json redraws and summarises a saved run without training
    again = tmp_path / "again.png"
    assert train.main(["--from-json", str(path), "--plot", str(again)]) == 0
    replay = capsys.readouterr().out
    assert f"{flash['train_loss'][-1]:.4f}" in replay and "ms/step" not in replay.split("summary")[0]
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_attention_grouped_query_bfloat16():
    """--attention torch alone (no simulator), grouped-query heads, bfloat16 autocast."""
    result = train.run(train.parse_args(TINY + ["--steps", "6", "--eval-every", "3", "--attention",
                                                "torch", "--kv-heads", "1", "--dtype", "bfloat16"]))
    (c,) = result["curves"]
    assert result["gap"] is None
    assert all(math.isfinite(x) for x in c["train_loss"]) and c["train_loss"][-1] < c["train_loss"][0]
    assert [s for s, _ in c["held_out"]] == [0, 3, 6]


def test_the_same_seed_trains_the_same_curve():
    args = TINY + ["--steps", "3", "--eval-every", "100", "--attention", "torch", "--seed", "3"]
    first = train.run(train.parse_args(args))["curves"][0]["train_loss"]
    assert train.run(train.parse_args(args))["curves"][0]["train_loss"] == first


def test_options_are_checked():
    with pytest.raises(SystemExit):
        train.parse_args(["--device", "cpu", "--steps", "0"])
    args = train.parse_args(["--device", "cpu"])
    assert (args.steps, args.layers, args.seq_len) == (8, 1, 16)         # the CPU defaults


def test_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "flashnumba.train", "--help"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--attention" in done.stdout
