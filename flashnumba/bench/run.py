"""``flashnumba bench``: flashnumba's kernels next to PyTorch's attention, on one CUDA GPU.

One command does everything, in this order::

    flashnumba bench                 # the default run (< 8 minutes on an H100/H200)
    flashnumba bench --quick         # d=64, N = 1k, 4k, 16k: a couple of minutes
    flashnumba bench --shapes 4x16x4096x64c,1x16x65536x64n --out figures/bench/
    flashnumba bench --tune          # also time every shipped config of the fast kernels
    flashnumba bench --calls         # the public calls beside their kernels and SDPA (bench.calls)
    flashnumba bench --calls --breakdown   # where a small call's host time goes (bench.breakdown)
    flashnumba bench --sim           # no GPU: tiny correctness pass on the simulator, NOT a benchmark
    flashnumba bench --sim --shapes 1x1x20x16c   # the same pass on these shapes instead
    python -m flashnumba.bench ...   # the same

1. Ceilings: a float32 matrix product through torch.matmul with TF32 off (the
   fp32 roof) and a device-to-device copy (the bandwidth roof).
2. Validation first: every implementation against ``flashnumba.reference``
   (NumPy float64) at a modest shape (B=1, H=2, N=200, d=64 and 128, causal
   and not). An implementation that fails there is WRONG and never timed.
3. For each shape: inputs once (rotated over several sets when they fit in
   L2), then for each implementation: one run that is checked against a
   float64 GPU computation of a subset (first/last 128 query rows of two
   heads; dK, dV of one head), with its peak extra memory measured; a WRONG
   result is reported and not timed; then timed runs between CUDA events,
   warm-up excluded, median reported.
4. Skips, each with its reason printed: implementations that would hold an
   N x N score matrix that does not fit; readable kernels predicted (from
   their rate at a smaller N) to take more than --max-slow-run seconds per
   run; anything once the run's time limit (--time-limit) is spent.
5. results.json (every number, the GPU, versions, command line),
   tflops_fwd.png, tflops_bwd.png, roofline.png in --out (default figures/bench/),
   and last a short table: TFLOP/s and the ratio to PyTorch's MATH and
   EFFICIENT backends in the same run (> 1: faster than that backend).

FLOPs: forward 4 B H N^2 d (half under causal), backward 2.5 x forward.
PyTorch is needed on the GPU machine only; flashnumba does not depend on it.
"""

import argparse
import datetime
import math
import os
import platform
import sys
import time

from flashnumba.bench import cases as cases_mod
from flashnumba.bench import report

DEFAULT_TIME_LIMIT_S = 450.0     # the whole default run, compilation included: < 8 minutes
DEFAULT_BUDGET_S = 0.5           # timed runs per implementation and shape (at least MIN_RUNS)
MIN_RUNS, MAX_RUNS = 3, 50
MAX_PRIMARY_RUN_S = 12.0         # fast kernels and torch: skip a shape predicted slower per run
MAX_SLOW_RUN_S = 1.5             # readable kernels and the naive baseline: likewise
MEMORY_FRACTION = 0.8            # of free device memory that an N x N matrix may take
VALIDATION_SHAPES = ((1, 2, 200, 64), (1, 2, 200, 128))   # (B, H, N, d), causal and not
TUNE_HEAD_DIMS = (64, 128)       # --tune: every shipped config of these buckets, at N=4096


