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
(their kernels are much longer than an allocation).
"""

from flashnumba import registry


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


def flashnumba_impl(version, direction, config=None):
    """The benchmark's implementation of one registry version in one direction."""
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
                  ("FLASH", "FLASH_ATTENTION", "bf16"), ("CUDNN", "CUDNN_ATTENTION", "bf16"))


class TorchSDPA(Impl):
    family = "torch"

    def __init__(self, label, backend, dtype, direction):
        name = f"torch {label}" + (" bf16" if dtype == "bf16" else "")
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
    impls = [flashnumba_impl(v, "fwd") for v in versions] + [NaiveForward()]
    impls += [TorchSDPA(label, backend, dtype, "fwd") for label, backend, dtype in TORCH_BACKENDS]
    impls += [flashnumba_impl(v, "bwd") for v in versions]
    impls += [TorchSDPA(label, backend, dtype, "bwd") for label, backend, dtype in TORCH_BACKENDS]
    return impls


class Inputs:
    """Random inputs of one case on the GPU: torch (B, N, H, d) float32, numba views, bf16 copies."""

    def __init__(self, case, seed=0):
        import torch
        from numba import cuda
        g = torch.Generator(device="cuda").manual_seed(seed)
        shape = (case.B, case.N, case.H, case.d)
        self.q, self.k, self.v, self.dout = (torch.randn(shape, device="cuda", generator=g)
                                             for _ in range(4))
        self.nq, self.nk, self.nv, self.ndout = (cuda.as_cuda_array(x)
                                                 for x in (self.q, self.k, self.v, self.dout))
        self._bf16 = None

    def typed(self, dtype):
        import torch
        if dtype == "fp32":
            return self.q, self.k, self.v, self.dout
        if self._bf16 is None:
            self._bf16 = tuple(x.to(torch.bfloat16) for x in (self.q, self.k, self.v, self.dout))
        return self._bf16

    def nbytes(self):
        return 4 * 4 * self.q.numel()
