"""Attention on checked operands: the chosen version's kernels, between the public calls and the kernels.

    call = Call(...)                                 the scalar options, checked (api._call builds it)
    out, softmax_lse, S_dmask = forward(operands, call, with_dmask)
    dq, dk, dv = backward(operands, call)            operands: dout, q, k, v, out, softmax_lse

Operands are ``interop.Operand``s (any array kind, float32, float16 or
bfloat16). A version whose kernels read the inputs' dtype (``Version.dtypes``:
fa2_tc reads float16 and bfloat16) gets their bits as they are; otherwise they
are widened to float32 on the device (``kernels.cast``). They run through the
kernels of the version ``call.algorithm`` names (``flashnumba.registry``), and
the results come back in the inputs' kind and dtype. Torch CUDA tensors take the
version's fast launch path where it has one and takes their dtype and head dim
(``fast_kernels``: fa2_fast's ``fast_forward`` and ``fast_backward`` for float32,
fa2_tc's for float16 and bfloat16): the same kernels and arguments, launched
through ``kernels.launch`` with torch's allocator, with none of numba's per-call
work. Both ``flashnumba.api`` (the public calls) and
``flashnumba.torch.function`` (autograd) call these, so neither imports the
other.
"""

import functools
from dataclasses import dataclass, field

import numpy as np
from numba import config as numba_config
from numba import cuda

from flashnumba import dtypes, registry
from flashnumba.interop import Results, torch_tensors
from flashnumba.kernels import dropout_mask as dmask
from flashnumba.kernels import launch, quiet
from flashnumba.kernels.common import resolve_offset


@dataclass(frozen=True)
class Call:
    """The scalar options of one attention call, checked."""
    scale: float
    dropout_p: float
    seed: int
    causal: bool
    alignment: str
    algorithm: str            # a version name of flashnumba.registry
    deterministic: bool
    window_size: tuple = (-1, -1)     # flash-attn's (left, right), -1 unbounded
    softcap: float = 0.0              # 0: none
    alibi_slopes: object = field(default=None, compare=False)   # host float32 (B, Hq) or None

    @functools.cached_property          # a Call is kept and reused (api._call): made once
    def features(self):
        """The options beyond plain attention this call uses, by flash-attn's names."""
        return tuple(name for name, used in (("window_size", self.window_size != (-1, -1)),
                                             ("softcap", self.softcap > 0.0),
                                             ("alibi_slopes", self.alibi_slopes is not None)) if used)

    def kernel_options(self):
        """The kernels' keyword options (read only: one dict for the Call's life)."""
        return self._kernel_options

    @functools.cached_property
    def _kernel_options(self):
        options = dict(causal=self.causal, alignment=self.alignment, softmax_scale=self.scale,
                       dropout_p=self.dropout_p, seed=self.seed)
        if self.features:         # only kernels that declare FEATURES take these
            options.update(window_size=self.window_size, softcap=self.softcap,
                           alibi_slopes=self.alibi_slopes)
        return options


def _missing(call, module):
    """The options of `call` (flash-attn's names) that a kernel module's FEATURES do not declare."""
    return [f for f in call.features if f not in getattr(module, "FEATURES", ())]


def lacks_features(call, version):
    """True when `version`'s forward or backward kernels lack one of `call`'s options: the public
    calls then run the default version instead, when no algorithm was named."""
    return any(_missing(call, version.module(direction)) for direction in registry.DIRECTIONS)


def _kernel_module(call, version, direction):
    """The version's kernel module; a ValueError naming the algorithm when it lacks a feature."""
    module = version.module(direction)
    missing = _missing(call, module)
    if missing:
        raise ValueError(f"algorithm={version.name!r} does not implement {', '.join(missing)} "
                         f"({direction}); use algorithm={registry.DEFAULT!r} (the default), whose "
                         f"kernels do")
    return module


def reads_natively(version, dtype):
    """True when `version`'s kernels read 16-bit `dtype` inputs as they are (no widening)."""
    return dtype != dtypes.FLOAT32 and version.reads(dtype)


def device_inputs(version, operands):
    """The operands as `version`'s kernels read them, and the keyword options that say their dtype:
    16-bit bits for a version that reads the dtype, else float32 (widened on the device)."""
    dtype = operands[1].dtype if len(operands) > 3 else operands[0].dtype   # q's
    if reads_natively(version, dtype):
        return [op.device_bits() if op.dtype != dtypes.FLOAT32 else op.device_f32()
                for op in operands], {"dtype": dtype}
    return [op.device_f32() for op in operands], {}


