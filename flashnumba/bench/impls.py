"""The implementations the benchmark runs, each behind one small interface.

    impl.prepare(inputs, case) -> run          run() does one forward or backward pass and
                                               returns its raw outputs
    impl.as_torch(raw)         -> tuple        the outputs as torch tensors (B, N, H, d), zero-copy

flashnumba kernels take numba device arrays made once from the torch inputs
(``cuda.as_cuda_array``, zero-copy); their outputs come back to torch with
``torch.as_tensor(array, device="cuda")``, also zero-copy. PyTorch's
``scaled_dot_product_attention`` takes (B, H, N, d): it gets transposed views
of the same (B, N, H, d) tensors, no copy.

The versions with a ``launcher`` (``flashnumba.registry``) preallocate their
outputs so that no allocation falls inside the timed region; the other
versions and the naive baseline go through their wrappers, which allocate
(their kernels are much longer than an allocation). A version whose kernels
read 16-bit inputs only (fa2_tc, ``Version.dtypes``) runs once per dtype it
reads ("bf16", "fp16"), on the uint16 bits of the torch tensors
(``bench.tc``'s zero-copy views), beside PyTorch's FLASH and CUDNN backends in
the same dtype: the ratios ``vs FLASH`` and ``vs CUDNN`` (``bench.report``).
"""

from flashnumba import dtypes, registry

SHORT = {dtypes.FLOAT32: "fp32", dtypes.BFLOAT16: "bf16", dtypes.FLOAT16: "fp16"}   # as rows say it


class Impl:
    """One implementation of one direction. Subclasses fill prepare() and as_torch()."""
    family = "flashnumba"
    dtype = "fp32"
    primary = True           # timed even when slow (within the run's overall budget)
    scores_factor = 0.0      # float32 N x N score matrices it holds (0: O(N) memory)

    def __init__(self, name, direction):
        self.name = name
        self.direction = direction

    @property
    def key(self):
        return f"{self.direction} {self.name}"

    def unavailable(self):
        """None, or why this implementation cannot run here."""
        return

    def as_torch(self, raw):
        import torch
        return tuple(torch.as_tensor(x, device="cuda") for x in raw)

    def __repr__(self):
        return f"<{self.key}>"


# ---------------------------------------------------------------------------
# flashnumba
# ---------------------------------------------------------------------------

class LauncherForward(Impl):
    """A version with a ``launcher``: checked and allocated once, the launch alone timed."""

    def __init__(self, version, config=None):
        super().__init__(f"flashnumba {version.name}", "fwd")
        self.version = version
        self.config = config

    def prepare(self, inputs, case):
        launch, out, L = self.version.module(registry.FORWARD).launcher(
            inputs.nq, inputs.nk, inputs.nv, causal=case.causal, config=self.config)
        outputs = (out, L)

        def run():
            launch()
            return outputs
        return run

    def as_torch(self, raw):
        return super().as_torch(raw[:1])


class LauncherBackward(Impl):
    def __init__(self, version, config=None):
        super().__init__(f"flashnumba {version.name}", "bwd")
        self.version = version
        self.config = config

    def prepare(self, inputs, case):
        out, L = self.version.module(registry.FORWARD).forward(inputs.nq, inputs.nk, inputs.nv,
                                                               causal=case.causal)
        launch, dq, dk, dv = self.version.module(registry.BACKWARD).launcher(
            inputs.ndout, inputs.nq, inputs.nk, inputs.nv, out, L, causal=case.causal,
            config=self.config)
        outputs = (dq, dk, dv)

        def run():
            launch()
            return outputs
        return run


class WrapperForward(Impl):
    """A version timed through its wrapper, which allocates (its kernel is much longer)."""
    primary = False

    def __init__(self, version):
        super().__init__(f"flashnumba {version.name}", "fwd")
        self.version = version

    def prepare(self, inputs, case):
        forward = self.version.module(registry.FORWARD).forward

        def run():
            return forward(inputs.nq, inputs.nk, inputs.nv, causal=case.causal)
        return run

    def as_torch(self, raw):
        return super().as_torch(raw[:1])


class WrapperBackward(Impl):
    primary = False

    def __init__(self, version):
        super().__init__(f"flashnumba {version.name}", "bwd")
        self.version = version

    def prepare(self, inputs, case):
        out, L = self.version.module(registry.FORWARD).forward(inputs.nq, inputs.nk, inputs.nv,
                                                               causal=case.causal)
        backward = self.version.module(registry.BACKWARD).backward

        def run():
            return backward(inputs.ndout, inputs.nq, inputs.nk, inputs.nv, out, L, causal=case.causal)
        return run


class HalfLauncherForward(Impl):
    """A version that reads 16-bit inputs only, in one dtype: its launcher on the uint16 bits of
    the torch tensors (no copy), the launch alone timed."""

    def __init__(self, version, dtype, config=None):
        super().__init__(f"flashnumba {version.name} {SHORT[dtype]}", "fwd")
        self.version, self.config = version, config
        self.dtype_name, self.dtype = dtype, SHORT[dtype]

    def _bits(self, inputs):
        from flashnumba.bench.tc import numba_bits
        return [numba_bits(x) for x in inputs.typed(self.dtype)]

    def prepare(self, inputs, case):
        q, k, v, _ = self._bits(inputs)
        launch, out, L, _ = self.version.module(registry.FORWARD).launcher(
            q, k, v, causal=case.causal, config=self.config, dtype=self.dtype_name)
        outputs = (out, L)

        def run():
            launch()
            return outputs
        return run

    def as_torch(self, raw):
        from flashnumba.bench.tc import torch_from_bits
        return (torch_from_bits(raw[0], self.dtype_name),)


