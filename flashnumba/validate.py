"""Every check a public call makes before it launches anything, with messages that name the argument.

Each function raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong value) saying which argument, what it got and what it
expects, e.g.

    ValueError: k has head dim 32, expected q's head dim 64
    TypeError: q is float16 but k is float32: q, k and v must share one dtype

The checks read shapes and dtypes only (``interop.Operand``); no data moves.
"""

import math
import numbers
import os
import sys
import warnings

import numpy as np

from flashnumba import dtypes, registry
from flashnumba.interop import Operand, current_device_id


def tensors(**named):
    """Operand for each named input, all of a supported dtype, one dtype, one side (host or device)."""
    operands = [Operand(name, x) for name, x in named.items()]
    for op in operands:
        if op.dtype not in dtypes.SUPPORTED:
            raise TypeError(f"{op.name} has dtype {op.dtype}; expected one of {', '.join(dtypes.SUPPORTED)} "
                            f"(bfloat16 from NumPy as ml_dtypes.bfloat16)")
    first = operands[0]
    for op in operands[1:]:
        if op.on_host != first.on_host:
            where = {True: "on the host", False: "on the device"}
            raise TypeError(f"{first.name} is {where[first.on_host]} ({first.kind}) but {op.name} is "
                            f"{where[op.on_host]} ({op.kind}); pass all tensors on one side")
        if op.dtype != first.dtype:
            names = ", ".join(o.name for o in operands)
            raise TypeError(f"{first.name} is {first.dtype} but {op.name} is {op.dtype}: {names} must "
                            f"share one dtype")
    return operands


def ndim(op, n, layout):
    if op.ndim != n:
        raise ValueError(f"{op.name} must be {n}-D {layout}, got shape {op.shape}")


FLASH_LAYOUT = "(batch, seqlen, nheads, headdim)"
SDPA_LAYOUT = "(batch, nheads, seqlen, headdim)"


class LayoutWarning(UserWarning):
    """The inputs look like the other layout: (batch, nheads, seqlen, headdim) given to
    flash_attn_func, or (batch, seqlen, nheads, headdim) to scaled_dot_product_attention."""


def _check_layout(q, k, layout, Nq, Nk, Hq, Hkv):
    """Warn when both q and k have more heads than sequence positions, as read in `layout`:
    the tell of the two middle axes swapped (head counts are small, sequences rarely shorter)."""
    if not (Hq > Nq and Hkv > Nk):
        return
    if layout == FLASH_LAYOUT:
        other, fix = SDPA_LAYOUT, ("transpose the middle axes (q.transpose(1, 2)) or call "
                                   "flashnumba.scaled_dot_product_attention")
    else:
        other, fix = FLASH_LAYOUT, "transpose the middle axes or call flashnumba.flash_attn_func"
    warnings.warn(
        f"{q.name} {q.shape} and {k.name} {k.shape} read as {layout} have more heads than "
        f"sequence positions ({Hq} heads, {Nq} positions; {Hkv} and {Nk}): they look like "
        f"{other}. This call takes {layout}: {fix}. If the sequences really are that short, "
        f"filter flashnumba.LayoutWarning.", LayoutWarning, stacklevel=_caller_level())


