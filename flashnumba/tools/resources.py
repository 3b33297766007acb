"""Does every shipped kernel compile, link, keep its values in registers and fit in shared memory?

Checked on a machine without a GPU. The CPU simulator runs kernels that the real
compiler rejects (a 64 KB static shared array, a local array with a run-time
size, ...) and tells nothing about registers or spills. So this tool builds every
shipped kernel configuration with the real toolchain, NVVM and then ptxas inside
nvJitLink, for sm_80 (A100) and sm_90 (H100/H200), and reads ptxas's report:

    ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 168 registers, used 1 barriers, 33792 bytes smem

A kernel passes when it links, spills nothing, uses at most 255 registers and
48 KB of static shared memory, and its static shared memory equals what its
module promises: ``static_smem_bytes(config)`` where the module has one (a
kernel whose tiles live in dynamic shared memory says 0), else
``smem_bytes(config)``. The stack frame (local memory: a
``cuda.local.array`` indexed at run time lands there) is reported, not failed.
So is each kernel's tensor-core instruction count: the ``mma.sync`` instructions
in its PTX (after numba's unrolling, before ptxas; one per m16n8k16 product of
a loop body, so a kernel of the FMA versions has 0).

    flashnumba resources            # table for sm_80 and sm_90
    flashnumba resources --cc 90 --json

    check_all(ccs=((8, 0), (9, 0))) -> [KernelResources]   one record per kernel x config x arch
    find_problems(records)          -> [str]               empty when everything passes
    parse_ptxas_log(log)            -> {function: {...}}   the parser, on its own

Where the kernels come from: each module in KERNEL_MODULES exposes
``shipped_configs()``, ``compile_targets(config) -> [(label, dispatcher,
argtypes)]`` and ``smem_bytes(config)``. PLAIN_TARGETS name functions that
return (label, dispatcher, argtypes) for kernels without a tile config. A listed
module that fails to import is reported as a failed record, never skipped.

How it works without a GPU
--------------------------
1. ``import flashnumba`` chooses the simulator when there is no GPU, and under
   the simulator there is no compiler. The parent therefore starts worker
   processes that import ``numba.cuda`` first, with NUMBA_ENABLE_CUDASIM removed
   from their environment; flashnumba then respects numba's (real) target.
2. The kernel is built the way a launch builds it: ``_Kernel(py_func, argtypes,
   **dispatcher.targetoptions)``, so fastmath, launch bounds, max_registers and
   link-time optimisation (on by default when nvJitLink is installed) are the
   shipped ones. Building asks the driver for the current device's compute
   capability (for the kernel and each device function it calls); in the worker
   that question is answered with the target instead.
3. nvJitLink (cuda.core's Linker, verbose) links it to a cubin for each
   architecture, as a launch would; its info log is parsed.

Each kernel is built once, with the first compute capability asked for, and
linked for every one: numba's IR depends on the compute capability only below
6.0 (fa1_forward's IR for 8.0 and 9.0 was checked identical but for names).
That halves the time. Measured on a 2-core machine: the shipped kernels (46
kernels x 2 archs) take about 70 s of CPU, 45 s of wall time with 2 workers;
numba's front end (typing, lowering) is most of it, each link 0.3-1 s.

Known differences from a launch: a launch on an H100 targets sm_90a, this tool
sm_90 (same register file and limits). The tool uses numba-cuda internals
(pinned to 0.30.x in pyproject.toml); if they move, the check fails loudly, it
does not pass.
"""

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

from flashnumba import registry
from flashnumba.kernels.common import TileConfig
from flashnumba.kernels.hardware import STATIC_SMEM_LIMIT

KERNEL_MODULES = list(registry.kernel_modules())      # every version's forward and backward
PLAIN_TARGETS = ["flashnumba.kernels.gqa:targets", "flashnumba.kernels.naive:targets",
                 "flashnumba.kernels.cast:targets", "flashnumba.kernels.lse:targets",
                 "flashnumba.kernels.dropout_mask:targets",
                 "flashnumba.kernels.split_kv:targets"]   # "module:function"
