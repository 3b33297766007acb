"""One rank of a ring-attention test: run by tests/test_ring.py as P subprocesses (gloo, CPU).

    python tests/ring_worker.py RANK WORLD PORT OUT_DIR CASES_JSON

Every rank builds the same full q, k, v, dout from the case's seed, takes its slice
(``flashnumba.distributed.shard``), runs ``ring_flash_attn_func`` forward and backward,
and saves its out, dq, dk, dv to OUT_DIR/<case>_rank<RANK>.npz; the test unshards them
and compares with the float64 reference on the full sequence. A case with "bad" set
makes this rank's input wrong as the case says and saves the error each rank raised
(<case>_rank<RANK>.txt); the next case then runs on the same process group, so a
rank left waiting would show as a timeout.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np


def full_inputs(case):
    rng = np.random.default_rng(case["seed"])
    B, N, H_q, H_kv, d = (case[key] for key in ("B", "N", "H_q", "H_kv", "d"))
    q = rng.standard_normal((B, N, H_q, d)).astype(np.float32)
    k = rng.standard_normal((B, N, H_kv, d)).astype(np.float32)
    v = rng.standard_normal((B, N, H_kv, d)).astype(np.float32)
    dout = rng.standard_normal((B, N, H_q, d)).astype(np.float32)
    return q, k, v, dout


def bad_input(case, rank, world, q, k, v):
    """This rank's slices made wrong the way case["bad"] says; returns (q, k, v, keywords)."""
    import torch

    from flashnumba.distributed import shard
    bad = case["bad"]
    keywords = {}
    q_r, k_r, v_r = (torch.from_numpy(shard(x, rank, world, "contiguous")) for x in (q, k, v))
    if bad == "short_slice_on_last_rank" and rank == world - 1:
        q_r, k_r, v_r = q_r[:, 1:], k_r[:, 1:], v_r[:, 1:]       # N not divisible: one rank short
    elif bad == "layout":
        keywords["layout"] = "striped"
    elif bad == "odd_zigzag":
        q_r, k_r, v_r = q_r[:, 1:], k_r[:, 1:], v_r[:, 1:]       # every rank odd: no two equal chunks
        keywords["layout"] = "zigzag"
    elif bad == "kv_heads_on_rank_0" and rank == 0:
        k_r, v_r = k_r[:, :, :1].repeat(1, 1, 3, 1), v_r[:, :, :1].repeat(1, 1, 3, 1)
    elif bad == "dropout":
        keywords["dropout_p"] = 0.1
    elif bad == "causal_differs" and rank == 1:
        keywords["causal"] = True
    return q_r, k_r, v_r, keywords


def run_case(case, rank, world, out_dir):
    import torch

    from flashnumba.distributed import ring_flash_attn_func, shard
    q, k, v, dout = full_inputs(case)
    name = case["name"]
    if case.get("bad"):
        q_r, k_r, v_r, keywords = bad_input(case, rank, world, q, k, v)
        try:
            ring_flash_attn_func(q_r, k_r, v_r, **keywords)
            message = "no error"
        except (TypeError, ValueError) as error:
            message = f"{type(error).__name__}: {error}"
        (out_dir / f"{name}_rank{rank}.txt").write_text(message)
        return
    layout, causal = case["layout"], case["causal"]
    q_r, k_r, v_r, dout_r = (torch.from_numpy(shard(x, rank, world, layout)) for x in (q, k, v, dout))
    for x in (q_r, k_r, v_r):
        x.requires_grad_(True)
    out = ring_flash_attn_func(q_r, k_r, v_r, causal=causal, layout=layout,
                               softmax_scale=case.get("softmax_scale"))
    out.backward(dout_r)
    np.savez(out_dir / f"{name}_rank{rank}.npz", out=out.detach().numpy(), dq=q_r.grad.numpy(),
             dk=k_r.grad.numpy(), dv=v_r.grad.numpy())


def main(rank, world, port, out_dir, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    import flashnumba  # noqa: F401  (picks the simulator before numba is imported)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in cases:
            run_case(case, rank, world, Path(out_dir))
        dist.barrier()                      # every rank finished every case
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
    except Exception:                   # noqa: BLE001  (any failure: printed, and a nonzero exit)
        traceback.print_exc()
        sys.exit(1)
