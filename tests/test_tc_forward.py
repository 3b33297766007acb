"""fa2_tc_forward (FA2 forward on mma.sync) against the float64 reference by flash-attn's rule
(max error <= 2x that of dense attention in the same dtype), on awkward shapes; stepped against
the FA2 mirror; compiled for sm_80 / sm_90. Simulator sizes are tiny (32 Python threads per warp);
on a GPU the same tests run, plus larger shapes."""

import numpy as np
import pytest
from numba import config as numba_config
from tc_helpers import compile_report, inputs, lse_rel, options, ratio

from flashnumba import mirror, reference
from flashnumba.geometry import BOTTOM_RIGHT, TOP_LEFT
from flashnumba.kernels import fa2_tc_forward as tc
from flashnumba.kernels.common import ConfigError, TileConfig
from flashnumba.tools import emulation

ON_GPU = not numba_config.ENABLE_CUDASIM
SEED = 7

# (B, Nq, Nk, Hq, Hkv, d, causal, alignment, dropout_p, Br, Bc)
CASES = [
    (1, 20, 37, 1, 1, 24, False, BOTTOM_RIGHT, 0.0, 16, 16),    # Nq != Nk, edge tiles, d < d_pad
    (1, 33, 17, 1, 1, 16, True, BOTTOM_RIGHT, 0.0, 16, 16),     # fully masked rows (Nq > Nk)
    (1, 37, 45, 1, 1, 32, True, TOP_LEFT, 0.0, None, None),     # default tiles (4 warps), one tile
    (1, 24, 24, 2, 1, 8, False, BOTTOM_RIGHT, 0.0, 16, 16),     # GQA, d = 8 in d_pad = 16
    (1, 21, 30, 1, 1, 17, True, BOTTOM_RIGHT, 0.2, 16, 16),     # dropout, odd head dim
    (1, 1, 1, 1, 1, 1, False, BOTTOM_RIGHT, 0.0, 16, 16),       # one query, one key, d = 1
    (2, 37, 45, 4, 2, 24, True, BOTTOM_RIGHT, 0.0, 16, 16),     # batches and K/V heads: offsets past the first head
]
GPU_CASES = [
    (2, 1000, 1000, 4, 2, 64, False, BOTTOM_RIGHT, 0.0, None, None),
    (1, 700, 1100, 4, 4, 40, True, BOTTOM_RIGHT, 0.1, None, None),
    (1, 300, 257, 2, 2, 128, True, TOP_LEFT, 0.0, None, None),
    (1, 129, 300, 2, 1, 96, False, BOTTOM_RIGHT, 0.0, None, None),
]


def _cases():
    return CASES + (GPU_CASES if ON_GPU else [])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: "B{}-Nq{}-Nk{}-H{}:{}-d{}-{}-{}-p{}".format(
    *c[:6], "causal" if c[6] else "full", c[7], c[8]))
def test_forward_within_twice_the_dense_error(rng, dtype, case):
    B, Nq, Nk, Hq, Hkv, d, causal, alignment, p, Br, Bc = case
    q, k, v, _ = inputs(rng, dtype, B, Nq, Nk, Hq, Hkv, d)
    O, L = tc.fa2_tc_forward(q, k, v, causal=causal, alignment=alignment, dropout_p=p, seed=SEED,
                             Br=Br, Bc=Bc)
    assert O.dtype == q.dtype and O.shape == q.shape and L.dtype == np.float32
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    opts = options(B, Hq, Nq, Nk, causal, alignment, p, SEED)
    ref, lse = reference.attention(q64, k64, v64, **opts)
    low = emulation.attention_in_dtype(q64, k64, v64, dtype, **opts)
    assert ratio(O, ref, low) <= 2.0
    assert lse_rel(L, lse) <= 1e-5
    if p > 0:            # the mask was applied: without it the output is far off
        undropped, _ = reference.attention(q64, k64, v64, causal=causal, alignment=alignment)
        assert np.abs(O.astype(np.float64) - undropped).max() > 0.1


