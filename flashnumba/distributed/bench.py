"""Ring attention on GPUs: correctness at a real size, then weak scaling against one GPU.

    torchrun --nproc-per-node 4 -m flashnumba.distributed.bench [--n-per-gpu 32768] [--json out.json]
    python -m flashnumba.distributed.bench --dry-run        # print the plan, touch no GPU

What it does, in order (validate before timing):

1. correctness: a seeded problem of N = P x check_n positions (B=1, H=4 query heads on
   2 K/V heads, d=64, fp32), every layout, causal and not: forward and backward through
   ``ring_flash_attn_func``, gathered on rank 0 and compared with float64 dense attention
   on the full sequence (relative error <= 1e-5). A failure stops the run before any timing.
2. weak scaling: fixed n positions per GPU (B=1, H=16, d=64, fp32); every GPU first times the
   single-GPU kernel (``flash_attn_func``) on n positions alone, then all ranks time the ring on
   N = P n. Throughput per GPU = attention FLOPs of the whole problem / time / P; the
   efficiency is that over the single GPU's throughput on its n positions.
3. PyTorch's own context parallelism (``torch.distributed.tensor.experimental.context_parallel``
   around ``scaled_dot_product_attention``), timed the same way, if the installed torch has it.

FLOPs follow the FlashAttention papers: 4 N^2 d H B for the forward (two matmuls), 2.5x
that for the backward (five matmuls), halved under causal masking. Times are the slowest
rank's (an all-reduce of the maximum), median of the repeats, after warm-up runs.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

LAYOUT_NAMES = ("contiguous", "zigzag")


@dataclass
class Row:
    """One timed configuration."""
    impl: str            # "single-gpu", "ring-<layout>" or "torch-context-parallel"
    world: int
    N: int               # whole sequence
    n_per_gpu: int
    causal: bool
    pass_: str           # "fwd" or "fwd+bwd"
    seconds: float
    tflops_per_gpu: float
    efficiency: float | None = None    # tflops_per_gpu over the single GPU's, same causal and pass


def attention_flops(B, H, N, d, causal, backward):
    """FLOPs of attention over N positions: 4 N^2 d per head forward, x 3.5 with the backward,
    x 1/2 under causal masking."""
    flops = 4.0 * B * H * N * N * d
    if backward:
        flops *= 3.5
    return flops / 2 if causal else flops


def efficiencies(rows):
    """Fill each ring row's efficiency: its TFLOP/s per GPU over the single GPU's (same causal, pass)."""
    single = {(r.causal, r.pass_): r.tflops_per_gpu for r in rows if r.impl == "single-gpu"}
    for r in rows:
        base = single.get((r.causal, r.pass_))
        r.efficiency = None if not base else r.tflops_per_gpu / base
    return rows


def table(rows):
    """The rows as a fixed-width text table."""
    lines = [(f"{'impl':<24} {'P':>2} {'N':>8} {'n/GPU':>7} {'causal':>6} {'pass':>7} "
              f"{'ms':>9} {'TFLOP/s/GPU':>11} {'eff':>6}")]
    for r in rows:
        eff = "-" if r.efficiency is None else f"{r.efficiency:.2f}"
        lines.append(f"{r.impl:<24} {r.world:>2} {r.N:>8} {r.n_per_gpu:>7} {r.causal!s:>6} "
                     f"{r.pass_:>7} {1e3 * r.seconds:>9.2f} {r.tflops_per_gpu:>11.3f} {eff:>6}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flashnumba.distributed.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-gpu", type=int, default=32768, help="positions per GPU (weak scaling)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--check-n", type=int, default=1024, help="positions per GPU of the correctness check")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUT_NAMES, default=list(LAYOUT_NAMES))
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch-cp", action="store_true", help="skip PyTorch's context parallelism")
    parser.add_argument("--json", help="write the rows here (rank 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU)")
    args = parser.parse_args(argv)
    for name in ("n_per_gpu", "heads", "headdim", "batch", "check_n", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_per_gpu % 2 or args.check_n % 2:
        parser.error("--n-per-gpu and --check-n must be even (zigzag holds two chunks per GPU)")
    return args


def causal_flags(args):
    return {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]


def plan(args, world):
    """The configurations the run will time, as text (what --dry-run prints)."""
    lines = [(f"world size {world}; correctness at N = {world} x {args.check_n} (B=1, H=4, Hkv=2, "
              f"d=64, fp32) for layouts {args.layouts}, causal and not")]
    for causal in causal_flags(args):
        for pass_ in ("fwd", "fwd+bwd"):
            lines.append(f"time: single GPU n={args.n_per_gpu}; ring N={world * args.n_per_gpu} "
                         f"({', '.join(args.layouts)}); causal={causal}, {pass_}; B={args.batch} "
                         f"H={args.heads} d={args.headdim} fp32")
    return "\n".join(lines)


# ---------------------------------------------------------------- on GPUs (not importable-only)

def _setup():
    """Initialise NCCL on this process's GPU (torchrun's env), or a 1-process group without torchrun."""
    import torch
    import torch.distributed as dist
    from numba import cuda
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")          # NVLink multicast off (see the machines' notes)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    cuda.select_device(local)                               # flashnumba computes on this GPU too
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)


def _slowest(seconds, device):
    import torch
    import torch.distributed as dist
    t = torch.tensor([seconds], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time(fn, args, device):
    """Median over repeats of the slowest rank's seconds for fn()."""
    import torch
    import torch.distributed as dist
    for _ in range(args.warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(_slowest(time.perf_counter() - start, device))
    return sorted(times)[len(times) // 2]


def _full(shape, seed, device):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32)


def check(args, rank, world, device):
    """Ring forward and backward against float64 dense attention on the full sequence; True if all pass."""
    import torch
    import torch.distributed as dist

    from flashnumba.distributed import ring_flash_attn_func, shard, unshard
    B, H, H_kv, d, N = 1, 4, 2, 64, world * args.check_n
    q, dout = _full((B, N, H, d), 1, device), _full((B, N, H, d), 2, device)
    k, v = _full((B, N, H_kv, d), 3, device), _full((B, N, H_kv, d), 4, device)
    ok = True
    for layout in args.layouts:
        for causal in (False, True):
            local = [shard(x, rank, world, layout).requires_grad_(x is not dout) for x in (q, k, v, dout)]
            out = ring_flash_attn_func(*local[:3], causal=causal, layout=layout)
            out.backward(local[3])
            results = [out.detach(), local[0].grad, local[1].grad, local[2].grad]
            gathered = []
            for x in results:
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x.contiguous())
                gathered.append(unshard(parts, layout))
            if rank == 0:
                errors = _reference_errors(q, k, v, dout, causal, gathered)
                good = all(e <= 1e-5 for e in errors.values())
                ok &= good
                print(f"check {layout:<10} causal={causal!s:<5} N={N}: "
                      + " ".join(f"{name} {e:.1e}" for name, e in errors.items())
                      + ("" if good else "  FAILED"), flush=True)
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def _reference_errors(q, k, v, dout, causal, gathered):
    """Relative errors of (out, dq, dk, dv) against dense float64 attention (autograd in float64)."""
    import torch
    x64 = [x.double().requires_grad_(True) for x in (q, k, v)]
    group = q.shape[2] // k.shape[2]
    Q = x64[0].transpose(1, 2)
    K, V = (x.repeat_interleave(group, dim=2).transpose(1, 2) for x in x64[1:])
    out = torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=causal).transpose(1, 2)
    out.backward(dout.double())
    want = [out.detach()] + [x.grad for x in x64]
    return {name: float((g.double() - w).norm() / w.norm())
            for name, g, w in zip(("out", "dq", "dk", "dv"), gathered, want)}


