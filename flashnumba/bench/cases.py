"""What is measured: the shapes, and the two numbers of each (FLOPs and the fewest bytes).

FLOPs follow FlashAttention's convention: forward 4 B H Nq Nk d (two matrix
products of 2 Nq Nk d each), half of it under causal masking, backward 2.5
times the forward (five products instead of two). The exp, max and sums are
not counted.

The fewest bytes: each input read once and each output written once, float32
(bf16 runs move half; they are reported against the same count).
"""

from dataclasses import dataclass

from flashnumba import registry

SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
LONG_SEQ_LENS = (65536, 131072)


@dataclass(frozen=True)
class Case:
    """One benchmark shape: q, k, v are (B, N, H, d) with Nq = Nk = N and Hq = Hkv = H."""
    B: int
    H: int
    N: int
    d: int
    causal: bool

    @property
    def label(self):
        return f"B{self.B} H{self.H} N{self.N} d{self.d}{' causal' if self.causal else ''}"

    @property
    def short(self):
        n = f"{self.N // 1024}k" if self.N >= 1024 and self.N % 1024 == 0 else str(self.N)
        return f"N{n} d{self.d}{' c' if self.causal else ''}"

    def flops(self, direction):
        return attention_flops(self.B, self.H, self.N, self.N, self.d, self.causal, direction)

    def min_bytes(self, direction, itemsize=4):
        return min_bytes(self.B, self.H, self.N, self.N, self.d, direction, itemsize)

    def scores_bytes(self, itemsize=4):
        """One B x H x N x N score matrix: what an implementation that materialises S holds."""
        return self.B * self.H * self.N * self.N * itemsize


def attention_flops(B, H, Nq, Nk, d, causal, direction="fwd"):
    """Forward 4 B H Nq Nk d (half with causal); backward 2.5 x forward."""
    flops = 4 * B * H * Nq * Nk * d
    if causal:
        flops //= 2
    if direction == "bwd":
        return flops * 5 // 2
    if direction != "fwd":
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    return flops


def min_bytes(B, H, Nq, Nk, d, direction="fwd", itemsize=4):
    """Fewest bytes through device memory. fwd: read q, k, v; write O and L.
    bwd: read q, k, v, O, dO, L; write dq, dk, dv."""
    q = B * Nq * H * d
    kv = B * Nk * H * d
    rows = B * H * Nq
    if direction == "fwd":
        return itemsize * (q + 2 * kv + q) + 4 * rows
    if direction == "bwd":
        return itemsize * (3 * q + 2 * kv + q + 2 * kv) + 4 * rows
    raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")


def default_cases():
    """d in (64, 128), N = 512 .. 16384 with B=4, H=16, causal and not; and B=1, H=16, N=64k, 128k.
    Ordered so that the cases that matter most come first (a run cut short by its
    time budget still has them): d=64, then the long sequences, then d=128."""
    cases = [Case(4, 16, N, 64, causal) for N in SEQ_LENS for causal in (False, True)]
    cases += [Case(1, 16, N, 64, causal) for N in LONG_SEQ_LENS for causal in (False, True)]
    cases += [Case(4, 16, N, 128, causal) for N in SEQ_LENS for causal in (False, True)]
    return cases


def quick_cases():
    """A few shapes for a short lease: d=64, N = 1k, 4k, 16k, causal and not."""
    return [Case(4, 16, N, 64, causal) for N in (1024, 4096, 16384) for causal in (False, True)]


def parse_shapes(text):
    """'BxHxNxd[c|n]' items, comma-separated: c causal only, n non-causal only, neither both.

    >>> [c.label for c in parse_shapes("4x16x4096x64c,1x16x65536x64n")]
    ['B4 H16 N4096 d64 causal', 'B1 H16 N65536 d64']
    """
    cases = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        modes = (False, True)
        if item[-1] in "cn":
            modes = (item[-1] == "c",)
            item = item[:-1]
        parts = item.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {item!r}: expected BxHxNxd with positive integers, e.g. 4x16x4096x64")
        B, H, N, d = map(int, parts)
        if d > registry.MAX_HEAD_DIM:
            raise ValueError(f"shape {item!r}: head dim d={d} > {registry.MAX_HEAD_DIM} is not supported")
        cases += [Case(B, H, N, d, causal) for causal in modes]
    if not cases:
        raise ValueError(f"--shapes {text!r} names no shape")
    return cases