def parse_args(argv):
    p = argparse.ArgumentParser(prog="flashnumba bench",
                                description="flashnumba's kernels next to PyTorch's attention, on one CUDA GPU.")
    p.add_argument("--quick", action="store_true", help="a few shapes (d=64, N=1k, 4k, 16k), for a short lease")
    p.add_argument("--shapes", help="comma-separated BxHxNxd, suffix c (causal only) or n (non-causal only); "
                                    "with --sim, these instead of its awkward shapes")
    p.add_argument("--impls", help="comma-separated substrings: only implementations whose name has one")
    p.add_argument("--fwd-only", action="store_true", help="forward only")
    p.add_argument("--out", default="figures/bench", help="output folder (default figures/bench/)")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help=f"seconds for the whole run; later shapes are skipped (default {DEFAULT_TIME_LIMIT_S:.0f})")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds of timed runs per implementation and shape (default {DEFAULT_BUDGET_S})")
    p.add_argument("--max-slow-run", type=float, default=MAX_SLOW_RUN_S,
                   help=f"skip readable/naive kernels predicted slower than this per run (default {MAX_SLOW_RUN_S})")
    p.add_argument("--tune", action="store_true", help="time every shipped config of the fast kernels first")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    p.add_argument("--calls", action="store_true",
                   help="time the public calls (torch, Numba, NumPy paths) beside the kernels alone and "
                        "SDPA, gpu and host ms; --shapes defaults to issue 13's three")
    p.add_argument("--profile", action="store_true",
                   help="with --calls: cProfile the torch fwd+bwd call of the first shape")
    p.add_argument("--busy", action="store_true",
                   help="with --calls: also each call's GPU-busy time (its kernels' durations, by "
                        "torch.profiler), beside the time the caller waits")
    p.add_argument("--breakdown", action="store_true",
                   help="with --calls: instead of the table, the host time of the first shape's torch "
                        "call and of each of its layers, called directly and inside autograd "
                        "(flashnumba.bench.breakdown)")
    p.add_argument("--json", help="with --calls: also write the rows to this file")
    p.add_argument("--sim", action="store_true",
                   help="no GPU needed: tiny correctness pass on the CPU simulator (NOT a benchmark)")
    args = p.parse_args(argv)
    if args.breakdown and not args.calls:
        p.error("--breakdown goes with --calls")
    if args.busy and not args.calls:
        p.error("--busy goes with --calls")
    return args


class Progress:
    """A progress bar on stderr (one line per shape when stderr is not a terminal)."""

    def __init__(self, total, start):
        self.total, self.done, self.start = total, 0, start
        self.tty = sys.stderr.isatty()

    def show(self, text, shape_start=False):
        elapsed = time.perf_counter() - self.start
        if not self.tty and not shape_start:
            return
        if self.tty:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"{elapsed:5.0f} s  {text[:60]:<60}")
        else:
            sys.stderr.write(f"[{self.done}/{self.total} {elapsed:.0f} s] {text}\n")
        sys.stderr.flush()

    def clear(self):
        if self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()


def environment(torch):
    import importlib.metadata as md

    import numba
    import numpy
    props = torch.cuda.get_device_properties(0)

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "numba": numba.__version__,
            "numba_cuda": version("numba-cuda"), "numpy": numpy.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _record(impl, case, status, reason="", **extra):
    r = {"impl": impl.name, "family": impl.family, "direction": impl.direction, "dtype": impl.dtype,
         "B": case.B, "H": case.H, "N": case.N, "d": case.d, "causal": case.causal,
         "case": case.label, "short": case.short, "status": status, "reason": reason,
         "flops": case.flops(impl.direction), "min_bytes": case.min_bytes(impl.direction),
         "median_ms": None, "tflops": None, "extra_bytes": None}
    r.update(extra)
    return r


class References:
    """float64 subset references of one case, computed once, on first use."""

    def __init__(self, inputs, case):
        self.inputs, self.case, self._fwd, self._bwd = inputs, case, None, None
        self.scale = 1.0 / math.sqrt(case.d)

    def check(self, impl, outputs):
        from flashnumba.bench import check
        x = self.inputs
        if impl.direction == "fwd":
            if self._fwd is None:
                self._fwd = check.reference_rows(x.q, x.k, x.v, self.case.causal, self.scale)
            return check.verdict([check.pick_rows(outputs[0])], [self._fwd["out"]], impl.dtype, ["O"])
        if self._bwd is None:
            rows = check.reference_rows(x.q, x.k, x.v, self.case.causal, self.scale, dout=x.dout)
            dk, dv = check.reference_dkdv(x.q, x.k, x.v, x.dout, self.case.causal, self.scale)
            self._bwd = (rows["dq"], dk, dv)
        dq, dk, dv = outputs
        return check.verdict([check.pick_rows(dq), dk[0, :, 0], dv[0, :, 0]], list(self._bwd),
                             impl.dtype, ["dq rows", "dk head0", "dv head0"])


