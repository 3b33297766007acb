"""The accuracy table tool runs, judges and writes what it measured."""

import json

import pytest

from flashnumba.tools import accuracy


def test_accuracy_table_passes_and_writes_json(tmp_path, capsys):
    """The second small case only (causal, Nq != Nk, odd d, dropout: the mask read back from
    S_dmask); the first costs the simulator as much again and adds grouped-query heads only."""
    path = tmp_path / "acc.json"
    assert accuracy.main(["--small", "--cases", "2", "--dtypes", "float32", "bfloat16",
                          "--algorithms", "fa2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| bfloat16 | fa2 |" in printed and "accuracy: 0 failure(s)" in printed
    rows = json.loads(path.read_text())["rows"]
    assert [(r["dtype"], r["case"]) for r in rows] == [(dtype, accuracy.SIM_CASES[1][0])
                                                       for dtype in ("float32", "bfloat16")]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    assert all(r[name] <= 1e-5 for r in fp32 for name in accuracy.NAMES)
    low = [r for r in rows if r["dtype"] == "bfloat16"]
    assert all(r["out"] <= 2 and r["dq"] <= 3 for r in low)


def test_cases_out_of_range_is_an_error(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--small", "--cases", "3"])
    assert f"there are {len(accuracy.SIM_CASES)} cases" in capsys.readouterr().err


def test_a_wrong_result_fails_the_table(monkeypatch):
    """Halving the kernels' output must show up as a failure, not pass quietly."""
    import flashnumba

    real = flashnumba.flash_attn_func

    def wrong(*args, **kwargs):
        out, lse, S = real(*args, **kwargs)
        return out * 0.5, lse, S

    monkeypatch.setattr(flashnumba, "flash_attn_func", wrong, raising=False)
    result = accuracy.measure("float32", "fa2", *accuracy.SIM_CASES[0][1:])
    assert not result["out"][1] and result["lse"][1]


def test_a_half_only_version_has_rows_in_half_dtypes_only():
    """fa2_tc takes fp16/bf16 only: the table gives it bf16 rows (within the rule) and no fp32 row."""
    import io

    from flashnumba import registry
    tiny = [("Nq=9 Nk=20 d=17 causal", 1, 9, 20, 1, 1, 17, True, 0.0)]
    rows, failures = accuracy.table(tiny, dtypes=("float32", "bfloat16"),
                                    algorithms=(registry.DEFAULT_HALF,), stream=io.StringIO())
    assert failures == 0
    assert [(r["dtype"], r["algorithm"]) for r in rows] == [("bfloat16", registry.DEFAULT_HALF)]
    assert rows[0]["out"] <= 2 and rows[0]["lse"] <= 1e-5
