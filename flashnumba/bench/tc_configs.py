"""fa2_tc's tile configs beside PyTorch's FLASH, in one run: the backward's shipped configs, or
(``--forward``) the forward's candidates.

    python -m flashnumba.bench.tc_configs                      # backward, B=4 H=16 N=4096, d=64 and 128
    python -m flashnumba.bench.tc_configs --shape 2x8x2048 --d 64
    python -m flashnumba.bench.tc_configs --forward --d 128 --json fwd.json

For each head dim and causal or not: FLASH (torch's scaled_dot_product_attention with the FLASH
backend, bf16; the backward alone through autograd, or the forward), timed by CUDA events, median
of RUNS runs after WARMUP, then each config of fa2_tc on the same inputs: milliseconds, TFLOP/s
(the forward's 4 B H N^2 d, 2.5 x that for the backward, half for causal), the ratio to FLASH,
and the largest difference from FLASH's output (the forward's O, the backward's gradients). What
a config change does to the speed is read here before a default moves.

Backward: every config of ``fa2_tc_backward.shipped_configs()`` for the head dim's bucket, then
the default with one float an atomic on sm_90 and newer (``backward_candidates``).
Forward: ``forward_candidates(d_pad)``, the default first: Bc in {32, 64} x warps in {4, 8}
(Br = 16 warps) x K/V stages in {1, 2}, less what check_config refuses and what ptxas spills on
sm_90 (SPILLED_ON_SM90; the whole grid, for ptxas through nvJitLink without a GPU:
``flashnumba resources --cc 90 --source flashnumba.bench.tc_configs:forward_targets``). A
candidate whose K/V tiles exceed 48 KB (2 stages of Bc=64 at d_pad=128: 69632 B) runs with them
in dynamic shared memory (``fa2_tc_forward.is_dynamic``); its name says "dynamic".
``--default-only``: only the defaults and their variants, in either direction.
Nothing here runs on the simulator.
"""

import argparse
import functools
import json
import statistics

WARMUP = 2
RUNS = 10
FORWARD_BC = (32, 64)
FORWARD_WARPS = (4, 8)
FORWARD_STAGES = (1, 2)
# the compiled variants the resource targets build: (name suffix, build options)
KERNEL_VARIANTS = (("", {}), ("_dropout", {"dropout": True}),
                   ("_softcap_alibi", {"softcap": True, "alibi": True}))
# (Br, Bc, d_pad, warps, stages) of the forward grid that ptxas spills for sm_90, by the resources
# command in the module docstring (PERF-NOTES.md, "fa2_tc_forward's candidates").
SPILLED_ON_SM90 = frozenset()


# ---------------------------------------------------------------------------
# The pure parts: FLOPs, the forward's candidates, the table
# ---------------------------------------------------------------------------

def forward_flops(B, H, N, d, causal):
    return 4 * B * H * N * N * d / (2 if causal else 1)


def backward_flops(B, H, N, d, causal):
    return 2.5 * forward_flops(B, H, N, d, causal)


def forward_grid(d_pad):
    """[(TileConfig, stages)] of fa2_tc_forward at d_pad over FORWARD_BC x FORWARD_WARPS x
    FORWARD_STAGES that its check_config takes (shared memory, static up to 48 KB and dynamic
    above, within any GPU's opt-in limit; thread layout)."""
    from flashnumba.kernels import fa2_tc_forward as tcf
    from flashnumba.kernels.common import ConfigError, TileConfig

    grid = []
    for Bc in FORWARD_BC:
        for warps in FORWARD_WARPS:
            for n_stages in FORWARD_STAGES:
                config = TileConfig(Br=16 * warps, Bc=Bc, d_pad=d_pad, num_warps=warps)
                try:
                    tcf.check_config(config, n_stages)
                except ConfigError:
                    continue
                grid.append((config, n_stages))
    return grid


def forward_candidates(d_pad):
    """What ``--forward`` times at d_pad: the shipped default (with its own stages) first, then
    the rest of forward_grid(d_pad) less SPILLED_ON_SM90."""
    from flashnumba.kernels import fa2_tc_forward as tcf

    default = tcf.default_config(d_pad)
    first = (default, tcf.stages(default))
    rest = [c for c in forward_grid(d_pad) if c != first and describe(*c, key=True) not in SPILLED_ON_SM90]
    return [first] + rest


def describe(config, n_stages, key=False):
    """"Br=64 Bc=32 warps=4 stages=2" (with " dynamic" where K/V live in dynamic shared memory),
    or the tuple SPILLED_ON_SM90 holds (key=True)."""
    from flashnumba.kernels import fa2_tc_forward as tcf

    if key:
        return (config.Br, config.Bc, config.d_pad, config.num_warps, n_stages)
    dynamic = " dynamic" if tcf.is_dynamic(config, n_stages) else ""
    return f"Br={config.Br} Bc={config.Bc} warps={config.num_warps} stages={n_stages}{dynamic}"


