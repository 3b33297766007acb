"""fa2_tc_backward (FA2 backward on mma.sync) against the float64 reference by flash-attn's rule
(max error <= 3x that of dense attention in the same dtype, for dq, dk, dv), on awkward shapes;
compiled for sm_80 / sm_90. Simulator sizes are tiny; on a GPU larger shapes run too."""

import numpy as np
import pytest
from numba import config as numba_config
from tc_helpers import compile_report, inputs, options, ratio

from flashnumba import mirror, reference
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT
from flashnumba.kernels import fa2_tc_backward as tcb
from flashnumba.kernels import fa2_tc_forward as tcf
from flashnumba.kernels.common import ConfigError, TileConfig
from flashnumba.tools import emulation

ON_GPU = not numba_config.ENABLE_CUDASIM
SEED = 11

# (B, Nq, Nk, Hq, Hkv, d, causal, alignment, dropout_p, Bc)
CASES = [
    (1, 20, 37, 1, 1, 24, False, BOTTOM_RIGHT, 0.0, 16),     # Nq != Nk, edge tiles, d < d_pad
    (1, 33, 17, 2, 1, 16, True, BOTTOM_RIGHT, 0.0, 16),      # GQA, fully masked rows, three Q tiles per head
    (1, 40, 70, 1, 1, 32, True, TOP_LEFT, 0.0, None),        # default tiles: Br=32 < Bc=64, 4 warps
    (1, 21, 30, 1, 1, 17, True, BOTTOM_RIGHT, 0.2, 16),      # dropout, odd head dim
    (1, 18, 20, 1, 1, 100, True, BOTTOM_RIGHT, 0.0, None),   # d_pad = 128 default: 8 warps, two for each 32 keys
    (1, 45, 140, 2, 1, 112, True, TOP_LEFT, 0.0, None),      # ... two K/V blocks of two key m-tiles a pair, GQA
    (1, 70, 20, 2, 1, 128, False, BOTTOM_RIGHT, 0.1, None),  # dropout's d_pad = 128 tiles (one m-tile), GQA: two heads of two Q tiles
    (2, 33, 40, 4, 2, 24, True, BOTTOM_RIGHT, 0.0, 16),      # batches and K/V heads: offsets past the first head
    (1, 40, 45, 1, 1, 72, False, BOTTOM_RIGHT, 0.0, 32),     # d_pad = 96, 4 warps: dQ in groups of 3 pieces
]
GPU_CASES = [
    (2, 1000, 1000, 4, 2, 64, False, BOTTOM_RIGHT, 0.0, None),
    (1, 700, 1100, 4, 4, 40, True, BOTTOM_RIGHT, 0.1, None),
    (1, 300, 257, 2, 2, 128, True, TOP_LEFT, 0.0, None),
]


def _cases():
    return CASES + (GPU_CASES if ON_GPU else [])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: "B{}-Nq{}-Nk{}-H{}:{}-d{}-{}-{}-p{}".format(
    *c[:6], "causal" if c[6] else "full", c[7], c[8]))
def test_backward_within_three_times_the_dense_error(rng, dtype, case):
    B, Nq, Nk, Hq, Hkv, d, causal, alignment, p, Bc = case
    q, k, v, dout = inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d)
    kw = {"causal": causal, "alignment": alignment, "dropout_p": p, "seed": SEED}
    out, L = tcf.fa2_tc_forward(q, k, v, **kw)
    grads = tcb.fa2_tc_backward(dout, q, k, v, out, L, Bc=Bc, **kw)
    for x, like in zip(grads, (q, k, v)):
        assert x.dtype == like.dtype and x.shape == like.shape
    a = [x.astype(np.float64) for x in (dout, q, k, v)]
    opts = options(B, Hq, Nq, Nk, causal, alignment, p, SEED)
    refs = reference.attention_backward(*a, **opts)
    lows = emulation.attention_backward_in_dtype(*a, dtype, **opts)
    for name, x, ref, low in zip(("dq", "dk", "dv"), grads, refs, lows):
        assert ratio(x, ref, low) <= 3.0, name


