"""`flashnumba bench --calls` and `--calls --breakdown`: the parts that need no GPU (shapes, ratios,
the tables, the timing helpers and wrappers, the flag)."""

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


# ---------------------------------------------------------------------------
# --calls --breakdown (flashnumba.bench.breakdown): the helpers and tables
# ---------------------------------------------------------------------------

class _Owner:
    @staticmethod
    def boom(x):
        raise ValueError(x)

    def plus_one(self, x):
        return x + 1


class _Child(_Owner):
    pass


def test_wrapped_times_each_call_and_puts_every_original_back_when_a_call_raises():
    import types

    from flashnumba.bench.breakdown import Layers, wrapped
    module = types.ModuleType("layer")
    module.double = lambda x: 2 * x
    originals = (_Owner.__dict__["boom"], _Owner.__dict__["plus_one"], module.double)
    layers = Layers()
    targets = [(_Owner, "boom", "boom"), (_Owner, "plus_one", "plus_one"),
               (module, "double", "double"), (_Child, "plus_one", "inherited")]
    with pytest.raises(ValueError, match="inside"), wrapped(targets, layers):
        assert module.double(3) == 6 and _Owner().plus_one(1) == 2
        assert isinstance(_Owner.__dict__["boom"], staticmethod)     # still callable unbound
        assert module.double is not originals[2]
        _Owner.boom("inside")
    assert (_Owner.__dict__["boom"], _Owner.__dict__["plus_one"], module.double) == originals
    assert "plus_one" not in _Child.__dict__                            # inherited again
    assert {label: len(us) for label, us in layers.spent.items()} == {"double": 1, "plus_one": 1, "boom": 1}
    assert all(threads == {"main": 1} for threads in layers.threads.values())


def test_wrapped_puts_back_what_it_wrapped_when_a_target_does_not_exist():
    import types

    from flashnumba.bench.breakdown import Layers, wrapped
    module = types.ModuleType("layer")
    module.double = original = lambda x: 2 * x
    targets = [(module, "double", "double"), (module, "missing", "missing")]
    with pytest.raises(AttributeError), wrapped(targets, Layers()):
        pass
    assert module.double is original and not hasattr(module, "missing")


def test_host_us_is_the_median_loop_with_sync_between_loops_only():
    from flashnumba.bench import breakdown
    now, calls, syncs = [0.0], [0], [0]
    cost_us = [10.0] * breakdown.WARMUP + [10.0] * 4 + [30.0] * 4 + [20.0] * 4   # loop medians 10, 30, 20

    def fn():
        now[0] += cost_us[calls[0]] * 1e-6
        calls[0] += 1

    def sync():
        syncs[0] += 1
    result = breakdown.host_us(fn, sync=sync, loops=3, n=4, clock=lambda: now[0])
    assert result["us"] == pytest.approx(20.0) and (result["calls"], result["loops"]) == (4, 3)
    assert calls[0] == breakdown.WARMUP + 12 and syncs[0] == 1 + 3
    calls[0] = syncs[0] = 0
    cost_us[:] = [10.0] * 100
    breakdown.host_us(fn, sync=sync, sync_each=True, loops=3, n=4, clock=lambda: now[0])
    assert syncs[0] == 1 + 3 * 4 + 3


def test_host_us_sizes_its_loops_from_one_timed_call():
    from flashnumba.bench import breakdown
    now = [0.0]

    def costs(seconds):
        def fn():
            now[0] += seconds
        return fn
    assert breakdown.host_us(costs(2 ** -17), loops=1, clock=lambda: now[0])["calls"] == breakdown.MOST_CALLS
    assert breakdown.host_us(costs(2 ** -7), loops=1, clock=lambda: now[0])["calls"] == 25   # 0.2 s / 7.8 ms


def test_on_thread_runs_elsewhere_and_hands_back_the_result_or_the_error():
    from flashnumba.bench.breakdown import on_thread, thread_name
    assert thread_name() == "main"
    assert on_thread(thread_name) == "plain Python thread"
    with pytest.raises(KeyError, match="lost"):
        on_thread(lambda: {}["lost"])


