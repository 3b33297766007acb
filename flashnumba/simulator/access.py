"""Who read and wrote what: per-thread access counts and a shared-memory race check.

GPU-Puzzles draws what each thread of a kernel read and wrote; CUDA's
``compute-sanitizer --tool racecheck`` finds two threads of a block touching one
shared-memory element, one of them writing, with no barrier between. On the
simulator every access is a Python call, so both can be done exactly:

    with access.traced() as trace:
        Q_d = trace.watch("Q", Q)                 # a device array whose accesses are recorded
        S_d = trace.watch("S", np.zeros((Nq, Nk)))
        kernel[grid, block](Q_d, S_d)
    trace.per_thread("Q", "reads")    # {(block, thread): count}
    trace.per_element("Q", "reads")   # array of Q's shape: how many reads of each element
    trace.races                       # [Race]: conflicting shared accesses between two barriers
    trace.array("S")                  # what the kernel left in S

Inside ``traced()`` every ``cuda.shared.array`` a kernel allocates is watched
too, named by the variable it is assigned to on its source line (``Q_s`` for
``Q_s = cuda.shared.array(...)``). Each thread counts the ``syncthreads`` it
has passed (its *epoch*); two accesses to one shared element by two threads of
a block at the same epoch, at least one a write, are a race, whatever order the
simulator happened to run them in: on a GPU they may run in either order.

Only scalar indexing (``A[r, c]``) is recorded; slices pass through unrecorded.
Simulator only: on a GPU accesses cannot be watched.
"""

import linecache
import re
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

READS, WRITES = "reads", "writes"


@dataclass(frozen=True)
class Race:
    """Two threads of one block touched shared element array[index] between the same two barriers."""
    array: str
    index: tuple
    block: tuple
    first: tuple          # (thread, "read" or "write") that came first in the simulator's order
    second: tuple         # the conflicting access
    barriers: int         # syncthreads both threads had passed

    def __str__(self):
        (t1, a1), (t2, a2) = self.first, self.second
        where = "before the first syncthreads" if self.barriers == 0 else \
            f"after syncthreads number {self.barriers}"
        return (f"race on shared {self.array}{list(self.index)} in block {self.block}: thread {t1} "
                f"{a1} it and thread {t2} {a2} it, both {where}, with no syncthreads between")


def _thread():
    """The simulated thread running now, or None outside a kernel."""
    t = threading.current_thread()
    return t if getattr(t, "threadIdx", None) is not None else None


def _key(thread):
    return tuple(int(v) for v in thread.blockIdx), tuple(int(v) for v in thread.threadIdx)


