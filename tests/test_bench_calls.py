"""`flashnumba bench --calls`: the parts that need no GPU (shapes, ratios, the table)."""

import pytest

from flashnumba.bench import calls
from flashnumba.bench.cases import parse_shapes
from flashnumba.bench.run import main


def test_the_default_shapes_are_the_issues_three():
    assert [(c.B, c.H, c.N, c.d, c.causal) for c in parse_shapes(calls.ISSUE_SHAPES)] == [
        (8, 8, 256, 64, True), (2, 8, 1024, 64, False), (4, 16, 4096, 64, False)]


def _result(gpu, host=0.05):
    return {"gpu_ms": gpu, "host_ms": host, "runs": 10}


def test_rows_divide_by_sdpa_and_by_the_kernel_alone():
    shape = "B8 H8 N256 d64 causal"
    results = {(shape, "SDPA fwd"): _result(0.1), (shape, "kernel fwd"): _result(0.08),
               (shape, "torch fwd"): _result(0.2), (shape, "SDPA fwd+bwd"): _result(0.3),
               (shape, "torch fwd+bwd"): _result(0.9)}
    rows = {row["path"]: row for row in calls.rows(results)}
    assert [r["path"] for r in calls.rows(results)] == [
        "kernel fwd", "torch fwd", "SDPA fwd", "torch fwd+bwd", "SDPA fwd+bwd"]   # PATHS order
    assert rows["torch fwd"]["x_sdpa"] == pytest.approx(2.0)
    assert rows["torch fwd"]["x_kernel"] == pytest.approx(2.5)
    assert rows["torch fwd+bwd"]["x_sdpa"] == pytest.approx(3.0)
    assert rows["torch fwd+bwd"]["x_kernel"] is None         # no kernel-alone baseline for it
    assert rows["SDPA fwd"]["x_sdpa"] is None


def test_the_table_names_each_shape_once_and_every_path():
    results = {(s, p): _result(1.0) for s in ("A", "B") for p in calls.PATHS}
    text = calls.format_table(calls.rows(results))
    lines = text.splitlines()
    assert len(lines) == 1 + 2 * len(calls.PATHS)
    assert sum(line.startswith("A ") for line in lines) == 1
    assert sum(line.startswith("B ") for line in lines) == 1
    assert all(path in text for path in calls.PATHS)


def test_runs_fit_the_budget():
    assert calls.runs_for(0.1) == 200                # capped
    assert calls.runs_for(50.0) == 20
    assert calls.runs_for(1e4) == 10                 # at least a few


def test_without_a_gpu_the_command_says_so(capsys):
    import flashnumba
    if not flashnumba.on_simulator():
        pytest.skip("a GPU is present: the command runs for real")
    assert main(["--calls"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