@pytest.mark.parametrize("d, config", [
    (24, TileConfig(Br=16, Bc=32, d_pad=32, num_warps=1)),     # one warp, two m-tiles: P^T, dS^T from registers
    (72, TileConfig(Br=32, Bc=64, d_pad=96, num_warps=4)),     # two pairs, two m-tiles each
], ids=["one-warp", "pairs"])
def test_two_key_tiles_a_warp_within_three_times_the_dense_error(rng, d, config):
    """key_tiles = 2 away from the d_pad = 128 default: with key_warps = 1 (accumulate_from_registers
    over two m-tiles) and at d_pad = 96; Nk over two K/V blocks, causal, dropout."""
    assert tcb.key_tiles(config) == 2
    B, Nq, Nk, Hq, Hkv, p = 1, 37, 70, 2, 1, 0.1
    q, k, v, dout = inputs(rng, "bfloat16", B, Nq, Nk, Hq, Hkv, d)
    kw = {"causal": True, "alignment": BOTTOM_RIGHT, "dropout_p": p, "seed": SEED}
    out, L = tcf.fa2_tc_forward(q, k, v, **kw)
    grads = tcb.fa2_tc_backward(dout, q, k, v, out, L, config=config, **kw)
    a = [x.astype(np.float64) for x in (dout, q, k, v)]
    opts = options(B, Hq, Nq, Nk, True, BOTTOM_RIGHT, p, SEED)
    refs = reference.attention_backward(*a, **opts)
    lows = emulation.attention_backward_in_dtype(*a, "bfloat16", **opts)
    for name, x, ref, low in zip(("dq", "dk", "dv"), grads, refs, lows):
        assert ratio(x, ref, low) <= 3.0, name


def test_stepping_matches_the_fa2_mirror(rng):
    """After k Q tiles per K/V block (limit=k), dQ, dK, dV agree with the FA2 mirror's (float64,
    same bf16 inputs and the kernel's own O, L) at bf16 tolerance."""
    q, k, v, dout = inputs(rng, "bfloat16", 1, 40, 23, 1, 1, 16)
    out, L = tcf.fa2_tc_forward(q, k, v, causal=True)
    one = lambda x: x[0, :, 0, :].astype(np.float64)
    for limit in (1, 2, 3):
        grads = tcb.fa2_tc_backward(dout, q, k, v, out, L, causal=True, Bc=16, limit=limit)
        refs = mirror.fa2_backward(one(dout), one(q), one(k), one(v), one(out),
                                   L[0, 0].astype(np.float64), Br=16, Bc=16, causal=True, limit=limit)
        for name, x, ref in zip(("dQ", "dK", "dV"), grads, refs):
            assert np.abs(one(x) - ref).max() <= 2 ** -6 * max(np.abs(ref).max(), 1e-30), (limit, name)


def test_bad_inputs_are_refused(rng):
    q, k, v, dout = inputs(rng, "bfloat16", 1, 9, 11, 1, 1, 16)
    out, L = tcf.fa2_tc_forward(q, k, v)
    with pytest.raises(ValueError, match="L must have shape"):
        tcb.fa2_tc_backward(dout, q, k, v, out, L[:, :, :5])
    with pytest.raises(ValueError, match="dout must have q's shape"):
        tcb.fa2_tc_backward(dout[:, :4], q, k, v, out, L)
    with pytest.raises(ConfigError, match="Br=24 must be a multiple of 16"):
        tcb.check_config(TileConfig(Br=24, Bc=16, d_pad=32, num_warps=1))
    with pytest.raises(ConfigError, match="Bc=48 must be 16 x num_warps / 1 = 16 or twice that"):
        tcb.check_config(TileConfig(Br=16, Bc=48, d_pad=32, num_warps=1))
    assert tcb.key_tiles(TileConfig(Br=16, Bc=32, d_pad=32, num_warps=1)) == 2      # two m-tiles a warp
    assert tcb.key_tiles(TileConfig(Br=32, Bc=128, d_pad=128, num_warps=8)) == 2    # ... a pair
    with pytest.raises(ConfigError, match="Br=16 must be a multiple of 32"):   # a half for each warp of a pair
        tcb.check_config(TileConfig(Br=16, Bc=64, d_pad=128, num_warps=8))
    with pytest.raises(ConfigError, match="blocks_per_sm=2: that many blocks of 256 threads and 123904 bytes"):
        tcb.check_config(TileConfig(Br=64, Bc=64, d_pad=128, num_warps=8, blocks_per_sm=2))  # shared memory
    with pytest.raises(ConfigError, match="blocks_per_sm must be a non-negative integer, got -1"):
        tcb.check_config(TileConfig(Br=32, Bc=64, d_pad=64, num_warps=4, blocks_per_sm=-1))
    for config in tcb.shipped_configs():
        tcb.check_config(config)


