"""Lesson 14's committed compiler report is current: one row per config of GRID, each a config
fa2_forward accepts, with ptxas's shared memory equal to the module's smem_bytes and no spill.

Re-measuring needs the NVIDIA compiler wheels and a minute or two of CPU; `flashnumba resources`
(tests/test_resources.py) checks the shipped configs with the compiler itself.
"""

from flashnumba.course import tile_report
from flashnumba.kernels import fa2_forward
from flashnumba.kernels.common import TileConfig


def test_committed_report_matches_the_grid_and_the_kernel():
    report = tile_report.load()
    assert report["command"] == tile_report.COMMAND
    assert report["arch"] == f"sm_{tile_report.CC[0]}{tile_report.CC[1]}"
    shapes = [(r["Br"], r["Bc"], r["d_pad"], r["num_warps"]) for r in report["rows"]]
    assert shapes == list(tile_report.GRID), "run: python -m flashnumba.course.tile_report"
    for row in report["rows"]:
        config = TileConfig(Br=row["Br"], Bc=row["Bc"], d_pad=row["d_pad"], num_warps=row["num_warps"])
        fa2_forward.check_config(config)
        assert row["smem"] == fa2_forward.smem_bytes(config), row
        assert row["spill_stores"] == row["spill_loads"] == 0, row
        assert 0 < row["registers"] <= 255, row
