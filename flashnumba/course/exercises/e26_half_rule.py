"""Lesson 13: flash-attn's accuracy rule for float16 / bfloat16 outputs."""

import numpy as np

from flashnumba import dtypes, reference
from flashnumba.course.grading import Mismatch, call, grade
from flashnumba.tools.emulation import attention_in_dtype

ID = "half_rule"
LESSON = 13
TITLE = "the 2x-dense-error rule"
SPEC = ("half_verdict(out, dense, ref, limit) -> (ratio, passed): ratio = max|out - ref| / "
        "max|dense - ref| (inf if out is not finite where ref is; 0/0 = 0), passed = ratio <= limit")
NAME = "half_verdict"


def stub(out, dense, ref, limit):
    raise NotImplementedError("FILL ME IN: the kernel's largest error against ref, over the largest "
                              "error of the dense attention in the same dtype; passed = ratio <= limit")


def solution(out, dense, ref, limit):
    out, dense, ref = (np.asarray(x, dtype=np.float64) for x in (out, dense, ref))
    if not np.isfinite(out[np.isfinite(ref)]).all():
        return np.inf, False                         # a NaN or inf the reference does not have
    kernel_error = np.abs(out - ref).max()
    dense_error = np.abs(dense - ref).max()
    if dense_error == 0:
        ratio = 0.0 if kernel_error == 0 else np.inf
    else:
        ratio = kernel_error / dense_error
    return float(ratio), bool(ratio <= limit)


def perturbed(out, dense, ref, limit):
    out, dense, ref = (np.asarray(x, dtype=np.float64) for x in (out, dense, ref))
    if not np.isfinite(out[np.isfinite(ref)]).all():
        return np.inf, False
    kernel_error = np.abs(out - ref).mean()            # the mean error, not the largest
    dense_error = np.abs(dense - ref).mean()
    ratio = kernel_error / dense_error if dense_error else (0.0 if kernel_error == 0 else np.inf)
    return float(ratio), bool(ratio <= limit)


def _problem(dtype, seed):
    """(ref, dense): float64 attention on inputs rounded to dtype, and the same attention in dtype."""
    rng = np.random.default_rng(seed)
    q, k, v = (dtypes.round_to(rng.standard_normal((1, n, 1, 8)), dtype).astype(np.float64)
               for n in (12, 20, 20))
    ref, _ = reference.attention(q, k, v, causal=True)
    return ref, attention_in_dtype(q, k, v, dtype, causal=True).astype(np.float64)


def _cases():
    ref, dense = _problem("bfloat16", 1)
    err = dense - ref
    one_row = np.zeros_like(ref)
    one_row[0, 3, 0, :] = err[0, 3, 0, :]                # the dense error of one row only
    spike = ref.copy()
    spike[0, 5, 0, 2] += 2.5 * np.abs(err).max()          # small mean error, one large error
    nan = ref.copy()
    nan[0, 0, 0, 0] = np.nan
    h_ref, h_dense = _problem("float16", 2)
    exact = np.ones((1, 4, 1, 8))
    return (
        ("bfloat16, the float64 answer rounded once to bfloat16", dtypes.round_to(ref, "bfloat16"),
         dense, ref, 2.0),
        ("bfloat16, the dense attention itself", dense, dense, ref, 2.0),
        ("bfloat16, an output with 3x the dense error", ref + 3.0 * err, dense, ref, 2.0),
        ("bfloat16, an output with the dense error in one row only", ref + one_row, dense, ref, 2.0),
        ("bfloat16, one entry off by 2.5x the dense error", spike, dense, ref, 2.0),
        ("bfloat16 gradients (limit 3), 2.5x the dense error", ref + 2.5 * err, dense, ref, 3.0),
        ("bfloat16, a NaN in the output", nan, dense, ref, 2.0),
        ("float16, 1.9x the dense error", h_ref + 1.9 * (h_dense - h_ref), h_dense, h_ref, 2.0),
        ("exact inputs, dense has no error and neither has out", exact, exact, exact, 2.0),
        ("exact inputs, dense has no error but out has", exact + 1e-3, exact, exact, 2.0),
    )


def check(implementation):
    def run():
        for case, out, dense, ref, limit in _cases():
            want_ratio, want_passed = solution(out, dense, ref, limit)
            with np.errstate(all="ignore"):
                got = call(implementation, out.copy(), dense.copy(), ref.copy(), limit)
            if not isinstance(got, tuple) or len(got) != 2:
                raise Mismatch(f"{case}: return a pair (ratio, passed), got {got!r}")
            ratio, passed = got
            try:
                ratio = float(ratio)
            except (TypeError, ValueError) as e:
                raise Mismatch(f"{case}: ratio is not a number ({e})") from e
            ratio_ok = (ratio == want_ratio or (np.isfinite(want_ratio)
                                                and abs(ratio - want_ratio) <= 1e-9 * max(1.0, want_ratio)))
            if not ratio_ok:
                raise Mismatch(f"{case}: ratio = {ratio:.6g}, expected {want_ratio:.6g} (max |out - ref| = "
                               f"{np.nanmax(np.abs(out - ref)):.3g}, max |dense - ref| = "
                               f"{np.abs(dense - ref).max():.3g}, limit {limit})", variable="ratio")
            if bool(passed) != want_passed:
                raise Mismatch(f"{case}: passed = {passed}, expected {want_passed} "
                               f"(ratio {want_ratio:.3g}, limit {limit})", variable="passed")
        return "the ratio and the verdict match on every case, NaN and zero dense error included"
    return grade(ID, run)
