"""The accuracy table: every public algorithm in every storage dtype it takes, against the float64 reference.

    flashnumba accuracy                  # the table, on the GPU (or, small, on the simulator)
    flashnumba accuracy --json acc.json
    flashnumba accuracy --cases 2        # only the second case (numbered as the table lists them)

For each dtype, algorithm and case it runs ``flash_attn_func`` (with
``return_attn_probs``) and ``flash_attn_backward`` and reports, per output,

    float32             ||x - ref|| / ||ref||                   passes at <= 1e-5
    float16, bfloat16   max|x - ref| / max|dense - ref|         passes at <= 2 (out), <= 3 (gradients)

where ref is the float64 reference on exactly the inputs the kernels saw
(rounded to the dtype) and dense is the same attention computed in that dtype
(``tools.emulation.attention_in_dtype``: every intermediate rounded, as PyTorch
computes it without upcasting): the official library's rule. lse is float32
in every dtype and is held to 1e-5 relative. Dropout cases use the mask the
kernels drew, read back from S_dmask (negative = dropped).
"""

import argparse
import json
import sys

import ml_dtypes
import numpy as np

import flashnumba
from flashnumba import reference, registry
from flashnumba.tools.emulation import attention_backward_in_dtype, attention_in_dtype

DTYPES = ("float32", "float16", "bfloat16")
ALGORITHMS = registry.names()
NAMES = ("out", "lse", "dq", "dk", "dv")
NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
LIMITS = {"out": 2.0, "lse": 1e-5, "dq": 3.0, "dk": 3.0, "dv": 3.0}
FP32_LIMIT = 1e-5

# (label, B, Nq, Nk, Hq, Hkv, d, causal, dropout_p)
GPU_CASES = [
    ("N=1000 d=64 GQA", 2, 1000, 1000, 4, 2, 64, False, 0.0),
    ("Nq=700 Nk=1100 d=40 causal dropout 0.1", 1, 700, 1100, 4, 4, 40, True, 0.1),
]
SIM_CASES = [
    ("N=37 d=24 GQA", 1, 37, 37, 2, 1, 24, False, 0.0),
    ("Nq=21 Nk=30 d=17 causal dropout 0.1", 1, 21, 30, 2, 2, 17, True, 0.1),
]


def _rel(x, ref):
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)):
        return float("inf")
    denom = np.linalg.norm(ref[finite])
    diff = np.linalg.norm(x[finite] - ref[finite])
    return float(diff / denom) if denom > 0 else float(diff)


def _max(x, ref):
    return float(np.abs(x - ref).max())


def measure(dtype, algorithm, B, Nq, Nk, Hq, Hkv, d, causal, dropout_p, seed=0):
    """{name: (value, passed)} for out, lse, dq, dk, dv (see the module docstring)."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32).astype(NP[dtype]) for shape in
                     ((B, Nq, Hq, d), (B, Nk, Hkv, d), (B, Nk, Hkv, d), (B, Nq, Hq, d)))
    out, lse, S_dmask = flashnumba.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal,
                                                   return_attn_probs=True, algorithm=algorithm,
                                                   seed=seed + 1)
    grads = flashnumba.flash_attn_backward(dout, q, k, v, out, lse, dropout_p=dropout_p, causal=causal,
                                           algorithm=algorithm, seed=seed + 1)
    keep = None if S_dmask is None else ~np.signbit(S_dmask)
    q64, k64, v64, dout64 = (x.astype(np.float64) for x in (q, k, v, dout))
    options = dict(causal=causal, dropout_p=dropout_p, dropout_mask=keep)
    refs = (*reference.attention(q64, k64, v64, **options),
            *reference.attention_backward(dout64, q64, k64, v64, **options))
    got = [x.astype(np.float64) for x in (out, lse, *grads)]
    result = {"lse": (_rel(got[1], refs[1]), None)}
    if dtype == "float32":
        for name, x, ref in zip(NAMES, got, refs):
            result[name] = (_rel(x, ref), None)
    else:
        lows = (attention_in_dtype(q64, k64, v64, dtype, **options), None,
                *attention_backward_in_dtype(dout64, q64, k64, v64, dtype, **options))
        for name, x, ref, low in zip(NAMES, got, refs, lows):
            if name != "lse":
                result[name] = (_max(x, ref) / max(_max(low, ref), 1e-30), None)
    for name, (value, _) in result.items():
        limit = FP32_LIMIT if dtype == "float32" or name == "lse" else LIMITS[name]
        result[name] = (value, value <= limit)
    return {name: result[name] for name in NAMES}


def table(cases, dtypes=DTYPES, algorithms=ALGORITHMS, stream=None):
    stream = sys.stdout if stream is None else stream
    rows, failures = [], 0
    print("| dtype | algorithm | case | " + " | ".join(NAMES) + " |", file=stream)
    print("| --- | --- | --- | " + " | ".join("---" for _ in NAMES) + " |", file=stream, flush=True)
    for dtype in dtypes:
        for algorithm in algorithms:
            if not registry.version(algorithm).takes(dtype):     # fa2_tc: float16 and bfloat16 only
                continue
            for label, *shape in cases:
                result = measure(dtype, algorithm, *shape)
                failures += sum(not ok for _, ok in result.values())
                cells = []
                for name in NAMES:
                    value, ok = result[name]
                    text = f"{value:.1e}" if dtype == "float32" or name == "lse" else f"{value:.2f}x"
                    cells.append(text if ok else f"**{text} FAIL**")
                print(f"| {dtype} | {algorithm} | {label} | " + " | ".join(cells) + " |", file=stream,
                      flush=True)
                rows.append({"dtype": dtype, "algorithm": algorithm, "case": label,
                             **{name: result[name][0] for name in NAMES}})
    return rows, failures


def _device_name():
    if flashnumba.on_simulator():
        return "the CUDA simulator"
    from numba import cuda
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="flashnumba accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--small", action="store_true", help="the simulator-sized cases, also on a GPU")
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--cases", nargs="+", type=int, metavar="I",
                        help="only these cases, numbered from 1 in the order the table lists them")
    args = parser.parse_args(argv)
    cases = SIM_CASES if args.small or flashnumba.on_simulator() else GPU_CASES
    if args.cases:
        wrong = [i for i in args.cases if not 1 <= i <= len(cases)]
        if wrong:
            parser.error(f"--cases {' '.join(map(str, wrong))}: there are {len(cases)} cases, "
                         f"numbered 1 to {len(cases)}")
        cases = [cases[i - 1] for i in args.cases]
    print(f"accuracy on {_device_name()}: fp32 ||x - ref|| / ||ref|| (<= 1e-5); fp16/bf16 "
          f"max|x - ref| / max|dense in dtype - ref| (<= 2 out, <= 3 gradients); lse relative (<= 1e-5)")
    rows, failures = table(cases, args.dtypes, args.algorithms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_name(), "rows": rows}, f, indent=1)
    print(f"accuracy: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
