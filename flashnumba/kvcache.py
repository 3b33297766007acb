"""flash-attn's ``flash_attn_with_kvcache``: decoding against a KV cache, forward only.

    out = flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                                  rotary_sin=None, cache_seqlens=None, cache_batch_idx=None, ...)

q (B, Nq, Hq, d); k_cache, v_cache (B_cache, S, Hkv, d). What happens, in order:

1. ``rotary_cos``, ``rotary_sin`` (S', rotary_dim / 2), when given, rotate the first
   rotary_dim dims of the new k at positions cache_seqlens[b] + i and of q at
   cache_seqlens[b] + i under causal or a window, else at cache_seqlens[b]
   (flash-attn's rule); interleaved (pairs 2i, 2i + 1) or not (halves).
2. The new k, v (B, Nnew, Hkv, d), when given, are written into the caches in place at
   rows cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1 of cache batch cache_batch_idx[b]
   (NumPy arrays and device arrays alike).
3. q attends to the first cache_seqlens[b] + Nnew keys of its cache row, with causal,
   window_size, softcap and alibi_slopes as ``flash_attn_func`` (bottom-right).
   The keys are split across blocks (``kernels.split_kv``) and the partial results
   merged by their log-sum-exps; ``num_splits`` = 0 lets ``split_kv.num_splits_heuristic``
   choose (ours, for that kernel: enough blocks of B * Hkv per split to fill the GPU).

cache_seqlens: an int or an int32 (B,) array (None: the whole cache, S keys);
cache_batch_idx: int32 (B,) rows of the cache (None: row b for batch b).
Returns out (B, Nq, Hq, d) in q's dtype, and with return_softmax_lse=True also
softmax_lse (B, Hq, Nq) float32. Paged caches (block_table) and cache_leftpad are
not implemented: passing them raises.
"""

import sys

import numpy as np
from numba import cuda

from flashnumba import validate
from flashnumba.interop import Operand, Results
from flashnumba.kernels import split_kv

KEYS_PER_BLOCK = 64          # the key-block size the num_splits heuristic counts in (4 per split at least)


def _host_int32(name, x, B):
    """An int32 (B,) array from NumPy, PyTorch or a device array, on the host."""
    op = Operand(name, x)
    if op.kind == "numpy":
        host = np.asarray(x)
    elif op.kind in ("torch", "torch-cpu"):
        host = x.detach().cpu().numpy()
    elif op.kind == "numba":
        host = x.copy_to_host()
    else:
        host = cuda.as_cuda_array(x).copy_to_host()
    if host.dtype != np.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn requires), got {host.dtype}")
    if host.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},) (batch,), got {host.shape}")
    return host.astype(np.int64)


def _cache_seqlens(cache_seqlens, B, S):
    if cache_seqlens is None:
        return np.full(B, S, dtype=np.int64)
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        return np.full(B, int(cache_seqlens), dtype=np.int64)
    return _host_int32("cache_seqlens", cache_seqlens, B)


def _rotate(x, cos, sin, positions, interleaved):
    """x (B, N, H, d) float64 with its first rotary_dim dims rotated at positions (B, N)."""
    half = cos.shape[1]
    c = cos[positions][:, :, None, :]                # (B, N, 1, rotary_dim / 2)
    s = sin[positions][:, :, None, :]
    x = x.copy()
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2] = x1 * c - x2 * s
        x[..., 1:2 * half:2] = x1 * s + x2 * c
    else:
        x1, x2 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half] = x1 * c - x2 * s
        x[..., half:2 * half] = x1 * s + x2 * c
    return x


def _to_host(op):
    """An operand's values on the host as float64 (q and the new k are small when decoding)."""
    x = op.value
    if op.kind == "numpy":
        return np.asarray(x, dtype=np.float64)
    if op.kind in ("torch", "torch-cpu"):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return op.device_f32().copy_to_host().astype(np.float64)


def _like(op, host):
    """host values back as op's kind and dtype (a new array)."""
    dtype = op.value.dtype
    if op.kind == "numpy":
        return host.astype(dtype)
    if op.kind in ("torch", "torch-cpu"):
        torch = sys.modules["torch"]
        return torch.from_numpy(host.astype(np.float32)).to(device=op.value.device, dtype=dtype)
    if op.kind == "numba":
        return cuda.to_device(host.astype(dtype))
    raise TypeError(f"{op.name}: rotary embeddings take NumPy, PyTorch or Numba arrays, got {op.kind}")


def _append(cache, new, rows, starts):
    """cache[rows[b], starts[b]:starts[b] + Nnew] = new[b], in place, on the cache's side."""
    n_new = new.shape[1]
    kind = Operand("cache", cache).kind
    for b in range(new.shape[0]):
        r, s0 = int(rows[b]), int(starts[b])
        if kind in ("numpy", "torch", "torch-cpu", "cupy"):
            cache[r, s0:s0 + n_new] = new[b]
        elif kind == "numba":
            piece = new[b] if Operand("k", new).kind == "numba" else cuda.to_device(np.ascontiguousarray(new[b]))
            cache[r, s0:s0 + n_new].copy_to_device(piece)
        else:
            raise TypeError(f"k_cache must be a NumPy array, a PyTorch tensor, a CuPy or Numba device "
                            f"array to be written in place; got {kind}")


