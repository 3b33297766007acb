"""Counting HBM traffic: every mirror reads and writes its big arrays through a counter.

Counts are in elements (multiply by the dtype's size for bytes), per tensor name.
"""

from collections import Counter


class HBM:
    """Element counts of reads and writes to high-bandwidth (off-chip) memory."""

    def __init__(self):
        self.reads = Counter()
        self.writes = Counter()

    def read(self, name, array):
        """Count reading `array` (a tile just loaded from tensor `name`); return it."""
        self.reads[name] += array.size
        return array

    def write(self, name, array):
        """Count writing `array` (a tile stored to tensor `name`)."""
        self.writes[name] += array.size

    @property
    def total_reads(self):
        return sum(self.reads.values())

    @property
    def total_writes(self):
        return sum(self.writes.values())

    @property
    def total(self):
        return self.total_reads + self.total_writes

    def snapshot(self):
        """A frozen copy: (reads, writes) as plain dicts."""
        return dict(self.reads), dict(self.writes)

    def __repr__(self):
        return f"HBM(reads={dict(self.reads)}, writes={dict(self.writes)})"
