"""NumPy mirrors: each algorithm on one head, tile by tile, as its CUDA kernel runs it.

Same loop order, variable names and step boundaries as the kernels, so a lesson
can show both side by side and a test can compare them step by step. Every HBM
read and write goes through a ``flashnumba.hbm.HBM`` counter.

    standard     standard attention: S and P written to HBM (Algorithm 0 / 3 of FA1)
    fa1_forward  FlashAttention-1 forward: K/V tiles outer; O, l, m updated in HBM every step
    fa1_backward FlashAttention-1 backward: K/V tiles outer; P recomputed from l, m
    fa2_forward  FlashAttention-2 forward: Q tiles outer; O_i unnormalised on chip; stores O, L
    fa2_backward FlashAttention-2 backward: D first; K/V tiles outer; P recomputed from L

Each algorithm comes three times: ``fa2_forward(Q, K, V, ...)`` returns the
outputs; ``fa2_forward_steps(Q, K, V, ...)`` is a generator yielding a ``Step``
(see ``trace``) after every inner step and returning the outputs at its end;
``fa2_forward_state(Q, K, V, limit=k)`` is the state ``flashnumba.stepping``
compares with the kernel's after k steps. The algorithms themselves are listed
once, in ``flashnumba.registry``.

Shared keywords (``common.prepare``): Br, Bc or M (on-chip floats, default
DEFAULT_M), causal, alignment, softmax_scale, keep (boolean (Nq, Nk) keep-mask),
dropout_p, limit (stop each thread block's loop after `limit` iterations), and
hbm (an HBM counter to fill; a fresh one when None). Standard attention takes
no Br, Bc, M or limit.
"""

from flashnumba.mirror.common import DEFAULT_M
from flashnumba.mirror.fa1_backward import fa1_backward, fa1_backward_state, fa1_backward_steps
from flashnumba.mirror.fa1_forward import fa1_forward, fa1_forward_state, fa1_forward_steps
from flashnumba.mirror.fa2_backward import fa2_backward, fa2_backward_state, fa2_backward_steps
from flashnumba.mirror.fa2_forward import fa2_forward, fa2_forward_state, fa2_forward_steps
from flashnumba.mirror.standard import (
    standard_backward,
    standard_backward_steps,
    standard_forward,
    standard_forward_steps,
)
from flashnumba.mirror.trace import Step, finish, nth, run

__all__ = [
    "DEFAULT_M", "Step",
    "fa1_backward", "fa1_backward_state", "fa1_backward_steps",
    "fa1_forward", "fa1_forward_state", "fa1_forward_steps",
    "fa2_backward", "fa2_backward_state", "fa2_backward_steps",
    "fa2_forward", "fa2_forward_state", "fa2_forward_steps",
    "finish", "nth", "run",
    "standard_backward", "standard_backward_steps", "standard_forward", "standard_forward_steps",
]
