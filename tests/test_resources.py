"""The real compiler's verdict on every shipped kernel, on CI without a GPU.

For every shipped tile config of every kernel module and for sm_80 and sm_90:
the kernel links, spills nothing, uses at most 255 registers and 48 KB of static
shared memory, and ptxas's shared memory equals the module's smem_bytes(config).
Then the checker itself is checked: its log parser on captured real logs, and
kernels built to fail (too much shared memory, spills, a run-time indexed local
array) must be caught.

The kernels are built in two halves (flashnumba.tools.resources starts one compiler
process for each: its start-up, numba and NVVM loading, is paid twice, not once per
module), each made by the first test that needs it and kept for the session. Under
pytest-xdist a half is left in pytest's shared temp directory for the other worker;
the tests alternate between the halves, so the two workers build them side by side.
"""

import fcntl
import importlib
import json
import os
import re

import pytest
from numba import cuda, float32, types

from flashnumba.kernels.hardware import STATIC_SMEM_LIMIT
from flashnumba.tools import resources

# sm_90 only: the lent GPUs' architecture; the GPU run's `flashnumba resources` links every
# shipped config for sm_80 and sm_90 (.ci/gpu-run resources).
CCS = ((9, 0),)
HERE = os.path.dirname(os.path.abspath(__file__))
THIS_MODULE = os.path.splitext(os.path.basename(__file__))[0]
MISSING_MODULE = "flashnumba.kernels.no_such_kernel"


# ---------------------------------------------------------------------------
# Kernels built to fail the check. Built in the worker, with the real compiler:
# the simulator would accept them all (and does not know max_registers).
# ---------------------------------------------------------------------------

def negative_targets():
    """(label, dispatcher, argtypes) of kernels the check must catch, and one it must pass."""
    vector = types.Array(types.float32, 1, "C")
    indices = types.Array(types.int32, 1, "C")

    @cuda.jit
    def shared_64kb(x, y):
        s = cuda.shared.array(16384, float32)    # 64 KB > the 48 KB static limit
        i = cuda.threadIdx.x
        s[i] = x[i]
        cuda.syncthreads()                        # s written before it is read reversed
        y[i] = s[16383 - i]

    @cuda.jit
    def shared_16kb(x, y):
        s = cuda.shared.array(4096, float32)     # 16 KB: links, smem reported as 16384
        i = cuda.threadIdx.x
        s[i] = x[i]
        cuda.syncthreads()                        # s written before it is read reversed
        y[i] = s[4095 - i]

    @cuda.jit
    def local_array_runtime_index(x, y, idx):
        a = cuda.local.array(1024, float32)      # indexed at run time: local memory
        i = cuda.threadIdx.x
        for k in range(1024):
            a[k] = x[i + k]
        y[i] = a[idx[i]]

    @cuda.jit(max_registers=32)
    def spills_under_32_registers(x, y):
        v = cuda.local.array(64, float32)        # 64 live values, 32 registers
        i = cuda.grid(1)
        for k in range(64):
            v[k] = x[64 * i + k]
        cuda.syncthreads()                        # every load before any store
        for k in range(64):
            y[64 * i + 63 - k] = v[k] * v[63 - k]

    return [("shared_64kb", shared_64kb, (vector, vector)),
            ("shared_16kb", shared_16kb, (vector, vector)),
            ("local_array_runtime_index", local_array_runtime_index, (vector, vector, indices)),
            ("spills_under_32_registers", spills_under_32_registers, (vector, vector))]


NEGATIVE_SPEC = f"{THIS_MODULE}:negative_targets"
NEGATIVE_SOURCE = resources.source_name(NEGATIVE_SPEC)


# ---------------------------------------------------------------------------
# One build per group of sources per session, shared by xdist workers
# ---------------------------------------------------------------------------

# Two halves of about equal compile time: the forward kernel modules with the kernels without
# a tile config; the backward ones with the kernels built to fail and the missing module.
CHECKER_SOURCES = (NEGATIVE_SPEC, MISSING_MODULE)
HALVES = (tuple(resources.KERNEL_MODULES[0::2]) + tuple(resources.PLAIN_TARGETS),
          tuple(resources.KERNEL_MODULES[1::2]) + CHECKER_SOURCES)


def half_of(source):
    (half,) = [h for h in HALVES if source in h]
    return half