def test_forward_softmax_scale_and_fully_masked_rows_give_zero_and_minus_inf(rng):
    q, k, v, _ = inputs(rng, "bfloat16", 1, 20, 6, 1, 1, 16)
    O, L = tc.fa2_tc_forward(q, k, v, causal=True, softmax_scale=0.3, Br=16, Bc=16)
    ref, _ = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True,
                                 softmax_scale=0.3)
    hidden = 20 - 6                   # bottom-right: the first Nq - Nk rows see no key
    assert np.all(O[0, :hidden].astype(np.float32) == 0) and np.all(np.isneginf(L[0, 0, :hidden]))
    low = emulation.attention_in_dtype(*(x.astype(np.float64) for x in (q, k, v)), "bfloat16",
                                       causal=True, softmax_scale=0.3)
    assert ratio(O, ref, low) <= 2.0


def test_forward_takes_uint16_bits_with_a_dtype(rng):
    q, k, v, _ = inputs(rng, "bfloat16", 1, 9, 11, 1, 1, 16)
    O, L = tc.fa2_tc_forward(q, k, v, Br=16, Bc=16)
    O_bits, L_bits = tc.fa2_tc_forward(q.view(np.uint16), k.view(np.uint16), v.view(np.uint16),
                                       Br=16, Bc=16, dtype="bfloat16")
    assert np.array_equal(O.view(np.uint16), O_bits.view(np.uint16)) and np.array_equal(L, L_bits)
    with pytest.raises(TypeError, match="dtype='bfloat16' or 'float16'"):
        tc.fa2_tc_forward(q.view(np.uint16), k.view(np.uint16), v.view(np.uint16))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        tc.fa2_tc_forward(*(x.astype(np.float32) for x in (q, k, v)))
    with pytest.raises(TypeError, match="share one dtype"):
        tc.fa2_tc_forward(q, k.astype(np.float16), v)


@pytest.mark.parametrize("config", [TileConfig(Br=32, Bc=16, d_pad=32, num_warps=1),
                                    TileConfig(Br=16, Bc=24, d_pad=32, num_warps=1),
                                    TileConfig(Br=64, Bc=512, d_pad=128, num_warps=4)])
def test_bad_configs_are_refused_naming_the_problem(config):
    with pytest.raises(ConfigError, match="Br=|Bc=|bytes"):
        tc.check_config(config)


def test_every_shipped_config_is_valid():
    for config in tc.shipped_configs():
        tc.check_config(config)
    assert tc.stages(tc.default_config(64)) == 2 and tc.stages(tc.default_config(128)) == 2
    assert tc.stages(TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4)) == 1     # 2 x 34 KB > 48 KB


def test_static_configs_keep_their_static_arrays():
    """Every shipped config, and every config and stage count of 48 KB or less, builds Ks and Vs
    as static arrays and launches with no dynamic shared memory; only above 48 KB (or when asked)
    is the kernel the dynamic one."""
    static = [(c, None) for c in tc.shipped_configs()]
    static += [(TileConfig(Br=16 * w, Bc=Bc, d_pad=d_pad, num_warps=w), n)
               for d_pad in (64, 128) for Bc in (32, 64) for w in (4, 8) for n in (1, 2)
               if not (d_pad == 128 and Bc == 64 and n == 2)]
    for config, n in static:
        assert tc.smem_bytes(config, n) <= 48 * 1024, (config, n)
        assert not tc.is_dynamic(config, n), (config, n)
        assert tc.static_smem_bytes(config, n) == tc.smem_bytes(config, n), (config, n)
        assert tc.dynamic_smem_bytes(config, n) == 0, (config, n)
    big = TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4)
    assert tc.is_dynamic(big, 2) and tc.static_smem_bytes(big, 2) == 0
    assert tc.dynamic_smem_bytes(big, 2) == 2 * 2 * 64 * 136 * 2 == 69632
    small = TileConfig(Br=16, Bc=16, d_pad=16, num_warps=1)
    assert tc.dynamic_smem_bytes(small, 2, dynamic=True) == tc.smem_bytes(small, 2) > 0


