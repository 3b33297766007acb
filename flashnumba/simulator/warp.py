"""Warps of simulated threads, and the rendezvous that warp collectives meet at.

Thread ``t`` of a block (linear id ``t = x + bx*(y + by*z)``) is lane
``t % 32`` of warp ``t // 32``. The last warp of a block whose size is not a
multiple of 32 has fewer lanes; the missing lanes simply do not exist, so a
mask naming them (``0xFFFFFFFF`` in a 48-thread block, say) is read as naming
only the lanes that exist.

A warp collective (a shuffle, a vote, ``syncwarp``) is a meeting of the lanes
named in its mask. Each simulated lane is its own Python thread, so the
meeting works like this, all under the block's lock (block.py):

1. A lane arriving at an operation with member set ``M`` looks up the meeting
   for ``M`` in its warp's ``pending`` table, opening one if there is none,
   and leaves its value (and its argument, such as a shuffle's ``delta``) in
   the meeting's per-lane slots.
2. If it was the last member to arrive, it computes every member's result
   with the hardware's rule for that operation, closes the meeting, hands each
   waiting lane its result and wakes it. It carries on without waiting.
3. Otherwise it goes to sleep (block.py: ``mark_waiting`` then ``wait``) until
   the last member wakes it, and returns the result left for it.

So a collective costs one lock round and one sleep/wake per lane, and only the
lanes of one warp are involved: no polling, nothing block-wide waits.

Before a lane goes to sleep, the meeting checks that it can still complete. It
cannot, and the simulator raises ``WarpDivergenceError`` naming the block, the
warp, the operation and which lanes arrived or are missing, when:

- a lane named in the mask has exited;
- a named lane waits at ``syncthreads`` (it needs this lane there too);
- lanes already waiting at one collective for this lane are named by the
  collective this lane now enters (each side waits for the other), which
  includes the plain case of divergent lanes calling different collectives
  with the same mask;
- a lane that this meeting waits for exits or goes to ``syncthreads``.

Any longer cycle of waits ends with every live thread asleep, which block.py
reports as a ``DeadlockError``. Nothing hangs.
"""

import functools

from .errors import WarpDivergenceError, lanes

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF


@functools.cache  # kernels use few distinct masks; this runs once per collective
def lanes_of(bits):
    """The lane numbers whose bits are set, lowest first."""
    return tuple(lane for lane in range(WARP_SIZE) if bits >> lane & 1)


class Meeting:
    """One warp collective in progress: the lanes of ``members`` meet here."""

    __slots__ = ("args", "arrived", "members", "op", "threads", "values")

    def __init__(self, op, members):
        self.op = op  # e.g. "shfl_xor_sync"
        self.members = members  # bit i set: lane i takes part
        self.arrived = 0  # bit i set: lane i is here
        self.values = [None] * WARP_SIZE  # what each lane contributes
        self.args = [None] * WARP_SIZE  # per-lane argument (src_lane, delta, ...)
        self.threads = [None] * WARP_SIZE  # the simulated threads, to wake them

    @property
    def missing(self):
        return self.members & ~self.arrived

    def label(self):
        return f"{self.op}(mask={self.members:#010x})"

    def status(self):
        return (f"arrived: {lanes(self.arrived)}; "
                f"missing: {lanes(self.missing)}")


class Warp:
    """The lanes of one warp of a block, and the collectives they are meeting at."""

    def __init__(self, block, index, nlanes):
        self.block = block
        self.index = index
        self.present = (1 << nlanes) - 1  # lanes that exist
        self.exited = 0  # lanes whose thread has returned
        self.at_barrier = 0  # lanes asleep in syncthreads
        self.pending = {}  # member mask -> Meeting not yet complete

    def name(self):
        return f"block {self.block.block_index}, warp {self.index}"

    def meet(self, thread, op, mask, value, arg, combine):
        """Lane ``thread.lane`` reaches collective ``op``; return its result.

        ``combine(meeting)`` runs once, in the last lane to arrive, and returns
        a list of 32 per-lane results (the hardware rule of ``op``).
        """
        block = self.block
        lane = thread.lane
        bit = 1 << lane
        with block.lock:
            block.check_not_failed()
            members = int(mask) & FULL_MASK & self.present
            if not members & bit:
                raise WarpDivergenceError(
                    f"{self.name()}: lane {lane} called {op}(mask={int(mask) & FULL_MASK:#010x}), "
                    f"a mask without its own lane (undefined on the GPU)")
            meeting = self.pending.get(members)
            if meeting is None:
                meeting = self.pending[members] = Meeting(op, members)
            elif meeting.op != op:
                raise WarpDivergenceError(
                    f"{self.name()}, {meeting.label()}: lane {lane} called "
                    f"{op}(mask={members:#010x}) instead, while the others wait for it "
                    f"({meeting.status()}). All lanes named in a mask must reach the "
                    f"same warp operation.")
            meeting.arrived |= bit
            meeting.values[lane] = value
            meeting.args[lane] = arg
            meeting.threads[lane] = thread

            if meeting.arrived == members:
                # Last to arrive: everyone's result, then wake the others.
                del self.pending[members]
                results = combine(meeting)
                for other in lanes_of(members & ~bit):
                    waiter = meeting.threads[other]
                    waiter.result = results[other]
                    block.wake(waiter)
                return results[lane]

            if meeting.members & (self.exited | self.at_barrier) or len(self.pending) > 1:
                self._check_can_complete(meeting, lane)  # may be stuck: find out
            block.mark_waiting(thread)
        thread.wait()
        return thread.result

    def _check_can_complete(self, meeting, lane):
        """Raise if ``lane`` would sleep at ``meeting`` for good. Lock held."""
        gone = meeting.members & self.exited
        if gone:
            raise WarpDivergenceError(
                f"{self.name()}, {meeting.label()}: {lanes(gone)} named in "
                f"the mask have exited ({meeting.status()})")
        stuck = meeting.members & self.at_barrier
        if stuck:
            raise WarpDivergenceError(
                f"{self.name()}, {meeting.label()}: {lanes(stuck)} named in "
                f"the mask wait at syncthreads, which needs lane {lane} there too "
                f"({meeting.status()})")
        bit = 1 << lane
        for other in self.pending.values():
            if other is not meeting and other.missing & bit and other.arrived & meeting.members:
                raise WarpDivergenceError(
                    f"{self.name()}: lane {lane} waits at {meeting.label()} for "
                    f"{lanes(other.arrived & meeting.members)}, which wait for lane "
                    f"{lane} at {other.label()} ({other.status()})")

    def waiting_for(self, lane):
        """The first pending meeting that still needs ``lane``, or None. Lock held."""
        bit = 1 << lane
        for meeting in self.pending.values():
            if meeting.missing & bit:
                return meeting
        return None

    def lane_exited(self, lane):
        """Record that ``lane`` returned; raise if a meeting still needed it. Lock held."""
        self.exited |= 1 << lane
        meeting = self.waiting_for(lane)
        if meeting is not None:
            raise WarpDivergenceError(
                f"{self.name()}, {meeting.label()}: lane {lane} exited without reaching "
                f"it ({meeting.status()})")