DEFAULT_SOURCES = KERNEL_MODULES + PLAIN_TARGETS
DEFAULT_CCS = ((8, 0), (9, 0))
MAX_REGISTERS = 255                 # per thread, on every architecture since sm_35


@dataclass
class KernelResources:
    """What ptxas reports for one kernel, one tile config, one architecture."""
    source: str                     # source_name(): "fa1_forward", "gqa:targets"
    label: str                      # from compile_targets ("" when the source itself failed)
    config: TileConfig | None       # None for a kernel without tile config
    cc: tuple                       # (8, 0) -> sm_80
    registers: int | None = None
    spill_stores: int | None = None     # bytes
    spill_loads: int | None = None      # bytes
    stack_frame: int | None = None      # bytes of local memory per thread
    smem: int | None = None             # bytes of static shared memory per block
    smem_expected: int | None = None    # the module's smem_bytes(config)
    mma: int | None = None              # mma.sync instructions in the PTX (tensor-core products)
    seconds: float = 0.0                # link time, plus the build for the first cc
    error: str | None = None            # import, compile or link failure

    @property
    def arch(self):
        return f"sm_{self.cc[0]}{self.cc[1]}"

    @property
    def name(self):
        return f"{self.source}.{self.label}" if self.label else self.source


# ---------------------------------------------------------------------------
# Reading ptxas's verbose log
# ---------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"^ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"^ptxas info\s*: Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")
_CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")
_LINKED_PROPERTIES = re.compile(r"^info\s*: Function properties for '([^']+)':")
_LINKED_USED = re.compile(r"^info\s*: used (\d+) registers, .*?(\d+) stack, (\d+) bytes smem")


def parse_ptxas_log(log):
    """{function name: {entry, registers, spill_stores, spill_loads, stack_frame, smem}}.

    Reads both forms nvJitLink writes. With link-time optimisation, ptxas's own
    lines only. Without it, ptxas's lines and then the linker's summary
    (``info : used N registers, ..., S stack, B bytes smem``); ptxas leaves smem
    out of its line there, so smem comes from the summary.
    Functions that are not entries (device functions left un-inlined) have a
    stack/spill line and no register line.
    """
    functions = {}

    def function(name):
        return functions.setdefault(name, {
            "entry": False, "registers": None, "spill_stores": 0, "spill_loads": 0,
            "stack_frame": 0, "smem": None})

    entry = properties_of = linked = None
    for line in log.replace("\x00", "").splitlines():
        line = line.strip()
        if m := _ENTRY.search(line):
            entry = m.group(1)
            function(entry)["entry"] = True
        elif m := _PROPERTIES.match(line):
            properties_of = m.group(1)
            function(properties_of)
        elif (m := _FRAME.search(line)) and properties_of is not None:
            f = function(properties_of)
            f["stack_frame"], f["spill_stores"], f["spill_loads"] = map(int, m.groups())
        elif (m := _USED.match(line)) and entry is not None:
            f = function(entry)
            f["registers"] = int(m.group(1))
            if s := _SMEM.search(m.group(2)):
                f["smem"] = int(s.group(1))
            if c := _CUMULATIVE.search(m.group(2)):
                f["stack_frame"] = max(f["stack_frame"], int(c.group(1)))
        elif m := _LINKED_PROPERTIES.match(line):
            linked = m.group(1)
        elif (m := _LINKED_USED.match(line)) and linked is not None:
            f = function(linked)
            if f["registers"] is None:
                f["registers"] = int(m.group(1))
            f["stack_frame"] = max(f["stack_frame"], int(m.group(2)))
            if f["smem"] is None:
                f["smem"] = int(m.group(3))
    return functions