def _build(sources):
    # Each kernel module's largest config only: compiling every shipped config of eight kernel
    # modules for two targets takes longer than the whole suite may on 2 cores. The GPU run
    # (.ci/gpu-run resources) and `flashnumba resources` check every shipped config.
    # One compiler process per build: a module's kernels share device functions compiled once,
    # and under xdist each worker is one core's share.
    return resources.check_all(ccs=CCS, sources=list(sources), sys_path=[HERE],
                               configs="largest", jobs=1)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """built(source) -> the records of the half that holds `source`, built once per session."""
    cache = {}

    def shared_build(sources):
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            return _build(sources)
        name = f"half{HALVES.index(sources)}"
        shared = tmp_path_factory.getbasetemp().parent / f"flashnumba-resources-{name}.json"
        with open(shared.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file closes
            if shared.exists():
                return [resources.from_dict(r) for r in json.loads(shared.read_text())]
            records = _build(sources)
            shared.write_text(json.dumps([resources.to_dict(r) for r in records]))
            return records

    def get(source):
        half = half_of(source)
        if half not in cache:
            cache[half] = shared_build(half)
        return cache[half]
    return get


@pytest.fixture
def records(built):
    """The checker's build: the kernels built to fail and the missing module (and the half's
    kernel modules)."""
    return built(NEGATIVE_SPEC)


def _of(records, source, cc):
    return [r for r in records if r.source == source and r.cc == cc]


# ---------------------------------------------------------------------------
# Every shipped kernel
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("module", resources.KERNEL_MODULES, ids=resources.source_name)
def test_shipped_kernels_link_without_spills_and_fit_shared_memory(built, module, cc):
    """The largest shipped config of `module`, for `cc`: links; 0 B spilled; <= 255 registers;
    <= 48 KB of static shared memory; the config's largest kernel uses exactly the
    module's smem_bytes(config), as ptxas counts it. Every failure is listed."""
    mine = _of(built(module), resources.source_name(module), cc)
    problems = resources.find_problems(mine)
    assert not problems, f"{module}, sm_{cc[0]}{cc[1]}:\n" + "\n".join(problems)

    # The largest shipped config was built: the worker saw the same shipped_configs().
    shipped = importlib.import_module(module).shipped_configs()
    assert shipped, f"{module}.shipped_configs() is empty"
    assert {r.config for r in mine} == {resources.largest(shipped)}
    for r in mine:
        assert r.spill_stores == 0 and r.spill_loads == 0
        assert r.registers <= resources.MAX_REGISTERS
        assert r.smem <= STATIC_SMEM_LIMIT


def test_every_kernel_module_is_listed():
    """A new kernel module (one with shipped_configs) cannot be forgotten by the check."""
    kernels = os.path.dirname(os.path.abspath(resources.__file__))
    for name in sorted(os.listdir(kernels)):
        if name.endswith(".py"):
            with open(os.path.join(kernels, name)) as f:
                source = f.read()
            if re.search(r"^def shipped_configs\(", source, flags=re.MULTILINE):
                assert f"flashnumba.kernels.{name[:-3]}" in resources.KERNEL_MODULES, name


@pytest.mark.parametrize("cc", CCS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("target", resources.PLAIN_TARGETS, ids=resources.source_name)
def test_kernels_without_tile_config_link_without_spills(built, target, cc):
    mine = _of(built(target), resources.source_name(target), cc)
    assert mine, f"{target}: nothing built"
    problems = resources.find_problems(mine)
    assert not problems, f"{target}, sm_{cc[0]}{cc[1]}:\n" + "\n".join(problems)
    if target == resources.PLAIN_TARGETS[0]:          # the GQA reduction: registers only
        (r,) = mine
        assert (r.spill_stores, r.spill_loads, r.stack_frame, r.smem) == (0, 0, 0, 0)


# ---------------------------------------------------------------------------
# The check can fail
# ---------------------------------------------------------------------------

def _negative(records, label):
    mine = [r for r in records if r.source == NEGATIVE_SOURCE and r.label == label]
    assert [r.cc for r in mine] == list(CCS), (label, mine)
    return mine


def test_oversized_shared_array_fails_to_link(records):
    for r in _negative(records, "shared_64kb"):
        assert r.error is not None and "too much shared data" in r.error, r
        (problem,) = resources.find_problems([r])
        assert "too much shared data" in problem


def test_shared_memory_is_measured_and_limited(records):
    for r in _negative(records, "shared_16kb"):
        assert r.error is None and r.smem == 16384, r
        assert resources.find_problems([r]) == []
        (problem,) = resources.find_problems([r], smem_limit=8192)
        assert "16384 B of static shared memory > 8192 B" in problem


def test_runtime_indexed_local_array_has_a_stack_frame(records):
    for r in _negative(records, "local_array_runtime_index"):
        assert r.error is None and r.stack_frame >= 4096, r


def test_register_pressure_spills_and_is_reported(records):
    """max_registers from the decorator reaches ptxas, and the spill is a problem."""
    for r in _negative(records, "spills_under_32_registers"):
        assert r.error is None and r.registers <= 32, r
        assert r.spill_stores > 0 and r.spill_loads > 0, r
        (problem,) = resources.find_problems([r])
        assert "spills" in problem


def test_missing_kernel_module_is_an_error_not_a_skip(records):
    mine = [r for r in records if r.source == resources.source_name(MISSING_MODULE)]
    assert [r.cc for r in mine] == list(CCS)
    for r in mine:
        assert r.error.startswith("ModuleNotFoundError"), r.error
        assert len(resources.find_problems([r])) == 1


def test_smem_bytes_mismatch_is_reported():
    config = resources.TileConfig(Br=16, Bc=16, d_pad=64, num_warps=4)
    common = {"source": "fa1_forward", "config": config, "cc": (9, 0), "registers": 100,
              "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "smem_expected": 8192}
    small = resources.KernelResources(label="preprocess", smem=0, **common)
    main = resources.KernelResources(label="main", smem=8192, **common)
    assert resources.find_problems([small, main]) == []
    main.smem = 8320
    (problem,) = resources.find_problems([small, main])
    assert "ptxas reports 8320 B" in problem and "says 8192 B" in problem


# ---------------------------------------------------------------------------
# The ptxas log parser, on logs captured from nvJitLink 13 (numba-cuda 0.30.4)
# ---------------------------------------------------------------------------

FA1 = ("_ZN10flashnumba7kernels11fa1_forward5build12_3clocals_3e18fa1_forward_kernelB2v1B104cw51cXTL"
       "SUwv1sDUaKthoaNgoKmjgOR3W3Cw6igA9duC0hkwnNGiHEkYkrqQBFBTDEwCyQe21eqwcFW3UoDGjzpQEsgzrtUEAA_3d"
       "_3dE5ArrayIfLi4E1C7mutable7alignedE5ArrayIfLi4E1C7mutable7alignedE5ArrayIfLi4E1C7mutable7alig"
       "nedE5ArrayIfLi4E1C7mutable7alignedE5ArrayIfLi3E1C7mutable7alignedE5ArrayIfLi3E1C7mutable7alig"
       "nedEfbi")
# fa1_forward, Br=16 Bc=32 d_pad=64, sm_90, link-time optimisation (how kernels ship).
LOG_LTO = (
    "INFO: NVVM70 LTOIR Container created (68236 bytes)\n"
    "ptxas info    : 0 bytes gmem\n"
    f"ptxas info    : Compiling entry function '{FA1}' for 'sm_90'\n"
    f"ptxas info    : Function properties for {FA1}\n"
    "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    "ptxas info    : Used 161 registers, used 1 barriers, 40000 bytes smem\n"
    "ptxas info    : Compile time = 539.492 ms\n\x00")

SPILL = ("_ZN8__main__4make12_3clocals_3e5spillB2v1B112cw51cXTLSUwv1sDUaKthoaNgoKmjgOR3W3Cw6igA9duC0"
         "pmOAorRtsZGwJBHSwRQhYj0hiSAmoZgEkh_2bsq1Wh4W0upUCNMbUgZJAnnGtJgA_3dE5ArrayIfLi1E1C7mutab"
         "le7alignedE5ArrayIfLi1E1C7mutable7alignedE")
# spills_under_32_registers (above), sm_80.
LOG_SPILL = (
    "INFO: NVVM70 LTOIR Container created (6388 bytes)\n"
    f"ptxas info    : Overriding maximum register limit 256 for '{SPILL}' with  32 of maxrregcount option\n"
    "ptxas info    : 0 bytes gmem\n"
    f"ptxas info    : Compiling entry function '{SPILL}' for 'sm_80'\n"
    f"ptxas info    : Function properties for {SPILL}\n"
    "ptxas         .     40 bytes stack frame, 60 bytes spill stores, 60 bytes spill loads\n"
    "ptxas info    : Used 32 registers, used 1 barriers, 40 bytes cumulative stack size, 464 bytes cmem[0]\n"
    "ptxas info    : Compile time = 18.840 ms\n \x00")

K = ("_ZN8__main__1kB2v4B118cw51cXTLSUwv1sDUaKthoaNgoKmjgOR3W3CwAkMQ6ntbdO9Xq4Ok1GuB2tATgy0oYUKEIekO"
     "SQA1LcEkkPxmCzEYZKe6lQJEXh0oB_2bQY12oCAA_3d_3dE5ArrayIfLi1E1C7mutable7alignedE5ArrayIfLi1E1C7m"
     "utable7alignedE")
# A kernel with a (64, 65) float32 shared array, sm_80, without link-time optimisation:
# ptxas's line leaves smem out, the linker's summary has it.
LOG_NO_LTO = (
    "ptxas info    : 0 bytes gmem\n"
    f"ptxas info    : Compiling entry function '{K}' for 'sm_80'\n"
    f"ptxas info    : Function properties for {K}\n"
    "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    "ptxas info    : Used 12 registers, used 1 barriers, 464 bytes cmem[0]\n"
    "ptxas info    : Compile time = 2.951 ms\n"
    "info    : 16 bytes gmem\n"
    f"info    : Function properties for '{K}':\n"
    "info    : used 12 registers, used 1 barriers, 0 stack, 16640 bytes smem, 464 bytes cmem[0], 0 bytes lmem\n\x00")


def test_parse_lto_log():
    functions = resources.parse_ptxas_log(LOG_LTO)
    assert functions == {FA1: {"entry": True, "registers": 161, "spill_stores": 0, "spill_loads": 0,
                               "stack_frame": 0, "smem": 40000}}
    assert resources.summarise(functions) == {"registers": 161, "spill_stores": 0, "spill_loads": 0,
                                              "stack_frame": 0, "smem": 40000}


def test_parse_log_with_spills():
    assert resources.summarise(resources.parse_ptxas_log(LOG_SPILL)) == {
        "registers": 32, "spill_stores": 60, "spill_loads": 60, "stack_frame": 40, "smem": 0}


def test_parse_log_without_lto_takes_smem_from_the_linker_summary():
    assert resources.summarise(resources.parse_ptxas_log(LOG_NO_LTO)) == {
        "registers": 12, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "smem": 16640}


def test_parse_log_spills_in_a_device_function_count():
    log = LOG_LTO.replace("ptxas info    : Compile time",
                          "ptxas info    : Function properties for helper\n"
                          "ptxas         .     8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
                          "ptxas info    : Compile time")
    summary = resources.summarise(resources.parse_ptxas_log(log))
    assert (summary["spill_stores"], summary["spill_loads"], summary["stack_frame"]) == (8, 4, 8)


def test_parse_log_without_an_entry_is_an_error():
    with pytest.raises(ValueError, match="one entry function"):
        resources.summarise(resources.parse_ptxas_log("ptxas info    : 0 bytes gmem\n"))


# ---------------------------------------------------------------------------
# The tensor-core instruction count
# ---------------------------------------------------------------------------

def test_mma_count_is_reported_for_tensor_core_kernels_only(built):
    """PTX mma.sync count, read from the shared build: the tensor-core forward's largest config
    has S = Q K^T and O += P V per K/V tile unrolled (m16n8k16: d_pad/16 x Bc/8 + Bc/16 x d_pad/8);
    the FMA forward has none."""
    from flashnumba import registry
    records = []
    for name, expect_mma in ((registry.DEFAULT_HALF, True), (registry.DEFAULT, False)):
        module = registry.version(name).module(registry.FORWARD)
        config = resources.largest(module.shipped_configs())
        plain = module.compile_targets(config)[0][0]
        mine = [r for r in built(module.__name__)     # the same build as that module's test above
                if r.source == resources.source_name(module.__name__)]
        records += mine
        for cc in CCS:
            (r,) = [r for r in _of(mine, resources.source_name(module.__name__), cc) if r.label == plain]
            if expect_mma:
                assert r.mma == (config.d_pad // 16) * (config.Bc // 8) + \
                    (config.Bc // 16) * (config.d_pad // 8) > 0, r
            else:
                assert r.mma == 0, r
    assert " mma " in resources.format_table(records).splitlines()[0]