def test_resolve_config_keeps_the_launch_bounds_of_its_warps():
    """blocks_per_sm stays with the config's warps (a launch bound of T threads is wrong for any
    other T): kept when Br changes, dropped when Bc (and so num_warps) does."""
    twelve = TileConfig(Br=32, Bc=96, d_pad=128, num_warps=12, blocks_per_sm=1)
    assert tcb.resolve_config(128, config=twelve) == twelve
    assert tcb.resolve_config(100, Br=64, config=twelve).blocks_per_sm == 1
    assert tcb.resolve_config(128, Bc=64, config=twelve) == TileConfig(32, 64, 128, 8, 0)
    assert tcb._jit_options(TileConfig(64, 64, 128, 8)) == {}


def test_backward_compiles_for_sm80_with_mma_and_no_spills():
    """The default d = 64 bf16 kernel for sm_80: the five products' mma.sync in the PTX, 0 spills,
    no local memory, the promised shared memory. (The largest config for sm_90:
    tests/test_resources.py; every shipped config for both: ``flashnumba resources``.)"""
    report = compile_report("""
        from flashnumba.kernels import fa2_tc_backward as tcb
        out = {}
        for d in (64,):
            label, dispatcher, argtypes = tcb.compile_targets(tcb.default_config(d))[0]
            for cc in ((8, 0),):
                r = build_and_link(dispatcher, argtypes, cc)
                r["mma"] = r.pop("ptx").count("mma.sync.aligned.m16n8k16")
                out[f"{label} d={d} sm_{cc[0]}{cc[1]}"] = r
        print(json.dumps(out))
    """)
    assert len(report) == 1, report
    for name, r in report.items():
        config = tcb.default_config(64)
        # five products, each at least one mma.sync (the compiler keeps some loops rolled: the
        # count in the PTX is not the count executed); no local memory, so the fragments stayed
        # in registers
        assert r["mma"] >= 5 * 2, (name, r)
        assert r["stack_frame"] == 0, (name, r)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, r)
        assert r["smem"] == tcb.static_smem_bytes(config), (name, r)


