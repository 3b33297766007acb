"""Every algorithm flashnumba implements and each of its kernel versions, named once.

Everything else reads this module: the public calls (``algorithm=``), stepping,
the figures, the accuracy table, the benchmark, the resource check, selfcheck
and the tests. Adding a kernel version means one ``Version`` entry here and its
files; nothing else changes.

    algorithm  paper                               forward / backward      mirror (flashnumba.mirror)
    standard   standard attention (FA1, Alg. 0/3)   Algorithm 0 / 3         standard_forward, standard_backward
    fa1        FlashAttention (Dao et al. 2022)     Algorithm 1 / 4         fa1_forward, fa1_backward
    fa2        FlashAttention-2 (Dao 2023)          Algorithm 1 / 2         fa2_forward, fa2_backward

    version    of    what it is
    fa1        fa1   version 1: one thread block per head, warps split the keys (split-K); for reading, slow
    fa2        fa2   version 1: one block per Q tile (forward) or K/V tile (backward), warps split the
                     rows (split-Q), shuffles for row statistics; the kernel the lessons read
    fa2_fast   fa2   version 2: register tiles, vector loads, exp2; the fp32 speed path
    fa2_tc     fa2   version 3: mma.sync on the tensor cores, fp16 and bf16 only (sm_80 and newer);
                     the half-precision default

A version's kernels live in ``flashnumba/kernels/<version>_forward.py`` and
``<version>_backward.py``. Each forward module has ``forward(q, k, v, **options)
-> (O, L)`` and ``state(q, k, v, **options) -> {variable: array}`` (what a step
shows), each backward module ``backward(dout, q, k, v, out, L, **options) -> (dq,
dk, dv)``; both take flash-attn's layout (B, N, H, d) in the dtypes the version
reads (``Version.dtypes``: float32 for the FMA versions, which serve float16 and
bfloat16 inputs widened to float32; float16 and bfloat16 only for fa2_tc) and the
options causal, alignment, softmax_scale, dropout_p, seed, limit.

(The FlashAttention paper numbers its forward Algorithm 1 and its backward
Algorithm 4; its Algorithm 2 is the forward with masking and dropout and
Algorithm 0 standard attention, whose backward is Algorithm 3.)
"""

import importlib
from dataclasses import dataclass

from flashnumba.dtypes import BFLOAT16, FLOAT16, FLOAT32

FORWARD = "forward"
BACKWARD = "backward"
DIRECTIONS = (FORWARD, BACKWARD)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of a paper: its numbered forward and backward, and its NumPy mirror."""
    name: str
    title: str                # how figures and tables label it
    paper: str
    forward: str              # the paper's number for the forward ("Algorithm 1")
    backward: str
    forward_loop: str         # what one step of a thread block's (or the mirror's) loop covers
    backward_loop: str
    block_per_head: bool      # one thread block walks every tile of a head (else one block per tile)

    @property
    def mirror_forward(self):
        """The mirror's name in flashnumba.mirror ("fa2_forward"); "<name>_steps" is its step generator."""
        return f"{self.name}_{FORWARD}"

    @property
    def mirror_backward(self):
        return f"{self.name}_{BACKWARD}"

    def mirror(self, direction, what=""):
        """The mirror function; what="steps": its step generator, what="state": the state a
        step shows (``flashnumba.stepping``)."""
        mirror = importlib.import_module("flashnumba.mirror")
        return getattr(mirror, f"{self.name}_{direction}" + (f"_{what}" if what else ""))


