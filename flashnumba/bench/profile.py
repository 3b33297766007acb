"""One launch of each kernel of a version with a launcher, at one shape, for a profiler (not a benchmark).

    ncu --kernel-name regex:fa2_fast --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats ... \\
        python -m flashnumba.bench.profile --shape 4x16x4096x64

Each kernel is launched three times: the first compiles it (and is what
``--launch-skip`` skips), the others are the ones to profile. Without a
profiler it prints each launch's time from CUDA events, which is a smoke test
and nothing more: ``flashnumba bench`` is the benchmark.

``--version`` picks the registry version (default: the public calls' default); a
version that reads no float32 (the tensor-core ``fa2_tc``) gets bfloat16 inputs;
``--config Br,Bc,warps[,blocks_per_sm]`` a backward configuration other than
the default (its module's ``shipped_configs()`` lists them).
"""

import argparse
import sys

from flashnumba import registry

LAUNCHES = 3


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flashnumba.bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4x16x4096x64", help="BxHxNxd (default 4x16x4096x64)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--direction", choices=("fwd", "bwd", "both"), default="both")
    p.add_argument("--version", default=registry.DEFAULT,
                   choices=[v.name for v in registry.VERSIONS if v.launcher],
                   help="the kernel version (default: %(default)s)")
    p.add_argument("--config", help="backward config Br,Bc,warps[,blocks_per_sm]")
    return p.parse_args(argv)


def parse_shape(text):
    try:
        B, H, N, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shape must be BxHxNxd with four integers, got {text!r}") from None
    return B, H, N, d


def parse_config(text, d, version):
    from flashnumba.kernels.common import TileConfig
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4):
        raise SystemExit(f"--config must be Br,Bc,warps[,blocks_per_sm], got {text!r}")
    Br, Bc, warps = values[:3]
    blocks = values[3] if len(values) == 4 else 0
    d_pad = version.module(registry.BACKWARD).default_config(d).d_pad
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=warps, blocks_per_sm=blocks)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from flashnumba._device import on_simulator
    if on_simulator():
        print("profile: no CUDA GPU here (this module launches real kernels for a profiler)")
        return 2
    import numpy as np
    from numba import cuda

    version = registry.version(args.version)
    forward, backward = version.module(registry.FORWARD), version.module(registry.BACKWARD)
    B, H, N, d = parse_shape(args.shape)
    config = parse_config(args.config, d, version) if args.config else None
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((B, N, H, d), dtype=np.float32) for _ in range(4)]
    options = {"causal": args.causal}
    if not version.reads("float32"):        # bfloat16 bits on the device, as fa2_tc reads them
        import ml_dtypes
        inputs = [x.astype(ml_dtypes.bfloat16).view(np.uint16) for x in inputs]
        options["dtype"] = "bfloat16"
    q, k, v, dout = (cuda.to_device(x) for x in inputs)
    launch_forward, out, L, *_ = forward.launcher(q, k, v, **options)
    launch_forward()                        # out and L for the backward
    launches = []
    if args.direction in ("fwd", "both"):
        launches.append((version.kernel(registry.FORWARD), launch_forward))
    if args.direction in ("bwd", "both"):
        launch, *_ = backward.launcher(dout, q, k, v, out, L, config=config, **options)
        launches.append((version.kernel(registry.BACKWARD), launch))
    for name, launch in launches:
        for n in range(LAUNCHES):
            start, stop = cuda.event(), cuda.event()
            start.record()
            launch()
            stop.record()
            stop.synchronize()
            print(f"{name} {args.shape}{' causal' if args.causal else ''} launch {n}: "
                  f"{start.elapsed_time(stop):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