def _pass(forward, backward, dout):
    """fn() running forward() and, if `backward`, out.backward(dout)."""
    def run():
        out = forward()
        if backward:
            out.backward(dout)
    return run


def _single_gpu_rows(args, world, device):
    from flashnumba import flash_attn_func
    B, H, d, n = args.batch, args.heads, args.headdim, args.n_per_gpu
    q, k, v, dout = (_full((B, n, H, d), s, device) for s in range(4))
    rows = []
    for causal in causal_flags(args):
        for pass_ in ("fwd", "fwd+bwd"):
            backward = pass_ == "fwd+bwd"
            xs = [x.clone().requires_grad_(backward) for x in (q, k, v)]
            run = _pass(lambda xs=xs, causal=causal: flash_attn_func(*xs, causal=causal), backward, dout)
            seconds = _time(run, args, device)             # every GPU runs it alone; the slowest counts
            flops = attention_flops(B, H, n, d, causal, backward)
            rows.append(Row("single-gpu", 1, n, n, causal, pass_, seconds, flops / seconds / 1e12))
    return rows


def _ring_rows(args, rank, world, device):
    from flashnumba.distributed import ring_flash_attn_func
    B, H, d, n = args.batch, args.heads, args.headdim, args.n_per_gpu
    q, k, v, dout = (_full((B, n, H, d), 10 + 4 * rank + s, device) for s in range(4))
    rows = []
    for layout in args.layouts:
        for causal in causal_flags(args):
            for pass_ in ("fwd", "fwd+bwd"):
                backward = pass_ == "fwd+bwd"
                xs = [x.clone().requires_grad_(backward) for x in (q, k, v)]
                run = _pass(lambda xs=xs, causal=causal, layout=layout:
                            ring_flash_attn_func(*xs, causal=causal, layout=layout), backward, dout)
                seconds = _time(run, args, device)
                flops = attention_flops(B, H, world * n, d, causal, backward) / world
                rows.append(Row(f"ring-{layout}", world, world * n, n, causal, pass_, seconds,
                                flops / seconds / 1e12))
    return rows