def _check_cache(q, k_cache, v_cache):
    for op in (q, k_cache, v_cache):
        validate.ndim(op, 4, validate.FLASH_LAYOUT)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {v_cache.shape}, expected k_cache's shape {k_cache.shape}")
    B, N_q, H_q, d = q.shape
    B_cache, S, H_kv, d_k = k_cache.shape
    if d_k != d:
        raise ValueError(f"k_cache has head dim {d_k}, expected q's head dim {d}")
    if H_kv < 1 or H_q % H_kv != 0:
        raise ValueError(f"nheads_q={H_q} must be a multiple of the cache's nheads_kv={H_kv}")
    split_kv.head_dim_bucket(d)
    return B, N_q, H_q, B_cache, S, H_kv, d


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """See the module docstring. Forward only (as flash-attn's)."""
    if block_table is not None:
        raise ValueError("block_table (a paged KV cache) is not implemented by flashnumba; pass "
                         "block_table=None and a contiguous cache (B_cache, seqlen, nheads_kv, headdim)")
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad is not implemented by flashnumba; pass cache_leftpad=None")
    ops = validate.tensors(q=q, k_cache=k_cache, v_cache=v_cache)
    B, _, H_q, B_cache, S, H_kv, d = _check_cache(*ops)
    causal = validate.flag("causal", causal)
    window = validate.window_size(window_size)
    cap = validate.softcap(softcap)
    scale = validate.scale(softmax_scale, d)
    slopes = validate.alibi_slopes(alibi_slopes, B, H_q)
    return_softmax_lse = validate.flag("return_softmax_lse", return_softmax_lse)
    rotary_interleaved = validate.flag("rotary_interleaved", rotary_interleaved)
    if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or num_splits < 0:
        raise ValueError(f"num_splits must be an integer >= 0 (0: chosen by a heuristic), got {num_splits!r}")

    starts = _cache_seqlens(cache_seqlens, B, S)
    rows = np.arange(B) if cache_batch_idx is None else _host_int32("cache_batch_idx", cache_batch_idx, B)
    if (rows < 0).any() or (rows >= B_cache).any():
        raise ValueError(f"cache_batch_idx must index the cache's batch 0 .. {B_cache - 1}, got {rows}")
    if (starts < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got {starts}")

    n_new = 0
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new tokens) or neither")
    if k is not None:
        new = validate.tensors(q=q, k=k, v=v)[1:]
        for op in new:
            validate.like(op, (B, op.shape[1], H_kv, d), "(batch, seqlen_new, nheads_kv, headdim)")
        if new[1].shape != new[0].shape:
            raise ValueError(f"v has shape {new[1].shape}, expected k's shape {new[0].shape}")
        n_new = new[0].shape[1]
        if (starts + n_new > S).any():
            b = int(np.argmax(starts + n_new > S))
            raise ValueError(f"the cache is too short: batch {b} has cache_seqlens {starts[b]} + "
                             f"{n_new} new tokens > the cache's {S} rows")
    elif (starts > S).any():
        raise ValueError(f"cache_seqlens {starts} exceed the cache's {S} rows")

    q_rotated = q
    if rotary_cos is not None or rotary_sin is not None:
        q_rotated, k = _apply_rotary(ops[0], k, rotary_cos, rotary_sin, starts, n_new, causal, window,
                                     rotary_interleaved)
    if k is not None:
        _append(k_cache, k, rows, starts)
        _append(v_cache, v, rows, starts)

    seqlens_k = starts + n_new
    if causal:
        window = (window[0], 0)
    num_key_blocks = max(1, -(-int(seqlens_k.max()) // KEYS_PER_BLOCK))
    if num_splits == 0:
        num_splits = split_kv.num_splits_heuristic(B * H_kv, _sm_count(), num_key_blocks)
    num_splits = max(1, min(int(num_splits), split_kv.MAX_SPLITS,
                            -(-max(1, int(seqlens_k.max())) // split_kv.SPLIT_KEYS)))

    q_op = Operand("q", q_rotated)
    Q = q_op.device_f32()
    K, V = ops[1].device_f32(), ops[2].device_f32()     # float32 caches: the same memory, no copy
    O_part, L_part = split_kv.partials(
        Q, K, V, cuda.to_device(rows.astype(np.int32)), cuda.to_device(seqlens_k.astype(np.int32)),
        num_splits, split_kv.keys_per_split(max(1, int(seqlens_k.max())), num_splits), scale, window, cap,
        None if slopes is None else cuda.to_device(slopes))
    out, L = split_kv.merged(O_part, L_part)
    results = Results(ops[0])
    out = results.give(out)
    return (out, results.give(L, "float32")) if return_softmax_lse else out


def _apply_rotary(q_op, k, rotary_cos, rotary_sin, starts, n_new, causal, window, interleaved):
    """(q rotated, k rotated) as new arrays of their kinds; flash-attn's positions."""
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    cos = _to_host(Operand("rotary_cos", rotary_cos))
    sin = _to_host(Operand("rotary_sin", rotary_sin))
    d = q_op.shape[3]
    if cos.ndim != 2 or cos.shape != sin.shape or 2 * cos.shape[1] > d:
        raise ValueError(f"rotary_cos and rotary_sin must be (seqlen, rotary_dim / 2) with rotary_dim <= "
                         f"headdim {d}, the same shape; got {cos.shape} and {sin.shape}")
    N_q = q_op.shape[1]
    moving = causal or window != (-1, -1)
    q_pos = starts[:, None] + (np.arange(N_q)[None, :] if moving else 0 * np.arange(N_q)[None, :])
    last = int(max(q_pos.max(), (starts + n_new - 1).max() if n_new else 0))
    if last >= cos.shape[0]:
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions but position {last} is needed")
    q_new = _like(q_op, _rotate(_to_host(q_op), cos, sin, q_pos, interleaved))
    if k is None:
        return q_new, None
    k_op = Operand("k", k)
    k_pos = starts[:, None] + np.arange(n_new)[None, :]
    return q_new, _like(k_op, _rotate(_to_host(k_op), cos, sin, k_pos, interleaved))


def _sm_count():
    """Multiprocessors of the current GPU (the simulator's device has no such attribute: 1)."""
    return int(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1))
