"""flashnumba: FlashAttention 1 and 2 in Python with Numba CUDA.

Importing flashnumba first decides where kernels run (a CUDA GPU if present,
else Numba's CUDA simulator, extended with warp intrinsics, patched in when
numba.cuda is first imported); see ``flashnumba.device()``. The public calls
(``flash_attn_func``,
``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``,
``flash_attn_backward``, ``scaled_dot_product_attention``) live in
``flashnumba.api``, the packed-batch calls (``flash_attn_varlen_func`` and its
packed variants) in ``flashnumba.varlen``, ``flash_attn_with_kvcache`` in
``flashnumba.kvcache``; all are loaded on first use, so ``import flashnumba`` stays
light.
"""

from flashnumba._device import device, on_simulator
from flashnumba._device import select as _select

_select()

__version__ = "0.1.0"
_API = ("flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
        "flash_attn_backward", "scaled_dot_product_attention")
_VARLEN = ("flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_backward")
_KVCACHE = ("flash_attn_with_kvcache",)
__all__ = ["device", "on_simulator", "__version__", "LayoutWarning",  # noqa: PLE0604
           *_API, *_VARLEN, *_KVCACHE]


def __getattr__(name):
    if name in _API:
        from flashnumba import api
        return getattr(api, name)
    if name == "LayoutWarning":
        from flashnumba.validate import LayoutWarning
        return LayoutWarning
    if name in _VARLEN:
        from flashnumba import varlen
        return getattr(varlen, name)
    if name in _KVCACHE:
        from flashnumba import kvcache
        return getattr(kvcache, name)
    raise AttributeError(f"module 'flashnumba' has no attribute {name!r}")
