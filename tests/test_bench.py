"""The benchmark's own logic, without a GPU: FLOP counts, shape parsing, validation verdicts
(a wrong implementation is caught), the --sim sanity pass, and the report. Nothing is timed."""

import json
import math

import numpy as np
import pytest

from flashnumba.bench import cases, check, report
from flashnumba.bench import run as bench
from flashnumba.bench.sim import run_sim


def test_flop_counts_follow_flashattention():
    assert cases.attention_flops(1, 1, 1024, 1024, 64, False) == 4 * 1024 * 1024 * 64
    assert cases.attention_flops(4, 16, 4096, 4096, 64, True) == 4 * 4 * 16 * 4096 ** 2 * 64 // 2
    fwd = cases.attention_flops(2, 3, 100, 300, 128, False)
    assert cases.attention_flops(2, 3, 100, 300, 128, False, "bwd") == fwd * 5 // 2
    case = cases.Case(4, 16, 4096, 64, False)
    assert case.flops("fwd") == 4 * 4 * 16 * 4096 * 4096 * 64            # 275 GFLOP
    # fewest bytes: read q, k, v and write O (float32) plus L (float32 per row)
    assert case.min_bytes("fwd") == 4 * 4 * (4 * 4096 * 16 * 64) + 4 * (4 * 16 * 4096)
    with pytest.raises(ValueError):
        cases.attention_flops(1, 1, 1, 1, 1, False, "sideways")


def test_shape_selection():
    parsed = cases.parse_shapes("4x16x4096x64c, 1x16x65536x64n,2x2x100x32")
    assert [c.label for c in parsed] == ["B4 H16 N4096 d64 causal", "B1 H16 N65536 d64",
                                         "B2 H2 N100 d32", "B2 H2 N100 d32 causal"]
    assert cases.parse_shapes("1x2x100x256n")[0].d == 256          # fa2_fast's largest head dim
    for bad in ("4x16x4096", "4x16x4096x257", "ax1x1x1", ""):
        with pytest.raises(ValueError):
            cases.parse_shapes(bad)
    default = cases.default_cases()
    assert {c.d for c in default} == {64, 128}
    assert {c.N for c in default} == {512, 1024, 2048, 4096, 8192, 16384, 65536, 131072}
    assert all(c.B == 1 for c in default if c.N > 16384)
    assert len(cases.quick_cases()) < len(default)


def test_verdict_rejects_wrong_and_nan():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 5))
    assert check.verdict([ref.astype(np.float32)], [ref], "fp32")[0]
    ok, err, text = check.verdict([ref * 1.01], [ref], "fp32", ["O"])
    assert not ok and "WRONG" in text and err == pytest.approx(0.01)
    nan = ref.copy()
    nan[0, 0] = np.nan
    ok, err, _ = check.verdict([nan], [ref], "fp32")
    assert not ok and math.isinf(err)
    assert check.verdict([ref * 1.01], [ref], "bf16")[0]           # bf16's tolerance is wider
    assert check.checked_rows(100) == list(range(100))
    rows = check.checked_rows(10000)
    assert rows[:3] == [0, 1, 2] and rows[-1] == 9999 and len(rows) == 2 * check.ROWS_CHECKED


def test_sim_pass_catches_an_injected_wrong_implementation():
    def off_by_a_bit(q, k, v, dout, causal):      # right shape, plausible values, wrong
        from flashnumba import reference
        out = reference.attention(q, k, v, causal=causal)[0]
        return (out + 1e-2 * np.sign(out),)

    def crashes(q, k, v, dout, causal):
        raise RuntimeError("launch failed")

    lines = []
    failures = run_sim(only=["fa2_fast", "injected"], out=lines.append,
                       shapes=((1, 20, 30, 2, 1, 16, True),),
                       extra=[("injected wrong", "fwd", off_by_a_bit), ("injected crash", "fwd", crashes)])
    text = "\n".join(lines)
    assert failures == 2, text
    assert "NOT A BENCHMARK" in text
    wrong = [line for line in lines if "injected wrong" in line]
    assert wrong and "WRONG" in wrong[0]
    assert any("injected crash" in line and "ERROR" in line for line in lines)
    assert any("fa2_fast" in line and " ok " in line for line in lines)


def test_sim_mode_runs_and_plain_run_needs_a_gpu(capsys):
    import flashnumba
    if flashnumba.on_simulator():
        # one small shape: run_sim's default shapes are the kernel tests' business
        assert bench.main(["--sim", "--impls", "fa2_fast", "--shapes", "1x1x20x16c"]) == 0
        out = capsys.readouterr().out
        assert "NOT A BENCHMARK" in out and "all ok" in out
        assert [line.split()[:3] for line in out.splitlines() if "B1 Nq20 Nk20 Hq1 Hkv1 d16 causal" in line] == [
            ["fwd", "flashnumba", "fa2_fast"], ["bwd", "flashnumba", "fa2_fast"]]
        assert bench.main([]) == 2                              # the simulator is not a GPU
        assert "no CUDA GPU" in capsys.readouterr().err
    else:                                                       # on a GPU, --sim is refused
        assert bench.main(["--sim", "--impls", "fa2_fast"]) == 2
        assert "a CUDA GPU is present" in capsys.readouterr().err


