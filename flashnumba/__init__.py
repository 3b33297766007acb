"""flashnumba: FlashAttention 1 and 2 in Python with Numba CUDA.

Importing flashnumba first decides where kernels run (a CUDA GPU if present,
else Numba's CUDA simulator, extended with warp intrinsics); see
``flashnumba.device()``.
"""

from flashnumba._device import device, on_simulator, select as _select

_select()

__version__ = "0.1.0"
__all__ = ["device", "on_simulator", "__version__"]