def _torch_cp_rows(args, rank, world, device):
    """PyTorch's context parallelism, or [] with the reason printed if this torch has none."""
    import torch
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as error:
        if rank == 0:
            print(f"torch context parallelism not available: {error}", flush=True)
        return []
    B, H, d, N = args.batch, args.heads, args.headdim, world * args.n_per_gpu
    mesh = init_device_mesh("cuda", (world,))
    rows = []
    for causal in causal_flags(args):
        for pass_ in ("fwd", "fwd+bwd"):
            backward = pass_ == "fwd+bwd"
            q, k, v, dout = (_full((B, H, N, d), s, device) for s in range(4))   # SDPA layout, full
            def run(q=q, k=k, v=v, dout=dout, causal=causal, backward=backward):
                xs = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
                grad = dout.clone()                            # context_parallel shards its buffers in place
                with context_parallel(mesh, buffers=[*xs, grad], buffer_seq_dims=[2, 2, 2, 2]):
                    out = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=causal)
                    if backward:
                        out.backward(grad)
            try:
                seconds = _time(run, args, device)
            except Exception as error:  # noqa: BLE001  (report and go on: it is only the comparison)
                if rank == 0:
                    print(f"torch context parallelism failed (causal={causal}, {pass_}): "
                          f"{type(error).__name__}: {error}", flush=True)
                continue
            flops = attention_flops(B, H, N, d, causal, backward) / world
            rows.append(Row("torch-context-parallel", world, N, args.n_per_gpu, causal, pass_, seconds,
                            flops / seconds / 1e12))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        print(plan(args, int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    import torch.distributed as dist
    rank, world, device = _setup()
    try:
        if rank == 0:
            print(plan(args, world), flush=True)
        if not check(args, rank, world, device):
            if rank == 0:
                print("correctness check failed: nothing timed", flush=True)
            return 1
        rows = _single_gpu_rows(args, world, device) + _ring_rows(args, rank, world, device)
        if not args.no_torch_cp:
            rows += _torch_cp_rows(args, rank, world, device)
        efficiencies(rows)
        if rank == 0:
            print(table(rows), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump([asdict(r) for r in rows], f, indent=1)
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
