"""Extensions to Numba's CUDA simulator (warp intrinsics, a faster barrier).

``install()`` is called by ``flashnumba._device.select()`` when kernels run on
the simulator. It must run before any kernel is launched.
"""


def install():
    """Patch numba's simulator. Placeholder until the warp module lands."""
