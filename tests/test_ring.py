"""flashnumba.distributed.ring_flash_attn_func on 2 and 4 CPU processes (gloo, kernels on the
simulator), forward and backward against the float64 reference on the full sequence;
bad input an error on every rank, never a hang.

Each of the two multi-process tests starts P copies of tests/ring_worker.py on a free port
(one launch with every 2-rank case, one with the 4-rank ones: an interpreter with torch and
numba per rank is the cost) and waits for them with a timeout (a hang fails the test and the
workers are killed).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err

from flashnumba import reference
from flashnumba.distributed import checks
from flashnumba.ring_geometry import unshard

torch = pytest.importorskip("torch")

WORKER = Path(__file__).resolve().parent / "ring_worker.py"
REPO = WORKER.parent.parent
TIMEOUT_S = 240
FP32_TOL = 1e-5          # the project's float32 bound, relative to the float64 reference



def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, cases, out_dir):
    """Run `cases` on `world` worker processes; fail (after killing them) if any fails or hangs."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(port),
                                 str(out_dir), json.dumps(cases)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for rank in range(world)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"ring workers did not finish in {TIMEOUT_S} s (a rank left waiting?)")
    failed = [(rank, out) for rank, (worker, out) in enumerate(zip(workers, outputs)) if worker.returncode]
    assert not failed, "\n".join(f"rank {rank} failed:\n{out}" for rank, out in failed)


def _case(name, layout, causal, N, H_q, H_kv, d=16, B=1, seed=0, **extra):
    return {"name": name, "layout": layout, "causal": causal, "N": N, "H_q": H_q, "H_kv": H_kv,
            "d": d, "B": B, "seed": seed, **extra}


def _check_against_reference(case, world, out_dir):
    sys.path.insert(0, str(WORKER.parent))
    from ring_worker import full_inputs
    q, k, v, dout = full_inputs(case)
    parts = [np.load(out_dir / f"{case['name']}_rank{rank}.npz") for rank in range(world)]
    got = {name: unshard([p[name] for p in parts], case["layout"]) for name in ("out", "dq", "dk", "dv")}
    options = {"causal": case["causal"], "softmax_scale": case.get("softmax_scale")}
    out, _ = reference.attention(q, k, v, **options)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, **options)
    for name, want in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        error = rel_err(got[name], want)
        assert error < FP32_TOL, f"{case['name']}: {name} relative error {error:.2e}"


# ---------------------------------------------------------------- one launch per world size

def _two_rank_valid():
    """GQA (2 query heads on 1 K/V head), causal and not, N = 32 over 2 ranks."""
    return [_case(f"{layout}_{kind}", layout, causal, N=32, H_q=2, H_kv=1, seed=seed, **extra)
            for layout in LAYOUTS
            for kind, causal, seed, extra in (("causal", True, 1, {}), ("full", False, 2, {"softmax_scale": 0.3}))]


def _four_rank_valid():
    """N = 32 over 4 ranks (zigzag: 8 chunks of 4): the skipped and the half blocks."""
    return [_case(f"{layout}_causal4", layout, True, N=32, H_q=1, H_kv=1, d=8, seed=3) for layout in LAYOUTS]


LAYOUTS = ("contiguous", "zigzag")
BAD = {
    "short_slice_on_last_rank": "every rank must pass the same q shape; got rank 0: (1, 16, 2, 16); "
                                "rank 1: (1, 15, 2, 16) (every rank must hold N / P positions of the "
                                "sequence; the slices add up to N = 31, not divisible by the world size 2)",
    "layout": "layout must be one of 'contiguous', 'zigzag', got 'striped'",
    "odd_zigzag": "layout='zigzag' holds two chunks of N / 2P per rank, so the local seqlen must be "
                  "even; got 15",
    "kv_heads_on_rank_0": "nheads_q=2 must be a multiple of nheads_kv=3",
    "dropout": "dropout_p=0.1: dropout is not supported by ring_flash_attn_func yet",
    "causal_differs": "every rank must pass the same (layout, causal, softmax_scale, dropout_p, seed, "
                      "algorithm)",
}