@pytest.mark.parametrize("n_stages", [1, 2])
def test_dynamic_layout_puts_Vs_after_every_stage_of_Ks(n_stages):
    """Ks and Vs end to end in the dynamic array, 16-byte aligned. (The simulator lands cp.async
    copies as late as allowed, so a stage of Vs overlapping Ks's other stage would pass there.)"""
    config = TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4)
    sm = tc.smem_offsets(config, n_stages)
    assert sm["Ks"] == 0 and sm["Vs"] == n_stages * 64 * (128 + tc.ROW_PAD)
    assert sm["Vs"] % 8 == 0 and 2 * sm["elements"] == tc.smem_bytes(config, n_stages)


def test_dynamic_shared_memory_is_refused_over_the_gpus_limit():
    """Above 48 KB: within the most any GPU here gives a block (227 KB), or a given compute
    capability's opt-in limit; the refusal names the bytes."""
    config = TileConfig(Br=64, Bc=128, d_pad=128, num_warps=4)        # 2 x 2 x 128 x 136 x 2 B
    tc.check_config(config, 2)
    tc.check_config(config, 2, cc=(9, 0))
    tc.check_config(config, 2, cc=(8, 0))
    with pytest.raises(ConfigError, match=r"139264 bytes of dynamic shared memory, over the 101376 bytes"):
        tc.check_config(config, 2, cc=(8, 6))
    with pytest.raises(ConfigError, match=r"278528 bytes of dynamic shared memory, over the 232448 bytes"):
        tc.check_config(TileConfig(Br=64, Bc=512, d_pad=128, num_warps=4))


def test_dynamic_shared_memory_gives_the_static_output_bit_for_bit(rng):
    """Ks and Vs at hand-computed offsets of one dynamic array (forced at small tiles) give the
    static arrays' bits, with one and two stages, over three K/V tiles with an edge tile and the
    causal skip. A dynamic kernel launched without its bytes would index past an empty array."""
    q, k, v, _ = inputs(rng, "bfloat16", 1, 20, 37, 1, 1, 16)
    for n_stages in (1, 2):
        results = {}
        for dynamic in (False, True):
            launch, out, L, _ = tc.launcher(q, k, v, causal=True, Br=16, Bc=16, stages=n_stages,
                                            dynamic=dynamic)
            launch()
            results[dynamic] = (out.copy_to_host(), L.copy_to_host())
        (O_s, L_s), (O_d, L_d) = results[False], results[True]
        assert np.array_equal(O_s, O_d) and np.array_equal(L_s, L_d), n_stages
    ref, _ = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    assert np.abs(O_d.view(q.dtype).astype(np.float64) - ref).max() < 0.05


def test_two_stages_of_Bc64_at_d128_run_in_dynamic_shared_memory(rng):
    """The config 48 KB of static shared memory refused (Br=64 Bc=64 4 warps, 2 stages at
    d_pad=128: 69632 B) against the float64 reference by flash-attn's rule: three K/V tiles, the
    last one an edge tile, causal (bottom-right), d = 120 < d_pad."""
    config = TileConfig(Br=64, Bc=64, d_pad=128, num_warps=4)
    assert tc.is_dynamic(config, 2)
    q, k, v, _ = inputs(rng, "bfloat16", 1, 5, 130, 1, 1, 120)
    launch, out, L, _ = tc.launcher(q, k, v, causal=True, config=config, stages=2)
    launch()
    O, L = out.copy_to_host().view(q.dtype), L.copy_to_host()
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    ref, lse = reference.attention(q64, k64, v64, causal=True)
    low = emulation.attention_in_dtype(q64, k64, v64, "bfloat16", causal=True)
    assert ratio(O, ref, low) <= 2.0
    assert lse_rel(L, lse) <= 1e-5


