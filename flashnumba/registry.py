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

A version's kernels live in ``flashnumba/kernels/<version>_forward.py`` and
``<version>_backward.py``. Each forward module has ``forward(q, k, v, **options)
-> (O, L)`` and ``state(q, k, v, **options) -> {variable: array}`` (what a step
shows), each backward module ``backward(dout, q, k, v, out, L, **options) -> (dq,
dk, dv)``; both take flash-attn's layout (B, N, H, d) in float32 and the options
causal, alignment, softmax_scale, dropout_p, seed, limit.

(The FlashAttention paper numbers its forward Algorithm 1 and its backward
Algorithm 4; its Algorithm 2 is the forward with masking and dropout and
Algorithm 0 standard attention, whose backward is Algorithm 3.)
"""

import importlib
from dataclasses import dataclass

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

    def kernel(self, direction):
        """The kernel name of one direction, "fa2_fast_forward" (also its module's name)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return f"{self.name}_{direction}"

    def module(self, direction):
        """The kernel module of one direction (imported on first use: it compiles kernels)."""
        return importlib.import_module(f"flashnumba.kernels.{self.kernel(direction)}")

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
            launcher=False, deterministic_backward="fa1"),
    Version("fa2", FA2, 1,
            "grid (Tr, batch x heads); warps split the rows of Q_i and reduce with shuffles; the "
            "backward adds dQ with float32 atomics, or with deterministic=True in a separate pass",
            forward_state=("O", "m", "l"), backward_state=("dQ", "dK", "dV"),
            launcher=False, deterministic_backward="fa2"),
    Version("fa2_fast", FA2, 2,
            "register tiles (4 x 8 per thread), k-major shared tiles read as 16-byte vectors, exp2 "
            "with log2(e) folded into the scale; the backward with more than 48 KB of shared memory",
            forward_state=("O", "L"), backward_state=("dQ", "dK", "dV"),
            launcher=True, deterministic_backward="fa2"),
)

DEFAULT = "fa2_fast"          # what the public calls run when no algorithm is named


def names():
    """The version names, in the order above: what ``algorithm=`` takes."""
    return tuple(v.name for v in VERSIONS)


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
