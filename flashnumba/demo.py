"""`flashnumba demo`: one small attention problem through every mirror and every kernel.

Prints, for each implementation, the relative error against the float64
reference; then the public call ``flash_attn_func`` in each storage dtype with
dropout (the official accuracy rule, ``flashnumba.tools.accuracy``); then a
step-by-step table of FA2's online softmax for one row; and says where the
kernels ran (GPU or simulator).
"""

import time

import numpy as np

import flashnumba
from flashnumba import dtypes, mirror, reference, registry
from flashnumba.geometry import Tiling


def rel_err(x, ref):
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)):
        return float("inf")
    denom = np.linalg.norm(ref[finite])
    diff = np.linalg.norm(x[finite] - ref[finite])
    return diff / denom if denom > 0 else diff


def _problem(N, d, seed):
    rng = np.random.default_rng(seed)
    shape = (1, N, 1, d)
    q, k, v, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    return q, k, v, dout


def _mirror_rows(q, k, v, dout, causal, Br, Bc):
    """(name, errors) for each NumPy mirror, one head, float64."""
    Q, K, V, dO = (x[0, :, 0, :].astype(np.float64) for x in (q, k, v, dout))
    O_ref, L_ref = reference.single_head(Q, K, V, causal=causal)
    dQ_ref, dK_ref, dV_ref = reference.single_head_backward(dO, Q, K, V, causal=causal)
    kw = dict(Br=Br, Bc=Bc, causal=causal)

    O1, l1, m1 = mirror.fa1_forward(Q, K, V, **kw)
    with np.errstate(divide="ignore"):
        L1 = m1 + np.log(l1)
    g1 = mirror.fa1_backward(dO, Q, K, V, O1, l1, m1, **kw)
    O2, L2 = mirror.fa2_forward(Q, K, V, **kw)
    g2 = mirror.fa2_backward(dO, Q, K, V, O2, L2, **kw)
    refs = (O_ref, L_ref, dQ_ref, dK_ref, dV_ref)
    return [("mirror fa1 (float64)", [rel_err(x, r) for x, r in zip((O1, L1, *g1), refs)]),
            ("mirror fa2 (float64)", [rel_err(x, r) for x, r in zip((O2, L2, *g2), refs)])]


def _kernel_rows(q, k, v, dout, causal):
    """(name, errors, seconds) for each registry version's kernels, in fp32 (a version that reads
    16-bit inputs only: in bf16, against the reference on the same rounded inputs), one at a time."""
    for version in registry.VERSIONS:
        dtype = version.input_dtype(dtypes.FLOAT32)
        q_, k_, v_, dout_ = (x.astype(dtypes.NUMPY[dtype]) for x in (q, k, v, dout))
        q64, k64, v64, dout64 = (x.astype(np.float64) for x in (q_, k_, v_, dout_))
        refs = (*reference.attention(q64, k64, v64, causal=causal),
                *reference.attention_backward(dout64, q64, k64, v64, causal=causal))
        start = time.perf_counter()
        O, L = version.module(registry.FORWARD).forward(q_, k_, v_, causal=causal)
        grads = version.module(registry.BACKWARD).backward(dout_, q_, k_, v_, O, L, causal=causal)
        short = "fp32" if dtype == dtypes.FLOAT32 else "bf16"
        yield (f"kernel {version.name} ({short})",
               [rel_err(np.asarray(x, dtype=np.float64), r) for x, r in zip((O, L, *grads), refs)],
               time.perf_counter() - start)


