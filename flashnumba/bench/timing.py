"""Timing with CUDA events, and peak device memory, for torch and numba alike.

Timing: each run between two CUDA events on the default stream (numba
launches there, and so does torch unless told otherwise); warm-up runs are
excluded; the median of the runs is reported, with the spread (min, max).
When one input set fits in L2, runs rotate over several sets, so that no run
finds its inputs in the cache the run before left there.

Memory: torch's allocator keeps a peak counter (``max_memory_allocated``);
numba's allocations are counted by a thin subclass of numba's own memory
manager (``TrackingMemoryManager``) that adds each allocation's size and
subtracts it when the array is freed. "Extra memory" of a run is the peak of
both during the run, above what was allocated before it, minus the bytes of
the outputs it returns.
"""

import statistics
import weakref


class _Counter:
    def __init__(self):
        self.current = 0
        self.peak = 0

    def add(self, n):
        self.current += n
        self.peak = max(self.peak, self.current)

    def sub(self, n):
        self.current -= n

    def reset_peak(self):
        self.peak = self.current


NUMBA_BYTES = _Counter()
_tracking = False


def install_numba_tracker():
    """Count numba's device allocations. Must run before numba creates its CUDA context.
    Returns True when installed (False: numba memory is not measured, said in the results)."""
    global _tracking
    if _tracking:
        return True
    try:
        from numba import cuda
        from numba.cuda.cudadrv.driver import NumbaCUDAMemoryManager

        class TrackingMemoryManager(NumbaCUDAMemoryManager):
            def memalloc(self, size):
                mem = super().memalloc(size)
                NUMBA_BYTES.add(size)
                weakref.finalize(mem, NUMBA_BYTES.sub, size)
                return mem

        cuda.set_memory_manager(TrackingMemoryManager)
        _tracking = True
    except Exception:      # an internal API moved: run on, without numba memory numbers
        _tracking = False
    return _tracking


class PeakMemory:
    """with PeakMemory() as pm: outputs = run(); then pm.extra(outputs) -> bytes (None if unknown)."""

    def __enter__(self):
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.torch_base = torch.cuda.memory_allocated()
        NUMBA_BYTES.reset_peak()
        self.numba_base = NUMBA_BYTES.current
        return self

    def __exit__(self, *exc):
        import torch
        torch.cuda.synchronize()
        self.torch_peak = torch.cuda.max_memory_allocated() - self.torch_base
        self.numba_peak = NUMBA_BYTES.peak - self.numba_base
        return False

    def extra(self, output_bytes, numba_used):
        if numba_used and not _tracking:
            return None
        return max(0, self.torch_peak + self.numba_peak - output_bytes)


def output_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def time_runs(runs, n_runs):
    """Milliseconds of each of n_runs runs (runs: list of callables, used in rotation); events only."""
    import torch
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n_runs)]
    for i, (start, end) in enumerate(events):
        run = runs[i % len(runs)]
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def summarise(times_ms):
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "max_ms": max(times_ms), "runs": len(times_ms)}


def matmul_tflops(n=8192, repeats=10):
    """The fp32 ceiling: torch.matmul in true fp32 (TF32 off), n x n x n, median TFLOP/s."""
    import torch
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for _ in range(2):
        torch.matmul(a, b)
    times = time_runs([lambda: torch.matmul(a, b)], repeats)
    return 2 * n ** 3 / (statistics.median(times) * 1e-3) / 1e12


def copy_bandwidth(nbytes=2 << 30, repeats=10):
    """Device-to-device copy, bytes read + written per second (TB/s), median."""
    import torch
    src = torch.empty(nbytes // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = time_runs([lambda: dst.copy_(src)], repeats)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e12
