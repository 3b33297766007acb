"""flash_attn_varlen_func and its packed variants: packed sequences of unequal lengths (one of
length 1), outputs and gradients in the packed layout, against the float64 reference per sequence."""

import numpy as np
import pytest
from conftest import rel_err

import flashnumba
from flashnumba import reference

TOL = 1e-5


def cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def packed(rng, lengths_q, lengths_k, Hq, Hkv, d):
    q = rng.standard_normal((sum(lengths_q), Hq, d)).astype(np.float32)
    k = rng.standard_normal((sum(lengths_k), Hkv, d)).astype(np.float32)
    v = rng.standard_normal((sum(lengths_k), Hkv, d)).astype(np.float32)
    return q, k, v, rng.standard_normal(q.shape).astype(np.float32)


def per_sequence_reference(dout, q, k, v, cu_q, cu_k, options, slopes=None):
    """(out, lse (Hq, total_q), dq, dk, dv) from the reference, one sequence at a time."""
    out, dq = np.zeros_like(q, dtype=np.float64), np.zeros_like(q, dtype=np.float64)
    dk, dv = np.zeros_like(k, dtype=np.float64), np.zeros_like(v, dtype=np.float64)
    lse = np.zeros((q.shape[1], q.shape[0]))
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        extra = {} if slopes is None else {"alibi_slopes": slopes[b]}
        o, l = reference.attention(q[None, rows], k[None, keys], v[None, keys], **options, **extra)
        grads = reference.attention_backward(dout[None, rows], q[None, rows], k[None, keys],
                                             v[None, keys], **options, **extra)
        out[rows], lse[:, rows] = o[0], l[0]
        dq[rows], dk[keys], dv[keys] = (g[0] for g in grads)
    return out, lse, dq, dk, dv


# The packing and unpacking are the same whatever the kernels: plain causal runs FA1's (the
# simulator's cheapest), the window and softcap the default's, which have them.
CASES = [
    pytest.param([1, 12, 5], [3, 12, 20], {"causal": True}, "fa1", id="lengths 1, 12, 5; Nq != Nk; causal"),
    pytest.param([7, 1], [7, 9], {"window_size": (3, 2), "softcap": 3.0}, None, id="window + softcap"),
]


@pytest.mark.parametrize("lengths_q, lengths_k, options, algorithm", CASES)
def test_varlen_matches_reference_per_sequence(rng, lengths_q, lengths_k, options, algorithm):
    q, k, v, dout = packed(rng, lengths_q, lengths_k, 2, 1, 8)
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    out, lse, _ = flashnumba.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                    return_attn_probs=True, algorithm=algorithm, **options)
    grads = flashnumba.flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lengths_q),
                                                  max(lengths_k), algorithm=algorithm, **options)
    expected = per_sequence_reference(dout, q, k, v, cu_q, cu_k, options)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0])
    for got, want in zip((out, lse, *grads), expected):
        assert rel_err(got, want) <= TOL


def test_varlen_alibi_per_sequence_and_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    lengths = [4, 9]
    q, k, v, dout = packed(rng, lengths, lengths, 2, 2, 4)
    slopes = rng.random((2, 2)).astype(np.float32)
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = flashnumba.flash_attn_varlen_qkvpacked_func(torch.stack([qt, kt, vt], dim=1),
                                                      torch.tensor(cu(lengths)), 9, alibi_slopes=slopes)
    (out * torch.tensor(dout)).sum().backward()
    expected = per_sequence_reference(dout, q, k, v, cu(lengths), cu(lengths), {}, slopes)
    assert rel_err(out.detach().numpy(), expected[0]) <= TOL
    for x, want in zip((qt, kt, vt), expected[2:]):
        assert rel_err(x.grad.numpy(), want) <= TOL


def test_kvpacked_is_the_same_call(rng):
    q, k, v, _ = packed(rng, [3, 2], [5, 1], 2, 1, 4)
    cu_q, cu_k = cu([3, 2]), cu([5, 1])
    plain = flashnumba.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 5, algorithm="fa1")
    kv = flashnumba.flash_attn_varlen_kvpacked_func(q, np.stack([k, v], axis=1), cu_q, cu_k, 3, 5,
                                                    algorithm="fa1")
    assert np.array_equal(plain, kv)


@pytest.mark.parametrize("cu_q, max_q, error, match", [
    ([0, 1, 5], 4, ValueError, r"cu_seqlens_q\[-1\] = 5 must equal the packed length 6"),
    ([1, 2, 6], 4, ValueError, "cu_seqlens_q must start at 0"),
    ([0, 4, 2, 6], 4, ValueError, "must be non-decreasing"),
    ([0, 2, 2, 6], 4, ValueError, "sequence 1 has length 0"),
    ([0, 2, 6], 3, ValueError, "max_seqlen_q = 3 but cu_seqlens_q has a sequence of length 4"),
    ([0, 2, 6], 4, ValueError, "cu_seqlens_q has 3 entries and cu_seqlens_k 4"),
])
def test_bad_cu_seqlens_are_refused(rng, cu_q, max_q, error, match):
    q, k, v, _ = packed(rng, [2, 4], [1, 1, 1], 1, 1, 4)
    cu_k = cu([1, 1, 1]) if "entries" in match else cu([2, 1])
    k, v = k[:cu_k[-1]], v[:cu_k[-1]]
    with pytest.raises(error, match=match):
        flashnumba.flash_attn_varlen_func(q, k, v, np.array(cu_q, np.int32), cu_k, max_q, 3)


def test_cu_seqlens_must_be_int32(rng):
    q, k, v, _ = packed(rng, [2], [2], 1, 1, 4)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        flashnumba.flash_attn_varlen_func(q, k, v, cu([2]), cu([2]).astype(np.int64), 2, 2)