def summarise(functions):
    """One kernel's resources from parse_ptxas_log's answer: its entry, plus spills anywhere."""
    entries = [f for f in functions.values() if f["entry"]]
    if len(entries) != 1:
        raise ValueError(f"expected one entry function in the ptxas log, found {len(entries)}")
    (entry,) = entries
    if entry["registers"] is None:
        raise ValueError("the ptxas log has no 'Used N registers' line for the entry function")
    return {
        "registers": entry["registers"],
        "spill_stores": sum(f["spill_stores"] for f in functions.values()),
        "spill_loads": sum(f["spill_loads"] for f in functions.values()),
        "stack_frame": max(f["stack_frame"] for f in functions.values()),
        "smem": entry["smem"] or 0,
    }


def read_log(log):
    """summarise(parse_ptxas_log(log)); a log it cannot read is an error that shows the log's start
    (a new nvJitLink may word its report differently: the error says how)."""
    try:
        return summarise(parse_ptxas_log(log))
    except ValueError as exc:
        raise ValueError(f"{exc}; the log ({len(log)} characters) begins {log[:400]!r}") from None


# ---------------------------------------------------------------------------
# The worker: runs with the real CUDA target, never the simulator
# ---------------------------------------------------------------------------

class _TargetDevice:
    """Stands in for the current device: only its compute capability is asked for."""

    def __init__(self, cc):
        self.compute_capability = cc


@contextmanager
def _building_for(cc):
    """Make numba build for `cc` without a driver: the 'current device' is the target."""
    from numba.cuda import codegen, dispatcher

    saved = dispatcher.get_current_device, codegen.CUDACodeLibrary._ensure_cc
    dispatcher.get_current_device = lambda: _TargetDevice(cc)
    codegen.CUDACodeLibrary._ensure_cc = lambda self, wanted: cc if wanted is None else wanted
    try:
        yield
    finally:
        dispatcher.get_current_device, codegen.CUDACodeLibrary._ensure_cc = saved


def _verbose_linker(**kwargs):
    """numba's own nvJitLink linker, asking ptxas for its resource report."""
    from numba.cuda.cudadrv.driver import _Linker

    class VerboseLinker(_Linker):
        def _get_linker_options(self, ptx):
            options = super()._get_linker_options(ptx)
            options.verbose = True
            return options

    return VerboseLinker(**kwargs)


def build(dispatcher, argtypes, cc):
    """Build `dispatcher` for `argtypes` as a launch on a `cc` device would; return its library."""
    from numba.cuda.dispatcher import _Kernel

    with _building_for(cc):
        kernel = _Kernel(dispatcher.py_func, tuple(argtypes), **dispatcher.targetoptions)
    return kernel.library


MMA_SYNC = re.compile(r"\bmma\.sync\.")


def mma_count(library, cc):
    """The mma.sync instructions (tensor-core matrix products) in the library's PTX for `cc`."""
    with _building_for(cc):
        ptx = library.get_asm_str(cc=cc)
    return len(MMA_SYNC.findall(ptx))


def link(library, cc):
    """Link a kernel's code library to a cubin for `cc` as a launch would; return ptxas's log."""
    with _building_for(cc):
        linker = _verbose_linker(max_registers=library._max_registers, cc=cc, lto=library._lto)
        library._link_all(linker, cc)
        linker.complete()
    return linker.info_log


def _short_error(exc):
    """A failed build's message on one line: ptxas's error if there is one, no mangled names."""
    text = str(exc)
    ptxas = re.findall(r"\berror\s*:\s*(.+)$", text, flags=re.MULTILINE)
    text = f"{type(exc).__name__}: " + ("; ".join(ptxas) if ptxas else text)
    text = re.sub(r"_Z\w{40,}", "<kernel>", text)
    return re.sub(r"\s+", " ", text).strip()


def source_name(spec):
    """How records name a source: "flashnumba.kernels.fa1_forward" -> "fa1_forward",
    "flashnumba.kernels.gqa:targets" -> "gqa:targets"."""
    return spec.rpartition(".")[2]


