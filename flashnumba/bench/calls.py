"""`flashnumba bench --calls`: what a public call costs beyond its kernels, beside SDPA.

For each shape (default: the three of issue 13) and each path below, in one
process on one GPU:

    kernel fwd, kernel bwd          the default version's ``launcher``: checked and allocated
                                    once, the launch alone (what ``flashnumba bench`` times)
    torch fwd                       flash_attn_func on torch CUDA tensors, no grad
    torch fwd+bwd                   the same with requires_grad, then out.backward(dout) (autograd)
    torch bf16 fwd                  flash_attn_func on bfloat16 torch tensors
    numba fwd                       flash_attn_func on Numba device arrays
    numpy fwd                       flash_attn_func on NumPy arrays (copies in and out included)
    SDPA fwd, SDPA fwd+bwd          torch's scaled_dot_product_attention, EFFICIENT backend, fp32

Two times per call, medians over the runs after warm-up:

    gpu ms    between two CUDA events recorded before and after the call (default
              stream): what the caller waits for, host work included when the GPU idles
    host ms   wall time of the call itself, before any synchronisation: the host's
              share (Python, checks, dispatch, allocation), which small shapes expose

and with ``--busy`` a third:

    busy ms   the GPU's own time for the call: the summed durations of the kernels, memsets
              and copies it ran, as CUPTI records them (torch.profiler, CUDA activity),
              every kernel of the process included (numba's cuLaunchKernel as torch's); what
              the call would take if the host cost nothing. gpu ms - busy ms is the GPU idle
              inside the call, waiting for the host

``--profile`` adds a cProfile of the torch fwd+bwd path of the first shape: the
functions that take the host's time, by cumulative time and by their own.

The table and ratios (``rows``, ``format_table``) are plain functions of the
measured numbers, tested without a GPU.
"""

import cProfile
import io
import json
import pstats
import statistics
import sys
import time

from flashnumba import registry

ISSUE_SHAPES = "8x8x256x64c,2x8x1024x64n,4x16x4096x64n"   # issue 13's three shapes
WARMUP = 3
PATHS = ("kernel fwd", "torch fwd", "numba fwd", "numpy fwd", "torch bf16 fwd", "SDPA fwd",
         "kernel bwd", "torch fwd+bwd", "SDPA fwd+bwd")
# each path's baseline for the ratio columns
AGAINST_SDPA = {"torch fwd": "SDPA fwd", "numba fwd": "SDPA fwd", "torch bf16 fwd": "SDPA fwd",
                "numpy fwd": "SDPA fwd", "kernel fwd": "SDPA fwd", "torch fwd+bwd": "SDPA fwd+bwd"}
AGAINST_KERNEL = {"torch fwd": "kernel fwd", "numba fwd": "kernel fwd", "torch bf16 fwd": "kernel fwd"}


def runs_for(label_ms_guess, budget_s=1.0, least=10, most=200):
    """How many timed runs fit `budget_s` when one takes about `label_ms_guess` ms."""
    if label_ms_guess <= 0:
        return most
    return max(least, min(most, int(budget_s * 1e3 / label_ms_guess)))


def median_times(gpu_ms, host_ms):
    return {"gpu_ms": statistics.median(gpu_ms), "host_ms": statistics.median(host_ms),
            "runs": len(gpu_ms)}


def device_us(events):
    """Summed durations (us) of the GPU activities among torch.profiler's events: those whose
    device_type is CUDA (kernels, memsets, copies; the host-side ops are CPU)."""
    total = 0.0
    for event in events:
        if getattr(getattr(event, "device_type", None), "name", None) == "CUDA":
            total += event.time_range.elapsed_us()
    return total


def rows(results):
    """results: {(shape label, path): {"gpu_ms", "host_ms", "runs"}} -> table rows (dicts) with
    the ratios to SDPA and to the kernel alone, in PATHS order per shape."""
    table = []
    shapes = list(dict.fromkeys(shape for shape, _ in results))
    for shape in shapes:
        for path in PATHS:
            if (shape, path) not in results:
                continue
            r = results[(shape, path)]
            row = {"shape": shape, "path": path, **r}
            for column, baselines in (("x_sdpa", AGAINST_SDPA), ("x_kernel", AGAINST_KERNEL)):
                base = results.get((shape, baselines.get(path)))
                row[column] = r["gpu_ms"] / base["gpu_ms"] if base and base["gpu_ms"] > 0 else None
            table.append(row)
    return table


