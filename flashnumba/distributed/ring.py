"""Ring attention on flashnumba's kernels: each step attends the local Q to the visiting K/V block.

The same ring as the NumPy mirror (``flashnumba.mirror.ring``, whose docstring has the
algorithm), on one rank of a torch.distributed group:

    forward                                              (rank r of P, local Q_r, K_r, V_r)
        O_r = 0, L_r = -inf;  K_j, V_j = K_r, V_r
        for s in 0 .. P-1:
            issue: send K_j, V_j to r + 1, receive the next block from r - 1   (not at s = P-1)
            O_rj, L_rj = flashnumba's forward kernels on the step's piece     (ring_geometry.piece)
            O_r, L_r = merge_pair(O_r, L_r, O_rj, L_rj)                       (flashnumba.merge)
            wait: K_j, V_j = the received block
    backward                                             (with the final O_r, L_r)
        dQ_r = 0;  K_j, V_j = K_r, V_r
        for s in 0 .. P-1:
            issue: send K_j, V_j on, receive the next block                   (not at s = P-1)
            dQ_rj, dK_rj, dV_rj = flashnumba's backward kernels on the piece
            dQ_r += dQ_rj
            dK_j, dV_j = the travelling sums of block j (received, step > 0; else 0) + dK_rj, dV_rj
            wait for K/V; issue: send dK_j, dV_j on, receive the next block's sums
        wait: the sums received after the last step are block r's own, finished: dK_r, dV_r

The kernels are the public API's own (``api.forward``, ``api.backward`` with an
``api.Call``): the diagonal block runs causal (Nq = Nk there, so the kernels' causal
offset is 0), every other visit runs unmasked on the piece of rows and columns the
geometry gives, and a wholly hidden block is skipped (it still travels on). Everything
between kernels (the merged O_r, L_r and the sums) is float32; q, k, v of float16 or
bfloat16 are widened once at the start and the results narrowed at the end.
"""

import dataclasses

import torch

from flashnumba import api, validate
from flashnumba.distributed.comm import Ring
from flashnumba.geometry import BOTTOM_RIGHT, SKIPPED
from flashnumba.interop import Operand
from flashnumba.merge import merge_pair
from flashnumba.ring_geometry import piece


def _calls(scale, seed, algorithm):
    """The api.Call of an unmasked visit and of the diagonal (causal) one."""
    unmasked = api.Call(scale=scale, dropout_p=0.0, seed=seed, causal=False, alignment=BOTTOM_RIGHT,
                        algorithm=validate.algorithm(algorithm), deterministic=False)
    return {False: unmasked, True: dataclasses.replace(unmasked, causal=True)}


def _visit_forward(q, k_j, v_j, p, calls):
    """(O_rj (B, H, rows, d), L_rj (B, H, rows)) float32 of one piece, by the forward kernels."""
    rows, cols = slice(*p.rows), slice(*p.cols)
    operands = [Operand("q", q[:, rows]), Operand("k", k_j[:, cols]), Operand("v", v_j[:, cols])]
    out, lse, _ = api.forward(operands, calls[p.causal], with_dmask=False)
    return out.transpose(1, 2), lse


def _visit_backward(dout, q, k_j, v_j, out, lse, p, calls):
    """(dQ_rj, dK_rj, dV_rj) float32 of one piece (rows and columns of the piece only)."""
    rows, cols = slice(*p.rows), slice(*p.cols)
    operands = [Operand("dout", dout[:, rows]), Operand("q", q[:, rows]), Operand("k", k_j[:, cols]),
                Operand("v", v_j[:, cols]), Operand("out", out[:, rows]),
                Operand("softmax_lse", lse[:, :, rows].contiguous())]
    return api.backward(operands, calls[p.causal])


def ring_forward(q, k, v, ring, layout, causal, calls):
    """(out (B, n, Hq, d), lse (B, Hq, n)) float32 of this rank's queries over the whole sequence."""
    B, n, H_q, d = q.shape
    O_r = q.new_zeros((B, H_q, n, d))                                  # O_r = 0
    L_r = q.new_full((B, H_q, n), float("-inf"))                       # L_r = -inf
    k_j, v_j = k, v
    for s in range(ring.world):
        if s < ring.world - 1:
            (k_next, v_next), transfer = ring.pass_on(k_j, v_j)        # next block in flight
        p = piece(ring.rank, s, ring.world, n, layout, causal)
        if p.kind != SKIPPED:
            O_rj, L_rj = _visit_forward(q, k_j, v_j, p, calls)
            rows = slice(*p.rows)
            O_r[:, :, rows], L_r[:, :, rows] = merge_pair(O_r[:, :, rows], L_r[:, :, rows], O_rj, L_rj)
        if s < ring.world - 1:
            transfer.wait()                                            # the next block has arrived
            k_j, v_j = k_next, v_next
    return O_r.transpose(1, 2).contiguous(), L_r


def ring_backward(dout, q, k, v, out, lse, ring, layout, causal, calls):
    """(dq, dk, dv) float32 of this rank's slices."""
    n = q.shape[1]
    dQ_r = torch.zeros_like(q)
    k_j, v_j = k, v
    sums_transfer, dK_in, dV_in = None, None, None       # the sums arriving from rank r - 1
    for s in range(ring.world):
        if s < ring.world - 1:
            (k_next, v_next), kv_transfer = ring.pass_on(k_j, v_j)    # next block in flight
        p = piece(ring.rank, s, ring.world, n, layout, causal)
        if p.kind != SKIPPED:
            dQ_rj, dK_rj, dV_rj = _visit_backward(dout, q, k_j, v_j, out, lse, p, calls)
            dQ_r[:, slice(*p.rows)] += dQ_rj                           # dQ_r += dQ_rj
        if sums_transfer is None:                                      # step 0: block r's sums start here
            dK_j, dV_j = torch.zeros_like(k), torch.zeros_like(v)
        else:
            sums_transfer.wait()                                       # block j's sums, from rank r - 1
            dK_j, dV_j = dK_in, dV_in
        if p.kind != SKIPPED:
            cols = slice(*p.cols)
            dK_j[:, cols] += dK_rj                                     # dK_j += dK_rj
            dV_j[:, cols] += dV_rj                                     # dV_j += dV_rj
        if s < ring.world - 1:
            kv_transfer.wait()
            k_j, v_j = k_next, v_next
        if ring.world == 1:
            return dQ_r, dK_j, dV_j                                    # no ring: the sums are home
        (dK_in, dV_in), sums_transfer = ring.pass_on(dK_j, dV_j)       # the sums move on with the block
    sums_transfer.wait()                                               # after P hops: block r's own sums
    return dQ_r, dK_in, dV_in


class RingFlashAttnFunction(torch.autograd.Function):
    """Ring attention as an autograd function on one rank's slices (checked by the caller)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, group, layout, seed, algorithm):
        ring = Ring(group)
        calls = _calls(scale, seed, algorithm)
        q32, k32, v32 = (x.detach().float().contiguous() for x in (q, k, v))
        out, lse = ring_forward(q32, k32, v32, ring, layout, causal, calls)
        ctx.save_for_backward(q32, k32, v32, out, lse)
        ctx.options = (group, layout, causal, calls)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, causal, calls = ctx.options
        dq, dk, dv = ring_backward(dout.float().contiguous(), q, k, v, out, lse, Ring(group), layout,
                                   causal, calls)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None, None
