"""Extensions to Numba's CUDA simulator, so the same kernel source runs there and on a GPU.

Numba's simulator (NUMBA_ENABLE_CUDASIM=1) runs each CUDA thread of a block
as a Python thread and hands the kernel a fake ``cuda`` module. Out of the
box it lacks every warp intrinsic and implements ``syncthreads`` by polling,
slowly. ``install()`` patches it in place:

- block.py     runs a block with a sleeping barrier and counts of live and
               running threads instead of a polling loop; detects deadlocks.
- warp.py      the per-warp rendezvous that warp collectives meet at, and
               the checks that turn a would-be hang into an error.
- intrinsics.py  syncwarp, shfl_*_sync, ballot/all/any/eq_sync,
               match_*_sync, activemask, lanemask_lt, with the GPU's rules.
- shared.py    cuda.shared.array finding its caller's line without walking
               the whole stack (same arrays, a fraction of the cost).
- errors.py    WarpDivergenceError and DeadlockError.
- access.py    who read and wrote what: per-thread access counts and a race
               check on shared memory, for the course's graders and pictures
               (``access.traced()``, used on demand, not by ``install()``).
- bench.py     times barriers and shuffles, stock against patched.

``flashnumba._device.select()`` calls ``install()`` right after choosing the
simulator, before numba is first imported. ``install()`` may be called again
(it does nothing the second time); ``uninstall()`` restores the stock
simulator, for comparisons.
"""

import sys

# How often Python forces a thread switch. Numba's polling barrier ran 3-5x
# faster at 1e-3 or 2e-4 than at Python's 5e-3. Here threads hand the GIL over
# themselves by sleeping at each barrier or collective, and forced switches are
# pure overhead: bench.py measured 5e-3 best (2e-2 the same, 1e-3 up to 1.3x
# slower, 2e-4 2-3x slower). Set explicitly, in case something changed it.
SWITCH_INTERVAL_S = 5e-3

_stock = None  # what install() replaced, so uninstall() can put it back


def installed():
    return _stock is not None


def install(switch_interval=SWITCH_INTERVAL_S):
    """Patch numba's CUDA simulator (idempotent)."""
    global _stock
    if _stock is not None:
        return
    from numba.cuda.simulator import kernel, kernelapi

    from . import shared
    from .block import BlockManager
    from .intrinsics import METHODS

    fake_cuda = kernelapi.FakeCUDAModule
    _stock = {
        "BlockManager": kernel.BlockManager,
        "methods": {name: fake_cuda.__dict__.get(name) for name in METHODS},
        "switch_interval": sys.getswitchinterval(),
    }
    kernel.BlockManager = BlockManager  # FakeCUDAKernel looks it up at each launch
    for name, method in METHODS.items():
        setattr(fake_cuda, name, method)
    _stock["shared_array"] = shared.patch(kernelapi.FakeCUDAShared)
    sys.setswitchinterval(switch_interval)


def uninstall():
    """Put the stock simulator back (for benchmarks and tests of the patch itself)."""
    global _stock
    if _stock is None:
        return
    from numba.cuda.simulator import kernel, kernelapi

    fake_cuda = kernelapi.FakeCUDAModule
    kernel.BlockManager = _stock["BlockManager"]
    kernelapi.FakeCUDAShared.array = _stock["shared_array"]
    for name, method in _stock["methods"].items():
        if method is None:
            delattr(fake_cuda, name)
        else:
            setattr(fake_cuda, name, method)
    sys.setswitchinterval(_stock["switch_interval"])
    _stock = None
