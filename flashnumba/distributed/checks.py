"""Checks of a ring call on every rank at once, before any point-to-point operation.

A check that fails on one rank only (its slice has another length, say) must not
leave the other ranks waiting for a block that will never be sent. So each rank
checks what it can alone, then every rank gathers every rank's shapes, options and
local verdict (one ``all_gather_object``), and all ranks run the same checks on the
same gathered facts: either every rank goes on, or every rank raises, with a message
that names the rank, what it gave and what is expected.
"""

import torch.distributed as dist

from flashnumba import validate
from flashnumba.kernels.common import resolve_dropout
from flashnumba.ring_geometry import ZIGZAG, check_layout


def local_facts(q, k, v, dropout_p, softmax_scale, causal, layout, seed, algorithm):
    """What this rank reports: its shapes, dtype and options, and its own error (type, message) or None."""
    facts = {"error": None, "q": None, "k": None, "v": None, "dtype": None,
             "options": (repr(layout), repr(causal), repr(softmax_scale), repr(dropout_p), repr(seed),
                         repr(algorithm))}
    try:
        operands = validate.tensors(q=q, k=k, v=v)
        facts.update(q=operands[0].shape, k=operands[1].shape, v=operands[2].shape,
                     dtype=operands[0].dtype)
        for op in operands:
            if op.kind not in ("torch", "torch-cpu"):
                raise TypeError(f"{op.name} must be a torch.Tensor (ring attention communicates with "
                                f"torch.distributed), got {type(op.value).__name__}")
        _, Nq, Nk, _, _, d = validate.attention_shapes(*operands)
        if Nq != Nk:
            raise ValueError(f"q has {Nq} local positions and k {Nk}: ring attention attends a "
                             f"sequence to itself, so each rank's q, k and v slices have one length")
        check_layout(layout)
        validate.flag("causal", causal)
        validate.scale(softmax_scale, d)
        validate.algorithm(algorithm)
        p, _ = resolve_dropout(dropout_p, seed)
        if p > 0.0:
            raise ValueError(
                f"dropout_p={dropout_p}: dropout is not supported by ring_flash_attn_func yet. The "
                f"kernels key the Philox mask by their local row and column, and a ring step needs the "
                f"global positions of its block (a row/column offset the kernels do not take); pass "
                f"dropout_p=0.0 (flashnumba.mirror.ring shows the ring with the global mask)")
    except (TypeError, ValueError) as error:
        facts["error"] = (type(error).__name__, str(error))
    return facts


def gather(facts, group):
    """Every rank's facts, in rank order (a collective: every rank of the group must call it)."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, facts, group=group)
    return everyone


def check_all(everyone, rank, layout):
    """Raise, on every rank alike, if any rank's facts are wrong or they disagree; returns N."""
    world = len(everyone)
    for r, facts in enumerate(everyone):                  # one rank's own error: everyone raises it
        if facts["error"] is not None:
            kind, message = facts["error"]
            where = "" if r == rank else f"rank {r} of {world}: "
            raise (TypeError if kind == "TypeError" else ValueError)(f"ring_flash_attn_func: {where}{message}")
    for name in ("options", "dtype", "q", "k"):
        values = [facts[name] for facts in everyone]
        if any(value != values[0] for value in values):
            given = "; ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            what = {"options": "(layout, causal, softmax_scale, dropout_p, seed, algorithm)",
                    "dtype": "dtype", "q": "q shape", "k": "k shape"}[name]
            lengths = [facts[name][1] for facts in everyone] if name in ("q", "k") else None
            hint = ""
            if lengths is not None and len(set(lengths)) > 1:
                total = sum(lengths)
                hint = (f" (every rank must hold N / P positions of the sequence; the slices add up "
                        f"to N = {total}" + (f", not divisible by the world size {world}"
                                             if total % world else "") + ")")
            raise ValueError(f"ring_flash_attn_func: every rank must pass the same {what}; "
                             f"got {given}{hint}")
    n = everyone[0]["q"][1]
    if layout == ZIGZAG and n % 2:
        raise ValueError(f"ring_flash_attn_func: layout='zigzag' holds two chunks of N / 2P per rank, "
                         f"so the local seqlen must be even; got {n} (N = {n * world} over {world} ranks)")
    return n * world