def test_the_breakdown_tables_and_json():
    import json

    from flashnumba.bench.breakdown import Layers, format_layers, format_rows, payload
    rows = [{"row": "fwd+bwd through autograd", "us": 947.25, "calls": 200, "loops": 5},
            {"row": "interop.current_device_id()", "us": 1.5, "calls": 1000, "loops": 5}]
    text = format_rows(rows).splitlines()
    assert len(text) == 3 and "947.2" in text[1] and "200 x 5" in text[1] and "1000 x 5" in text[2]
    ends = [text[0].index("us") + 2, text[1].index("947.2") + 5, text[2].index("1.5") + 3]
    assert len(set(ends)) == 1                                # the numbers end under "us"
    layers = Layers()
    for us in (10.0, 30.0, 20.0, 40.0):
        layers.add("inner", us)
    layers.add("outer", 100.0)
    layers.add("outer", 300.0)
    table = layers.rows(2, order=("outer", "absent"))
    assert [r["layer"] for r in table] == ["outer", "inner"]
    assert table[1] == {"layer": "inner", "median_us": 25.0, "mean_us": 25.0, "per_iteration": 2.0,
                        "threads": {"main": 4}}
    lines = format_layers(table, 2, 123.4).splitlines()
    assert lines[1].startswith("outer") and "main x2" in lines[1] and "2.00" in lines[2]
    assert lines[-1] == "2 iterations, 123.4 us each (wrappers included)"
    written = json.loads(json.dumps(payload({"shape": "B8 H8 N256 d64 causal"}, rows, table, 2, 123.4)))
    assert written["shape"] == "B8 H8 N256 d64 causal" and written["rows"] == rows
    assert written["layers"][0]["threads"] == {"main": 2}
    assert written["layer_loop"] == {"iterations": 2, "us_per_iteration": 123.4}


def test_breakdown_is_a_flag_of_calls():
    from flashnumba.bench.run import parse_args
    assert parse_args(["--calls", "--breakdown", "--json", "b.json"]).breakdown
    assert not parse_args(["--calls"]).breakdown
    with pytest.raises(SystemExit):
        parse_args(["--breakdown"])


def test_without_a_gpu_the_breakdown_says_so(capsys):
    import flashnumba
    if not flashnumba.on_simulator():
        pytest.skip("a GPU is present: the command runs for real")
    assert main(["--calls", "--breakdown"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


class _Range:
    def __init__(self, us):
        self.us = us

    def elapsed_us(self):
        return self.us


class _Event:
    """What device_us reads of a torch.profiler event: its device type and time range."""

    def __init__(self, device, us):
        self.device_type = type("DeviceType", (), {"name": device})()
        self.time_range = _Range(us)


def test_busy_time_sums_the_gpu_activities_only():
    events = [_Event("CUDA", 12.5), _Event("CPU", 400.0), _Event("CUDA", 7.5), object()]
    assert calls.device_us(events) == pytest.approx(20.0)
    assert calls.device_us([]) == 0.0


def test_the_table_shows_busy_time_when_measured():
    results = {("A", p): _result(1.0) for p in calls.PATHS}
    assert "busy ms" not in calls.format_table(calls.rows(results))
    results[("A", "torch fwd")]["busy_ms"] = 0.25
    lines = calls.format_table(calls.rows(results)).splitlines()
    assert "busy ms" in lines[0]
    torch_fwd = next(line for line in lines if "torch fwd " in line)
    assert "0.250" in torch_fwd
    assert next(line for line in lines if "SDPA fwd " in line).split()[4] == "-"   # not measured


def test_busy_is_a_flag_of_calls():
    from flashnumba.bench.run import parse_args
    assert parse_args(["--calls", "--busy"]).busy
    with pytest.raises(SystemExit):
        parse_args(["--busy"])
