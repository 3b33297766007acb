"""How the simulator runs one thread block: its threads, syncthreads, exits, errors.

Numba's simulator launches a kernel one block at a time. Each CUDA thread of a
block is a Python thread (a ``BlockThread``) that calls the kernel function;
the ``cuda`` object the kernel sees answers ``threadIdx``, ``syncthreads()``
and the rest by looking at ``threading.current_thread()``. Only one Python
thread runs at a time (the GIL), so the threads of a block take turns.

Stock numba implements ``syncthreads`` by polling: the launching thread loops
over the block's threads, reading flags, until every live one is blocked, and
competes with them for the GIL all the while (tens of milliseconds per
barrier). ``BlockManager`` here replaces it; the threads do their own
bookkeeping under one lock per block:

- ``live`` counts the threads that have not returned, ``running`` those of
  them that are not asleep.
- A thread reaching ``syncthreads`` joins ``barrier``. When ``barrier`` holds
  every live thread, the last one to arrive wakes the others and carries on.
  A thread that returns lowers ``live`` and may thereby complete the barrier,
  as in stock numba: exited threads never hold a barrier up.
- Sleeping is blocking on a lock of the thread's own (``_wake``), which the
  waking thread releases: no polling, and a sleeper costs nothing until woken.
- If ``running`` drops to zero while threads are live, nobody is left to wake
  them: a ``DeadlockError`` says where each one waits.
- An exception in any thread (or a detected deadlock) fails the block: every
  sleeper is woken with its ``abort`` flag set and leaves quietly, and the
  launching thread re-raises the first error, prefixed with the thread and
  block ids as in stock numba.

Warp collectives (warp.py) sleep and wake through the same ``mark_waiting`` /
``wait`` / ``wake``, so one count of running threads covers both kinds of wait.
Blocks still run one after another, and shared memory is numba's, unchanged.
"""

import threading
import time

import numpy as np
from numba.cuda.simulator import kernel as stock

from .errors import DeadlockError, WarpDivergenceError, lanes
from .warp import WARP_SIZE, Warp

JOIN_AFTER_ERROR_S = 2.0  # how long a failed block waits for its threads to stop


class Aborted(Exception):
    """Raised in a simulated thread to unwind it once its block has failed."""