def validate_modest(impls, torch, log):
    """Every implementation against flashnumba.reference (NumPy float64) at small shapes.
    Returns {(impl.key, d): (ok, text, kind)}, kind "ok", "WRONG" or "error" (could not run);
    compiles every kernel on the way."""
    from flashnumba import reference
    from flashnumba.bench.check import verdict
    from flashnumba.bench.impls import Inputs
    verdicts = {}
    for B, H, N, d in VALIDATION_SHAPES:
        for causal in (False, True):
            case = cases_mod.Case(B, H, N, d, causal)
            inputs = Inputs(case, seed=1)
            q, k, v, dout = (t.cpu().numpy() for t in (inputs.q, inputs.k, inputs.v, inputs.dout))
            ref_fwd = (reference.attention(q, k, v, causal=causal)[0],)
            ref_bwd = reference.attention_backward(dout, q, k, v, causal=causal)
            for impl in impls:
                try:
                    outputs = impl.as_torch(impl.prepare(inputs, case)())
                    outputs = [o.detach().float().cpu().numpy() for o in outputs]
                    refs, names = (ref_fwd, ["O"]) if impl.direction == "fwd" else (ref_bwd, ["dq", "dk", "dv"])
                    ok, _, text = verdict(outputs, refs, impl.dtype, names)
                except Exception as exc:      # an unsupported backend, a compile error: reported
                    ok, text = False, f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    torch.cuda.synchronize()
                kind = "ok" if ok else ("error" if text.startswith("ERROR") else "WRONG")
                key = (impl.key, d)
                if not ok or key not in verdicts:
                    verdicts[key] = (ok, f"{case.label}: {text}", kind)
                log(f"validate {impl.direction} {impl.name:<22} {case.label:<26} {text}")
    return verdicts


def validation_verdict(valid, key, d):
    """The verdict of (key, d); for a head dim not validated, the worst over the validated ones."""
    if (key, d) in valid:
        return valid[(key, d)]
    mine = [v for (k, _), v in valid.items() if k == key]
    failed = [v for v in mine if not v[0]]
    return failed[0] if failed else (True, "", "ok")


def measure(impl, case, input_sets, refs, args, state, torch):
    """Check, then time, one implementation at one case; returns a result record."""
    from flashnumba.bench import timing
    ok, text, kind = validation_verdict(state["valid"], impl.key, case.d)
    if not ok:
        what = "failed validation" if kind == "WRONG" else "could not run at validation"
        return _record(impl, case, kind, f"{what}, not timed ({text})")
    need = impl.scores_factor * case.scores_bytes()
    free = torch.cuda.mem_get_info()[0]
    if need > MEMORY_FRACTION * free:
        return _record(impl, case, "skipped", f"holds N x N scores: needs ~{report.fmt_bytes(need)}, "
                                              f"{report.fmt_bytes(free)} free")
    rate = state["rates"].get((impl.key, case.d, case.causal))
    if rate:
        predicted = case.flops(impl.direction) / rate
        limit = MAX_PRIMARY_RUN_S if impl.primary else args.max_slow_run
        if predicted > limit:
            return _record(impl, case, "skipped", f"predicted {predicted:.1f} s per run from its rate at a "
                                                  f"smaller N (> {limit} s allowed for this kind)")
    left = state["deadline"] - time.perf_counter()
    if left < 5:
        return _record(impl, case, "skipped", f"time limit of the run (--time-limit {args.time_limit:.0f} s) spent")
    try:
        runs = [impl.prepare(inputs, case) for inputs in input_sets]
        with timing.PeakMemory() as pm:
            outputs = impl.as_torch(runs[0]())
        extra = pm.extra(timing.output_bytes(outputs), impl.family == "flashnumba")
        ok, err, text = refs.check(impl, outputs)
        del outputs
        if not ok:
            return _record(impl, case, "WRONG", f"not timed: {text}", check=text)
        first = timing.time_runs(runs, 1)[0]              # a second warm-up; sizes the timed runs
        if first / 1e3 > left:
            return _record(impl, case, "skipped", "time limit of the run spent")
        n = int(min(MAX_RUNS, max(MIN_RUNS, args.budget * 1e3 / max(first, 1e-3))))
        n = max(1, min(n, int(left * 1e3 / max(first, 1e-3)) - 1))
        stats = timing.summarise(timing.time_runs(runs, n))
    except Exception as exc:   # out of memory, unsupported dtype/backend, launch failure: reported
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return _record(impl, case, "error", f"{type(exc).__name__}: {message}")
    tflops = case.flops(impl.direction) / (stats["median_ms"] * 1e-3) / 1e12
    state["rates"][(impl.key, case.d, case.causal)] = tflops * 1e12
    return _record(impl, case, "ok", "", tflops=tflops, extra_bytes=extra, check=text, max_rel_err=err,
                   gbps=case.min_bytes(impl.direction) / (stats["median_ms"] * 1e-3) / 1e9, **stats)


