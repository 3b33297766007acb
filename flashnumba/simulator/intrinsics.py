"""numba.cuda's warp intrinsics for the simulator, with the GPU's semantics.

Signatures are numba-cuda 0.30's (numba/cuda/intrinsics.py, stubs.py,
cudadecl.py), argument names included::

    syncwarp(mask=0xFFFFFFFF)
    shfl_sync(mask, value, src_lane)      shfl_up_sync(mask, value, delta)
    shfl_down_sync(mask, value, delta)    shfl_xor_sync(mask, value, lane_mask)
    ballot_sync(mask, predicate) -> int32
    all_sync(mask, predicate), any_sync(...), eq_sync(...) -> bool
    match_any_sync(mask, value) -> int32  match_all_sync(mask, value) -> (int32, bool)
    activemask() -> uint32                lanemask_lt() -> uint32

Numba exposes no ``width`` argument: its shuffles always span the whole warp
(it passes PTX ``shfl.sync`` the operand c = 0x1F, or 0 for shfl_up). So
there are no width segments here either; a kernel passing a width would not
compile for the GPU.

Shuffles follow PTX ``shfl.sync`` with that c. For lane ``lane`` with
argument ``b`` (src_lane, delta or lane_mask)::

    b = b & 31                                # only the low 5 bits count
    shfl_sync:       j = b                    # i.e. src_lane % 32
    shfl_up_sync:    j = lane - b, or lane if that is < 0
    shfl_down_sync:  j = lane + b, or lane if that is > 31
    shfl_xor_sync:   j = lane ^ b
    result = value passed by lane j

An H200 agreed on every edge case tried (delta 32, 33, 63, -1; src_lane -1,
33, 100), and tests/test_simulator.py runs the same kernels on both.

When lane j does not take part (outside the mask, or past the end of a
partial warp) the GPU returns an undefined value (the H200 gave 0.0). The
simulator returns a poison value instead, NaN for floats and 0xDEADBEEF for
ints, so that a use of it is likely to show. Values pass through unchanged (an np.float32 stays np.float32),
and only the types Numba compiles are accepted: 32- and 64-bit ints and
floats (a Python int or float is Numba's int64 or float64).

``ballot_sync`` returns an int32 as in Numba, so lane 31's bit makes it
negative; ``popc`` and ``ffs`` are replaced too, so that they count the
int32's 32 bits as the GPU does rather than Python's sign.

``activemask()`` returns every lane that exists, as a GPU does in converged
code. The simulator cannot do better: it does not model which lanes run
together, and since it runs lanes one after another between sync points, a
lane that has already returned here may still be running in GPU time.
"""

import struct
import threading

import numpy as np

from .errors import SimulatorError
from .warp import FULL_MASK, WARP_SIZE, lanes_of

SHFL_TYPES = (int, float, np.int32, np.int64, np.float32, np.float64)
POISON_INT = -0x21524111  # 0xDEADBEEF as an int32


def _this_lane(op):
    """The simulated thread calling ``cuda.<op>``."""
    thread = threading.current_thread()
    if getattr(thread, "warp", None) is None:
        raise SimulatorError(f"cuda.{op}() called outside a kernel running on the simulator")
    return thread


def _check_mask(op, mask):
    if isinstance(mask, bool) or not isinstance(mask, (int, np.integer)):
        raise TypeError(f"cuda.{op}: mask must be an integer, got {type(mask).__name__}")


def _int32(bits):
    """A 32-bit pattern as Numba's int32 (bit 31 set -> negative)."""
    return np.int32(bits - (1 << 32) if bits >= 1 << 31 else bits)


def undefined(like):
    """What a read of a lane that is not taking part gives: poison of like's type."""
    if isinstance(like, (float, np.floating)):
        return type(like)("nan")
    return type(like)(POISON_INT)


# -- shuffles ----------------------------------------------------------------

def _source_idx(lane, b):
    return b


def _source_up(lane, b):
    return lane - b if lane - b >= 0 else lane


