"""ptxas's report on the readable FA2 forward kernel over a grid of tile configs, for lesson 14.

The real compiler (NVVM, then ptxas inside nvJitLink, ``flashnumba.tools.resources``)
takes 5-15 s of CPU per configuration, too slow for a lesson that should run in
seconds, so the lesson reads the report committed beside this file,
``tile_report.json``, made by

    python -m flashnumba.course.tile_report            # rewrites tile_report.json (a minute or two)

which needs the NVIDIA compiler wheels (``pip install -e '.[cu13]'``), no GPU.

    GRID                 the (Br, Bc, d_pad, num_warps) configs measured
    targets()            (label, dispatcher, argtypes) of each, for resources.check_all
    load()               the committed report: {"command", "arch", "rows": [{Br, Bc, d_pad, num_warps,
                         registers, spill_stores, spill_loads, stack_frame, smem}, ...]}
"""

import json
import sys
from pathlib import Path

REPORT = Path(__file__).with_name("tile_report.json")
COMMAND = "python -m flashnumba.course.tile_report"
CC = (9, 0)                               # sm_90: H100 / H200
# (Br, Bc, d_pad, num_warps): every config fa2_forward.check_config accepts among a few shapes
GRID = ((16, 32, 64, 1), (32, 32, 64, 2), (16, 32, 64, 4), (16, 64, 64, 4), (32, 32, 64, 4),
        (64, 32, 64, 4), (32, 32, 64, 8), (64, 32, 64, 8))


def _config(Br, Bc, d_pad, num_warps):
    from flashnumba.kernels.common import TileConfig
    return TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps)


def label(Br, Bc, d_pad, num_warps):
    return f"Br={Br} Bc={Bc} d_pad={d_pad} w={num_warps}"


def targets():
    """The forward kernel without dropout for each config of GRID (a resources plain target)."""
    from flashnumba.kernels import fa2_forward
    out = []
    for shape in GRID:
        _, dispatcher, argtypes = fa2_forward.compile_targets(_config(*shape))[0]
        out.append((label(*shape), dispatcher, argtypes))
    return out


def measure():
    """Compile every config of GRID with the real compiler; the report as load() returns it."""
    from flashnumba.tools import resources
    records = resources.check_all(ccs=(CC,), sources=["flashnumba.course.tile_report:targets"])
    problems = [r.error for r in records if r.error]
    if problems:
        raise RuntimeError(f"the compiler failed: {problems[0]}")
    by_label = {r.label: r for r in records}
    rows = []
    for shape in GRID:
        r = by_label[label(*shape)]
        rows.append(dict(zip(("Br", "Bc", "d_pad", "num_warps"), shape), registers=r.registers,
                         spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                         stack_frame=r.stack_frame, smem=r.smem))
    return {"command": COMMAND, "arch": f"sm_{CC[0]}{CC[1]}", "kernel": "fa2_forward (no dropout)",
            "rows": rows}


def load():
    """The committed report (see the module docstring for the command that made it)."""
    return json.loads(REPORT.read_text())


def main():
    report = measure()
    REPORT.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {REPORT} ({len(report['rows'])} configs, {report['arch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