def fast_kernels(module, direction, operands):
    """The module's fast launch path (``fast_forward`` / ``fast_backward``) when these operands
    can take it, else None: torch CUDA tensors on a GPU, a module that has one, and q's dtype and
    head dim ones its ``fast_takes`` accepts (fa2_fast: float32; fa2_tc: float16 and bfloat16 at
    a bucket's own head dim), the other operands in q's dtype (softmax_lse: float32). It
    launches the same kernels with the same arguments (``flashnumba.kernels.launch``) without
    numba's per-call typing, wrapping and allocation; everything else takes the dispatcher path
    (FLASHNUMBA_FAST_LAUNCH=0: always)."""
    if not launch.ENABLED or numba_config.ENABLE_CUDASIM:      # the simulator has no cufunc
        return None
    fast = getattr(module, f"fast_{direction}", None)
    if fast is None or any(op.kind != "torch" for op in operands):
        return None
    if direction == registry.BACKWARD:                   # dout, q, k, v, out; softmax_lse
        *tensors, lse = operands
        if lse.dtype != dtypes.FLOAT32:
            return None
    else:
        tensors = operands
    q = tensors[1] if direction == registry.BACKWARD else tensors[0]
    if any(op.dtype != q.dtype for op in tensors) or not module.fast_takes(q.dtype, q.shape[-1]):
        return None
    return fast


def forward_kernels(call, operands):
    """(O, L, native) on the device for q, k, v operands in flash layout: O float32, or in the
    inputs' dtype when `native` (the version read them as they are), L float32."""
    version = registry.version(call.algorithm)
    inputs, dtype_option = device_inputs(version, operands)
    O, L = _kernel_module(call, version, registry.FORWARD).forward(
        *inputs, **dtype_option, **call.kernel_options())
    return O, L, bool(dtype_option)


def backward_kernels(call, operands):
    """(dQ, dK, dV, native) on the device for operands dout, q, k, v, out, softmax_lse;
    deterministic=True runs the version's ``deterministic_backward``."""
    version = _backward_version(call)
    inputs, dtype_option = device_inputs(version, operands)
    grads = _kernel_module(call, version, registry.BACKWARD).backward(
        *inputs, deterministic=call.deterministic, **dtype_option, **call.kernel_options())
    return (*grads, bool(dtype_option))


def _backward_version(call):
    version = registry.version(call.algorithm)
    if call.deterministic:
        version = registry.version(version.deterministic_backward)
    return version


def dropout_mask_kernel(call, Q, K, L):
    """S_dmask (B, Hq, Nq, Nk) float32: P with the dropped entries negated (Q, K float32)."""
    B, Nq, Hq, _ = Q.shape
    Nk = K.shape[1]
    S = cuda.device_array((B, Hq, Nq, Nk), dtype=np.float32)
    offset = resolve_offset(call.causal, call.alignment, Nq, Nk)
    dmask.dropout_mask[dmask.blocks(S.size), dmask.THREADS](
        Q, K, L, S, np.float32(call.scale), call.causal, offset, np.float64(call.dropout_p),
        np.uint64(call.seed))
    return S


def forward(operands, call, with_dmask):
    """(out, softmax_lse, S_dmask) in the inputs' kind; out and S_dmask in their dtype, lse float32.
    S_dmask is None without dropout or unless `with_dmask`."""
    q, k, _ = operands
    if not (with_dmask and call.dropout_p > 0.0):     # S_dmask's kernel reads numba's arrays
        module = _kernel_module(call, registry.version(call.algorithm), registry.FORWARD)
        fast = fast_kernels(module, registry.FORWARD, operands)
        if fast is not None:
            out, L = fast(*torch_tensors(operands), **call.kernel_options())
            return out, L, None
    with quiet.launches():
        O, L, native = forward_kernels(call, operands)
        results = Results(q)
        S_dmask = None
        if with_dmask and call.dropout_p > 0.0:
            if call.features:
                raise ValueError(f"return_attn_probs=True with dropout does not take "
                                 f"{', '.join(call.features)}: the S_dmask kernel draws plain "
                                 f"attention's probabilities")
            S_dmask = results.give(dropout_mask_kernel(call, q.device_f32(), k.device_f32(), L))
        out = results.give_bits(O) if native else results.give(O)
        return out, results.give(L, "float32"), S_dmask


def backward(operands, call):
    """(dq, dk, dv) in the inputs' kind and dtype; operands are dout, q, k, v, out, softmax_lse."""
    module = _kernel_module(call, _backward_version(call), registry.BACKWARD)
    fast = fast_kernels(module, registry.BACKWARD, operands)
    if fast is not None:
        return fast(*torch_tensors(operands), **call.kernel_options())
    with quiet.launches():
        *grads, native = backward_kernels(call, operands)
        results = Results(operands[1])
        return tuple(results.give_bits(g) if native else results.give(g) for g in grads)
