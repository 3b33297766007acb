"""The implementations the benchmark runs, each behind one small interface.

    impl.prepare(inputs, case) -> run          run() does one forward or backward pass and
                                               returns its raw outputs
    impl.as_torch(raw)         -> tuple        the outputs as torch tensors (B, N, H, d), zero-copy

flashnumba kernels take numba device arrays made once from the torch inputs
(``cuda.as_cuda_array``, zero-copy); their outputs come back to torch with
``torch.as_tensor(array, device="cuda")``, also zero-copy. PyTorch's
``scaled_dot_product_attention`` takes (B, H, N, d): it gets transposed views
of the same (B, N, H, d) tensors, no copy.

The fast kernels preallocate their outputs (``launcher``) so that no
allocation falls inside the timed region; the readable kernels and the naive
baseline go through their wrappers, which allocate (their kernels are much
longer than an allocation).
"""

import importlib

DIRECTIONS = ("fwd", "bwd")


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

def _module(name):
    return importlib.import_module(f"flashnumba.kernels.{name}")


class FastForward(Impl):
    def __init__(self, config=None, name="flashnumba fa2_fast"):
        super().__init__(name, "fwd")
        self.config = config

    def prepare(self, inputs, case):
        fast = _module("fa2_fast_forward")
        launch, out, L = fast.launcher(inputs.nq, inputs.nk, inputs.nv, causal=case.causal,
                                       config=self.config)
        outputs = (out, L)

        def run():
            launch()
            return outputs
        return run

    def as_torch(self, raw):
        return super().as_torch(raw[:1])


class FastBackward(Impl):
    def __init__(self, config=None, name="flashnumba fa2_fast"):
        super().__init__(name, "bwd")
        self.config = config

    def unavailable(self):
        try:
            _module("fa2_fast_backward")
        except ImportError as exc:
            return f"fa2_fast_backward not importable: {exc}"
        return None

    def prepare(self, inputs, case):
        fast_fwd = _module("fa2_fast_forward")
        fast_bwd = _module("fa2_fast_backward")
        out, L = fast_fwd.fa2_fast_forward(inputs.nq, inputs.nk, inputs.nv, causal=case.causal)
        launch, dq, dk, dv = fast_bwd.launcher(inputs.ndout, inputs.nq, inputs.nk, inputs.nv, out, L,
                                               causal=case.causal, config=self.config)
        outputs = (dq, dk, dv)

        def run():
            launch()
            return outputs
        return run


class ReadableForward(Impl):
    primary = False

    def __init__(self, algorithm):
        super().__init__(f"flashnumba {algorithm}", "fwd")
        self.algorithm = algorithm

    def prepare(self, inputs, case):
        fn = getattr(_module(f"{self.algorithm}_forward"), f"{self.algorithm}_forward")

        def run():
            return fn(inputs.nq, inputs.nk, inputs.nv, causal=case.causal)
        return run

    def as_torch(self, raw):
        return super().as_torch(raw[:1])


class ReadableBackward(Impl):
    primary = False

    def __init__(self, algorithm):
        super().__init__(f"flashnumba {algorithm}", "bwd")
        self.algorithm = algorithm

    def prepare(self, inputs, case):
        fwd = getattr(_module(f"{self.algorithm}_forward"), f"{self.algorithm}_forward")
        bwd = getattr(_module(f"{self.algorithm}_backward"), f"{self.algorithm}_backward")
        saved = fwd(inputs.nq, inputs.nk, inputs.nv, causal=case.causal)   # fa1: (O, l, m); fa2: (O, L)

        def run():
            return bwd(inputs.ndout, inputs.nq, inputs.nk, inputs.nv, *saved, causal=case.causal)
        return run


class NaiveForward(Impl):
    primary = False
    scores_factor = 1.0       # S, softmaxed in place

    def __init__(self):
        super().__init__("numba naive", "fwd")

    def prepare(self, inputs, case):
        naive = _module("naive")

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
    impls = [FastForward(), ReadableForward("fa2"), ReadableForward("fa1"), NaiveForward()]
    impls += [TorchSDPA(label, backend, dtype, "fwd") for label, backend, dtype in TORCH_BACKENDS]
    impls += [FastBackward(), ReadableBackward("fa2"), ReadableBackward("fa1")]
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