def input_sets_for(case, torch, l2_bytes):
    """Enough input sets to cover twice the L2 (at most 4), when one set fits in it."""
    from flashnumba.bench.impls import Inputs
    first = Inputs(case, seed=0)
    n = 1
    if l2_bytes and first.nbytes() < 2 * l2_bytes:
        n = min(4, math.ceil(2 * l2_bytes / first.nbytes()))
    return [first] + [Inputs(case, seed=s) for s in range(1, n)]


def tune(torch, log, budget):
    """Every shipped config of the versions with a launcher at B=4, H=16, N=4096, d=64 and d=128
    (each config at the head dim of its bucket), causal and not."""
    from flashnumba import registry
    from flashnumba.bench.impls import Inputs
    configs = [(v, direction, c) for v in registry.VERSIONS if v.launcher
               for direction, kernel in (("fwd", registry.FORWARD), ("bwd", registry.BACKWARD))
               for c in v.module(kernel).shipped_configs()]
    rows = []
    for d in TUNE_HEAD_DIMS:
        for causal in (False, True):
            case = cases_mod.Case(4, 16, 4096, d, causal)
            inputs = Inputs(case)
            rows += [_tune_one(case, inputs, version, direction, config, budget, log)
                     for version, direction, config in configs if config.d_pad == d]
    return rows


