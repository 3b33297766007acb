"""Philox4x32-10 and the dropout masks built from it (flashnumba.philox, flashnumba.kernels.philox).

1. The generator matches Random123's published known-answer vectors
   (Random123 tests/kat_vectors, "philox4x32 7" and "philox4x32 10" lines), in
   NumPy and through the device function in a kernel on the simulator.
2. The mask has the documented layout and statistics, and is a pure function of
   (seed, batch, head, row, column).
3. The device ``keep`` reproduces ``keep_mask`` bit for bit at awkward sizes.
4. The reference with the mask equals the FA2 mirror with the same mask per head.
5. The real CUDA compiler accepts the device functions (the simulator would
   accept a call to a plain Python function; NVVM does not).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import rel_err
from numba import cuda

from flashnumba import mirror, philox, reference
from flashnumba.kernels import philox as device_philox

U = np.uint64

# rounds, counter (4 words), key (2 words), expected output (4 words): Random123 kat_vectors
KNOWN_ANSWERS = [
    (7, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48)),
    (7, (0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662)),
    (7, (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a)),
    (10, (0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    (10, (0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    (10, (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]
KAT_IDS = [f"R{rounds}-{counter[0]:08x}" for rounds, counter, _, _ in KNOWN_ANSWERS]


# ---------------------------------------------------------------- kernels (simulator)

@cuda.jit
def philox_kernel(counters, keys, rounds, out):
    """out[t] = Philox4x32-R(counters[t], keys[t]), one thread per test vector."""
    t = cuda.grid(1)
    if t < out.shape[0]:
        x0, x1, x2, x3 = device_philox.philox4x32(counters[t, 0], counters[t, 1], counters[t, 2],
                                                 counters[t, 3], keys[t, 0], keys[t, 1], rounds[t])
        out[t, 0] = x0
        out[t, 1] = x1
        out[t, 2] = x2
        out[t, 3] = x3


@cuda.jit
def keep_kernel(seed, p, out):
    """out[b, h, r, c] = keep(seed, b, h, r, c, p): one thread per (r, c), grid over (b, h)."""
    r, c = cuda.grid(2)
    b = cuda.blockIdx.z // out.shape[1]
    h = cuda.blockIdx.z % out.shape[1]
    if r < out.shape[2] and c < out.shape[3]:
        out[b, h, r, c] = device_philox.keep(seed, b, h, r, c, p)


def device_mask(seed, p, B, H, Nq, Nk, block=(8, 8)):
    out = np.zeros((B, H, Nq, Nk), dtype=np.bool_)
    grid = ((Nq + block[0] - 1) // block[0], (Nk + block[1] - 1) // block[1], B * H)
    keep_kernel[grid, block](seed, p, out)
    return out


# ---------------------------------------------------------------- 1. known answers

@pytest.mark.parametrize("rounds, counter, key, expected", KNOWN_ANSWERS, ids=KAT_IDS)
def test_known_answers_numpy(rounds, counter, key, expected):
    out = philox.philox4x32(*(U(w) for w in counter), *(U(w) for w in key), rounds=rounds)
    assert [int(x) for x in out] == list(expected)
    assert all(isinstance(x, np.uint64) for x in out)


def test_known_answers_numpy_arrays():
    """The same function on uint64 arrays (as keep_mask calls it) gives the same answers."""
    for rounds in (7, 10):
        cases = [case for case in KNOWN_ANSWERS if case[0] == rounds]
        counters = np.array([case[1] for case in cases], dtype=np.uint64).T
        keys = np.array([case[2] for case in cases], dtype=np.uint64).T
        out = np.stack(philox.philox4x32(*counters, *keys, rounds=rounds), axis=-1)
        assert out.dtype == np.uint64
        assert np.array_equal(out, np.array([case[3] for case in cases], dtype=np.uint64))


def test_known_answers_device():
    counters = np.array([case[1] for case in KNOWN_ANSWERS], dtype=np.uint64)
    keys = np.array([case[2] for case in KNOWN_ANSWERS], dtype=np.uint64)
    rounds = np.array([case[0] for case in KNOWN_ANSWERS], dtype=np.int64)
    out = np.zeros((len(KNOWN_ANSWERS), 4), dtype=np.uint64)
    philox_kernel[1, 32](counters, keys, rounds, out)
    assert np.array_equal(out, np.array([case[3] for case in KNOWN_ANSWERS], dtype=np.uint64))


# ---------------------------------------------------------------- 2. the mask

def test_layout_is_documented_one():
    """u[b, h, r, c] * 2^32 = word c % 4 of Philox(counter (c // 4, r, h, b), key (seed lo, seed hi))."""
    seed = 0x0123456789ABCDEF
    B, H, Nq, Nk = 2, 3, 5, 11
    u = philox.uniforms(seed, B, H, Nq, Nk)
    for b, h, r, c in [(0, 0, 0, 0), (1, 2, 4, 10), (0, 1, 3, 7), (1, 0, 2, 4), (1, 2, 0, 9)]:
        words = philox.philox4x32(U(c // 4), U(r), U(h), U(b), U(seed & 0xFFFFFFFF), U(seed >> 32))
        assert u[b, h, r, c] * 2.0 ** 32 == int(words[c % 4])
        assert int(philox.dropout_word(seed, b, h, r, c)) == int(words[c % 4])
    assert ((0.0 <= u) & (u < 1.0)).all()


def test_scalar_keep_matches_mask():
    seed, p = 7, 0.3
    mask = philox.keep_mask(seed, p, 2, 2, 6, 9)
    for b, h, r, c in np.ndindex(mask.shape):
        assert bool(philox.keep(seed, b, h, r, c, p)) == mask[b, h, r, c]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction(p):
    mask = philox.keep_mask(2024, p, 1, 2, 256, 300)
    assert abs(mask.mean() - (1 - p)) < 0.01
    for head in mask[0]:                                # and per head, per row block
        assert abs(head.mean() - (1 - p)) < 0.01
    assert abs(mask[0, 0, :, :4].mean() - (1 - p)) < 0.05   # every word position is uniform too
    assert abs(mask[0, 0, :, 3::4].mean() - (1 - p)) < 0.02


def test_p_zero_keeps_everything():
    assert philox.keep_mask(1, 0.0, 1, 1, 16, 17).all()


def test_same_seed_same_mask():
    a = philox.keep_mask(99, 0.5, 2, 2, 33, 47)
    b = philox.keep_mask(99, 0.5, 2, 2, 33, 47)
    assert np.array_equal(a, b)
    # a bigger problem contains the smaller one: the mask depends on (b, h, r, c), not on the shape
    big = philox.keep_mask(99, 0.5, 3, 4, 40, 64)
    assert np.array_equal(big[:2, :2, :33, :47], a)


def test_different_seed_batch_head_row_column_differ():
    mask = philox.keep_mask(5, 0.5, 2, 2, 64, 64)
    others = {
        "seed": philox.keep_mask(6, 0.5, 2, 2, 64, 64),
        "seed high word": philox.keep_mask(5 + 2 ** 32, 0.5, 2, 2, 64, 64),
    }
    for name, other in others.items():
        assert np.mean(other != mask) > 0.4, name
    assert np.mean(mask[0, 0] != mask[1, 0]) > 0.4, "batch"
    assert np.mean(mask[0, 0] != mask[0, 1]) > 0.4, "head"
    assert np.mean(mask[0, 0, 0] != mask[0, 0, 1]) > 0.3, "row"
    assert np.mean(mask[0, 0, :, 0] != mask[0, 0, :, 4]) > 0.3, "column group"
    assert np.mean(mask[0, 0, :, 0] != mask[0, 0, :, 1]) > 0.3, "word"


@pytest.mark.parametrize("bad", [{"p": 1.0}, {"p": -0.1}, {"seed": -1}, {"seed": 2 ** 64}, {"Nk": 0}])
def test_rejects_bad_arguments(bad):
    args = {"seed": 1, "p": 0.5, "B": 1, "H": 1, "Nq": 4, "Nk": 4} | bad
    with pytest.raises(ValueError):
        philox.keep_mask(**args)


# ---------------------------------------------------------------- 3. device == NumPy

@pytest.mark.parametrize("seed, p, B, H, Nq, Nk", [
    (0, 0.5, 1, 1, 1, 1),                               # one element
    (12345, 0.1, 2, 2, 5, 13),                          # Nk not a multiple of 4 or of the block
    (2 ** 64 - 1, 0.5, 1, 2, 9, 6),                     # the largest seed (uint64 on a GPU)
    (0xDEADBEEF00000001, 0.9, 2, 1, 3, 17),
], ids=["1x1", "awkward", "max-seed", "high-seed"])
def test_device_keep_matches_numpy(seed, p, B, H, Nq, Nk):
    assert np.array_equal(device_mask(seed, p, B, H, Nq, Nk), philox.keep_mask(seed, p, B, H, Nq, Nk))


# ---------------------------------------------------------------- 4. reference == mirror

@pytest.mark.parametrize("causal", [False, True])
def test_reference_with_mask_matches_mirror(rng, causal):
    B, H, Nq, Nk, d, p, seed = 2, 2, 37, 45, 8, 0.3, 31337
    q = rng.standard_normal((B, Nq, H, d))
    k = rng.standard_normal((B, Nk, H, d))
    v = rng.standard_normal((B, Nk, H, d))
    mask = philox.keep_mask(seed, p, B, H, Nq, Nk)
    out, lse = reference.attention(q, k, v, causal=causal, dropout_p=p, dropout_mask=mask)
    undropped, _ = reference.attention(q, k, v, causal=causal)
    assert rel_err(out, undropped) > 0.1                # dropout did something
    for b in range(B):
        for h in range(H):
            O, L = mirror.fa2_forward(q[b, :, h], k[b, :, h], v[b, :, h], Br=16, Bc=16,
                                      causal=causal, keep=mask[b, h], dropout_p=p)
            assert rel_err(O, out[b, :, h]) < 1e-12
            assert rel_err(L, lse[b, h]) < 1e-12


# ---------------------------------------------------------------- 5. the real compiler

PTX_CHECK = textwrap.dedent("""
    import os
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    from numba import cuda, types                      # the real target, before flashnumba
    from flashnumba.kernels import philox
    from flashnumba.tools import resources

    def kernel(seed, p, out):
        r, c = cuda.grid(2)
        if r < out.shape[0] and c < out.shape[1]:
            out[r, c] = philox.keep(seed, 1, 2, r, c, p)

    with resources._building_for((9, 0)):
        for seed_type in (types.int64, types.uint64):
            ptx, _ = cuda.compile_ptx(kernel, (seed_type, types.float64,
                                               types.Array(types.boolean, 2, "C")), cc=(9, 0))
            assert ptx.count("mul.lo") >= 20, "10 rounds x 2 products, unrolled"
    print("ok")
""")


def test_real_compiler_accepts_device_functions():
    try:
        import cuda.core  # noqa: F401  (the NVVM/nvJitLink wheels: numba-cuda[cu13])
    except ImportError:
        pytest.skip("no CUDA toolchain wheels installed: cannot run the real compiler")
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", PTX_CHECK], check=False, env=env, cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
