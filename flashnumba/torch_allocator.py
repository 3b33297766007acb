"""Numba's device memory from PyTorch's caching allocator, when the inputs are torch CUDA tensors.

Numba's own memory manager calls cuMemAlloc for every device array and frees
them in batches with cuMemFree, which waits for the device: a call that
allocates its outputs and scratch (O, L, D_i, dQ, dK, dV, widened copies) pays
for allocations and, every few calls, a synchronisation. PyTorch keeps freed
blocks in a cache and hands them out again without the driver.

Numba takes an External Memory Management (EMM) plugin for this
(``numba.cuda.set_memory_manager``), but only before it creates its CUDA
context, which it does once per process. ``install()`` is called when the first
torch CUDA tensor reaches flashnumba (``interop``): if numba has made no context
yet, every numba allocation from then on comes from torch's allocator. If numba
already has a context, or another plugin was chosen, nothing changes. Blocks
are taken for the default stream, where numba launches, whatever stream torch
is on: torch reuses a freed block only for work ordered after numba's kernels.
FLASHNUMBA_TORCH_ALLOCATOR=0 turns this off.

Only a caller holding a torch tensor calls ``install()``: the core never imports torch.
"""

import os

_installed = None   # None: not decided yet; True / False: whether TorchMemoryManager is numba's


def _plugin_class():
    """The EMM plugin class (defined on first use: it needs torch and numba's real CUDA target)."""
    import ctypes
    import weakref

    import torch
    from numba import cuda
    from numba.cuda.cudadrv import driver

    class TorchMemoryManager(cuda.GetIpcHandleMixin, cuda.HostOnlyCUDAMemoryManager):
        """Device allocations from torch's caching allocator, on the default stream (numba's
        launches run there, so torch hands a block out again only after they are done with it);
        the block returns to torch's cache when numba's array is collected."""

        def initialize(self):
            self.stream = torch.cuda.default_stream(self.context.device.id)

        def memalloc(self, size):
            # As numba's own manager: an AutoFreePointer kept in self.allocations while any
            # array or view of it lives (views hold only weak references to it), freed when
            # the last goes; the caller gets an owned reference.
            address = torch.cuda.caching_allocator_alloc(max(int(size), 1), self.context.device.id,
                                                         self.stream)
            allocations = self.allocations

            def release():
                allocations.pop(address, None)
                torch.cuda.caching_allocator_delete(address)

            memory = driver.AutoFreePointer(weakref.proxy(self.context), ctypes.c_void_p(address),
                                            size, finalizer=release)
            allocations[address] = memory
            return memory.own()

        def get_memory_info(self):
            free, total = torch.cuda.mem_get_info(self.context.device.id)
            return cuda.MemoryInfo(free=free, total=total)

        @property
        def interface_version(self):
            return 1                              # the EMM plugin interface numba-cuda takes

    return TorchMemoryManager


def install():
    """Make torch's allocator numba's, if numba has no CUDA context yet. True when it is."""
    global _installed
    if _installed is not None:
        return _installed
    _installed = False
    if os.environ.get("FLASHNUMBA_TORCH_ALLOCATOR", "1") == "0":
        return False
    from numba import config
    if config.ENABLE_CUDASIM:
        return False             # the simulator has no device memory to manage
    from numba.cuda.cudadrv import driver
    if getattr(driver, "_memory_manager", "unknown") is not None:
        return False             # numba made its context (or chose a plugin): too late, keep it
    from numba import cuda
    cuda.set_memory_manager(_plugin_class())
    _installed = True
    return True