def _source_down(lane, b):
    return lane + b if lane + b < WARP_SIZE else lane


def _source_xor(lane, b):
    return lane ^ b


def _shuffle_rule(source):
    """combine() for a shuffle: lane gets the value of lane source(lane, b & 31)."""
    def combine(meeting):
        members = meeting.members
        values = meeting.values
        out = [None] * WARP_SIZE
        for lane in lanes_of(members):
            j = source(lane, int(meeting.args[lane]) & 31)
            out[lane] = values[j] if members >> j & 1 else undefined(values[lane])
        return out
    return combine


_SHFL_IDX = _shuffle_rule(_source_idx)
_SHFL_UP = _shuffle_rule(_source_up)
_SHFL_DOWN = _shuffle_rule(_source_down)
_SHFL_XOR = _shuffle_rule(_source_xor)


def _shuffle(op, rule, mask, value, b):
    thread = _this_lane(op)
    _check_mask(op, mask)
    if isinstance(value, bool) or not isinstance(value, SHFL_TYPES):
        raise TypeError(f"cuda.{op}: Numba shuffles only 32- and 64-bit ints and floats, "
                        f"not {type(value).__name__}")
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
        raise TypeError(f"cuda.{op}: the lane argument must be an integer, "
                        f"not {type(b).__name__}")
    return thread.warp.meet(thread, op, mask, value, b, rule)


def shfl_sync(self, mask, value, src_lane):
    """value of lane src_lane % 32."""
    return _shuffle("shfl_sync", _SHFL_IDX, mask, value, src_lane)


def shfl_up_sync(self, mask, value, delta):
    """value of lane (lane - delta); lanes below delta keep their own."""
    return _shuffle("shfl_up_sync", _SHFL_UP, mask, value, delta)


def shfl_down_sync(self, mask, value, delta):
    """value of lane (lane + delta); lanes past 31 - delta keep their own."""
    return _shuffle("shfl_down_sync", _SHFL_DOWN, mask, value, delta)


def shfl_xor_sync(self, mask, value, lane_mask):
    """value of lane (lane ^ lane_mask): the butterfly of a tree reduction."""
    return _shuffle("shfl_xor_sync", _SHFL_XOR, mask, value, lane_mask)


# -- votes -------------------------------------------------------------------

def _ballot_bits(meeting):
    """Bit i set for each member lane i whose predicate is true."""
    bits = 0
    for lane in lanes_of(meeting.members):
        if meeting.values[lane]:
            bits |= 1 << lane
    return bits


def _vote_rule(result_of_bits):
    """combine() for a vote: every member gets result_of_bits(ballot bits, members)."""
    def combine(meeting):
        return [result_of_bits(_ballot_bits(meeting), meeting.members)] * WARP_SIZE
    return combine


_BALLOT = _vote_rule(lambda bits, members: _int32(bits))
_ALL = _vote_rule(lambda bits, members: bits == members)
_ANY = _vote_rule(lambda bits, members: bits != 0)
_EQ = _vote_rule(lambda bits, members: bits in (0, members))


def _vote(op, rule, mask, predicate):
    thread = _this_lane(op)
    _check_mask(op, mask)
    if not isinstance(predicate, (int, np.integer, np.bool_)):
        raise TypeError(f"cuda.{op}: predicate must be an integer or boolean, "
                        f"not {type(predicate).__name__}")
    return thread.warp.meet(thread, op, mask, bool(predicate), None, rule)


def ballot_sync(self, mask, predicate):
    """int32 whose bit i is lane i's predicate, for the lanes in mask."""
    return _vote("ballot_sync", _BALLOT, mask, predicate)


def all_sync(self, mask, predicate):
    """True when the predicate holds in every lane of mask."""
    return _vote("all_sync", _ALL, mask, predicate)


def any_sync(self, mask, predicate):
    """True when the predicate holds in some lane of mask."""
    return _vote("any_sync", _ANY, mask, predicate)