class SimThread(stock.BlockThread):
    """One CUDA thread: numba's BlockThread with a lane, a warp and a way to sleep."""

    def __init__(self, f, manager, blockIdx, threadIdx, debug):
        super().__init__(f, manager, blockIdx, threadIdx, debug)
        self.lane = self.thread_id % WARP_SIZE
        self.warp = manager.warps[self.thread_id // WARP_SIZE]
        self._wake = threading.Lock()
        self._wake.acquire()  # held: acquiring it again sleeps until wake() releases it
        self.result = None  # a collective's result, left here by the lane that woke us

    def run(self):
        block = self._manager
        try:
            if block.error is None:
                threading.Thread.run(self)  # calls the kernel
        except Aborted:
            pass
        except Exception as e:  # noqa: BLE001 (any kernel error fails the block, as in numba)
            block.fail(self._with_ids(e), e.__traceback__)
        finally:
            block.exited(self)

    def _with_ids(self, e):
        """The same exception, its message prefixed with tid and ctaid (stock format)."""
        ids = f"tid={list(self.threadIdx)} ctaid={list(self.blockIdx)}"
        msg = f"{ids}: {e}" if str(e) else ids
        try:
            return type(e)(msg)
        except Exception:  # noqa: BLE001 (an exception type that wants other arguments)
            return RuntimeError(f"{type(e).__name__}: {msg}")

    def wait(self):
        """Sleep until another thread calls block.wake(self)."""
        self._wake.acquire()
        if self.abort:
            raise Aborted

    def syncthreads(self):
        self._manager.syncthreads(self)

    # syncthreads_count/_and/_or are numba's (a barrier, a vote, a barrier);
    # only the predicate's type is checked here, as Numba's compiler checks it.

    def syncthreads_count(self, value):
        _check_barrier_predicate("syncthreads_count", value)
        return super().syncthreads_count(value)

    def syncthreads_and(self, value):
        _check_barrier_predicate("syncthreads_and", value)
        return super().syncthreads_and(value)

    def syncthreads_or(self, value):
        _check_barrier_predicate("syncthreads_or", value)
        return super().syncthreads_or(value)


def _check_barrier_predicate(op, value):
    """Numba compiles these for integer predicates only: a bool fails on the GPU."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"cuda.{op}: Numba takes an integer predicate, not "
                        f"{type(value).__name__} (write 1 if cond else 0)")


class BlockManager(stock.BlockManager):
    """Runs one block: starts its threads, then sleeps until they finish or one fails."""

    def __init__(self, f, grid_dim, block_dim, debug):
        super().__init__(f, grid_dim, block_dim, debug)
        bx, by, bz = block_dim
        n = bx * by * bz
        self.lock = threading.Lock()
        self.live = n  # threads not yet returned
        self.running = n  # live threads not asleep
        self.barrier = []  # threads asleep in syncthreads
        self.sleepers = set()  # every thread asleep (barrier or warp collective)
        self.warps = [Warp(self, w, min(WARP_SIZE, n - WARP_SIZE * w))
                      for w in range((n + WARP_SIZE - 1) // WARP_SIZE)]
        self.block_index = None
        self.error = None  # (exception, traceback) of the first failure
        self.done = threading.Event()

    def run(self, grid_point, *args):
        self.block_index = tuple(int(i) for i in grid_point)

        def kernel_call():
            self._f(*args)

        bx, by, bz = self._block_dim
        # Linear thread order (x fastest), so warp 0's lanes start first.
        threads = [SimThread(kernel_call, self, grid_point, (x, y, z), self._debug)
                   for z in range(bz) for y in range(by) for x in range(bx)]
        for t in threads:
            t.start()
        self.done.wait()
        if self.error is not None:
            exc, tb = self.error
            self._let_threads_stop(threads)
            raise exc.with_traceback(tb)

    # -- sleeping and waking (call with self.lock held) ----------------------

    def check_not_failed(self):
        if self.error is not None:
            raise Aborted

    def mark_waiting(self, thread):
        """``thread`` is about to sleep; then it calls thread.wait()."""
        self.sleepers.add(thread)
        self.running -= 1
        if self.running == 0:
            self._fail_locked(DeadlockError(self._deadlock_report()), None)

    def wake(self, thread):
        self.sleepers.discard(thread)
        self.running += 1
        thread._wake.release()

    # -- syncthreads ---------------------------------------------------------

    def syncthreads(self, thread):
        """Sleep until every live thread of the block has reached a syncthreads."""
        warp = thread.warp
        with self.lock:
            self.check_not_failed()
            meeting = warp.waiting_for(thread.lane)
            if meeting is not None:
                raise WarpDivergenceError(
                    f"{warp.name()}, {meeting.label()}: lane {thread.lane} went to "
                    f"syncthreads while the others wait for it ({meeting.status()})")
            self.barrier.append(thread)
            if len(self.barrier) == self.live:
                self._release_barrier()  # we were the last: wake all, don't sleep
                return
            warp.at_barrier |= 1 << thread.lane
            self.mark_waiting(thread)
        thread.wait()

    def _release_barrier(self):
        for t in self.barrier:
            if t in self.sleepers:
                t.warp.at_barrier &= ~(1 << t.lane)
                self.wake(t)
        self.barrier.clear()

    # -- endings -------------------------------------------------------------

    def exited(self, thread):
        """``thread`` returned (or unwound): it no longer counts for any wait."""
        with self.lock:
            self.live -= 1
            self.running -= 1
            if self.error is not None:
                return
            try:
                thread.warp.lane_exited(thread.lane)
            except WarpDivergenceError as e:
                self._fail_locked(thread._with_ids(e), None)
                return
            if self.live == 0:
                self.done.set()
            elif len(self.barrier) == self.live:
                self._release_barrier()  # the others were only waiting for us
            elif self.running == 0:
                self._fail_locked(DeadlockError(self._deadlock_report()), None)

    def fail(self, exc, tb):
        with self.lock:
            self._fail_locked(exc, tb)

    def _fail_locked(self, exc, tb):
        """Keep the first error, wake every sleeper to unwind, release the launcher."""
        if self.error is None:
            self.error = (exc, tb)
        for t in list(self.sleepers):
            t.abort = True
            self.wake(t)
        self.barrier.clear()
        self.done.set()

    def _let_threads_stop(self, threads):
        """Give woken threads a moment to unwind before the next launch reuses state."""
        deadline = time.monotonic() + JOIN_AFTER_ERROR_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _deadlock_report(self):
        """Where the sleeping threads wait, warp by warp. Lock held."""
        lines = []
        for warp in self.warps:
            if warp.at_barrier:
                lines.append(f"  warp {warp.index}, {lanes(warp.at_barrier)}: syncthreads")
            for meeting in warp.pending.values():
                lines.append(f"  warp {warp.index}, {meeting.label()}: {meeting.status()}")
        return (f"block {self.block_index}: deadlock, all {self.live} live threads wait "
                f"and none can go on:\n" + "\n".join(lines))