def test_dq_groups_deal_each_piece_once():
    """The warps' groups of dQ_i pieces (dq_group side by side, groups dealt round-robin) cover
    each 16 x 16 piece of dQ_i exactly once, at every shipped config and a few others."""
    configs = tcb.shipped_configs() + [TileConfig(Br=Br, Bc=16 * w // tcb.key_warps(d_pad), d_pad=d_pad,
                                                  num_warps=w)
                                       for Br in (16, 32, 64) for d_pad in (32, 64, 96, 128)
                                       for w in (2, 4, 8)]
    for c in configs:
        PW, NQ16 = tcb.dq_group(c.Br, c.d_pad, c.num_warps), c.d_pad // 16
        assert NQ16 % PW == 0, c
        pieces = [(grp // (NQ16 // PW), PW * (grp % (NQ16 // PW)) + u)
                  for warp in range(c.num_warps)
                  for grp in range(warp, (c.Br // 16) * NQ16 // PW, c.num_warps) for u in range(PW)]
        assert sorted(pieces) == [(rq, nq) for rq in range(c.Br // 16) for nq in range(NQ16)], c
    assert tcb.dq_group(32, 64, 4) == 2 and tcb.dq_group(32, 96, 4) == 3 and tcb.dq_group(16, 128, 8) == 1


def test_shared_tiles_are_laid_end_to_end_and_fit_a_block():
    """smem_offsets: K_j, V_j, two stages of Q_i, dO_i, dS_ij^T and (key_warps = 2) P_ij^T, one
    after another on 16-byte boundaries; the d_pad = 64 default takes 42496 B (static L_i, D_i
    included), the d_pad = 128 default 125440 B (K_j, V_j 2 x 128 x 136 elements, Q_i, dO_i
    2 x 2 x 32 x 136, dS^T, P^T 2 x 128 x 40, all 2 B, and 512 B of L_i, D_i), that of its
    dropout, softcap and ALiBi kernels 123904 B; every shipped config fits what an A100 gives a
    block (163 KB), and what ptxas counts as static is L_i, D_i."""
    d64, d128 = tcb.default_config(64), tcb.default_config(128)
    assert tcb.smem_bytes(d64) == 42496 and tcb.smem_bytes(d128) == 125440
    assert tcb.smem_bytes(tcb.default_config(128, variant=True)) == 123904
    assert tcb.smem_offsets(d64)["elements"] == tcb.smem_offsets(d64)["Ps"]   # no P^T tile at key_warps = 1
    for config in tcb.shipped_configs():
        at = tcb.smem_offsets(config)
        names = ["Ks", "Vs", "Qs", "dOs", "dSs"] + (["Ps"] if tcb.key_warps(config.d_pad) == 2 else [])
        ends = [at[n] for n in names[1:]] + [at["elements"]]
        wide, narrow = config.d_pad + tcb.ROW_PAD, config.Br + tcb.ROW_PAD
        sizes = [config.Bc * wide] * 2 + [tcb.STAGES * config.Br * wide] * 2 + [config.Bc * narrow] * (len(names) - 4)
        assert [e - at[n] for n, e in zip(names, ends)] == sizes, config
        assert all(at[n] % 8 == 0 for n in names), config          # 16-byte boundaries
        assert tcb.smem_bytes(config) <= 163 * 1024, config
        assert tcb.static_smem_bytes(config) == 2 * tcb.STAGES * config.Br * 4, config
        tcb.check_config(config, cc=(8, 0))
    with pytest.raises(ConfigError, match="shared memory"):
        tcb.check_config(TileConfig(Br=128, Bc=128, d_pad=128, num_warps=16), cc=(8, 6))


@pytest.mark.parametrize("d", [24, 17])
def test_dq_added_two_floats_at_a_time_matches_one_at_a_time(rng, d):
    """red_v2=True (dQ's atomics as 8-byte vector adds, mma.red_add_v2) gives the gradients of
    the one-float atomics to rounding: d = 24 takes the vector adds, odd d = 17 keeps one float
    an atomic (an odd row length would misalign every other row's pairs)."""
    q, k, v, dout = inputs(rng, "bfloat16", 1, 20, 37, 2, 1, d)
    out, L = tcf.fa2_tc_forward(q, k, v, causal=True)
    one = tcb.fa2_tc_backward(dout, q, k, v, out, L, causal=True, Bc=16)
    two = tcb.fa2_tc_backward(dout, q, k, v, out, L, causal=True, Bc=16, red_v2=True)
    for name, a, b in zip(("dq", "dk", "dv"), one, two):
        a, b = a.astype(np.float32), b.astype(np.float32)
        assert np.allclose(a, b, rtol=1e-2, atol=1e-2), name
    assert tcb.build(tcb.resolve_config(d, Bc=16), "bf16", red_v2=True) is not tcb.build(
        tcb.resolve_config(d, Bc=16), "bf16")