def _tune_one(case, inputs, version, direction, config, budget, log):
    """Time one config on one case: a row of the tuning table (or its error)."""
    from flashnumba.bench import timing
    from flashnumba.bench.impls import flashnumba_impl
    impl = flashnumba_impl(version, direction, config)
    label = f"{version.name} Br={config.Br} Bc={config.Bc} warps={config.num_warps}"
    if config.blocks_per_sm:
        label += f" blocks/SM={config.blocks_per_sm}"
    row = {"direction": direction, "case": case.label, "config": label}
    try:
        run = impl.prepare(inputs, case)
        run()
        first = timing.time_runs([run], 1)[0]
        n = int(min(MAX_RUNS, max(MIN_RUNS, budget * 1e3 / max(first, 1e-3))))
        ms = timing.summarise(timing.time_runs([run], n))["median_ms"]
        tflops = case.flops(direction) / (ms * 1e-3) / 1e12
        log(f"tune {direction} {case.label:<26} {label:<34} {tflops:6.2f} TFLOP/s {ms:8.3f} ms")
        return {**row, "median_ms": ms, "tflops": tflops}
    except Exception as exc:
        log(f"tune {direction} {case.label:<26} {label:<34} ERROR {type(exc).__name__}: {exc}")
        return {**row, "error": f"{type(exc).__name__}: {exc}"}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import flashnumba
    only = [s.strip() for s in args.impls.split(",")] if args.impls else None

    if args.sim:
        if not flashnumba.on_simulator():
            print("flashnumba bench --sim: a CUDA GPU is present; the sanity pass runs on the "
                  "simulator only (set FLASHNUMBA_DEVICE=sim before starting)", file=sys.stderr)
            return 2
        from flashnumba.bench.sim import SIM_SHAPES, run_sim
        shapes = SIM_SHAPES
        if args.shapes:         # BxHxNxd: Nq = Nk, one K/V head per query head
            shapes = [(c.B, c.N, c.N, c.H, c.H, c.d, c.causal) for c in cases_mod.parse_shapes(args.shapes)]
        return 1 if run_sim(only=only, shapes=shapes) else 0
    if flashnumba.on_simulator():
        print("flashnumba bench: no CUDA GPU found, nothing to benchmark. "
              "(--sim runs a tiny correctness pass on the CPU simulator; it is not a benchmark.)",
              file=sys.stderr)
        return 2

    if args.calls:          # before the allocation tracker, which would add to every call's host time
        import torch

        from flashnumba.bench import calls
        torch.backends.cuda.matmul.allow_tf32 = False
        if args.breakdown:
            from flashnumba.bench import breakdown
            breakdown.run(cases_mod.parse_shapes(args.shapes or calls.ISSUE_SHAPES)[0], torch,
                          json_path=args.json)
            return 0
        calls.run(cases_mod.parse_shapes(args.shapes or calls.ISSUE_SHAPES), torch,
                  json_path=args.json, profile=args.profile, busy=args.busy)
        if args.busy:
            # torch.profiler's CUPTI buffers can abort the process at its teardown, after every
            # result is out ("double free or corruption", PyTorch PRs 195207 and 195471): leave
            # without the teardown, once the output is flushed
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0

    start = time.perf_counter()
    from flashnumba.bench import timing
    tracking = timing.install_numba_tracker()        # before numba's CUDA context exists
    try:
        import torch
    except ImportError:
        print("flashnumba bench: PyTorch is needed on the GPU machine (it is the comparison)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("flashnumba bench: torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False     # fp32 means fp32: MATH and the ceiling too
    torch.backends.cudnn.allow_tf32 = False
    if torch.cuda.current_stream().cuda_stream != 0:
        print("warning: torch's current stream is not the default stream; numba launches on the "
              "default stream, so event timings of torch and numba may differ", file=sys.stderr)

    from flashnumba.bench.impls import implementations
    cases = (cases_mod.parse_shapes(args.shapes) if args.shapes
             else cases_mod.quick_cases() if args.quick else cases_mod.default_cases())
    impls = [i for i in implementations() if not only or any(o in i.name for o in only)]
    if args.fwd_only:
        impls = [i for i in impls if i.direction == "fwd"]
    for impl in list(impls):
        reason = impl.unavailable()
        if reason:
            print(f"not run: {impl.key}: {reason}")
            impls.remove(impl)
    os.makedirs(args.out, exist_ok=True)
    env = environment(torch)
    log = print
    log(f"flashnumba bench on {env['gpu']} (cc {env['compute_capability']}, {env['multiprocessors']} SMs), "
        f"torch {env['torch']}, numba {env['numba']}, numba-cuda {env['numba_cuda']}")
    log(f"{len(cases)} shapes x {len(impls)} implementations; time limit {args.time_limit:.0f} s; "
        f"numba memory tracking {'on' if tracking else 'OFF'}")

    ceilings = {"matmul_fp32_tflops": timing.matmul_tflops(), "copy_tbps": timing.copy_bandwidth()}
    log(f"ceilings: fp32 matmul (TF32 off) {ceilings['matmul_fp32_tflops']:.1f} TFLOP/s, "
        f"device copy {ceilings['copy_tbps']:.2f} TB/s")

    log("-- validation against flashnumba.reference (float64) at modest shapes; compiles every kernel --")
    valid = validate_modest(impls, torch, log)
    tuning = tune(torch, log, args.budget) if args.tune else []

    state = {"valid": valid, "rates": {}, "deadline": start + args.time_limit}
    results = []
    progress = Progress(len(cases) * len(impls), start)
    log("-- measurements --")
    for case in cases:
        progress.show(case.label, shape_start=True)
        try:
            input_sets = input_sets_for(case, torch, env["l2_bytes"])
        except Exception as exc:
            progress.clear()
            for impl in impls:
                results.append(_record(impl, case, "error", f"inputs: {type(exc).__name__}: {exc}"))
                log(report.result_line(results[-1]))
            progress.done += len(impls)
            continue
        refs = References(input_sets[0], case)
        for impl in impls:
            progress.show(f"{impl.direction} {impl.name} {case.label}")
            r = measure(impl, case, input_sets, refs, args, state, torch)
            results.append(r)
            progress.done += 1
            progress.clear()
            log(report.result_line(r))
        del input_sets, refs
        torch.cuda.empty_cache()
    progress.clear()

    report.add_ratios(results)
    speedup = report.causal_speedup(results)
    payload = {"environment": env, "ceilings": ceilings, "validation": [{"impl": k, "d": d, "ok": v[0], "text": v[1], "kind": v[2]}
                                                                        for (k, d), v in valid.items()],
               "tuning": tuning, "results": results, "causal_speedup_fa2_fast_N16k": speedup,
               "numba_memory_tracking": tracking, "elapsed_s": time.perf_counter() - start}
    json_path = os.path.join(args.out, "results.json")
    report.write_json(json_path, payload)
    paths = [json_path]
    if not args.no_plot:
        try:
            paths += report.plot(results, ceilings, args.out)
        except Exception as exc:
            log(f"plots failed: {type(exc).__name__}: {exc}")
    wrong = sorted({r["impl"] + " " + r["direction"] for r in results if r["status"] == "WRONG"})
    errors = sum(r["status"] == "error" for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)

    print()
    print(f"wrote {', '.join(paths)}")
    print(f"{len(results)} measurements: {sum(r['status'] == 'ok' for r in results)} ok, {skipped} skipped, "
          f"{errors} errors, WRONG: {', '.join(wrong) if wrong else 'none'}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"fp32 matmul ceiling {ceilings['matmul_fp32_tflops']:.1f} TFLOP/s; "
          + (f"fa2_fast causal speedup at N=16k d=64: {speedup:.2f}x (target >= 1.8)" if speedup
             else "fa2_fast causal speedup at N=16k d=64: not measured"))
    print(report.summary_table(results))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
