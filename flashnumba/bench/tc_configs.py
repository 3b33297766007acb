"""fa2_tc_backward's shipped tile configs beside PyTorch's FLASH backward, in one run.

    python -m flashnumba.bench.tc_configs                      # B=4 H=16 N=4096, d=64 and 128
    python -m flashnumba.bench.tc_configs --shape 2x8x2048 --d 64

For each head dim and causal or not: FLASH's backward (torch autograd on
scaled_dot_product_attention with the FLASH backend, bf16; the backward alone,
timed by CUDA events, median of RUNS runs after WARMUP), then every config of
``fa2_tc_backward.shipped_configs()`` for that head dim's bucket on the same
inputs: milliseconds, TFLOP/s (2.5 x the forward's 4 B H N^2 d, half for causal),
the ratio to FLASH, and the largest difference from FLASH's gradients. What a
config change does to the speed is read here before a default moves.
Nothing here runs on the simulator.
"""

import argparse
import functools
import statistics

WARMUP = 2
RUNS = 10


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


def backward_flops(B, H, N, d, causal):
    return 2.5 * 4 * B * H * N * N * d / (2 if causal else 1)


def run(B, H, N, head_dims, log=print):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashnumba.bench.tc import numba_bits, torch_from_bits
    from flashnumba.geometry import TOP_LEFT
    from flashnumba.kernels import fa2_tc_backward as tcb
    from flashnumba.kernels import fa2_tc_forward as tcf

    for d in head_dims:
        d_pad = tcb.default_config(d).d_pad
        for causal in (False, True):
            flops = backward_flops(B, H, N, d, causal)
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, dout = (torch.randn(B, N, H, d, device="cuda", dtype=torch.bfloat16, generator=g)
                             for _ in range(4))
            qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                grads = functools.partial(torch.autograd.grad, o, (qt, kt, vt), dout.transpose(1, 2),
                                          retain_graph=True)
                flash_ms = time_ms(grads)
                ref = [x.transpose(1, 2).float() for x in grads()]
            log(f"B={B} H={H} N={N} d={d} causal={causal}: FLASH bwd {flash_ms:.3f} ms "
                f"{flops / flash_ms / 1e9:.1f} TFLOP/s")
            launch_forward, out, L, _ = tcf.launcher(*(numba_bits(x) for x in (q, k, v)), causal=causal,
                                                     alignment=TOP_LEFT, dtype="bfloat16")
            launch_forward()
            for config in (c for c in tcb.shipped_configs() if c.d_pad == d_pad):
                name = f"Br={config.Br} Bc={config.Bc} warps={config.num_warps}"
                launch, dq, dk, dv, _ = tcb.launcher(*(numba_bits(x) for x in (dout, q, k, v)), out, L,
                                                     causal=causal, alignment=TOP_LEFT, dtype="bfloat16",
                                                     config=config)
                ms = time_ms(launch)
                got = [torch_from_bits(x, torch.bfloat16).float() for x in (dq, dk, dv)]
                diff = max((a - r).abs().max().item() for a, r in zip(got, ref))
                log(f"  {name}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s {flash_ms / ms:.2f}x FLASH, "
                    f"max |grad - FLASH's| {diff:.3g}")


def main(argv=None):
    import flashnumba
    parser = argparse.ArgumentParser(prog="python -m flashnumba.bench.tc_configs",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", default="4x16x4096", help="BxHxN")
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    args = parser.parse_args(argv)
    if flashnumba.on_simulator():
        parser.error("needs a CUDA GPU (the simulator has no speed to measure)")
    B, H, N = (int(x) for x in args.shape.split("x"))
    run(B, H, N, args.d)


if __name__ == "__main__":
    main()