def forward_targets():
    """[(label, dispatcher, argtypes)] of the bf16 forward over forward_grid(64) and (128), for
    ``flashnumba resources --source flashnumba.bench.tc_configs:forward_targets``."""
    from flashnumba.kernels import fa2_tc_forward as tcf

    targets = []
    for d_pad in (64, 128):
        for config, n_stages in forward_grid(d_pad):
            (label, _, argtypes), *_ = tcf.compile_targets(config)    # the first: plain bf16
            targets.append((f"{label} d_pad={d_pad} {describe(config, n_stages)}",
                            tcf.build(config, "bf16", stages=n_stages), argtypes))
    return targets


def backward_red_v2_targets():
    """[(label, dispatcher, argtypes)] of every shipped config's dkdv kernels (each dtype, plain,
    and dropout, softcap + ALiBi where the config serves them: ``fa2_tc_backward.serves_variants``)
    with dQ's atomics two floats at a time, as they run on sm_90 and
    newer (``fa2_tc_backward.vector_red``); ptxas takes them for sm_90 only:
    ``flashnumba resources --cc 90 --source flashnumba.bench.tc_configs:backward_red_v2_targets``."""
    from flashnumba.kernels import fa2_tc_backward as tcb

    targets = []
    argtypes = tcb.dkdv_argtypes()
    for config in tcb.shipped_configs():
        for kind in ("bf16", "f16"):
            for suffix, options in KERNEL_VARIANTS:
                if options and not tcb.serves_variants(config):
                    continue
                targets.append(((f"fa2_tc_backward_{kind}{suffix} Br={config.Br} Bc={config.Bc} "
                                 f"d_pad={config.d_pad} red.v2"),
                                tcb.build(config, kind, red_v2=True, **options).dkdv, argtypes))
    return targets


def format_table(rows):
    """Rows (dicts of pass, d, causal, impl, ms, tflops, x_flash, max_diff) as an aligned text
    table; FLASH's own row shows dashes for the ratio and the difference."""
    header = ("pass", "d", "causal", "impl", "ms", "TFLOP/s", "x FLASH", "max |diff|")
    lines = [header]
    for r in rows:
        flash = r["impl"] == "FLASH"
        lines.append((r["pass"], str(r["d"]), "yes" if r["causal"] else "no", r["impl"], f"{r['ms']:.3f}",
                      f"{r['tflops']:.1f}", "-" if flash else f"{r['x_flash']:.2f}",
                      "-" if flash else f"{r['max_diff']:.3g}"))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


# ---------------------------------------------------------------------------
# Timing (GPU only)
# ---------------------------------------------------------------------------

def time_ms(fn, runs=RUNS):
    import torch
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _row(pass_, d, causal, impl, ms, flops, flash_ms, max_diff):
    return {"pass": pass_, "d": d, "causal": causal, "impl": impl, "ms": ms, "tflops": flops / ms / 1e9,
            "x_flash": flash_ms / ms, "max_diff": max_diff}


def _inputs(B, H, N, d, count):
    """count bf16 tensors (B, N, H, d), seeded, on the GPU (flashnumba's layout)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, N, H, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(count)]


def run_forward(B, H, N, head_dims, log=print, default_only=False):
    """Rows: FLASH's forward, then each of forward_candidates(d_pad) (only the default with
    `default_only`), per head dim x causal."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashnumba.bench.tc import numba_bits, torch_from_bits
    from flashnumba.geometry import TOP_LEFT
    from flashnumba.kernels import common
    from flashnumba.kernels import fa2_tc_forward as tcf

    rows = []
    for d in head_dims:
        candidates = forward_candidates(common.head_dim_bucket(d))
        if default_only:
            candidates = candidates[:1]
        for causal in (False, True):
            flops = forward_flops(B, H, N, d, causal)
            q, k, v = _inputs(B, H, N, d, 3)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, qt, kt, vt,
                                         is_causal=causal)
                flash_ms = time_ms(sdpa)
                ref = sdpa().transpose(1, 2).float()
            rows.append(_row("fwd", d, causal, "FLASH", flash_ms, flops, flash_ms, 0.0))
            log(f"B={B} H={H} N={N} d={d} causal={causal}: FLASH fwd {flash_ms:.3f} ms "
                f"{rows[-1]['tflops']:.1f} TFLOP/s")
            for config, n_stages in candidates:
                launch, out, _, _ = tcf.launcher(*(numba_bits(x) for x in (q, k, v)), causal=causal,
                                                 alignment=TOP_LEFT, dtype="bfloat16", config=config,
                                                 stages=n_stages)
                ms = time_ms(launch)
                diff = (torch_from_bits(out, torch.bfloat16).float() - ref).abs().max().item()
                name = describe(config, n_stages)
                rows.append(_row("fwd", d, causal, name, ms, flops, flash_ms, diff))
                log(f"  {rows[-1]['impl']}: {ms:.3f} ms {rows[-1]['tflops']:.1f} TFLOP/s "
                    f"{rows[-1]['x_flash']:.2f}x FLASH, max |O - FLASH's| {diff:.3g}")
    return rows


