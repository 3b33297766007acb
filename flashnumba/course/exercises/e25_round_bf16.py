"""Lesson 13: round float32 to bfloat16 by bit manipulation (round to nearest, ties to even)."""

import ml_dtypes
import numpy as np

from flashnumba.course.grading import Mismatch, call, grade

ID = "round_bf16"
LESSON = 13
TITLE = "round float32 to bfloat16 with integer operations"
SPEC = ("round_bf16(x float32 array) -> float32 array of the same shape holding x rounded to bfloat16 "
        "(nearest, ties to even; inf stays inf, NaN stays NaN), using the bits of x, not ml_dtypes")
NAME = "round_bf16"


def stub(x):
    raise NotImplementedError("FILL ME IN: bits = x.view(np.uint32); add 0x7FFF plus the lowest kept "
                              "bit (bit 16), clear the low 16 bits, view as float32; keep NaN as NaN")


def solution(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)        # 64-bit: the sum below cannot wrap
    lowest_kept = (bits >> 16) & 1                     # the last mantissa bit bfloat16 keeps
    rounded = (bits + 0x7FFF + lowest_kept) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)   # a NaN's payload could round to inf


def perturbed(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x8000) & 0xFFFF0000             # ties always away from zero
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out)


def _kind(value):
    """What is special about a float32 for bfloat16 rounding, in words."""
    low = int(np.float32(value).view(np.uint32)) & 0xFFFF
    if not np.isfinite(value):
        return "not finite"
    if low == 0x8000:
        kept = (int(np.float32(value).view(np.uint32)) >> 16) & 1
        return f"a tie, lowest kept bit {kept}: ties go to the even neighbour"
    if low == 0:
        return "exactly a bfloat16 already"
    return "above the halfway point" if low > 0x8000 else "below the halfway point"


def _cases():
    rng = np.random.default_rng(13)
    grid = np.arange(-3, 4, dtype=np.float32)
    one_ulp = np.float32(2.0 ** -7)                    # bfloat16's spacing in [1, 2)
    ties = np.array([1 + one_ulp / 2, 1 + 1.5 * one_ulp, -(1 + one_ulp / 2), 3 + 1.5 * 2 * one_ulp],
                    dtype=np.float32)
    return (
        ("small integers", grid),
        ("standard normals", rng.standard_normal(64).astype(np.float32)),
        ("exact ties between two bfloat16s", ties),
        ("wide magnitudes (1e-30 to 1e30)",
         (rng.standard_normal(32) * 10.0 ** rng.integers(-30, 30, 32)).astype(np.float32)),
        ("subnormal float32s", np.array([1e-40, -3e-41, 7e-45], dtype=np.float32)),
        ("zeros, infinities, NaN, the largest float32 (rounds up to inf)",
         np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.39e38], dtype=np.float32)),
        ("a 2-D array", rng.standard_normal((3, 5)).astype(np.float32)),
    )


def check(implementation):
    def run():
        for case, x in _cases():
            want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
            got = call(implementation, x.copy())
            if not isinstance(got, np.ndarray) or got.dtype != np.float32 or got.shape != x.shape:
                raise Mismatch(f"{case}: return a float32 array of shape {x.shape}, got "
                               f"{type(got).__name__} {getattr(got, 'dtype', '')} "
                               f"{getattr(got, 'shape', '')}", variable="dtype")
            same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
            if not same.all():
                index = tuple(int(k) for k in np.argwhere(~same)[0])
                value = x[index]
                raise Mismatch(f"{case}: x{list(index)} = {float(value)!r} (bits 0x{int(value.view(np.uint32)):08X}, "
                               f"{_kind(value)}) -> yours {float(got[index])!r} "
                               f"(0x{int(got[index].view(np.uint32)):08X}), expected {float(want[index])!r} "
                               f"(0x{int(want[index].view(np.uint32)):08X})",
                               variable="x", index=index)
        return "every value rounds as bfloat16 does: ties to even, subnormals, inf and NaN included"
    return grade(ID, run)