def eq_sync(self, mask, predicate):
    """True when the predicate is the same in every lane of mask."""
    return _vote("eq_sync", _EQ, mask, predicate)


# -- matches -----------------------------------------------------------------

def _bit_pattern(value):
    """What match.sync compares: the value's bits (so -0.0 != 0.0, NaN == NaN)."""
    if isinstance(value, (float, np.float64)):
        return struct.pack("<d", value)
    if isinstance(value, np.float32):
        return value.tobytes()
    return int(value)


def _match(op, mask, value, combine):
    thread = _this_lane(op)
    _check_mask(op, mask)
    if isinstance(value, bool) or not isinstance(value, SHFL_TYPES):
        raise TypeError(f"cuda.{op}: Numba matches only 32- and 64-bit ints and floats, "
                        f"not {type(value).__name__}")
    return thread.warp.meet(thread, op, mask, _bit_pattern(value), None, combine)


def _match_any_rule(meeting):
    lanes = lanes_of(meeting.members)
    out = [None] * WARP_SIZE
    for lane in lanes:
        same = 0
        for other in lanes:
            if meeting.values[other] == meeting.values[lane]:
                same |= 1 << other
        out[lane] = _int32(same)
    return out


def _match_all_rule(meeting):
    lanes = lanes_of(meeting.members)
    equal = all(meeting.values[lane] == meeting.values[lanes[0]] for lane in lanes)
    return [(_int32(meeting.members if equal else 0), equal)] * WARP_SIZE


def match_any_sync(self, mask, value):
    """int32 mask of the lanes in mask whose value equals this lane's."""
    return _match("match_any_sync", mask, value, _match_any_rule)


def match_all_sync(self, mask, value):
    """(mask, True) when every lane in mask has the same value, else (0, False)."""
    return _match("match_all_sync", mask, value, _match_all_rule)


# -- synchronisation and lane masks ------------------------------------------

def _no_results(meeting):
    return [None] * WARP_SIZE


def syncwarp(self, mask=FULL_MASK):
    """Wait until every lane of mask has reached a syncwarp with this mask."""
    thread = _this_lane("syncwarp")
    _check_mask("syncwarp", mask)
    thread.warp.meet(thread, "syncwarp", mask, None, None, _no_results)


def activemask(self):
    """uint32 of the lanes of this warp that exist (as in converged code)."""
    return np.uint32(_this_lane("activemask").warp.present)


def lanemask_lt(self):
    """uint32 with the bits of the lanes below this one set."""
    return np.uint32((1 << _this_lane("lanemask_lt").lane) - 1)


# -- bit counts that see an int32 as 32 bits ---------------------------------

def _unsigned(val):
    """val's two's-complement bits at Numba's width (numpy ints: theirs; Python ints: 64)."""
    bits = 8 * val.dtype.itemsize if isinstance(val, np.integer) else 64
    return int(val) & ((1 << bits) - 1)


def popc(self, val):
    """Number of set bits: popc(ballot_sync(...)) counts the lanes voting true."""
    return _unsigned(val).bit_count()


def ffs(self, val):
    """1-based position of the lowest set bit, 0 when none: ffs(ballot) - 1 is a lane."""
    bits = _unsigned(val)
    return (bits & -bits).bit_length()


# What install() puts on numba's FakeCUDAModule (the ``cuda`` a kernel sees).
METHODS = {
    "syncwarp": syncwarp,
    "shfl_sync": shfl_sync,
    "shfl_up_sync": shfl_up_sync,
    "shfl_down_sync": shfl_down_sync,
    "shfl_xor_sync": shfl_xor_sync,
    "ballot_sync": ballot_sync,
    "all_sync": all_sync,
    "any_sync": any_sync,
    "eq_sync": eq_sync,
    "match_any_sync": match_any_sync,
    "match_all_sync": match_all_sync,
    "activemask": activemask,
    "lanemask_lt": lanemask_lt,
    "popc": popc,
    "ffs": ffs,
}