# the backward's launcher options a candidate sets, and how its row names each setting
BACKWARD_VARIANTS = {("red_v2", False): "one-float atomics"}


def backward_candidates(d, default_only=False, capability=(9, 0)):
    """[(config, launcher options)] the backward times at head dim d: every shipped config as it
    ships (only the default with `default_only`), then, on compute capability >= 9.0, where dQ's
    atomics are two floats at a time by default (``fa2_tc_backward.vector_red``), the default
    config with one float an atomic."""
    from flashnumba.kernels import fa2_tc_backward as tcb

    default = tcb.default_config(d)
    configs = [default] if default_only else [c for c in tcb.shipped_configs() if c.d_pad == default.d_pad]
    candidates = [(c, {}) for c in configs]
    if tuple(capability) >= (9, 0):
        candidates.append((default, {"red_v2": False}))
    return candidates


def run_backward(B, H, N, head_dims, log=print, default_only=False):
    """Rows: FLASH's backward, then each candidate of backward_candidates, per head dim x causal."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashnumba.bench.tc import numba_bits, torch_from_bits
    from flashnumba.geometry import TOP_LEFT
    from flashnumba.kernels import fa2_tc_backward as tcb
    from flashnumba.kernels import fa2_tc_forward as tcf

    rows = []
    for d in head_dims:
        for causal in (False, True):
            flops = backward_flops(B, H, N, d, causal)
            q, k, v, dout = _inputs(B, H, N, d, 4)
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                grads = functools.partial(torch.autograd.grad, o, (qt, kt, vt), dout.transpose(1, 2),
                                          retain_graph=True)
                flash_ms = time_ms(grads)
                ref = [x.transpose(1, 2).float() for x in grads()]
            rows.append(_row("bwd", d, causal, "FLASH", flash_ms, flops, flash_ms, 0.0))
            log(f"B={B} H={H} N={N} d={d} causal={causal}: FLASH bwd {flash_ms:.3f} ms "
                f"{rows[-1]['tflops']:.1f} TFLOP/s")
            launch_forward, out, L, _ = tcf.launcher(*(numba_bits(x) for x in (q, k, v)), causal=causal,
                                                     alignment=TOP_LEFT, dtype="bfloat16")
            launch_forward()
            for config, variant in backward_candidates(d, default_only,
                                                       torch.cuda.get_device_capability()):
                launch, dq, dk, dv, _ = tcb.launcher(*(numba_bits(x) for x in (dout, q, k, v)), out, L,
                                                     causal=causal, alignment=TOP_LEFT, dtype="bfloat16",
                                                     config=config, **variant)
                ms = time_ms(launch)
                got = [torch_from_bits(x, torch.bfloat16).float() for x in (dq, dk, dv)]
                diff = max((a - r).abs().max().item() for a, r in zip(got, ref))
                name = f"Br={config.Br} Bc={config.Bc} warps={config.num_warps}" + "".join(
                    f" {BACKWARD_VARIANTS[setting]}" for setting in variant.items())
                rows.append(_row("bwd", d, causal, name, ms, flops, flash_ms, diff))
                log(f"  {name}: {ms:.3f} ms {rows[-1]['tflops']:.1f} TFLOP/s "
                    f"{rows[-1]['x_flash']:.2f}x FLASH, max |grad - FLASH's| {diff:.3g}")
    return rows


def main(argv=None, log=print):
    import flashnumba
    parser = argparse.ArgumentParser(prog="python -m flashnumba.bench.tc_configs",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="4x16x4096", help="BxHxN")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    parser.add_argument("--forward", action="store_true",
                        help="time the forward's candidate configs instead of the backward's shipped ones")
    parser.add_argument("--default-only", action="store_true",
                        help="only the default config and its variant (one-float atomics)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH")
    args = parser.parse_args(argv)
    if flashnumba.on_simulator():
        parser.error("needs a CUDA GPU (the simulator has no speed to measure)")
    B, H, N = (int(x) for x in args.shape.split("x"))
    if args.forward:
        rows = run_forward(B, H, N, args.d, log=log, default_only=args.default_only)
    else:
        rows = run_backward(B, H, N, args.d, log=log, default_only=args.default_only)
    log(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {"B": B, "H": H, "N": N}, "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
