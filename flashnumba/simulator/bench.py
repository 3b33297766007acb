"""Time barriers and warp shuffles on the simulator: numba's stock one against ours.

    python -m flashnumba.simulator.bench [--blocks 4] [--iters 64]

Two kernels, each a few blocks of 128 threads (4 warps):

- ``barriers``: per iteration, write shared memory, ``syncthreads``, read a
  neighbour's value, ``syncthreads`` (2 barriers per iteration).
- ``butterflies``: per iteration one ``syncthreads`` and one butterfly max
  reduction over the warp (5 ``shfl_xor_sync``), the pattern of a row max.

Each run is checked against NumPy before it is timed. The stock simulator has
no shuffles, so it runs ``barriers`` only. Timings include thread start-up
(about 70 us per simulated thread).

Measured on the 2-core development machine with the defaults (best of 3; it
was shared, and stock's numbers swung between runs): stock ``barriers`` 4.7-16 s
at Python's default switch interval (9-32 ms per barrier per block) and
2.2-2.8 s at its best interval (1e-3 or 2e-4); patched ``barriers`` 1.05-1.3 s
(2.1-2.5 ms per barrier per 128-thread block) and ``butterflies`` 3.9-4.4 s.
A 32-lane collective costs about 0.6 ms, ~18 us per lane, most of it the
operating system handing the GIL from one Python thread to the next (a bare
ring of Python threads and locks costs 10-13 us per handoff on that machine).
"""

import argparse
import sys
import time

import numpy as np
from numba import cuda, float32  # after flashnumba/__init__.py chose the simulator

import flashnumba
from flashnumba import simulator

THREADS = 128  # 4 warps
FULL_MASK = 0xFFFFFFFF


@cuda.jit
def barriers(out, iters):
    tid = cuda.threadIdx.x
    s = cuda.shared.array(THREADS, float32)
    acc = float32(0)
    for k in range(iters):
        s[tid] = tid + k
        cuda.syncthreads()  # every s[i] written before anyone reads
        acc += s[THREADS - 1 - tid]
        cuda.syncthreads()  # every read done before the next iteration writes
    out[cuda.blockIdx.x, tid] = acc


@cuda.jit
def butterflies(out, iters):
    tid = cuda.threadIdx.x
    acc = float32(0)
    for k in range(iters):
        v = float32((tid * 7 + k) % 32)
        # m = max over the warp of v: 5 butterfly steps
        for offset in (16, 8, 4, 2, 1):
            v = max(v, cuda.shfl_xor_sync(FULL_MASK, v, offset))
        acc += v
        cuda.syncthreads()
    out[cuda.blockIdx.x, tid] = acc


def expected(kernel, blocks, iters):
    tid = np.arange(THREADS)
    if kernel is barriers:
        row = sum((THREADS - 1 - tid) + k for k in range(iters))
    else:
        row = np.zeros(THREADS)
        for k in range(iters):
            v = (tid * 7 + k) % 32
            row = row + v.reshape(-1, 32).max(axis=1).repeat(32)
    return np.tile(row.astype(np.float32), (blocks, 1))


def timed(kernel, blocks, iters, repeat):
    """(wall, cpu) seconds of the fastest of ``repeat`` launches, each checked first."""
    best = None
    for _ in range(repeat):
        out = np.zeros((blocks, THREADS), np.float32)
        wall, cpu = time.perf_counter(), time.process_time()
        kernel[blocks, THREADS](out, iters)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        np.testing.assert_allclose(out, expected(kernel, blocks, iters))
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--iters", type=int, default=64)
    parser.add_argument("--intervals", type=float, nargs="+", default=[5e-3, 1e-3, 2e-4],
                        help="sys.setswitchinterval values to try")
    parser.add_argument("--repeat", type=int, default=3, help="report the fastest of N runs")
    parser.add_argument("--no-stock", action="store_true", help="skip numba's own simulator")
    args = parser.parse_args(argv)
    if flashnumba.device() != "sim":
        sys.exit("bench.py times the simulator; run it with FLASHNUMBA_DEVICE=sim")

    b, n, r = args.blocks, args.iters, args.repeat
    print(f"{b} blocks x {THREADS} threads, {n} iterations: barriers = {2 * n} syncthreads; "
          f"butterflies = {n} syncthreads + {n} x 5 shfl_xor_sync. Fastest of {r}.")
    print(f"{'simulator':<10} {'interval':>9} {'kernel':<12} {'wall s':>8} {'cpu s':>8} "
          f"{'wall ms per sync op per block':>30}")

    def row(name, interval, kernel, sync_ops):
        sys.setswitchinterval(interval)
        wall, cpu = timed(kernel, b, n, r)
        per = 1e3 * wall / (sync_ops * b)
        print(f"{name:<10} {interval:>9.0e} {kernel.__name__:<12} {wall:>8.3f} {cpu:>8.3f} "
              f"{per:>30.3f}", flush=True)

    if not args.no_stock:
        simulator.uninstall()
        for interval in args.intervals:
            row("stock", interval, barriers, 2 * n)
        simulator.install()
    for interval in args.intervals:
        row("patched", interval, barriers, 2 * n)
        row("patched", interval, butterflies, 6 * n)
    sys.setswitchinterval(simulator.SWITCH_INTERVAL_S)


if __name__ == "__main__":
    main()