def largest(configs):
    """The config with the largest tiles (head dim, then Br x Bc, then warps): where a kernel
    is nearest its register and shared-memory limits."""
    return max(configs, key=lambda c: (c.d_pad, c.Br * c.Bc, c.num_warps))


def _enumerate(sources, configs="shipped"):
    """Yield (source, config, label, dispatcher, argtypes, smem_expected) or (source, error).
    configs: "shipped" (every shipped config of a kernel module) or "largest" (its largest)."""
    for spec in sources:
        module_name, _, function_name = spec.partition(":")
        short = source_name(spec)
        try:
            module = importlib.import_module(module_name)
            if function_name:
                jobs = [(None, getattr(module, function_name)(), None)]
            else:
                static_bytes = getattr(module, "static_smem_bytes", module.smem_bytes)
                shipped = module.shipped_configs()
                if not shipped:
                    raise ValueError(f"{module_name}.shipped_configs() is empty")
                chosen = shipped if configs == "shipped" else [largest(shipped)]
                jobs = [(config, module.compile_targets(config), static_bytes(config))
                        for config in chosen]
        except Exception as exc:  # noqa: BLE001  (a failed record, never a skip)
            yield short, _short_error(exc) + "\n" + traceback.format_exc(limit=3)
            continue
        for config, targets, smem_expected in jobs:
            for label, dispatcher, argtypes in targets:
                yield short, config, label, dispatcher, argtypes, smem_expected


