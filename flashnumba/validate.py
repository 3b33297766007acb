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

import numpy as np

from flashnumba import dtypes, registry
from flashnumba.interop import Operand
from flashnumba.kernels.common import MAX_HEAD_DIM


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


def attention_shapes(q, k, v, layout=FLASH_LAYOUT):
    """(B, Nq, Nk, Hq, Hkv, d) of q (B, Nq, Hq, d), k and v (B, Nk, Hkv, d), or of
    q (B, Hq, Nq, d), k, v (B, Hkv, Nk, d) with layout=SDPA_LAYOUT."""
    for op in (q, k, v):
        ndim(op, 4, layout)
    seq, heads = (1, 2) if layout == FLASH_LAYOUT else (2, 1)
    B, Nq, Hq, d = q.shape[0], q.shape[seq], q.shape[heads], q.shape[3]
    Bk, Nk, Hkv, dk = k.shape[0], k.shape[seq], k.shape[heads], k.shape[3]
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
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported; expected 1 <= headdim <= {MAX_HEAD_DIM}"
                         + (" (head dims up to 256 run in flash_attn_with_kvcache only: the fast kernels' "
                            "shared and register tiles do not fit d = 256 in 48 KB and 255 registers)"
                            if d > MAX_HEAD_DIM else ""))
    return B, Nq, Nk, Hq, Hkv, d


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


def algorithm(name):
    """A version name of flashnumba.registry; None: registry.DEFAULT."""
    if name is None:
        return registry.DEFAULT
    if not isinstance(name, str):
        raise TypeError(f"algorithm must be a string or None, got {name!r}")
    return registry.version(name).name


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
