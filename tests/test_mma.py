"""kernels.mma: each tensor-core intrinsic against NumPy (the simulator's stand-ins here, the
PTX instructions on a GPU: the same kernels and checks run on both), and a compile check
for sm_80 and sm_90 in a process without the simulator."""

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from numba import config as numba_config
from numba import cuda, float32, uint16

from flashnumba.kernels import mma

HALF = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}
MMA = {"bf16": mma.mma_bf16, "f16": mma.mma_f16}
PACK = {"bf16": mma.pack_bf16x2, "f16": mma.pack_f16x2}
UNPACK = {"bf16": mma.unpack_bf16x2, "f16": mma.unpack_f16x2}
ALIGN = None if numba_config.ENABLE_CUDASIM else 16


def _bits(x, kind):
    return np.ascontiguousarray(np.asarray(x, np.float32).astype(HALF[kind]).view(np.uint16))


def _rounded(x, kind):
    return np.asarray(x, np.float32).astype(HALF[kind]).astype(np.float64)


_KERNELS = {}


def _kernels(kind):
    """One warp: A (16 x 16), B^T (8 x 16), B (16 x 8), V (16 x 16) go to shared memory by cp.async;
    D = A B + C twice (B read plainly from B^T and transposed from B), and O = round(A V') V
    where A V' = S is packed from the accumulators into A fragments, as FA2 hands P_ij to P V."""
    if kind in _KERNELS:
        return _KERNELS[kind]
    MMA_K, PACK_K, UNPACK_K = MMA[kind], PACK[kind], UNPACK[kind]

    @cuda.jit
    def products(a_bits, bt_bits, b_bits, v_bits, c, d_plain, d_trans, s_out, o_out):
        lane = cuda.threadIdx.x
        g = lane // 4
        t = lane % 4
        As = cuda.shared.array((16, 16), uint16, alignment=ALIGN)
        Bts = cuda.shared.array((8, 16), uint16, alignment=ALIGN)
        Bs = cuda.shared.array((16, 8), uint16, alignment=ALIGN)
        Vs = cuda.shared.array((16, 16), uint16, alignment=ALIGN)
        # 16-byte chunks: A and V 32 each (one per lane), B^T and B 16 each
        mma.cp_async_16(As, (lane // 2, 8 * (lane % 2)), a_bits, (lane // 2, 8 * (lane % 2)))
        mma.cp_async_16(Vs, (lane // 2, 8 * (lane % 2)), v_bits, (lane // 2, 8 * (lane % 2)))
        mma.cp_async_commit()
        if lane < 16:
            mma.cp_async_16(Bts, (lane // 2, 8 * (lane % 2)), bt_bits, (lane // 2, 8 * (lane % 2)))
            mma.cp_async_16(Bs, (lane, 0), b_bits, (lane, 0))
        mma.cp_async_commit()
        mma.cp_async_wait(0)
        cuda.syncthreads()  # every lane's copies landed before any lane's ldmatrix reads them

        a = mma.ldmatrix_x4(As, (lane % 16, 8 * (lane // 16)))       # A[0:8|8:16, 0:8|8:16]
        b = mma.ldmatrix_x2(Bts, (lane % 8, 8 * ((lane // 8) % 2)))   # B^T[0:8, 0:8|8:16]
        bT = mma.ldmatrix_x2_trans(Bs, (lane % 16, 0))                # B[0:8|8:16, 0:8]^T
        cf = (c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1])
        d1 = MMA_K(a, b, cf)
        d2 = MMA_K(a, bT, cf)
        v = mma.ldmatrix_x4_trans(Vs, (lane % 16, 8 * (lane // 16)))  # two B fragments of V
        zero = (float32(0.0), float32(0.0), float32(0.0), float32(0.0))
        s0 = MMA_K(a, (v[0], v[1]), zero)                              # S = A V, columns 0-7
        s1 = MMA_K(a, (v[2], v[3]), zero)                              # columns 8-15
        p = (PACK_K(s0[0], s0[1]), PACK_K(s0[2], s0[3]),               # S's accumulators are
             PACK_K(s1[0], s1[1]), PACK_K(s1[2], s1[3]))               # P's A fragment
        o0 = MMA_K(p, (v[0], v[1]), zero)
        o1 = MMA_K(p, (v[2], v[3]), zero)
        for e in range(4):
            r = g + 8 * (e // 2)
            col = 2 * t + e % 2
            d_plain[r, col] = d1[e]
            d_trans[r, col] = d2[e]
            s_out[r, col] = s0[e]
            s_out[r, col + 8] = s1[e]
            o_out[r, col] = o0[e]
            o_out[r, col + 8] = o1[e]

    @cuda.jit
    def packing(x, packed, back):
        i = cuda.grid(1)
        if i < packed.size:
            w = PACK_K(x[2 * i], x[2 * i + 1])
            packed[i] = w
            lo, hi = UNPACK_K(w)
            back[2 * i] = lo
            back[2 * i + 1] = hi

    _KERNELS[kind] = products, packing
    return products, packing


def _run_products(kind, A, B, V, C):
    products, _ = _kernels(kind)
    d1, d2 = np.zeros((16, 8), np.float32), np.zeros((16, 8), np.float32)
    s, o = np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32)
    products[1, 32](_bits(A, kind), _bits(B.T, kind), _bits(B, kind), _bits(V, kind),
                    np.ascontiguousarray(C, np.float32), d1, d2, s, o)
    return d1, d2, s, o


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_mma_ldmatrix_cp_async_exact_on_small_integers(kind, rng):
    """Small integers are exact in bf16, f16 and fp32: every product must match to the bit."""
    A = rng.integers(-4, 5, (16, 16)).astype(np.float32)
    B = rng.integers(-4, 5, (16, 8)).astype(np.float32)
    V = rng.integers(-2, 3, (16, 16)).astype(np.float32)
    C = rng.integers(-50, 51, (16, 8)).astype(np.float32)
    d1, d2, s, o = _run_products(kind, A, B, V, C)
    np.testing.assert_array_equal(d1, A @ B + C)
    np.testing.assert_array_equal(d2, A @ B + C)
    np.testing.assert_array_equal(s, A @ V)
    S = A @ V
    if np.abs(S).max() <= 256:                          # S exact in both 16-bit types
        np.testing.assert_array_equal(o, S @ V)


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_mma_random_inputs_rounded_as_the_hardware_does(kind, rng):
    """Inputs are rounded to the 16-bit type, products summed in fp32."""
    A = rng.standard_normal((16, 16)).astype(np.float32)
    B = rng.standard_normal((16, 8)).astype(np.float32)
    V = rng.standard_normal((16, 16)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    d1, d2, s, o = _run_products(kind, A, B, V, C)
    Ar, Br, Vr = _rounded(A, kind), _rounded(B, kind), _rounded(V, kind)
    ref = Ar @ Br + C
    tol = 1e-5 * (np.abs(Ar) @ np.abs(Br) + np.abs(C))  # fp32 summation order
    assert np.all(np.abs(d1 - ref) <= tol) and np.all(np.abs(d2 - ref) <= tol)
    S = Ar @ Vr
    assert np.all(np.abs(s - S) <= 1e-5 * (np.abs(Ar) @ np.abs(Vr)))
    P = _rounded(s, kind)                                # P packed from S's accumulators
    assert np.all(np.abs(o - P @ Vr) <= 1e-5 * (np.abs(P) @ np.abs(Vr)) + 1e-6)
    # and the rounding is really there: unrounded inputs would differ
    assert not np.array_equal(_rounded(A, kind), A.astype(np.float64))


@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_pack_rounds_to_nearest_even_and_unpack_restores(kind, rng):
    x = np.concatenate([rng.standard_normal(62).astype(np.float32) * 100,
                        np.float32([1.0 + 2.0 ** -9, -3.0])])   # 1 + 2^-9: a bf16 tie
    _, packing = _kernels(kind)
    packed, back = np.zeros(32, np.uint32), np.zeros(64, np.float32)
    packing[1, 32](x, packed, back)
    bits = _bits(x, kind).astype(np.uint32)
    np.testing.assert_array_equal(packed, bits[0::2] | bits[1::2] << 16)
    np.testing.assert_array_equal(back, _rounded(x, kind).astype(np.float32))


def test_ldmatrix_rejects_an_unaligned_row_on_the_simulator():
    if not numba_config.ENABLE_CUDASIM:
        pytest.skip("the simulator's alignment check; a GPU faults instead")

    @cuda.jit
    def misaligned(out):
        tile = cuda.shared.array((16, 20), uint16)      # rows of 40 bytes: row 1 is unaligned
        lane = cuda.threadIdx.x
        r = mma.ldmatrix_x2(tile, (lane % 16, 0))
        out[lane] = r[0]

    with pytest.raises(Exception, match="16-byte aligned"):
        misaligned[1, 32](np.zeros(32, np.uint32))


def test_cp_async_lands_only_at_its_wait_on_the_simulator():
    """Without cp_async_wait the copy has not landed: the stand-in holds it (a GPU may land it
    any time, so only the simulator can show a missing wait)."""
    if not numba_config.ENABLE_CUDASIM:
        pytest.skip("the simulator's model of cp.async")

    @cuda.jit
    def early_and_late(src, early, late):
        tile = cuda.shared.array(8, uint16)
        lane = cuda.threadIdx.x
        if lane == 0:
            tile[0] = 7
            mma.cp_async_16(tile, 0, src, 0)
            mma.cp_async_commit()
            early[0] = tile[0]
            mma.cp_async_wait(0)
            late[0] = tile[0]

    early, late = np.zeros(1, np.uint16), np.zeros(1, np.uint16)
    early_and_late[1, 32](np.arange(1, 9, dtype=np.uint16), early, late)
    assert (early[0], late[0]) == (7, 1)


# ---------------------------------------------------------------------------
# Compiled for sm_80 and sm_90 without a GPU (a process without the simulator)
# ---------------------------------------------------------------------------

_COMPILE_CHECK = textwrap.dedent("""
    import json, sys
    import numba.cuda                              # the real target: import before flashnumba
    from numba import cuda, float32, types, uint16
    from flashnumba.kernels import mma
    from flashnumba.tools import resources

    def every_intrinsic(src, out, packed):
        lane = cuda.threadIdx.x
        tile = cuda.shared.array((16, 24), uint16, alignment=16)
        mma.cp_async_16(tile, (lane // 2, 8 * (lane % 2)), src, (lane // 2, 8 * (lane % 2)))
        mma.cp_async_commit()
        mma.cp_async_16_at(tile, (lane // 2, 8 * (lane % 2)), src, 8 * lane)
        mma.cp_async_commit()
        mma.cp_async_wait(1)
        mma.cp_async_wait(0)
        cuda.syncthreads()
        a = mma.ldmatrix_x4(tile, (lane % 16, 8 * (lane // 16)))
        b = mma.ldmatrix_x2(tile, (lane % 8, 8 * ((lane // 8) % 2)))
        at = mma.ldmatrix_x4_trans(tile, (lane % 16, 8 * (lane // 16)))
        bt = mma.ldmatrix_x2_trans(tile, (lane % 16, 0))
        c = (float32(0.0), float32(1.0), float32(2.0), float32(3.0))
        d = mma.mma_bf16(a, b, c)
        d = mma.mma_f16(at, bt, d)
        p = mma.pack_bf16x2(d[0], d[1])
        q = mma.pack_f16x2(d[2], d[3])
        lo, hi = mma.unpack_bf16x2(p)
        lo2, hi2 = mma.unpack_f16x2(q)
        out[lane] = lo + hi + lo2 + hi2
        packed[lane] = p ^ q

    argtypes = (types.Array(types.uint16, 2, "C"), types.Array(types.float32, 1, "C"),
                types.Array(types.uint32, 1, "C"))
    report = {}
    for cc in ((8, 0), (9, 0)):
        library = resources.build(cuda.jit(every_intrinsic), argtypes, cc)
        with resources._building_for(cc):
            ptx = library.get_asm_str(cc=cc)
        log = resources.link(library, cc)
        report[f"sm_{cc[0]}{cc[1]}"] = {
            "ptx": ptx, **resources.read_log(log)}

    def vector_red(acc, a):                        # sm_90 and newer only: a kernel of its own
        lane = cuda.threadIdx.x
        mma.red_add_v2(acc, (lane % 4, 2 * (lane // 4)), a[lane], a[lane] + float32(1.0))

    red_types = (types.Array(types.float32, 2, "C"), types.Array(types.float32, 1, "C"))
    library = resources.build(cuda.jit(vector_red), red_types, (9, 0))
    with resources._building_for((9, 0)):
        ptx = library.get_asm_str(cc=(9, 0))
    report["red_sm_90"] = {"ptx": ptx, **resources.read_log(resources.link(library, (9, 0)))}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "FLASHNUMBA_DEVICE")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, check=False, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    import json
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_red_add_v2_compiles_to_one_vector_red_for_sm90(compiled):
    report = compiled["red_sm_90"]
    assert report["ptx"].count("red.global.add.v2.f32") == 1
    assert report["spill_stores"] == 0 and report["stack_frame"] == 0


def test_red_add_v2_adds_both_floats_and_refuses_an_odd_element_on_the_simulator():
    """32 lanes add a pair each into 4 rows of 16 floats: the lane's a into the even element,
    a + 1 into the odd one next to it; a pair starting at an odd column is not 8-byte aligned."""
    if not numba_config.ENABLE_CUDASIM:
        pytest.skip("the simulator's stand-in and alignment check; test_red_add_v2_compiles... for sm_90")

    @cuda.jit
    def pairs(acc, a, odd):
        lane = cuda.threadIdx.x
        mma.red_add_v2(acc, (lane % 4, 2 * (lane // 4) + odd), a[lane], a[lane] + float32(1.0))

    a = np.arange(32, dtype=np.float32)
    acc = np.zeros((4, 16), np.float32)
    pairs[1, 32](acc, a, 0)
    want = np.zeros((4, 16), np.float32)
    for lane in range(32):
        want[lane % 4, 2 * (lane // 4)] += a[lane]
        want[lane % 4, 2 * (lane // 4) + 1] += a[lane] + 1
    np.testing.assert_array_equal(acc, want)
    with pytest.raises(Exception, match="8-byte aligned"):
        pairs[1, 32](np.zeros((4, 17), np.float32), a, 1)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_intrinsic_compiles_to_ptx_and_links_without_spills(compiled, arch):
    report = compiled[arch]
    ptx = report["ptx"]
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 1
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 1
    assert ptx.count("cp.async.cg.shared.global") == 2           # by index and by offset
    for instruction in ("ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                        "cp.async.cg.shared.global", "cp.async.commit_group",
                        "cp.async.wait_group 1", "cp.async.wait_group 0",
                        "cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
        assert instruction in ptx, instruction
    assert ".local" not in ptx                          # fragments stayed in registers
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0
    assert report["stack_frame"] == 0


def test_cp_async_from_an_element_offset_copies_what_the_index_copies():
    """cp_async_16_at(dst, i, src, offset) reads the 8 elements at src's C-order element offset:
    each lane copies a row of a (2, 4, 3, 16) array both ways into two tiles, which agree."""
    if not numba_config.ENABLE_CUDASIM:
        pytest.skip("the simulator's stand-in; the GPU's is compiled in test_every_intrinsic...")

    @cuda.jit
    def both(src, by_index, by_offset):
        lane = cuda.threadIdx.x
        a = cuda.shared.array((32, 8), uint16)
        o = cuda.shared.array((32, 8), uint16)
        b, n, h, x = lane // 16, (lane // 4) % 4, lane % 3, 8 * (lane % 2)
        mma.cp_async_16(a, (lane, 0), src, (b, n, h, x))
        mma.cp_async_16_at(o, (lane, 0), src, ((b * 4 + n) * 3 + h) * 16 + x)
        mma.cp_async_commit()
        mma.cp_async_wait(0)
        for e in range(8):
            by_index[lane, e] = a[lane, e]
            by_offset[lane, e] = o[lane, e]

    src = np.arange(2 * 4 * 3 * 16, dtype=np.uint16).reshape(2, 4, 3, 16)
    by_index, by_offset = np.zeros((32, 8), np.uint16), np.zeros((32, 8), np.uint16)
    both[1, 32](src, by_index, by_offset)
    np.testing.assert_array_equal(by_index, by_offset)
    assert by_index[5, 0] == src[0, 1, 2, 8]