def _measure(dispatcher, argtypes, ccs):
    """{cc: resources, or {"error": ...}} for one kernel: built once, linked for each cc."""
    start = time.perf_counter()
    try:
        library = build(dispatcher, argtypes, ccs[0])
    except Exception as exc:  # noqa: BLE001  (a typing error and the like: a failed record)
        error = _short_error(exc)
        return {cc: {"error": error, "seconds": time.perf_counter() - start} for cc in ccs}
    results = {}
    for cc in ccs:
        try:
            results[cc] = {**read_log(link(library, cc)), "mma": mma_count(library, cc)}
        except Exception as exc:  # noqa: BLE001  (a link error: a failed record)
            results[cc] = {"error": _short_error(exc)}
        results[cc]["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    return results


def _worker(sources, ccs, shard, shards, configs="shipped"):
    """Measure this worker's share of the kernels (every `shards`-th); return JSON-ready records."""
    import numba
    if numba.config.ENABLE_CUDASIM:
        raise RuntimeError("the resource worker must run without NUMBA_ENABLE_CUDASIM")

    records = []
    measured = {}   # (id(dispatcher), argtypes) -> (dispatcher, results): a kernel listed twice
    for order, item in enumerate(_enumerate(sources, configs)):    # is built once
        if order % shards != shard:
            continue
        if len(item) == 2:
            source, error = item
            records += [{"order": order, "source": source, "label": "", "config": None, "cc": cc,
                         "error": error} for cc in ccs]
            continue
        source, config, label, dispatcher, argtypes, smem_expected = item
        key = (id(dispatcher), tuple(argtypes))
        if key in measured:
            results = {cc: {**r, "seconds": 0.0} for cc, r in measured[key][1].items()}
        else:
            results = _measure(dispatcher, argtypes, ccs)
            measured[key] = dispatcher, results
        for cc in ccs:
            records.append({"order": order, "source": source, "label": label, "cc": cc,
                            "config": dataclasses.asdict(config) if config is not None else None,
                            "smem_expected": smem_expected, **results[cc]})
    return records


def _worker_main(argv):
    parser = argparse.ArgumentParser(prog="resources worker")
    parser.add_argument("--request", required=True, help="JSON: sources, ccs, shard, shards")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with open(args.request) as f:
        request = json.load(f)
    records = _worker(request["sources"], [tuple(cc) for cc in request["ccs"]],
                      request["shard"], request["shards"], request.get("configs", "shipped"))
    with open(args.out, "w") as f:
        json.dump(records, f)
    return 0


# Imports numba.cuda before anything from flashnumba, so flashnumba keeps the real target.
_WORKER_BOOTSTRAP = ("import sys, numba.cuda; "
                     "from flashnumba.tools.resources import _worker_main; "
                     "sys.exit(_worker_main(sys.argv[1:]))")


# ---------------------------------------------------------------------------
# The parent: start workers, gather records, judge them
# ---------------------------------------------------------------------------

def check_all(ccs=DEFAULT_CCS, sources=None, jobs=None, sys_path=(), configs="shipped"):
    """Build every (kernel, config) of `sources` for each cc in worker processes; return records.

    sources: module names (kernel modules) and "module:function" specs
    (plain targets); KERNEL_MODULES + PLAIN_TARGETS by default. jobs: worker
    processes (default: up to 2, as many as there are cores). sys_path: extra
    import directories for the workers (for kernels defined outside the package).
    configs: "shipped" (every shipped config) or "largest" (each kernel module's largest
    config only: the test suite's quick pass on 2 cores; the GPU run checks them all).
    Records come back in source order, then config, then kernel, then cc.
    """
    sources = list(DEFAULT_SOURCES if sources is None else sources)
    ccs = [tuple(cc) for cc in ccs]
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "FLASHNUMBA_DEVICE")}
    # Workers must import this checkout's flashnumba, even when it is not installed.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root, *map(os.path.abspath, sys_path)]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))

    raw = []
    with tempfile.TemporaryDirectory(prefix="flashnumba-resources-") as tmp:
        workers = []
        try:
            for shard in range(jobs):
                request, out, log = (os.path.join(tmp, f"{what}{shard}")
                                     for what in ("request", "records", "log"))
                with open(request, "w") as f:
                    json.dump({"sources": sources, "ccs": ccs, "shard": shard, "shards": jobs,
                               "configs": configs}, f)
                with open(log, "w") as f:
                    command = [sys.executable, "-c", _WORKER_BOOTSTRAP,
                               "--request", request, "--out", out]
                    process = subprocess.Popen(command, env=env, stdout=f,
                                               stderr=subprocess.STDOUT)
                workers.append((process, out, log))
            for process, out, log in workers:
                if process.wait() != 0:
                    with open(log) as f:
                        output = f.read()
                    raise RuntimeError(
                        f"resource worker exited with {process.returncode}:\n{output[-4000:]}")
                with open(out) as f:
                    raw.extend(json.load(f))
        finally:
            for process, _, _ in workers:      # after a failure, stop the others
                if process.poll() is None:
                    process.kill()
                    process.wait()

    raw.sort(key=lambda r: (r.pop("order"), ccs.index(tuple(r["cc"]))))
    return [from_dict(r) for r in raw]


def to_dict(record):
    """A record as plain JSON-ready data (config as a dict, cc as a list)."""
    return dataclasses.asdict(record)


def from_dict(data):
    """The record that to_dict (or a worker) wrote."""
    data = dict(data)
    data["cc"] = tuple(data["cc"])
    data["config"] = TileConfig(**data["config"]) if data["config"] is not None else None
    return KernelResources(**data)


def _judge(records, smem_limit):
    """[(record, what is wrong with it)] for every failing record."""
    failures = []
    largest = {}    # (source, config, cc) -> the record with the most shared memory
    for r in records:
        if r.error is not None:
            failures.append((r, r.error.splitlines()[0]))
            continue
        if r.spill_stores or r.spill_loads:
            failures.append((r, f"spills {r.spill_stores} B stored, {r.spill_loads} B loaded"))
        if r.registers > MAX_REGISTERS:
            failures.append((r, f"{r.registers} registers > {MAX_REGISTERS}"))
        if r.smem > smem_limit:
            failures.append((r, f"{r.smem} B of static shared memory > {smem_limit} B"))
        if r.smem_expected is not None:
            key = (r.source, r.config, r.cc)
            if key not in largest or r.smem > largest[key].smem:
                largest[key] = r
    for r in largest.values():
        if r.smem != r.smem_expected:
            what = (f"ptxas reports {r.smem} B of shared memory, "
                    f"smem_bytes(config) says {r.smem_expected} B")
            failures.append((r, what))
    return failures


