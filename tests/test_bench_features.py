"""bench.features' pure parts (cases, byte counts, the table); the timing itself needs a CUDA GPU."""

import pytest

import flashnumba
from flashnumba.bench import features


def test_cases_are_the_issues():
    assert (1, 16, 16384, 64, 256) in features.WINDOW_CASES
    assert (8, 32, 8, 128, 32768) in features.DECODE_CASES
    assert any(d == 256 for *_, d, _ in features.DECODE_CASES)
    assert any(1 in lengths for lengths, _, _ in features.VARLEN_CASES)


def test_window_fraction_and_cache_bytes():
    assert features.window_visible_fraction(4, 0) == 4 / 16
    assert features.window_visible_fraction(4, 3) == (1 + 2 + 3 + 4) / 16
    assert features.window_visible_fraction(16384, 256) < 1 / 30
    assert features.cache_bytes(8, 8, 128, 32768) == 2 * 8 * 32768 * 8 * 128 * 4
    assert features.read_once_ms(4e12, 4.0) == pytest.approx(1000.0)


def test_alibi_slopes_are_the_papers():
    slopes = features.alibi_slopes(8)
    assert slopes[0] == 0.5 and slopes[-1] == 2.0 ** -8


def test_table_lists_timings_and_the_ratio():
    rows = [{"case": "window w=256", "pass": True, "ms": {"window fwd": 1.0, "full fwd": 25.0},
             "ratio_name": "full / window (fwd)", "ratio": 25.0}]
    table = features.format_table(rows).splitlines()
    assert table[2] == "| window w=256 | True | window fwd 1.000, full fwd 25.000 | full / window (fwd) = 25.00 |"


@pytest.mark.skipif(not flashnumba.on_simulator(), reason="on a GPU main() runs the benchmark")
def test_main_refuses_the_simulator():
    assert features.main(["--quick"]) == 2