class HalfLauncherBackward(HalfLauncherForward):
    def __init__(self, version, dtype, config=None):
        super().__init__(version, dtype, config)
        self.direction = "bwd"

    def prepare(self, inputs, case):
        q, k, v, dout = self._bits(inputs)
        out, L = self.version.module(registry.FORWARD).forward(q, k, v, causal=case.causal,
                                                               dtype=self.dtype_name)
        launch, dq, dk, dv, _ = self.version.module(registry.BACKWARD).launcher(
            dout, q, k, v, out, L, causal=case.causal, config=self.config, dtype=self.dtype_name)
        outputs = (dq, dk, dv)

        def run():
            launch()
            return outputs
        return run

    def as_torch(self, raw):
        from flashnumba.bench.tc import torch_from_bits
        return tuple(torch_from_bits(x, self.dtype_name) for x in raw)


def flashnumba_impls(version, direction, config=None):
    """The benchmark's implementations of one registry version in one direction: one, or one per
    16-bit dtype for a version that reads those only."""
    if not version.reads(dtypes.FLOAT32):
        kind = HalfLauncherForward if direction == "fwd" else HalfLauncherBackward
        return [kind(version, dtype, config) for dtype in version.dtypes]
    return [flashnumba_impl(version, direction, config)]


def flashnumba_impl(version, direction, config=None):
    """The benchmark's implementation of one registry version in one direction (a version that
    reads 16-bit inputs only: in the last dtype it reads, bf16)."""
    if not version.reads(dtypes.FLOAT32):
        return flashnumba_impls(version, direction, config)[-1]
    if version.launcher:
        return (LauncherForward if direction == "fwd" else LauncherBackward)(version, config)
    return (WrapperForward if direction == "fwd" else WrapperBackward)(version)


class NaiveForward(Impl):
    primary = False
    scores_factor = 1.0       # S, softmaxed in place

    def __init__(self):
        super().__init__("numba naive", "fwd")

    def prepare(self, inputs, case):
        from flashnumba.kernels import naive

        def run():
            return naive.naive_attention(inputs.nq, inputs.nk, inputs.nv, causal=case.causal)
        return run

    def as_torch(self, raw):
        return super().as_torch(raw[:1])


# ---------------------------------------------------------------------------
# PyTorch scaled_dot_product_attention, one backend at a time
# ---------------------------------------------------------------------------

TORCH_BACKENDS = (("MATH", "MATH", "fp32"), ("EFFICIENT", "EFFICIENT_ATTENTION", "fp32"),
                  ("FLASH", "FLASH_ATTENTION", "bf16"), ("CUDNN", "CUDNN_ATTENTION", "bf16"),
                  ("FLASH", "FLASH_ATTENTION", "fp16"), ("CUDNN", "CUDNN_ATTENTION", "fp16"))


class TorchSDPA(Impl):
    family = "torch"

    def __init__(self, label, backend, dtype, direction):
        name = f"torch {label}" + ("" if dtype == "fp32" else f" {dtype}")
        super().__init__(name, direction)
        self.label = label
        self.backend = backend
        self.dtype = dtype
        if label == "MATH":
            self.scores_factor = 2.0 if direction == "fwd" else 4.0   # S and P; backward adds dP, dS

    def _call(self, q, k, v, causal):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            # (B, N, H, d) -> (B, H, N, d) views; Nq = Nk, so is_causal's top-left diagonal
            # is flashnumba's bottom-right one
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=causal)

    def prepare(self, inputs, case):
        import torch
        q, k, v, dout = inputs.typed(self.dtype)
        if self.direction == "fwd":
            def run():
                return (self._call(q, k, v, case.causal),)
            return run
        q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = self._call(q, k, v, case.causal)                  # (B, H, N, d)
        grad_out = dout.transpose(1, 2)

        def run():
            return torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)
        return run

    def as_torch(self, raw):
        if self.direction == "fwd":
            return (raw[0].transpose(1, 2),)                    # back to (B, N, H, d)
        return tuple(raw)


def implementations():
    """Every implementation, forward then backward, in the order of the tables."""
    versions = sorted(registry.VERSIONS, key=lambda v: not v.launcher)   # the timed-bare ones first
    impls = [i for v in versions for i in flashnumba_impls(v, "fwd")] + [NaiveForward()]
    impls += [TorchSDPA(label, backend, dtype, "fwd") for label, backend, dtype in TORCH_BACKENDS]
    impls += [i for v in versions for i in flashnumba_impls(v, "bwd")]
    impls += [TorchSDPA(label, backend, dtype, "bwd") for label, backend, dtype in TORCH_BACKENDS]
    return impls


class Inputs:
    """Random inputs of one case on the GPU: torch (B, N, H, d) float32, numba views, bf16 and fp16
    copies (made on first use)."""

    def __init__(self, case, seed=0):
        import torch
        from numba import cuda
        g = torch.Generator(device="cuda").manual_seed(seed)
        shape = (case.B, case.N, case.H, case.d)
        self.q, self.k, self.v, self.dout = (torch.randn(shape, device="cuda", generator=g)
                                             for _ in range(4))
        self.nq, self.nk, self.nv, self.ndout = (cuda.as_cuda_array(x)
                                                 for x in (self.q, self.k, self.v, self.dout))
        self._typed = {}

    def typed(self, dtype):
        """q, k, v, dout in "fp32" (the originals), "bf16" or "fp16" (rounded copies, kept)."""
        import torch
        if dtype == "fp32":
            return self.q, self.k, self.v, self.dout
        if dtype not in self._typed:
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            self._typed[dtype] = tuple(x.to(torch_dtype) for x in (self.q, self.k, self.v, self.dout))
        return self._typed[dtype]

    def nbytes(self):
        return 4 * 4 * self.q.numel()
