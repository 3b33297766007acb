"""Beyond one GPU: ring attention (context parallelism) over torch.distributed.

A sequence too long for one device is split over the P ranks of a process group;
each rank keeps its slice of Q, the K/V slices travel around a ring of ranks, and
each step runs flashnumba's FlashAttention kernels on (local Q, visiting K/V); the
partial outputs merge by their log-sum-exps (Liu, Zaharia, Abbeel 2023, "Ring
Attention with Blockwise Transformers"; the ring-flash-attention project).

    ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         group=None, layout="contiguous", *, seed=0, algorithm=None)
        q (batch, seqlen_local, nheads, headdim), k, v (batch, seqlen_local, nheads_kv,
        headdim): this rank's slices of one sequence; returns this rank's out, with
        autograd through the ring's backward (dK/dV partial sums travel around the ring)
    shard(x, rank, world, layout)    this rank's slice of a full tensor (dim 1, flash layout)
    unshard(parts, layout)           the full tensor from every rank's slice

Layouts (``flashnumba.ring_geometry``): "contiguous" gives rank r positions
[r N/P, (r+1) N/P); "zigzag" cuts the sequence into 2P chunks and gives rank r chunks
r and 2P-1-r, so that under causal masking every rank does the same work.

Modules: ``ring`` (the forward and backward rings and the autograd function),
``comm`` (the neighbour exchange: isend/irecv, issued before a step's kernels and
waited after them), ``checks`` (every rank checks every rank's shapes before any
point-to-point operation, so bad input is an error on all ranks, never a hang),
``bench`` (GPU correctness and weak scaling, ``torchrun ... -m flashnumba.distributed.bench``).

Limits: dropout_p > 0 is refused (the kernels key the Philox mask by local positions);
causal masking uses the one diagonal of a sequence attending to itself (seqlen_q =
seqlen_k, where flash-attn's and PyTorch's alignments agree).
"""

from flashnumba import validate
from flashnumba.distributed import checks
from flashnumba.ring_geometry import CONTIGUOUS, LAYOUTS, ZIGZAG, shard, unshard

__all__ = ["CONTIGUOUS", "LAYOUTS", "ZIGZAG", "ring_flash_attn_func", "shard", "unshard"]


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, group=None,
                         layout=CONTIGUOUS, *, seed=0, algorithm=None):
    """Attention of this rank's q over the whole sequence's k, v, split over the ranks of `group`.

    q (B, n, Hq, d), k, v (B, n, Hkv, d) torch tensors (CUDA with NCCL, CPU with gloo), the
    slices `shard` gives (n = N / P positions; Hq % Hkv == 0). Every rank of `group` (None:
    the default group) must call it with the same shapes and options. causal=True masks key c
    from query r when c > r in global positions. Returns out (B, n, Hq, d) in q's dtype;
    out.backward() runs the ring backward. Bad input raises the same error on every rank.
    """
    from flashnumba.distributed.comm import Ring
    from flashnumba.distributed.ring import RingFlashAttnFunction

    ring = Ring(group)
    facts = checks.local_facts(q, k, v, dropout_p, softmax_scale, causal, layout, seed, algorithm)
    checks.check_all(checks.gather(facts, group), ring.rank, layout)
    scale = validate.scale(softmax_scale, q.shape[-1])                 # checked on every rank above
    return RingFlashAttnFunction.apply(q, k, v, scale, bool(causal), group, layout, int(seed), algorithm)