@dataclass(frozen=True)
class Version:
    """One kernel version of an algorithm: its forward and backward kernel modules."""
    name: str                 # also its kernel modules' prefix
    algorithm: Algorithm
    number: int               # version number within its algorithm, simplest first
    summary: str              # one honest sentence
    forward_state: tuple      # the variables a step of the forward kernel shows
    backward_state: tuple
    launcher: bool            # its kernel modules have launcher(): the benchmark times them bare
    deterministic_backward: str   # the version whose backward serves deterministic=True
    dtypes: tuple = (FLOAT32,)    # the input dtypes its kernels read; with float32 among them,
                                  # float16 and bfloat16 inputs are widened to float32 for it
    min_compute_capability: tuple = None   # (major, minor) a GPU needs; None: any numba runs on
    max_head_dim: int = None      # the largest head dim its kernels serve; None: every bucket

    def takes(self, dtype):
        """True when inputs of `dtype` can run: read as they are, or widened to float32."""
        return dtype in self.dtypes or (FLOAT32 in self.dtypes and dtype in (FLOAT16, BFLOAT16))

    def reads(self, dtype):
        """True when its kernels read `dtype` as it is (no widening)."""
        return dtype in self.dtypes

    def input_dtype(self, wanted=FLOAT32):
        """The dtype to hand its kernels when a caller would rather use `wanted`: `wanted` if
        they read it, else the last of the dtypes they read (bfloat16 for fa2_tc)."""
        return wanted if wanted in self.dtypes else self.dtypes[-1]

    def runs_on(self, compute_capability):
        """True when a GPU of `compute_capability` (major, minor) can run it; None: the simulator."""
        if compute_capability is None or self.min_compute_capability is None:
            return True
        return tuple(compute_capability) >= tuple(self.min_compute_capability)

    def serves_head_dim(self, d):
        return self.max_head_dim is None or d <= self.max_head_dim

    def kernel(self, direction):
        """The kernel name of one direction, "fa2_fast_forward" (also its module's name)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return f"{self.name}_{direction}"

    def module(self, direction):
        """The kernel module of one direction (imported on first use: it compiles kernels)."""
        module = _MODULES.get((self.name, direction))
        if module is None:
            module = _MODULES[self.name, direction] = importlib.import_module(
                f"flashnumba.kernels.{self.kernel(direction)}")
        return module

    def state(self, direction):
        return self.forward_state if direction == FORWARD else self.backward_state


STANDARD = Algorithm(
    "standard", "standard attention", "FlashAttention (Dao et al. 2022), Algorithms 0 and 3",
    "Algorithm 0", "Algorithm 3",
    forward_loop="the whole N x N score matrix", backward_loop="the whole N x N score matrix",
    block_per_head=True)
FA1 = Algorithm(
    "fa1", "FlashAttention-1", "FlashAttention (Dao et al. 2022)", "Algorithm 1", "Algorithm 4",
    forward_loop="K/V tile j (outer), every Q tile i (inner), one block per head",
    backward_loop="K/V tile j (outer), every Q tile i (inner), one block per head",
    block_per_head=True)
FA2 = Algorithm(
    "fa2", "FlashAttention-2", "FlashAttention-2 (Dao 2023)", "Algorithm 1", "Algorithm 2",
    forward_loop="K/V tile j, for the block's Q tile i",
    backward_loop="Q tile i, for the block's K/V tile j", block_per_head=False)

ALGORITHMS = (STANDARD, FA1, FA2)

VERSIONS = (
    Version("fa1", FA1, 1,
            "one thread block per (batch, head); warps split the keys of S_ij and pool partial max, "
            "sum and P V through shared memory; dK_j, dV_j on chip, dQ_i read-modify-written in HBM",
            forward_state=("O", "l", "m"), backward_state=("dQ", "dK", "dV"),
            launcher=False, deterministic_backward="fa1", max_head_dim=128),
    Version("fa2", FA2, 1,
            "grid (Tr, batch x heads); warps split the rows of Q_i and reduce with shuffles; the "
            "backward adds dQ with float32 atomics, or with deterministic=True in a separate pass",
            forward_state=("O", "m", "l"), backward_state=("dQ", "dK", "dV"),
            launcher=False, deterministic_backward="fa2", max_head_dim=128),
    Version("fa2_fast", FA2, 2,
            "register tiles (4 x 8 per thread), k-major shared tiles read as 16-byte vectors, exp2 "
            "with log2(e) folded into the scale; the backward with more than 48 KB of shared memory",
            forward_state=("O", "L"), backward_state=("dQ", "dK", "dV"),
            launcher=True, deterministic_backward="fa2", max_head_dim=256),
    Version("fa2_tc", FA2, 3,
            "mma.sync m16n8k16 on the tensor cores: each warp owns 16 rows of Q_i in registers, "
            "K_j and V_j double-buffered by cp.async, P_ij handed from the S_ij accumulators to "
            "the P V fragments in registers; fp16 and bf16 in, fp32 accumulators",
            forward_state=("O", "L"), backward_state=("dQ", "dK", "dV"),
            launcher=True, deterministic_backward="fa2",
            dtypes=(FLOAT16, BFLOAT16),
            min_compute_capability=(8, 0),   # mma.sync with bf16 operands is sm_80's instruction
            max_head_dim=128),
)
_MODULES = {}                 # (version name, direction) -> its kernel module, once imported

# Head dims: fa1, fa2 and fa2_tc compile d_pad in kernels.common.HEAD_DIM_BUCKETS (up to 128),
# fa2_fast in FAST_HEAD_DIMS (up to 256, flash-attn's largest); tests/test_head_dims.py checks.
MAX_HEAD_DIM = max(v.max_head_dim for v in VERSIONS)   # the most any version serves

DEFAULT = "fa2_fast"          # what the public calls run when no algorithm is named
DEFAULT_HALF = "fa2_tc"       # ... with float16 or bfloat16 inputs, where it can run


def default(dtype, d, compute_capability):
    """The version the public calls run for `dtype` inputs of head dim d when no algorithm is
    named: DEFAULT_HALF where it reads the dtype, serves d and runs on the device
    (compute_capability None: the simulator), else DEFAULT (half inputs widened to float32)."""
    half = version(DEFAULT_HALF)
    if half.reads(dtype) and half.serves_head_dim(d) and half.runs_on(compute_capability):
        return half.name
    return DEFAULT


def names(dtype=None):
    """The version names, in the order above: what ``algorithm=`` takes (for inputs of `dtype`:
    the versions that take it, read as they are or widened)."""
    return tuple(v.name for v in VERSIONS if dtype is None or v.takes(dtype))


def version(name):
    """The Version called `name`, or a ValueError listing the names."""
    for v in VERSIONS:
        if v.name == name:
            return v
    raise ValueError(f"algorithm must be one of {', '.join(map(repr, names()))}, got {name!r}")


def algorithm(name):
    for a in ALGORITHMS:
        if a.name == name:
            return a
    raise ValueError(f"algorithm must be one of {', '.join(repr(a.name) for a in ALGORITHMS)}, "
                     f"got {name!r}")


def kernels():
    """Every kernel name, version by version, forward first: "fa1_forward", ..., "fa2_fast_backward"."""
    return tuple(v.kernel(direction) for v in VERSIONS for direction in DIRECTIONS)


def kernel(name):
    """(Version, direction) of a kernel name such as "fa2_fast_backward"."""
    for v in VERSIONS:
        for direction in DIRECTIONS:
            if v.kernel(direction) == name:
                return v, direction
    raise ValueError(f"kernel must be one of {', '.join(kernels())}, got {name!r}")


def mirrors():
    """The tiled algorithms' mirror names, forward then backward: "fa1_forward", "fa2_forward", ..."""
    return tuple(getattr(a, f"mirror_{direction}") for direction in DIRECTIONS
                 for a in ALGORITHMS if a is not STANDARD)


def kernel_modules():
    """Every kernel module's import path, for the resource check."""
    return tuple(f"flashnumba.kernels.{name}" for name in kernels())