def _fake_results():
    rows = []
    for causal in (False, True):
        case = cases.Case(4, 16, 16384, 64, causal)
        for impl, ms in (("torch MATH", 40.0), ("torch EFFICIENT", 20.0), ("flashnumba fa2_fast", 25.0)):
            ms = ms / 2 if causal else ms
            rows.append({"impl": impl, "family": "x", "direction": "fwd", "dtype": "fp32",
                         "B": case.B, "H": case.H, "N": case.N, "d": case.d, "causal": causal,
                         "case": case.label, "short": case.short, "status": "ok", "reason": "",
                         "flops": case.flops("fwd"), "min_bytes": case.min_bytes("fwd"),
                         "median_ms": ms, "min_ms": ms, "max_ms": ms, "runs": 3,
                         "tflops": case.flops("fwd") / (ms * 1e-3) / 1e12, "extra_bytes": 0})
    rows.append(dict(rows[-1], impl="flashnumba fa1", status="WRONG", reason="not timed",
                     median_ms=None, tflops=None))
    return rows


def test_report_ratios_table_and_plots(tmp_path):
    results = report.add_ratios(_fake_results())
    fast = [r for r in results if r["impl"] == "flashnumba fa2_fast" and not r["causal"]][0]
    assert fast["vs MATH"] == pytest.approx(40 / 25) and fast["vs EFFICIENT"] == pytest.approx(20 / 25)
    assert report.causal_speedup(results) == pytest.approx(2.0)
    table = report.summary_table(results)
    assert "fwd flashnumba fa2_fast" in table and "1.60/0.80" in table and "WRONG" in table
    paths = report.plot(results, {"matmul_fp32_tflops": 50.0, "copy_tbps": 4.0}, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["roofline.png", "tflops_fwd.png"]
    report.write_json(str(tmp_path / "r.json"), {"results": results, "x": math.inf})
    assert json.loads((tmp_path / "r.json").read_text())["x"] == "inf"


def test_half_rows_get_ratios_to_flash_and_cudnn_in_their_own_dtype():
    """fa2_tc rows carry dtype bf16/fp16 and "vs FLASH", "vs CUDNN" against PyTorch's backends in
    the same dtype, same case, same run; fp32 rows have none; a missing base gives None."""
    case = cases.Case(4, 16, 4096, 64, False)
    rows = []
    for impl, dtype, ms in (("torch FLASH bf16", "bf16", 2.0), ("torch CUDNN bf16", "bf16", 1.0),
                            ("flashnumba fa2_tc bf16", "bf16", 4.0), ("torch FLASH fp16", "fp16", 3.0),
                            ("flashnumba fa2_tc fp16", "fp16", 6.0), ("flashnumba fa2_fast", "fp32", 8.0)):
        rows.append({"impl": impl, "family": "x", "direction": "fwd", "dtype": dtype, "B": case.B,
                     "H": case.H, "N": case.N, "d": case.d, "causal": False, "case": case.label,
                     "short": case.short, "status": "ok", "reason": "", "median_ms": ms,
                     "tflops": case.flops("fwd") / (ms * 1e-3) / 1e12})
    by = {r["impl"]: r for r in report.add_ratios(rows)}
    assert by["flashnumba fa2_tc bf16"]["vs FLASH"] == pytest.approx(0.5)
    assert by["flashnumba fa2_tc bf16"]["vs CUDNN"] == pytest.approx(0.25)
    assert by["flashnumba fa2_tc fp16"]["vs FLASH"] == pytest.approx(0.5)
    assert by["flashnumba fa2_tc fp16"]["vs CUDNN"] is None            # no CUDNN fp16 row
    assert by["flashnumba fa2_fast"]["vs FLASH"] is None
    assert "0.50/0.25" in report.summary_table(rows)


def test_tensor_core_version_is_benchmarked_per_half_dtype_beside_flash_and_cudnn():
    from flashnumba import registry
    from flashnumba.bench import impls
    by_key = {i.key: i for i in impls.implementations()}
    for direction in ("fwd", "bwd"):
        for dtype in ("bf16", "fp16"):
            tc = by_key[f"{direction} flashnumba {registry.DEFAULT_HALF} {dtype}"]
            assert tc.dtype == dtype and tc.direction == direction
            for backend in ("FLASH", "CUDNN"):
                assert by_key[f"{direction} torch {backend} {dtype}"].dtype == dtype
    assert impls.flashnumba_impl(registry.version(registry.DEFAULT_HALF), "fwd").dtype == "bf16"


def test_sim_pass_runs_the_tensor_core_version_in_bf16():
    lines = []
    failures = run_sim(only=["fa2_tc"], out=lines.append, shapes=((1, 20, 17, 1, 1, 16, True),))
    text = "\n".join(lines)
    assert failures == 0, text
    assert sum("flashnumba fa2_tc" in line and " ok " in line and "tolerance 3e-02" in line
               for line in lines) == 2, text
