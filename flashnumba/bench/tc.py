"""The tensor-core kernels (fa2_tc_forward / fa2_tc_backward) beside PyTorch SDPA, in one run.

    python -m flashnumba.bench.tc                 # the table below, on a CUDA GPU
    python -m flashnumba.bench.tc --quick         # N = 1024 only, to try it out

For each case and dtype (bf16, fp16) it validates, then times with CUDA events
(``bench.timing.time_runs``; warm-up excluded, median of the runs):

    tc      fa2_tc_forward / fa2_tc_backward on the torch tensors' memory (no copy:
            uint16 views through __cuda_array_interface__)
    FLASH   torch.nn.functional.scaled_dot_product_attention, FLASH_ATTENTION backend
    CUDNN   the same, CUDNN_ATTENTION backend

TFLOP/s count forward 4 B H Nq Nk d (half under causal), backward 2.5 times that.
Validation before timing, by flash-attn's rule: the output's max error against
an fp32 reference must be at most 2x that of dense attention computed in the
dtype (SDPA MATH in bf16/fp16), gradients 3x. The reference is computed one
batch at a time; for N beyond VALIDATE_FULL_N only the last VALIDATE_ROWS
query rows are checked for the forward (they see every key), and the
gradients are compared with the FLASH backend's instead (relative error at
most BACKWARD_VS_FLASH). A row that fails is reported, never timed.
"""

import argparse
import sys

FORWARD_CASES = [   # (B, H, N, d, causal)
    (4, 16, 4096, 64, False), (4, 16, 4096, 64, True),
    (4, 16, 4096, 128, False), (4, 16, 4096, 128, True),
    (1, 16, 131072, 64, True), (1, 16, 131072, 128, True),
]
QUICK_CASES = [(2, 8, 1024, 64, False), (2, 8, 1024, 128, True)]
DTYPES = ("bfloat16", "float16")
BACKENDS = ("tc", "FLASH", "CUDNN")
VALIDATE_FULL_N = 8192
VALIDATE_ROWS = 256
BACKWARD_VS_FLASH = 2e-2
WARMUP = 2
RUNS = 10


def attention_flops(B, H, Nq, Nk, d, causal, backward=False):
    """Forward 4 B H Nq Nk d (matmuls only), half under causal; backward 2.5 x the forward."""
    flops = 4.0 * B * H * Nq * Nk * d
    if causal:
        flops /= 2
    return flops * 2.5 if backward else flops


def tflops(flops, median_ms):
    return flops / (median_ms * 1e-3) / 1e12