def _caller_level():
    """warnings.warn's stacklevel of the first frame outside flashnumba (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1          # our caller: level 1 for warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def attention_shapes(q, k, v, layout=FLASH_LAYOUT):
    """(B, Nq, Nk, Hq, Hkv, d) of q (B, Nq, Hq, d), k and v (B, Nk, Hkv, d), or of
    q (B, Hq, Nq, d), k, v (B, Hkv, Nk, d) with layout=SDPA_LAYOUT."""
    for op in (q, k, v):
        ndim(op, 4, layout)
    seq, heads = (1, 2) if layout == FLASH_LAYOUT else (2, 1)
    B, Nq, Hq, d = q.shape[0], q.shape[seq], q.shape[heads], q.shape[3]
    Bk, Nk, Hkv, dk = k.shape[0], k.shape[seq], k.shape[heads], k.shape[3]
    _check_layout(q, k, layout, Nq, Nk, Hq, Hkv)
    if v.shape != k.shape:
        raise ValueError(f"{v.name} has shape {v.shape}, expected {k.name}'s shape {k.shape} "
                         f"(same batch, seqlen, nheads and headdim)")
    if Bk != B:
        raise ValueError(f"{k.name} has batch {Bk}, expected {q.name}'s batch {B}")
    if dk != d:
        raise ValueError(f"{k.name} has head dim {dk}, expected {q.name}'s head dim {d}")
    if B < 1:
        raise ValueError(f"{q.name} has batch {B}; expected at least 1")
    if Nq < 1 or Nk < 1:
        raise ValueError(f"sequence lengths must be at least 1; got seqlen_q={Nq}, seqlen_k={Nk}")
    if Hq < 1 or Hkv < 1:
        raise ValueError(f"head counts must be at least 1; got nheads_q={Hq}, nheads_kv={Hkv}")
    if Hq % Hkv != 0:
        raise ValueError(f"nheads_q={Hq} must be a multiple of nheads_kv={Hkv} (grouped-query attention)")
    if not 1 <= d <= registry.MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported; expected 1 <= headdim <= {registry.MAX_HEAD_DIM}")
    return B, Nq, Nk, Hq, Hkv, d


def deterministic(value, name, d):
    """The deterministic flag, checked against the head dims of the version whose backward
    serves it (registry: deterministic_backward) for algorithm `name`."""
    value = flag("deterministic", value)
    if value:
        version = registry.version(registry.version(name).deterministic_backward)
        if not version.serves_head_dim(d):
            raise ValueError(f"deterministic=True runs the backward of algorithm={version.name!r}, which "
                             f"serves head dims up to {version.max_head_dim}, got headdim {d}; pass "
                             f"deterministic=False (dQ added with atomics) for head dims above "
                             f"{version.max_head_dim}")
    return value


def like(op, shape, what):
    if op.shape != tuple(shape):
        raise ValueError(f"{op.name} must have shape {tuple(shape)} ({what}), got {op.shape}")


def flag(name, value):
    """A bool (Python or NumPy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def scale(softmax_scale, d, name="softmax_scale"):
    """1/sqrt(d) for None, else a finite real number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"{name} must be a finite number or None, got {softmax_scale!r}")
    value = float(softmax_scale)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number or None, got {softmax_scale!r}")
    return value


_CAPABILITY = {}   # device id -> (major, minor): asked of Numba once per GPU


def compute_capability():
    """(major, minor) of the current GPU; None on the simulator (it runs every version)."""
    from numba import config, cuda
    if config.ENABLE_CUDASIM:
        return None
    device_id = current_device_id()
    if device_id not in _CAPABILITY:
        _CAPABILITY[device_id] = tuple(cuda.gpus[device_id].compute_capability)
    return _CAPABILITY[device_id]


def algorithm_name(name):
    """A version name of flashnumba.registry (not checked against dtypes or the device)."""
    if not isinstance(name, str):
        raise TypeError(f"algorithm must be a string or None, got {name!r}")
    return registry.version(name).name


def algorithm(name, dtype=dtypes.FLOAT32, d=None):
    """A version name of flashnumba.registry that can run inputs of `dtype` and head dim d;
    None: ``registry.default`` (the tensor-core version for float16 and bfloat16 where it can
    run, else registry.DEFAULT)."""
    cc = compute_capability()
    if name is None:
        return registry.default(dtype, d, cc)
    version = registry.version(algorithm_name(name))
    if not version.takes(dtype):
        raise ValueError(f"algorithm={name!r} takes inputs of dtype {' or '.join(version.dtypes)}, "
                         f"got {dtype}; pass algorithm=None to choose by dtype")
    if d is not None and not version.serves_head_dim(d):
        raise ValueError(f"algorithm={name!r} serves head dims up to {version.max_head_dim}, got "
                         f"headdim {d}; pass algorithm=None to choose by head dim")
    if not version.runs_on(cc):
        need = ".".join(map(str, version.min_compute_capability))
        raise ValueError(f"algorithm={name!r} needs a GPU of compute capability >= {need}, this one "
                         f"is {'.'.join(map(str, cc))}; pass algorithm=None to choose by device")
    return version.name


def window_size(value):
    """flash-attn's (left, right): two integers, each -1 (unbounded) or >= 0. A side wider than
    the sequence is allowed (as in flash-attn): it hides nothing."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of integers, -1 for unbounded; "
                        f"got {value!r}")
    for side, x in zip(("left", "right"), value):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"window_size {side} must be an integer (-1 for unbounded), got {x!r}")
        if x < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {x}")
    return int(value[0]), int(value[1])


def softcap(value):
    """softcap: a finite number >= 0 (0: no softcap)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"softcap must be a number >= 0 (0 for none), got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 for none), got {value!r}")
    return float(value)


def alibi_slopes(value, B, Hq):
    """alibi_slopes of shape (nheads,) or (batch, nheads), float32, any side; returned as a host
    float32 (B, Hq) array (a few bytes: the kernels take a device copy)."""
    if value is None:
        return None
    op = Operand("alibi_slopes", value)
    if op.dtype != "float32":
        raise TypeError(f"alibi_slopes must be float32 (as flash-attn requires), got {op.dtype}")
    if op.shape not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}) (nheads,) or "
                         f"(batch, nheads), got {op.shape}")
    host = _to_host(op)
    if not np.all(np.isfinite(host)):
        raise ValueError("alibi_slopes must be finite")
    return np.ascontiguousarray(np.broadcast_to(host, (B, Hq)), dtype=np.float32)


def _to_host(op):
    x = op.value
    if op.kind == "numpy":
        return np.asarray(x, dtype=np.float32)
    if op.kind in ("torch", "torch-cpu"):
        return x.detach().cpu().numpy().astype(np.float32)
    return op.device_bits().copy_to_host().astype(np.float32)
