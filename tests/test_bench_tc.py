"""bench.tc's pure-Python parts (FLOP counts, the table); the timing itself needs a CUDA GPU."""

import pytest

import flashnumba
from flashnumba.bench import tc


def test_flops_forward_causal_and_backward():
    assert tc.attention_flops(4, 16, 4096, 4096, 64, False) == 4.0 * 4 * 16 * 4096 * 4096 * 64
    assert tc.attention_flops(1, 1, 8, 8, 2, True) == 4.0 * 8 * 8 * 2 / 2
    assert tc.attention_flops(1, 1, 8, 8, 2, True, backward=True) == 2.5 * 4.0 * 8 * 8 * 2 / 2
    assert tc.tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_cases_are_the_issue_s():
    assert (4, 16, 4096, 64, False) in tc.FORWARD_CASES and (4, 16, 4096, 128, True) in tc.FORWARD_CASES
    assert any(B == 1 and H == 16 and N == 131072 for B, H, N, _, _ in tc.FORWARD_CASES)


def test_table_has_ratios_and_dashes_for_missing_backends():
    rows = [{"case": tc.case_label(4, 16, 4096, 64, True, False), "dtype": "bfloat16", "pass": True,
             "tflops": {"tc": 150.0, "FLASH": 300.0, "CUDNN": 500.0}},
            {"case": tc.case_label(4, 16, 4096, 64, True, True), "dtype": "float16", "pass": False,
             "tflops": {"tc": 60.0}}]
    table = tc.format_table(rows).splitlines()
    assert table[2] == ("| fwd B=4 H=16 N=4096 d=64 causal | bfloat16 | True | 150.0 | 300.0 | 500.0 "
                        "| 0.50x | 0.30x |")
    assert table[3].endswith("| 60.0 | - | - | - | - |")


@pytest.mark.skipif(not flashnumba.on_simulator(), reason="on a GPU main() runs the benchmark")
def test_main_refuses_the_simulator():
    assert tc.main(["--quick"]) == 2
