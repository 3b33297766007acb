"""bench.tc_configs' pure parts (FLOP counts, the forward's candidates, the table, the refusal on
the simulator); the timing itself needs a CUDA GPU."""

import json

import pytest

import flashnumba
from flashnumba.bench import tc_configs
from flashnumba.kernels import fa2_tc_forward as tcf
from flashnumba.kernels.common import ConfigError, TileConfig


def test_flops_forward_half_for_causal_and_backward_two_and_a_half_times():
    assert tc_configs.forward_flops(4, 16, 4096, 128, False) == 4 * 4 * 16 * 4096 * 4096 * 128
    assert tc_configs.forward_flops(1, 2, 8, 4, True) == 4 * 2 * 8 * 8 * 4 / 2
    assert tc_configs.backward_flops(1, 2, 8, 4, True) == 2.5 * 4 * 2 * 8 * 8 * 4 / 2


@pytest.mark.parametrize("d_pad", [64, 128])
def test_forward_candidates_start_with_the_default_and_all_fit(d_pad):
    candidates = tc_configs.forward_candidates(d_pad)
    default = tcf.default_config(d_pad)
    assert candidates[0] == (default, tcf.stages(default))
    assert not tcf.is_dynamic(default, tcf.stages(default))
    assert len(set(candidates)) == len(candidates)
    for config, n_stages in candidates:
        assert config.d_pad == d_pad and config.Br == 16 * config.num_warps
        assert config.Bc in tc_configs.FORWARD_BC and n_stages in tc_configs.FORWARD_STAGES
        tcf.check_config(config, n_stages)
    grid = tc_configs.forward_grid(d_pad)
    assert len(grid) == 8    # the whole grid: static up to 48 KB, dynamic above
    spilled = [c for c in grid if tc_configs.describe(*c, key=True) in tc_configs.SPILLED_ON_SM90]
    assert len(candidates) == 8 - len(spilled)
    dynamic = {(c.Bc, c.num_warps, s) for c, s in grid if tcf.is_dynamic(c, s)}
    if d_pad == 64:          # 2 stages of Bc=64 are 36 KB: all static
        assert dynamic == set()
    else:                    # 2 stages of Bc=64 at d_pad=128 are 68 KB, over 48 KB: dynamic
        assert dynamic == {(64, 4, 2), (64, 8, 2)}
        assert all(tc_configs.describe(c, s).endswith("stages=2 dynamic") for c, s in grid
                   if (c.Bc, c.num_warps, s) in dynamic)


def test_forward_candidates_leave_out_what_spilled(monkeypatch):
    spilled = (128, 64, 128, 8, 1)
    assert any(tc_configs.describe(*c, key=True) == spilled for c in tc_configs.forward_candidates(128))
    monkeypatch.setattr(tc_configs, "SPILLED_ON_SM90", frozenset({spilled}))
    assert all(tc_configs.describe(*c, key=True) != spilled for c in tc_configs.forward_candidates(128))


def test_forward_stages_override_is_checked():
    config = TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4)
    assert tcf.stages(config) == 1 and tcf.stages(config, 2) == 2
    assert tcf.smem_bytes(config, 1) == 64 * 136 * 2 * 2
    tcf.check_config(config, 2)                                  # 69632 B, dynamic
    with pytest.raises(ConfigError, match="69632 bytes of static"):
        tcf.check_config(config, 2, dynamic=False)
    with pytest.raises(ConfigError, match="stages=3"):
        tcf.check_config(tcf.default_config(64), 3)


def test_table_aligns_columns_and_shows_dashes_for_flash():
    rows = [{"pass": "fwd", "d": 128, "causal": False, "impl": "FLASH", "ms": 1.5, "tflops": 350.0,
             "x_flash": 1.0, "max_diff": 0.0},
            {"pass": "fwd", "d": 128, "causal": True, "impl": "Br=64 Bc=32 warps=4 stages=2", "ms": 2.0,
             "tflops": 210.04, "x_flash": 0.6, "max_diff": 0.0078125}]
    lines = tc_configs.format_table(rows).splitlines()
    assert lines[0].split() == ["pass", "d", "causal", "impl", "ms", "TFLOP/s", "x", "FLASH", "max", "|diff|"]
    assert lines[1].split() == ["fwd", "128", "no", "FLASH", "1.500", "350.0", "-", "-"]
    assert lines[2].split()[-4:] == ["2.000", "210.0", "0.60", "0.00781"]
    assert lines[1].index("1.500") == lines[2].index("2.000") == lines[0].index("ms")


@pytest.mark.parametrize("argv", [["--forward", "--json", "rows.json"], []])
def test_main_refuses_the_simulator(monkeypatch, capsys, tmp_path, argv):
    monkeypatch.setattr(flashnumba, "on_simulator", lambda: True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        tc_configs.main(argv)
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "rows.json").exists()


def test_main_writes_the_rows_as_json(monkeypatch, tmp_path):
    """Past the refusal (on_simulator patched off, the timing replaced): the table and the JSON."""
    monkeypatch.setattr(flashnumba, "on_simulator", lambda: False)
    row = {"pass": "fwd", "d": 64, "causal": False, "impl": "FLASH", "ms": 1.0, "tflops": 300.0,
           "x_flash": 1.0, "max_diff": 0.0}
    calls = []

    def run_forward(B, H, N, head_dims, log, default_only=False):
        calls.append((B, H, N, head_dims, default_only))
        return [row]

    monkeypatch.setattr(tc_configs, "run_forward", run_forward)
    logged = []
    tc_configs.main(["--forward", "--shape", "2x3x256", "--d", "64", "--json", str(tmp_path / "r.json")],
                    log=logged.append)
    tc_configs.main(["--forward", "--default-only", "--d", "128"], log=logged.append)
    assert calls == [(2, 3, 256, [64], False), (4, 16, 4096, [128], True)]
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == [row]
    assert "FLASH" in logged[-1]


def test_backward_candidates_are_the_shipped_configs_then_the_defaults_variants():
    from flashnumba.kernels import fa2_tc_backward as tcb
    default = tcb.default_config(64)
    shipped = [c for c in tcb.shipped_configs() if c.d_pad == 64]
    assert tc_configs.backward_candidates(64, capability=(9, 0)) == [(c, {}) for c in shipped] + [
        (default, {"red_v2": False})]
    assert tc_configs.backward_candidates(64, default_only=True, capability=(8, 0)) == [(default, {})]
    assert all(key in tc_configs.BACKWARD_VARIANTS for _, variant in
               tc_configs.backward_candidates(128, capability=(9, 0)) for key in variant.items())