def find_problems(records, smem_limit=STATIC_SMEM_LIMIT):
    """One line per failure: a build or link error, a spill, too many registers or too much smem,
    or shared memory that differs from the module's smem_bytes(config).

    smem_bytes(config) is per config while a module may have several kernels
    per config: the largest of them must equal it.
    """
    return [f"{r.name} {describe_config(r.config)} {r.arch}: {what}"
            for r, what in _judge(records, smem_limit)]


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def describe_config(config):
    if config is None:
        return "-"
    blocks = f" b={config.blocks_per_sm}" if config.blocks_per_sm else ""
    return f"Br={config.Br} Bc={config.Bc} d_pad={config.d_pad} w={config.num_warps}{blocks}"


def format_table(records):
    header = ("module", "kernel", "config", "arch", "mma", "regs", "spill st/ld", "stack", "smem",
              "smem_bytes", "s", "status")
    failing = {id(r) for r, _ in _judge(records, STATIC_SMEM_LIMIT)}
    rows = []
    for r in records:
        status = "FAIL" if id(r) in failing else "ok"
        if r.error is not None:
            rows.append((r.source, r.label, describe_config(r.config), r.arch,
                         "", "", "", "", "", "", "", "ERROR " + r.error.splitlines()[0][:120]))
            continue
        if r.stack_frame and status == "ok":
            status = "ok, uses local memory"
        rows.append((r.source, r.label, describe_config(r.config), r.arch, str(r.mma), str(r.registers),
                     f"{r.spill_stores}/{r.spill_loads}", str(r.stack_frame), str(r.smem),
                     "" if r.smem_expected is None else str(r.smem_expected),
                     f"{r.seconds:.1f}", status))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_cc(text):
    digits = text.lower().removeprefix("sm_").replace(".", "")
    if not digits.isdigit() or len(digits) < 2:
        raise argparse.ArgumentTypeError(
            f"expected a compute capability like 80, 8.0 or sm_90, got {text!r}")
    return int(digits[:-1]), int(digits[-1])


def main(argv=None):
    """Print the resource table; exit status 1 when any kernel fails the check."""
    parser = argparse.ArgumentParser(
        prog="flashnumba resources",
        description="Compile every shipped kernel for real (no GPU needed) and report "
                    "mma.sync count, registers, spills, stack frame and shared memory.")
    parser.add_argument("--cc", action="append", type=_parse_cc,
                        help="compute capability, repeatable (default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: up to 2)")
    parser.add_argument("--source", action="append",
                        help="kernel module or module:function (default: all shipped kernels)")
    parser.add_argument("--largest", action="store_true",
                        help="only each kernel module's largest shipped config (quick)")
    parser.add_argument("--json", action="store_true", help="print records as JSON")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    records = check_all(ccs=args.cc or DEFAULT_CCS, sources=args.source, jobs=args.jobs,
                        configs="largest" if args.largest else "shipped")
    elapsed = time.perf_counter() - start
    problems = find_problems(records)
    if args.json:
        print(json.dumps([{**to_dict(r), "arch": r.arch} for r in records], indent=1))
    else:
        print(format_table(records))
        print(f"\n{len(records)} kernel x config x arch links in {elapsed:.1f} s; "
              f"static shared memory limit {STATIC_SMEM_LIMIT} B, register limit {MAX_REGISTERS}")
        for line in problems:
            print("PROBLEM", line)
        print("all kernels pass" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