def format_table(rows):
    """Markdown table of result dicts (case, dtype, pass, backend TFLOP/s and ratios to FLASH, CUDNN)."""
    head = ("| case | dtype | pass | tc TFLOP/s | FLASH | CUDNN | tc vs FLASH | tc vs CUDNN |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]

    def cell(x):
        return "-" if x is None else f"{x:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    for r in rows:
        tc, flash, cudnn = (r["tflops"].get(name) for name in BACKENDS)
        lines.append(f"| {r['case']} | {r['dtype']} | {r['pass']} | {cell(tc)} | {cell(flash)} | "
                     f"{cell(cudnn)} | {ratio(tc, flash)} | {ratio(tc, cudnn)} |")
    return "\n".join(lines)


def case_label(B, H, N, d, causal, backward):
    return f"{'bwd' if backward else 'fwd'} B={B} H={H} N={N} d={d}{' causal' if causal else ''}"


# ---------------------------------------------------------------------------
# GPU side (torch imported here only)
# ---------------------------------------------------------------------------

def numba_bits(t):
    """A CUDA torch tensor (B, N, H, d) in fp16/bf16 as a Numba uint16 device array, no copy."""
    import numpy as np
    import torch
    from numba import cuda
    return cuda.as_cuda_array(t.contiguous().view(torch.int16)).view(np.uint16)


def torch_from_bits(bits, dtype):
    """A Numba uint16 device array as a torch tensor of `dtype` (a torch dtype, or "bfloat16" /
    "float16"), no copy."""
    import numpy as np
    import torch
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.as_tensor(bits.view(np.int16), device="cuda").view(dtype)


def _sdpa(backend, q, k, v, causal):
    """SDPA on (B, N, H, d) tensors through the given backend; returns (B, N, H, d)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"FLASH": SDPBackend.FLASH_ATTENTION, "CUDNN": SDPBackend.CUDNN_ATTENTION,
             "MATH": SDPBackend.MATH}[backend]
    with sdpa_kernel(which):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


def _tc_forward(q, k, v, causal, dtype_name):
    """(run, get_out) for fa2_tc_forward on torch tensors: out as a torch tensor."""
    from flashnumba.geometry import TOP_LEFT
    from flashnumba.kernels import fa2_tc_forward as tcf
    launch, out, L, _ = tcf.launcher(*(numba_bits(x) for x in (q, k, v)), causal=causal,
                                     alignment=TOP_LEFT, dtype=dtype_name)
    return launch, (lambda: torch_from_bits(out, q.dtype)), L


def _tc_backward(q, k, v, dout, out, L, causal, dtype_name):
    from flashnumba.geometry import TOP_LEFT
    from flashnumba.kernels import fa2_tc_backward as tcb
    launch, dq, dk, dv, _ = tcb.launcher(*(numba_bits(x) for x in (dout, q, k, v, out)), L,
                                         causal=causal, alignment=TOP_LEFT, dtype=dtype_name)
    return launch, lambda: tuple(torch_from_bits(x, q.dtype) for x in (dq, dk, dv))


def _max_err(x, ref):
    return (x.float() - ref.float()).abs().max().item()


def _validate_forward(out_by_backend, q, k, v, causal):
    """{backend: passed}: max error vs fp32 <= 2x dense attention in the dtype (per batch)."""
    import torch
    B, N = q.shape[0], q.shape[1]
    rows = slice(None) if N <= VALIDATE_FULL_N else slice(N - VALIDATE_ROWS, N)
    errs = {name: 0.0 for name in out_by_backend}
    low_err = 0.0
    for b in range(B):
        qb = q[b:b + 1, rows]
        kb, vb = k[b:b + 1], v[b:b + 1]
        # the last rows see every key; as a slice, their causal mask is bottom-right of the slice
        mask = None
        if causal:
            r0 = N - qb.shape[1]
            mask = (torch.arange(N, device="cuda")[None, :]
                    <= torch.arange(r0, N, device="cuda")[:, None])
        def dense(x, y, z, dt, mask=mask):
            s = torch.einsum("bnhd,bmhd->bhnm", x.to(dt), y.to(dt)) * (q.shape[-1] ** -0.5)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.softmax(s.float(), dim=-1).to(dt)
            return torch.einsum("bhnm,bmhd->bnhd", p, z.to(dt))
        ref = dense(qb, kb, vb, torch.float32)
        low_err = max(low_err, _max_err(dense(qb, kb, vb, q.dtype), ref))
        for name, out in out_by_backend.items():
            errs[name] = max(errs[name], _max_err(out[b:b + 1, rows], ref))
    return {name: err <= 2.0 * low_err for name, err in errs.items()}, errs, low_err


def _validate_backward(grads_by_backend, q, k, v, dout, causal):
    """{backend: passed} for (dq, dk, dv): 3x rule against fp32 autograd (N <= VALIDATE_FULL_N),
    else relative error against the FLASH backend's gradients."""
    import torch
    N = q.shape[1]
    if N > VALIDATE_FULL_N:
        flash = grads_by_backend["FLASH"]
        ok = {}
        for name, grads in grads_by_backend.items():
            rel = max(((g.float() - f.float()).norm() / f.float().norm()).item()
                      for g, f in zip(grads, flash))
            ok[name] = rel <= BACKWARD_VS_FLASH
        return ok
    worst = {name: 0.0 for name in grads_by_backend}
    for b in range(q.shape[0]):
        ref_grads, low_grads = [], []
        for dt in (torch.float32, q.dtype):
            xs = [x[b:b + 1].detach().to(dt).requires_grad_() for x in (q, k, v)]
            o = _sdpa("MATH", *xs, causal)
            o.backward(dout[b:b + 1].to(dt))
            (ref_grads if dt == torch.float32 else low_grads).append([x.grad for x in xs])
        for name, grads in grads_by_backend.items():
            for g, r, lo in zip(grads, ref_grads[0], low_grads[0]):
                worst[name] = max(worst[name], _max_err(g[b:b + 1], r) / max(_max_err(lo, r), 1e-30))
    return {name: w <= 3.0 for name, w in worst.items()}


def _time(run):
    from flashnumba.bench.timing import summarise, time_runs
    for _ in range(WARMUP):
        run()
    return summarise(time_runs([run], RUNS))


def run_case(B, H, N, d, causal, dtype_name, seed=0):
    """Two result dicts (forward, backward) for one case: validated, then timed."""
    import torch
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(B, N, H, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))

    # forward
    tc_run, tc_out, L = _tc_forward(q, k, v, causal, dtype_name)
    tc_run()
    outs = {"tc": tc_out()}
    runs = {"tc": tc_run}
    for backend in ("FLASH", "CUDNN"):
        try:
            outs[backend] = _sdpa(backend, q, k, v, causal)
            runs[backend] = (lambda be=backend: _sdpa(be, q, k, v, causal))
        except RuntimeError as exc:              # backend not available for this shape/GPU
            print(f"  {backend} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    torch.cuda.synchronize()
    passed, _, _ = _validate_forward(outs, q, k, v, causal)
    fwd_flops = attention_flops(B, H, N, N, d, causal)
    fwd = {"case": case_label(B, H, N, d, causal, False), "dtype": dtype_name,
           "pass": all(passed.values()), "validated": passed, "tflops": {}, "timing": {}}
    for name, run in runs.items():
        if passed[name]:
            fwd["timing"][name] = _time(run)
            fwd["tflops"][name] = tflops(fwd_flops, fwd["timing"][name]["median_ms"])

    # backward
    tc_bwd, tc_grads = _tc_backward(q, k, v, dout, outs["tc"], L, causal, dtype_name)
    tc_bwd()
    grads = {"tc": tc_grads()}
    bwd_runs = {"tc": tc_bwd}
    for backend in [b for b in ("FLASH", "CUDNN") if b in outs]:
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        with torch.enable_grad():
            o = _sdpa(backend, *xs, causal)
        o.backward(dout, retain_graph=True)
        grads[backend] = tuple(x.grad.clone() for x in xs)

        def bwd(o=o, xs=xs):
            for x in xs:
                x.grad = None
            o.backward(dout, retain_graph=True)
        bwd_runs[backend] = bwd
    torch.cuda.synchronize()
    passed_b = _validate_backward(grads, q, k, v, dout, causal)
    bwd_flops = attention_flops(B, H, N, N, d, causal, backward=True)
    bwd = {"case": case_label(B, H, N, d, causal, True), "dtype": dtype_name,
           "pass": all(passed_b.values()), "validated": passed_b, "tflops": {}, "timing": {}}
    for name, run in bwd_runs.items():
        if passed_b[name]:
            bwd["timing"][name] = _time(run)
            bwd["tflops"][name] = tflops(bwd_flops, bwd["timing"][name]["median_ms"])
    return fwd, bwd


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flashnumba.bench.tc", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small cases only")
    parser.add_argument("--dtype", choices=DTYPES, action="append", help="default: both")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    import flashnumba
    if flashnumba.on_simulator():
        print("flashnumba.bench.tc needs a CUDA GPU (the simulator cannot time anything)", file=sys.stderr)
        return 2
    import numba
    numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    rows = []
    for dtype_name in args.dtype or DTYPES:
        for case in (QUICK_CASES if args.quick else FORWARD_CASES):
            rows += run_case(*case, dtype_name)
            print("\n".join(format_table(rows[-2:]).splitlines()[2:]), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
