"""Reproducible dropout masks from a counter-based generator: Philox4x32-10.

A dropout mask on a GPU is never stored: each thread regenerates the keep bits
of its own tile from a seed, in the forward pass and again in the backward. So
the random numbers must be a pure function of (seed, where): a counter-based
generator (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers: as easy as
1, 2, 3"). Philox4x32-10 is the one curand and the official flash-attn use.

Philox4x32-10: counter (c0, c1, c2, c3) and key (k0, k1), 32-bit words, 10 rounds

    for round in 0 .. 9:
        if round > 0: k0 += W0, k1 += W1                       # Weyl key schedule
        hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2                  # 32 x 32 -> 64-bit products
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    output (c0, c1, c2, c3)

    M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85, all mod 2^32

The dropout mask (Nq x Nk per head) of batch b, head h, for a 64-bit seed:

    key     = (seed mod 2^32, seed // 2^32)
    counter = (c // 4, r, h, b)          one Philox call serves 4 consecutive columns
    x       = output word c % 4          for query row r, key column c
    u       = x * 2^-32                  uniform in [0, 1), exactly representable
    keep    = u >= p                     P(keep) = 1 - p (to within 2^-32)

Since x is an integer and u = x / 2^32 is exact in float64, `u >= p` is the same
test as `x >= ceil(p * 2^32)` for every float64 p: host and device agree bit for
bit as long as both compare against the same float64 p (a kernel must take p as
float64, not float32, which would be a different number). This layout is
flashnumba's own; it is not flash-attn's, so masks do not match flash-attn's.

Written once
------------
Every function above ``keep_mask`` uses only NumPy uint64 scalars built with
``np.uint64(...)``, integer operators and ``range``: the same source runs on
NumPy scalars, on NumPy uint64 arrays (the whole mask at once, ``keep_mask``)
and, compiled by ``flashnumba.kernels.philox``, as CUDA device functions.
Every 32-bit word is carried in a uint64 holding a value below 2^32, so the
64-bit product M * c never overflows and every sum is reduced with ``& MASK32``;
no Python int ever meets a uint64 inside them (in Numba, uint64 mixed with
int64 is promoted to float64).

    philox4x32(c0, c1, c2, c3, k0, k1, rounds=10) -> (x0, x1, x2, x3)
    keep(seed, b, h, r, c, p) -> bool               one element, as a kernel asks
    keep_mask(seed, p, B, H, Nq, Nk) -> (B, H, Nq, Nk) bool   for the reference
"""

import numpy as np

ROUNDS = 10

# Written as np.uint64(...) calls inside the functions (not module constants) so
# that Numba types them as uint64 without relying on how it freezes globals.
#   M0 = 0xD2511F53, M1 = 0xCD9E8D57   round multipliers
#   W0 = 0x9E3779B9, W1 = 0xBB67AE85   key increments (golden ratio, sqrt(3) - 1)
#   MASK32 = 0xFFFFFFFF


def mulhilo32(a, b):
    """(hi, lo) 32-bit halves of the 64-bit product a * b of two 32-bit words."""
    product = a * b                                              # < 2^64: no overflow
    return product >> np.uint64(32), product & np.uint64(0xFFFFFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds=ROUNDS):
    """Philox4x32-R of counter (c0, c1, c2, c3) and key (k0, k1); words and result are uint64 < 2^32."""
    M0 = np.uint64(0xD2511F53)
    M1 = np.uint64(0xCD9E8D57)
    W0 = np.uint64(0x9E3779B9)
    W1 = np.uint64(0xBB67AE85)
    MASK32 = np.uint64(0xFFFFFFFF)
    for round_ in range(rounds):
        if round_ > 0:                                           # bump the key before rounds 2..R
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = mulhilo32(M0, c0)
        hi1, lo1 = mulhilo32(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_key(seed):
    """The Philox key of a 64-bit seed: (k0, k1) = (seed low word, seed high word), as uint64."""
    seed64 = np.uint64(seed)
    return seed64 & np.uint64(0xFFFFFFFF), seed64 >> np.uint64(32)


def dropout_word(seed, b, h, r, c):
    """The 32-bit random word x of element (r, c) of head h, batch b (a uint64 < 2^32)."""
    k0, k1 = philox_key(seed)
    x0, x1, x2, x3 = philox4x32(np.uint64(c // 4), np.uint64(r), np.uint64(h), np.uint64(b), k0, k1)
    word = c % 4                                                 # column c uses word c % 4
    if word == 0:
        return x0
    if word == 1:
        return x1
    if word == 2:
        return x2
    return x3


def kept(x, p):
    """The keep test on a word x already drawn (a uint64 below 2^32): u = x 2^-32 >= p, p float64."""
    return np.float64(x) * 2.0 ** -32 >= p


def keep(seed, b, h, r, c, p):
    """True when element (r, c) of head h, batch b survives dropout with probability p: x 2^-32 >= p."""
    return kept(dropout_word(seed, b, h, r, c), p)


# ---------------------------------------------------------------- host side only

def _check_seed(seed):
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return seed


def uniforms(seed, B, H, Nq, Nk):
    """u = x 2^-32 for every element: float64 (B, H, Nq, Nk) in [0, 1)."""
    seed = _check_seed(seed)
    if min(B, H, Nq, Nk) < 1:
        raise ValueError(f"need B, H, Nq, Nk >= 1, got {(B, H, Nq, Nk)}")
    k0, k1 = philox_key(seed)
    groups = (Nk + 3) // 4                                       # Philox calls per row
    c0 = np.arange(groups, dtype=np.uint64)[None, None, None, :]     # column // 4
    c1 = np.arange(Nq, dtype=np.uint64)[None, None, :, None]         # row
    c2 = np.arange(H, dtype=np.uint64)[None, :, None, None]          # head
    c3 = np.arange(B, dtype=np.uint64)[:, None, None, None]          # batch
    c0, c1, c2, c3 = np.broadcast_arrays(c0, c1, c2, c3)
    words = np.stack(philox4x32(c0, c1, c2, c3, k0, k1), axis=-1)    # (B, H, Nq, groups, 4)
    x = words.reshape(B, H, Nq, 4 * groups)[..., :Nk]                # column c = 4 (c // 4) + c % 4
    return x.astype(np.float64) * 2.0 ** -32


def keep_mask(seed, p, B, H, Nq, Nk):
    """The boolean keep-mask (B, H, Nq, Nk): True where u >= p (kept), as ``keep`` computes per element.

    Pass it as ``reference.attention(..., dropout_p=p, dropout_mask=mask)`` and,
    for one head, ``mirror.fa2_forward(..., keep=mask[b, h], dropout_p=p)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return uniforms(seed, B, H, Nq, Nk) >= float(p)