def format_table(table):
    """The rows as aligned text: one line per (shape, path)."""
    def ratio(x):
        return f"{x:7.2f}x" if x is not None else f"{'':>8}"
    busy = any("busy_ms" in row for row in table)
    lines = [f"{'shape':<26}{'path':<16}{'gpu ms':>10}{'host ms':>10}" + (f"{'busy ms':>10}" if busy else "")
             + f"{'/ SDPA':>8}{'/ kernel':>9}"]
    previous = None
    for row in table:
        shape = row["shape"] if row["shape"] != previous else ""
        previous = row["shape"]
        busy_ms = (f"{row['busy_ms']:>10.3f}" if "busy_ms" in row else f"{'-':>10}") if busy else ""
        lines.append(f"{shape:<26}{row['path']:<16}{row['gpu_ms']:>10.3f}{row['host_ms']:>10.3f}{busy_ms}"
                     f"{ratio(row['x_sdpa'])}{ratio(row['x_kernel']):>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# On the GPU
# ---------------------------------------------------------------------------

def time_call(call, torch, runs):
    """gpu and host milliseconds of each of `runs` calls (after WARMUP untimed ones)."""
    for _ in range(WARMUP):
        call()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    host = []
    for start, end in events:
        start.record()
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events], host


def calls_for(case, torch):
    """{path: call()} for one shape: inputs made once, every call on them."""
    import numpy as np
    import torch.nn.functional as F
    from numba import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashnumba
    from flashnumba import torch_allocator
    torch_allocator.install()        # as in a torch program: before numba's first allocation
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (case.B, case.N, case.H, case.d)
    q, k, v, dout = (torch.randn(shape, device="cuda", generator=gen) for _ in range(4))
    nq, nk, nv, ndout = (cuda.as_cuda_array(x) for x in (q, k, v, dout))
    hq, hk, hv = (x.cpu().numpy() for x in (q, k, v))
    bq, bk, bv = (x.to(torch.bfloat16) for x in (q, k, v))
    gq, gk, gv = (x.clone().requires_grad_() for x in (q, k, v))
    sq, sk, sv = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sdout = dout.transpose(1, 2).contiguous()
    causal = case.causal
    version = registry.version(registry.DEFAULT)
    launch_fwd, out, L = version.module(registry.FORWARD).launcher(nq, nk, nv, causal=causal)
    launch_fwd()
    launch_bwd = version.module(registry.BACKWARD).launcher(ndout, nq, nk, nv, out, L, causal=causal)[0]

    def torch_fwd_bwd():
        flashnumba.flash_attn_func(gq, gk, gv, causal=causal).backward(dout)

    def sdpa(a, b, c):
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    def sdpa_fwd():
        with torch.no_grad():
            return sdpa(sq, sk, sv)

    def torch_fwd():
        with torch.no_grad():
            return flashnumba.flash_attn_func(q, k, v, causal=causal)

    def bf16_fwd():
        with torch.no_grad():
            return flashnumba.flash_attn_func(bq, bk, bv, causal=causal)

    return {
        "kernel fwd": launch_fwd,
        "torch fwd": torch_fwd,
        "numba fwd": lambda: flashnumba.flash_attn_func(nq, nk, nv, causal=causal),
        "numpy fwd": lambda: np.asarray(flashnumba.flash_attn_func(hq, hk, hv, causal=causal)),
        "torch bf16 fwd": bf16_fwd,
        "SDPA fwd": sdpa_fwd,
        "kernel bwd": launch_bwd,
        "torch fwd+bwd": torch_fwd_bwd,
        "SDPA fwd+bwd": lambda: sdpa(sq, sk, sv).backward(sdout),
    }


def busy_ms(call, torch, calls=20):
    """The GPU's own milliseconds a call (the module docstring's busy ms): `calls` calls under
    torch.profiler with CUDA activity, after WARMUP untimed ones."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(WARMUP):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return device_us(prof.events()) / calls / 1e3


def profile_call(call, calls=50, top=60):
    """cProfile of `calls` calls: the top functions by cumulative time, then by own time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return f"cProfile of {calls} calls (host time, cumulative, then own):\n{text.getvalue()}"


def run(cases, torch, json_path=None, profile=False, busy=False, log=print):
    """Time every path of every case (busy: and its GPU-busy time); print the table; return the rows."""
    log(f"flashnumba bench --calls on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"algorithm {registry.DEFAULT}; gpu ms: CUDA events around each call, host ms: the call's "
        f"wall time before any synchronisation; medians")
    results = {}
    for case in cases:
        calls = calls_for(case, torch)
        if case is cases[0]:
            from numba.cuda.cudadrv import driver
            log(f"numba's device memory: {getattr(driver._memory_manager, '__name__', '?')}")
        for path in PATHS:
            call = calls[path]
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            gpu, host = time_call(call, torch, runs_for((time.perf_counter() - t0) * 1e3))
            results[(case.label, path)] = median_times(gpu, host)
            if busy:
                results[(case.label, path)]["busy_ms"] = busy_ms(call, torch)
            print(f"  {case.label:<26}{path:<16}{results[(case.label, path)]['gpu_ms']:9.3f} ms",
                  file=sys.stderr, flush=True)
        if profile and case is cases[0]:
            profiled = calls["torch fwd+bwd"]
            log(profile_call(profiled))
        del calls
    table = rows(results)
    log(format_table(table))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(table, f, indent=1)
    return table
