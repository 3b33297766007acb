"""What the benchmark writes: result lines, the final table, results.json and the figures."""

import json
import math
import os

RATIO_BASES = ("torch MATH", "torch EFFICIENT")          # fp32 rows: these, in fp32
HALF_RATIO_BASES = ("FLASH", "CUDNN")                    # bf16/fp16 rows: "torch FLASH <dtype>", ...
HALF_DTYPES = ("bf16", "fp16")
SUMMARY_CASES = ("N4k d64", "N4k d64 c", "N16k d64", "N16k d64 c", "N4k d128", "N64k d64")


def case_key(r):
    return (r["B"], r["H"], r["N"], r["d"], r["causal"])


def add_ratios(results):
    """r["vs MATH"], r["vs EFFICIENT"]: that backend's median time / this one's (> 1: faster),
    measured in the same run. Rows in bf16 or fp16 also get r["vs FLASH"], r["vs CUDNN"]: PyTorch's
    FLASH and CUDNN backends in the row's own dtype ("torch FLASH bf16"), same case, same run."""
    base = {}
    for r in results:
        if r["status"] == "ok":
            base[(r["direction"], case_key(r), r["impl"])] = r["median_ms"]
    for r in results:
        for b in RATIO_BASES:
            t = base.get((r["direction"], case_key(r), b))
            ok = r["status"] == "ok" and t is not None
            r["vs " + b.split()[1]] = t / r["median_ms"] if ok else None
        for b in HALF_RATIO_BASES:
            t = base.get((r["direction"], case_key(r), f"torch {b} {r['dtype']}"))
            ok = r["status"] == "ok" and r["dtype"] in HALF_DTYPES and t is not None
            r["vs " + b] = t / r["median_ms"] if ok else None
    return results


def fmt_bytes(n):
    if n is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def result_line(r):
    head = f"{r['direction']} {r['impl']:<22} {r['case']:<28}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    return (f"{head} {r['tflops']:6.2f} TFLOP/s  {r['median_ms']:9.3f} ms "
            f"[{r['min_ms']:.3f}-{r['max_ms']:.3f}, {r['runs']} runs]  extra mem {fmt_bytes(r['extra_bytes'])}")


def _cell(r):
    if r is None:
        return "-"
    if r["status"] != "ok":
        return {"WRONG": "WRONG", "error": "error"}.get(r["status"], "skip")
    keys = ("vs FLASH", "vs CUDNN") if r["dtype"] in HALF_DTYPES else ("vs MATH", "vs EFFICIENT")
    ratios = "/".join("-" if r.get(k) is None else f"{r[k]:.2f}" for k in keys)
    return f"{r['tflops']:.1f} ({ratios})"


def summary_table(results):
    """Short final table: TFLOP/s (x MATH / x EFFICIENT; bf16 and fp16 rows: x FLASH / x CUDNN in
    their dtype) per implementation, for a few shapes."""
    shorts = []
    for r in results:
        if r["short"] not in shorts:
            shorts.append(r["short"])
    columns = [s for s in SUMMARY_CASES if s in shorts] or shorts[:6]
    columns = columns[:6]
    lines = []
    for direction in ("fwd", "bwd"):
        rows = [r for r in results if r["direction"] == direction]
        if not rows:
            continue
        impls = []
        for r in rows:
            if r["impl"] not in impls:
                impls.append(r["impl"])
        by = {(r["impl"], r["short"]): r for r in rows}
        cells = [[f"{direction} {impl}"] + [_cell(by.get((impl, c))) for c in columns] for impl in impls]
        header = [f"{direction}: TFLOP/s (x MATH/x EFF; half: x FLASH/x CUDNN)"] + columns
        widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        lines.append("")
    return "\n".join(lines)


def causal_speedup(results, impl="flashnumba fa2_fast", N=16384, d=64):
    """median time non-causal / causal of `impl` forward at N, d (criterion: >= 1.8), or None."""
    t = {}
    for r in results:
        if (r["impl"], r["direction"], r["N"], r["d"], r["status"]) == (impl, "fwd", N, d, "ok"):
            t[r["causal"]] = r["median_ms"]
    if True in t and False in t:
        return t[False] / t[True]
    return None


def write_json(path, payload):
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)


def plot(results, ceilings, out_dir):
    """tflops_fwd.png, tflops_bwd.png (TFLOP/s against N) and roofline.png; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in results if r["status"] == "ok"]
    for direction in ("fwd", "bwd"):
        rows = [r for r in ok if r["direction"] == direction]
        if not rows:
            continue
        panels = sorted({(r["d"], r["causal"]) for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
        for ax, (d, causal) in zip(axes[0], panels):
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted((r["N"], r["tflops"]) for r in rows
                             if r["impl"] == impl and r["d"] == d and r["causal"] == causal)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl,
                            linestyle="--" if "bf16" in impl else "-")
            if ceilings.get("matmul_fp32_tflops"):
                ax.axhline(ceilings["matmul_fp32_tflops"], color="gray", linestyle=":",
                           label="fp32 matmul (TF32 off)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (sequence length)")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{direction}, d={d}{', causal' if causal else ''}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"tflops_{direction}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    fp32 = [r for r in ok if r["dtype"] == "fp32"]
    if fp32 and ceilings.get("matmul_fp32_tflops") and ceilings.get("copy_tbps"):
        fig, ax = plt.subplots(figsize=(7, 5))
        peak, bw = ceilings["matmul_fp32_tflops"], ceilings["copy_tbps"]
        xs = [r["flops"] / r["min_bytes"] for r in fp32]
        lo, hi = min(xs + [1.0]) / 2, max(xs) * 2
        grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
        ax.plot(grid, [min(peak, bw * x) for x in grid], color="black",
                label=f"roof: {peak:.1f} TFLOP/s fp32 matmul, {bw:.2f} TB/s copy")
        for impl in dict.fromkeys(r["impl"] for r in fp32):
            for direction, marker in (("fwd", "o"), ("bwd", "s")):
                pts = [(r["flops"] / r["min_bytes"], r["tflops"]) for r in fp32
                       if r["impl"] == impl and r["direction"] == direction]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, s=18, label=f"{direction} {impl}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per byte of the fewest bytes)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title("fp32 attention against the fp32 roofline")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, "roofline.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