def _api_lines(N, d, causal, seed, dropout_p=0.1):
    """flash_attn_func + flash_attn_backward in every storage dtype, with dropout, judged as
    ``flashnumba accuracy`` judges them; one line at a time."""
    from flashnumba.tools import accuracy
    yield (f"flashnumba.flash_attn_func and flash_attn_backward, the default algorithm ({registry.DEFAULT!r} "
           f"for float32, {registry.DEFAULT_HALF!r} for float16 and bfloat16 where it runs), 2 query heads "
           f"sharing 1 K/V head, dropout p={dropout_p}:")
    yield ("  float32: ||x - ref|| / ||ref||;  float16, bfloat16: max|x - ref| / max|dense attention "
           "in that dtype - ref| (passes at <= 2, gradients <= 3)")
    yield f"  {'dtype':<10}" + "".join(f"{n:>10}" for n in accuracy.NAMES) + f"{'':>4}time"
    for dtype in accuracy.DTYPES:
        start = time.perf_counter()
        result = accuracy.measure(dtype, None, 1, N, N, 2, 1, d, causal, dropout_p, seed=seed)
        cells = []
        for name in accuracy.NAMES:
            value, ok = result[name]
            text = f"{value:.1e}" if dtype == "float32" or name == "lse" else f"{value:.2f}x"
            cells.append(f"{text if ok else text + '!':>10}")
        yield f"  {dtype:<10}" + "".join(cells) + f"{time.perf_counter() - start:>7.1f}s"


def _online_softmax_table(q, k, v, causal, Br, Bc, row=0):
    """FA2's running statistics for one query row, one line per inner step."""
    Q, K, V = (x[0, :, 0, :].astype(np.float64) for x in (q, k, v))
    tiling = Tiling(Q.shape[0], K.shape[0], Br, Bc, causal=causal)
    i, r = divmod(row, Br)
    lines = [f"FA2 online softmax, query row {row} (Q tile i={i}), one line per K/V tile j:",
             f"  {'j':>3} {'m_i':>10} {'l_i':>10} {'e^(m_old-m_new)':>16}"]
    m_old = -np.inf
    for step in mirror.fa2_forward_steps(Q, K, V, Br=Br, Bc=Bc, causal=causal):
        if step.i != i:
            continue
        m_new = float(step.state["m_i"][r])
        scale = f"{np.exp(m_old - m_new):.4f}" if np.isfinite(m_old) else "- (first)"
        lines.append(f"  {step.j:>3} {m_new:>10.4f} {float(step.state['l_i'][r]):>10.4f} "
                     f"{scale:>16}")
        m_old = m_new
    _, L = mirror.fa2_forward(Q, K, V, Br=Br, Bc=Bc, causal=causal)
    _, L_ref = reference.single_head(Q, K, V, causal=causal)
    lines.append(f"  L = m_i + log l_i = {L[row]:.4f}; float64 reference lse = {L_ref[row]:.4f}")
    lines.append(f"  ({tiling.Tc} K/V tiles of Bc={Bc}; {tiling.count('skipped')} tiles skipped "
                 f"by the causal mask)" if causal else f"  ({tiling.Tc} K/V tiles of Bc={Bc})")
    return lines


def _say(text="", end="\n"):
    print(text, end=end, flush=True)     # each line as it is ready: the kernels take seconds each


def main(args):
    where = flashnumba.device()
    _say(f"flashnumba {flashnumba.__version__}: kernels run on "
         f"{'a CUDA GPU' if where == 'gpu' else 'Numba CUDA simulator (no GPU found)'}")
    _say(f"problem: batch=1, heads=1, N={args.N}, d={args.d}, causal={args.causal}, "
         f"seed={args.seed}; errors are ||x - ref|| / ||ref|| against the float64 reference\n")
    q, k, v, dout = _problem(args.N, args.d, args.seed)
    Br, Bc = 16, 16

    header = f"{'implementation':<24}{'out':>10}{'lse':>10}{'dq':>10}{'dk':>10}{'dv':>10}{'time':>9}"
    _say(header)
    _say("-" * len(header))
    for name, errs in _mirror_rows(q, k, v, dout, args.causal, Br, Bc):
        _say(f"{name:<24}" + "".join(f"{e:>10.1e}" for e in errs))
    for name, errs, seconds in _kernel_rows(q, k, v, dout, args.causal):
        _say(f"{name:<24}" + "".join(f"{e:>10.1e}" for e in errs) + f"{seconds:>8.1f}s")
    _say()
    for line in _api_lines(args.N, args.d, args.causal, args.seed):
        _say(line)
    _say()
    _say("\n".join(_online_softmax_table(q, k, v, args.causal, Br, Bc, row=Br + 3)))
    return 0