def _scalar_index(index, shape):
    """index as a tuple of non-negative ints, or None for a slice / fancy index."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) != len(shape):
        return None
    out = []
    for k, n in zip(index, shape):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            return None
        out.append(int(k) % n if n else int(k))
    return tuple(out)


class Trace:
    """What the kernels launched inside ``traced()`` read and wrote (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.arrays = {}                          # name -> watched ndarray
        self.thread_counts = {}                   # name -> {READS: Counter, WRITES: Counter}
        self.element_counts = {}                  # name -> {READS: ndarray, WRITES: ndarray}
        self.touched = {}                         # name -> {(block, thread): {READS: set, WRITES: set}}
        self.shared_names = set()
        self.epoch = {}                           # (block's run, thread) -> syncthreads passed
        self._last = {}                           # (name, block, index) -> (thread, epoch, writes, reads)
        self.races = []

    # ------------------------------------------------------------ watching arrays

    def _register(self, name, array):
        view = array.view(_Watched)
        view._trace, view._name = self, name
        self.arrays[name] = view
        self.thread_counts[name] = {READS: Counter(), WRITES: Counter()}
        self.element_counts[name] = {READS: np.zeros(array.shape, int), WRITES: np.zeros(array.shape, int)}
        self.touched[name] = {}
        return view

    def watch(self, name, array):
        """A device array for a kernel argument (a copy of `array`), its accesses recorded as `name`."""
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        if name in self.arrays:
            raise ValueError(f"name={name!r} is already watched")
        return FakeCUDAArray(self._register(name, np.array(array)))

    def array(self, name):
        """The contents of watched array `name` now (a plain ndarray copy)."""
        return np.array(self.arrays[name].view(np.ndarray))

    # ------------------------------------------------------------ recording

    def _record(self, name, index, kind):
        thread = _thread()
        if thread is None:
            return
        index = _scalar_index(index, self.arrays[name].shape)
        if index is None:
            return
        block, tid = _key(thread)
        with self._lock:
            self.thread_counts[name][kind][(block, tid)] += 1
            self.element_counts[name][kind][index] += 1
            mine = self.touched[name].setdefault((block, tid), {READS: set(), WRITES: set()})
            mine[kind].add(index)
            if name in self.shared_names:
                self._check_race(name, index, thread._manager, block, tid, kind)

    def _check_race(self, name, index, run, block, tid, kind):
        """Compare this access with the element's accesses since the last barrier. Lock held.

        run: the simulator's manager of this block in this launch (a second launch of the
        same kernel starts again from epoch 0)."""
        epoch = self.epoch.get((run, tid), 0)
        key = (name, run, index)
        last = self._last.get(key)
        if last is None or last[1] != epoch:
            last = (None, epoch, [], [])          # (unused, epoch, writers, readers) this epoch
            self._last[key] = last
        writers, readers = last[2], last[3]
        others_w = [t for t in writers if t != tid]
        others_r = [t for t in readers if t != tid] if kind == WRITES else []
        other = others_w[0] if others_w else (others_r[0] if others_r else None)
        if other is not None and not any(r.array == name and r.block == block for r in self.races):
            did = "wrote" if others_w else "read"
            self.races.append(Race(name, index, block, (other, did),
                                   (tid, "wrote" if kind == WRITES else "read"), epoch))
        (writers if kind == WRITES else readers).append(tid)

    def passed_barrier(self, thread):
        key = (thread._manager, _key(thread)[1])
        with self._lock:
            self.epoch[key] = self.epoch.get(key, 0) + 1

    # ------------------------------------------------------------ reading the record

    def per_thread(self, name, kind=READS):
        """{(block, thread): how many elements of `name` that thread read (or wrote)}."""
        return dict(self.thread_counts[name][kind])

    def per_element(self, name, kind=READS):
        """An int array of `name`'s shape: how many times each element was read (or written)."""
        return self.element_counts[name][kind].copy()

    def elements(self, name, who, kind=READS):
        """The indices of `name` that thread who = (block, thread) read (or wrote), sorted."""
        return sorted(self.touched[name].get(who, {}).get(kind, ()))

    def threads(self, name=None):
        """Every (block, thread) that touched `name` (any watched array when None), sorted."""
        names = [name] if name else list(self.touched)
        return sorted({who for n in names for who in self.touched[n]})

    def total(self, name, kind=READS):
        return int(self.element_counts[name][kind].sum())


class _Watched(np.ndarray):
    """An ndarray whose scalar reads and writes are reported to its Trace."""

    def __getitem__(self, index):
        value = np.ndarray.__getitem__(self, index)
        trace = getattr(self, "_trace", None)
        if trace is not None:
            trace._record(self._name, index, READS)
        return value.view(np.ndarray) if isinstance(value, np.ndarray) else value

    def __setitem__(self, index, value):
        trace = getattr(self, "_trace", None)
        if trace is not None:
            trace._record(self._name, index, WRITES)
        np.ndarray.__setitem__(self, index, value)


_ASSIGNED = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")


def _shared_name(frame):
    """The variable a cuda.shared.array call is assigned to, from its source line."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno, frame.f_globals)
    found = _ASSIGNED.match(line)
    return found.group(1) if found else f"shared@{frame.f_lineno}"


_active = None       # the Trace of the traced() block now open


@contextmanager
def traced():
    """Record every watched access of the kernels launched inside; yields the Trace."""
    global _active
    import flashnumba
    if flashnumba.device() != "sim":
        raise RuntimeError("access.traced() watches the simulator's threads; this process runs "
                           "kernels on a GPU (set FLASHNUMBA_DEVICE=sim before importing flashnumba)")
    from numba.cuda.simulator import kernelapi
    if _active is not None:
        raise RuntimeError("access.traced() blocks do not nest")
    trace = Trace()
    shared_cls, module_cls = kernelapi.FakeCUDAShared, kernelapi.FakeCUDAModule
    stock_array, stock_sync = shared_cls.__dict__["array"], module_cls.__dict__["syncthreads"]

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return stock_array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = ("traced", caller.f_code.co_filename, caller.f_lineno)
        with trace._lock:
            found = self._allocations.get(key)
            if found is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                name = _shared_name(caller)
                found = trace.arrays.get(name)         # a second launch: the same array again
                if found is None or found.shape != np.empty(shape).shape or found.dtype != dtype:
                    while name in trace.arrays:
                        name += "'"
                    trace.shared_names.add(name)
                    found = trace._register(name, np.zeros(shape, dtype))
                self._allocations[key] = found
        return found

    def syncthreads(self):
        stock_sync(self)
        thread = _thread()
        if thread is not None:
            trace.passed_barrier(thread)

    shared_cls.array, module_cls.syncthreads = array, syncthreads
    _active = trace
    try:
        yield trace
    finally:
        shared_cls.array, module_cls.syncthreads = stock_array, stock_sync
        _active = None
