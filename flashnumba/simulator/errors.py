"""Errors the extended simulator raises where a GPU would hang or compute garbage.

On a GPU, a warp collective that some named lanes never reach hangs the
kernel or returns undefined values, and a barrier that a waiting thread can
never pass hangs it. The simulator sees every thread, so it stops the block
instead and says who was where.
"""


class SimulatorError(RuntimeError):
    """A kernel did something the GPU leaves undefined or that would hang it."""


class WarpDivergenceError(SimulatorError):
    """Lanes named in a warp operation's mask did not all reach that operation."""


class DeadlockError(SimulatorError):
    """Every live thread of a block waits, and none of the waits can complete."""


def lane_list(bits):
    """'0-15, 17, 20-31' for the set bits of a 32-bit lane mask; 'none' if empty."""
    runs = []
    lane = 0
    while lane < 32:
        if bits >> lane & 1:
            first = lane
            while lane + 1 < 32 and bits >> (lane + 1) & 1:
                lane += 1
            runs.append(str(first) if first == lane else f"{first}-{lane}")
        lane += 1
    return ", ".join(runs) if runs else "none"


def lanes(bits):
    """'lane 5' or 'lanes 0-15, 17' for a lane mask."""
    return ("lane " if bits and not bits & (bits - 1) else "lanes ") + lane_list(bits)