def test_one_stage_gives_the_two_stage_output_bit_for_bit(rng):
    """stages=1 (no shipped config below d_pad=128, Bc=64 takes it) runs the same products in the
    same order as stages=2, only the loads of K_j, V_j move: the same bits, over three K/V tiles
    with an edge tile and the causal skip."""
    q, k, v, _ = inputs(rng, "bfloat16", 1, 20, 37, 1, 1, 16)
    results = {}
    for n_stages in (1, 2):
        launch, out, L, _ = tc.launcher(q, k, v, causal=True, Br=16, Bc=16, stages=n_stages)
        launch()
        results[n_stages] = (out.copy_to_host(), L.copy_to_host())
    (O_1, L_1), (O_2, L_2) = results[1], results[2]
    assert np.array_equal(O_1, O_2) and np.array_equal(L_1, L_2)
    ref, _ = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    assert np.abs(O_1.view(q.dtype).astype(np.float64) - ref).max() < 0.05


@pytest.mark.parametrize("causal", [False, True])
def test_stepping_matches_the_fa2_mirror_tile_by_tile(rng, causal):
    """After k K/V tiles (limit=k) the kernel's O and L are the mirror's (float64, on the same
    bf16 inputs) at bf16 tolerance: P_ij is rounded to bf16 before P V."""
    q, k, v, _ = inputs(rng, "bfloat16", 1, 19, 40, 1, 1, 16)
    Q, K, V = (x[0, :, 0, :].astype(np.float64) for x in (q, k, v))
    for limit in (1, 2, 3):
        O, L = tc.fa2_tc_forward(q, k, v, causal=causal, Br=16, Bc=16, limit=limit)
        O_m, L_m = mirror.fa2_forward(Q, K, V, Br=16, Bc=16, causal=causal, limit=limit)
        assert np.abs(O[0, :, 0, :].astype(np.float64) - O_m).max() <= 2 ** -7 * np.abs(O_m).max()
        assert lse_rel(L[0, 0], L_m) <= 1e-5


def test_forward_compiles_for_sm80_with_mma_and_no_spills():
    """The default d = 64 bf16 kernel for sm_80: PTX has the expected number of mma.sync per
    K/V tile (loops unrolled), ptxas reports 0 spills and the promised static shared memory; the
    same at small tiles on the dynamic path: no static shared memory, one extern (dynamic) array.
    (The largest config for sm_90: tests/test_resources.py; every shipped config and variant for
    both: ``flashnumba resources``; the forward's candidates, dynamic ones included:
    ``flashnumba resources --source flashnumba.bench.tc_configs:forward_targets``.)"""
    report = compile_report("""
        from flashnumba.kernels import fa2_tc_forward as tc
        from flashnumba.kernels.common import TileConfig
        out = {}
        small = TileConfig(Br=16, Bc=16, d_pad=16, num_warps=1)
        (label, _, argtypes), *_ = tc.compile_targets(small)
        for name, config, dispatcher in (("static d=64", tc.default_config(64), tc.build(tc.default_config(64))),
                                         ("dynamic d=16", small, tc.build(small, dynamic=True))):
            r = build_and_link(dispatcher, argtypes, (8, 0))
            ptx = r.pop("ptx")
            r["mma"] = ptx.count("mma.sync.aligned.m16n8k16")
            r["extern_shared"] = ptx.count(".extern .shared")
            out[name] = r
        print(json.dumps(out))
    """)
    assert len(report) == 2, report
    for name, r in report.items():
        config = tc.default_config(64) if name.startswith("static") else TileConfig(Br=16, Bc=16, d_pad=16,
                                                                                     num_warps=1)
        d_pad, Bc = config.d_pad, config.Bc
        dynamic = name.startswith("dynamic")
        assert r["mma"] == (d_pad // 16) * (Bc // 8) + (Bc // 16) * (d_pad // 8), (name, r)
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, r)
        assert r["smem"] == tc.static_smem_bytes(config, dynamic=dynamic), (name, r)
        assert r["smem"] == (0 if dynamic else tc.smem_bytes(config)), (name, r)
        assert r["extern_shared"] == (1 if dynamic else 0), (name, r)
        assert r["registers"] <= 255