def test_two_ranks_equal_the_reference_and_refuse_bad_input(tmp_path):
    """One 2-rank launch: the valid cases (both layouts) against the reference, then each bad case
    raises on both ranks (the rank at fault and the other) and the next case runs on the same
    group: nobody was left waiting on a point-to-point operation (the launch fails on a timeout
    otherwise)."""
    valid = _two_rank_valid()
    bad = [_case(name, "contiguous", False, N=32, H_q=2, H_kv=1, bad=name) for name in BAD]
    _launch(2, valid + bad, tmp_path)
    assert {case["layout"] for case in valid} == set(LAYOUTS) and len(valid) == 4
    for case in valid:
        _check_against_reference(case, 2, tmp_path)
    for name, expected in BAD.items():
        for rank in range(2):
            message = (tmp_path / f"{name}_rank{rank}.txt").read_text()
            assert message.startswith("ValueError: ring_flash_attn_func: "), message
            assert expected in message, f"{name}, rank {rank}: {message}"


def test_four_ranks_causal_equal_the_reference(tmp_path):
    """One 4-rank launch, both layouts."""
    cases = _four_rank_valid()
    _launch(4, cases, tmp_path)
    for case in cases:
        _check_against_reference(case, 4, tmp_path)


# ---------------------------------------------------------------- the checks alone (no processes)

def _facts(q_shape=(1, 8, 2, 16), k_shape=(1, 8, 1, 16), **options):
    keywords = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "layout": "contiguous",
                "seed": 0, "algorithm": "fa2"}
    keywords.update(options)
    q = torch.zeros(q_shape)
    k = torch.zeros(k_shape)
    return checks.local_facts(q, k, k.clone(), **keywords)


def test_checks_name_the_rank_at_fault_to_the_others():
    everyone = [_facts(), _facts(k_shape=(1, 7, 1, 16))]
    with pytest.raises(ValueError, match="rank 1 of 2: q has 8 local positions and k 7"):
        checks.check_all(everyone, rank=0, layout="contiguous")
    with pytest.raises(ValueError, match="ring_flash_attn_func: q has 8 local positions and k 7"):
        checks.check_all(everyone, rank=1, layout="contiguous")


def test_checks_pass_and_give_N():
    assert checks.check_all([_facts(), _facts(), _facts()], rank=2, layout="contiguous") == 24
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        facts = checks.local_facts(np.zeros((1, 8, 1, 16), np.float32), torch.zeros(1, 8, 1, 16),
                                   torch.zeros(1, 8, 1, 16), 0.0, None, False, "contiguous", 0, "fa2")
        checks.check_all([facts], rank=0, layout="contiguous")


# ---------------------------------------------------------------- the GPU benchmark's pure-Python parts

def test_bench_flops_efficiency_and_table():
    from flashnumba.distributed import bench
    assert bench.attention_flops(1, 16, 1024, 64, causal=False, backward=False) == 4.0 * 16 * 1024 ** 2 * 64
    assert bench.attention_flops(1, 1, 8, 2, causal=True, backward=True) == 4.0 * 64 * 2 * 3.5 / 2
    rows = [bench.Row("single-gpu", 1, 8, 8, True, "fwd", 1.0, 2.0),
            bench.Row("ring-zigzag", 4, 32, 8, True, "fwd", 1.0, 1.7),
            bench.Row("ring-zigzag", 4, 32, 8, False, "fwd", 1.0, 1.7)]
    bench.efficiencies(rows)
    assert rows[1].efficiency == pytest.approx(0.85) and rows[2].efficiency is None
    text = bench.table(rows)
    assert "ring-zigzag" in text and "0.85" in text and len(text.splitlines()) == 4


def test_bench_arguments_and_dry_run(capsys):
    from flashnumba.distributed import bench
    assert bench.main(["--dry-run", "--n-per-gpu", "64", "--causal", "yes"]) == 0
    printed = capsys.readouterr().out
    assert "ring N=64" in printed and "causal=True" in printed and "causal=False" not in printed
    with pytest.raises(SystemExit):
        bench.parse_args(["--n-per-gpu", "33"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
