"""`flashnumba bench --calls --breakdown`: where the host's time of one small call goes, layer by layer.

The small forward+backward of issue 13 costs the host more through autograd than its parts add
up to when called directly. This mode measures the call and its parts in one process, for the
first shape of ``--shapes`` (default: issue 13's first, B=8 H=8 N=256 d=64 causal), float32
torch CUDA tensors, the default algorithm.

First a warm-up, not counted, that runs every row below a few times: it compiles every kernel
timed (so a short time limit is not spent compiling inside a row) and prints how long it took.
Then, per row, host microseconds per call: the median over LOOPS loops of n calls each, by
``time.perf_counter`` around the whole loop, with ``torch.cuda.synchronize`` between loops only,
or after every call where the row says so:

    public call, no grad                  flash_attn_func(q, k, v) on tensors without grad
    public call, requires_grad (fwd)      the same on tensors with requires_grad (builds the graph)
    fwd+bwd through autograd              flash_attn_func(...).backward(dout)
    fwd+bwd, synchronize after each       the same, torch.cuda.synchronize() after each call
    synchronize alone                     torch.cuda.synchronize() on an idle device
    FlashAttnFunction.backward, main      our autograd backward called directly with a ctx
                                          holding what it reads (saved tensors, the call
                                          autograd saved), under no_grad as the engine runs it
    FlashAttnFunction.backward, thread    the same, the whole loop on a plain Python thread
    attention.backward                    validate.tensors (x5) + Operand(lse) + attention.backward
    fast_forward, fast_backward           the default version's fast launch paths, directly
    validate.tensors x5 + Operand         what FlashAttnFunction.backward checks
    interop.current_device_id()           the current-device query of every fast call
    no-op autograd.Function fwd+bwd       a Function whose forward clones and backward returns
                                          the gradient: the autograd engine's own round trip
    SDPA EFFICIENT fwd+bwd                torch's scaled_dot_product_attention, its inputs in
                                          (B, H, N, d)

Last, one loop of autograd forward+backward with temporary timing wrappers (``wrapped``) around
our layers: FlashAttnFunction.forward and .backward, attention.forward and .backward, the fast
forward and backward, validate.tensors, interop.torch_tensors (under the name attention calls it
by) and launch.Launch.__call__, beside the loop's own timing of flash_attn_func and of
out.backward (the two "(the loop)" rows). Per layer: median and mean microseconds per call, calls per
iteration, and the threads it ran on ("main", or the name Python gives another thread: autograd
runs a CUDA backward on its own device thread). A layer's time includes the wrappers nested in
it (two perf_counter calls and an append each). Every wrapped function is put back when the loop
ends or raises, so no row above sees a wrapper.

``--json PATH`` writes the rows and the layers. The helpers (``host_us``, ``Layers``,
``wrapped``, ``on_thread``) and the tables are plain functions, tested without a GPU
(tests/test_bench_calls.py).
"""

import collections
import contextlib
import functools
import json
import statistics
import sys
import threading
import time
import types

from flashnumba import registry
from flashnumba.bench.calls import runs_for

LOOPS = 5                  # timed loops per row: the median is reported
WARMUP = 3                 # untimed calls before a row's loops
LOOP_BUDGET_S = 0.2        # about this long per loop; from 10 to MOST_CALLS calls
MOST_CALLS = 1000
_ABSENT = object()


def thread_name():
    """ "main" on the main thread, else the name Python gives the current thread."""
    current = threading.current_thread()
    return "main" if current is threading.main_thread() else current.name


def host_us(fn, sync=lambda: None, sync_each=False, loops=LOOPS, n=None, clock=time.perf_counter):
    """Host microseconds per call of fn(): WARMUP untimed calls, then the median over `loops`
    loops of `n` calls (sized to about LOOP_BUDGET_S a loop when None), sync() between loops
    only, or after every call with `sync_each`. Returns {"us", "calls", "loops"}."""
    for _ in range(WARMUP):
        fn()
    sync()
    if n is None:
        t0 = clock()
        fn()
        sync()
        n = runs_for((clock() - t0) * 1e3, budget_s=LOOP_BUDGET_S, most=MOST_CALLS)
    per_call = []
    for _ in range(loops):
        t0 = clock()
        for _ in range(n):
            fn()
            if sync_each:
                sync()
        per_call.append((clock() - t0) / n * 1e6)
        sync()
    return {"us": statistics.median(per_call), "calls": n, "loops": loops}


def on_thread(fn):
    """fn() run on a new plain Python thread: its result, or its exception raised here."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as exc:          # handed to the caller, whatever it was
            box["error"] = exc

    thread = threading.Thread(target=target, name="plain Python thread")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Layers:
    """Microseconds of each timed call, by label, and the threads the calls ran on."""

    def __init__(self):
        self.spent = collections.defaultdict(list)
        self.threads = collections.defaultdict(collections.Counter)

    def clear(self):
        self.spent.clear()
        self.threads.clear()

    def add(self, label, us):
        self.spent[label].append(us)
        self.threads[label][thread_name()] += 1

    def timed(self, label, fn):
        """fn, timing each of its calls into `label` (a call that raises is timed too)."""
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, (time.perf_counter() - t0) * 1e6)
        return timed

    def rows(self, iterations, order=()):
        """One dict per label that has calls, those of `order` first in its order, then the others
        as first seen: median and mean us, calls per iteration, {thread: calls}."""
        labels = [label for label in order if self.spent.get(label)]
        labels += [label for label, us in self.spent.items() if us and label not in labels]
        return [{"layer": label, "median_us": statistics.median(self.spent[label]),
                 "mean_us": statistics.mean(self.spent[label]),
                 "per_iteration": len(self.spent[label]) / iterations,
                 "threads": dict(self.threads[label])} for label in labels]


@contextlib.contextmanager
def wrapped(targets, layers):
    """Within the block, each (owner, name, label) of `targets` (a class or a module, and the
    attribute its callers look up) times its calls into `layers`. Every original is put back on
    the way out, also when a call or the block raised. A staticmethod stays one."""
    saved = []
    try:
        for owner, name, label in targets:
            raw = vars(owner).get(name, _ABSENT)
            if isinstance(raw, staticmethod):
                replacement = staticmethod(layers.timed(label, raw.__func__))
            else:
                replacement = layers.timed(label, getattr(owner, name))
            saved.append((owner, name, raw))
            setattr(owner, name, replacement)
        yield layers
    finally:
        for owner, name, raw in reversed(saved):
            if raw is _ABSENT:             # it was inherited: uncover the original again
                delattr(owner, name)
            else:
                setattr(owner, name, raw)


def format_rows(rows):
    """The per-call rows as aligned text."""
    lines = [f"{'host time per call':<52}{'us':>9}   calls x loops"]
    for row in rows:
        lines.append(f"{row['row']:<52}{row['us']:>9.1f}   {row['calls']} x {row['loops']}")
    return "\n".join(lines)


def format_layers(layers, iterations, loop_us):
    """The layers' table: one line per layer, then what one iteration took."""
    header = f"{'layer (inside autograd fwd+bwd)':<34}{'median us':>10}{'mean us':>10}{'calls/iter':>11}"
    lines = [header + "   threads"]
    for row in layers:
        threads = ", ".join(f"{name} x{count}" for name, count in row["threads"].items())
        lines.append(f"{row['layer']:<34}{row['median_us']:>10.1f}{row['mean_us']:>10.1f}"
                     f"{row['per_iteration']:>11.2f}   {threads}")
    lines.append(f"{iterations} iterations, {loop_us:.1f} us each (wrappers included)")
    return "\n".join(lines)


def payload(header, rows, layers, iterations, loop_us):
    """What --json writes: the run's header (GPU, versions, shape), the rows, the layers."""
    return {**header, "rows": rows, "layers": layers,
            "layer_loop": {"iterations": iterations, "us_per_iteration": loop_us}}


# ---------------------------------------------------------------------------
# On the GPU
# ---------------------------------------------------------------------------

def layer_targets(fwd_module, bwd_module):
    """(owner, name, label) of each layer timed inside autograd, as its callers look it up."""
    from flashnumba import attention, validate
    from flashnumba.kernels import launch
    from flashnumba.torch.function import FlashAttnFunction
    return [(FlashAttnFunction, "forward", "FlashAttnFunction.forward"),
            (FlashAttnFunction, "backward", "FlashAttnFunction.backward"),
            (attention, "forward", "attention.forward"),
            (attention, "backward", "attention.backward"),
            (fwd_module, "fast_forward", "fast_forward"),
            (bwd_module, "fast_backward", "fast_backward"),
            (validate, "tensors", "validate.tensors"),
            (attention, "torch_tensors", "interop.torch_tensors"),    # attention imported the name
            (launch.Launch, "__call__", "launch.Launch.__call__")]


def noop_function(torch):
    """An autograd.Function that clones forward and passes the gradient back: the engine's cost."""
    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad
    return Noop


def run(case, torch, json_path=None, log=print):
    """Every row, then the layers, of one shape; prints both tables; returns the payload."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashnumba
    from flashnumba import attention, interop, torch_allocator, validate
    from flashnumba.interop import Operand
    from flashnumba.torch.function import FlashAttnFunction

    torch_allocator.install()        # as in a torch program: before numba's first allocation
    version = registry.version(registry.DEFAULT)
    fwd_module, bwd_module = version.module(registry.FORWARD), version.module(registry.BACKWARD)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn((case.B, case.N, case.H, case.d), device="cuda", generator=gen)
                     for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    sq, sk, sv = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sdout = dout.transpose(1, 2).contiguous()
    causal, sync = case.causal, torch.cuda.synchronize
    Noop = noop_function(torch)
    x, ones = torch.zeros(4, device="cuda", requires_grad=True), torch.ones(4, device="cuda")

    header = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "algorithm": registry.DEFAULT, "shape": case.label, "loops": LOOPS}
    log(f"flashnumba bench --calls --breakdown on {header['gpu']}, torch {header['torch']}, "
        f"algorithm {registry.DEFAULT}, {case.label}, float32 torch tensors; host us per call, "
        f"median of {LOOPS} loops")

    def fwd_bwd():
        flashnumba.flash_attn_func(qg, kg, vg, causal=causal).backward(dout)

    t0 = time.perf_counter()
    fwd_bwd()                        # compiles the forward and backward kernels
    sync()
    call = flashnumba.flash_attn_func(qg, kg, vg, causal=causal).grad_fn.call   # the call autograd saved
    out, lse = fwd_module.fast_forward(q, k, v, **call.kernel_options())
    # what FlashAttnFunction.backward reads of its ctx; autograd's own node frees its saved
    # tensors once the graph's output is gone (torch 2.11 on the lent GPU)
    ctx = types.SimpleNamespace(saved_tensors=(q, k, v, out, lse), call=call)

    def backward_direct():
        with torch.no_grad():        # as autograd's engine runs a backward (no create_graph)
            FlashAttnFunction.backward(ctx, dout, None, None)

    def checked_backward_operands():
        return validate.tensors(dout=dout, q=q, k=k, v=v, out=out) + [Operand("softmax_lse", lse)]

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            o = F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal)
        o.backward(sdout)

    specs = [
        ("public call, no grad", lambda: flashnumba.flash_attn_func(q, k, v, causal=causal), {}),
        ("public call, requires_grad (forward only)",
         lambda: flashnumba.flash_attn_func(qg, kg, vg, causal=causal), {}),
        ("fwd+bwd through autograd", fwd_bwd, {}),
        ("fwd+bwd, synchronize after each", fwd_bwd, {"sync_each": True}),
        ("synchronize alone", lambda: None, {"sync_each": True}),
        ("FlashAttnFunction.backward direct, main thread", backward_direct, {}),
        ("FlashAttnFunction.backward direct, plain thread", backward_direct, {"thread": True}),
        ("attention.backward direct (+ validate.tensors)",
         lambda: attention.backward(checked_backward_operands(), call), {}),
        ("fast_forward direct", lambda: fwd_module.fast_forward(q, k, v, **call.kernel_options()), {}),
        ("fast_backward direct",
         lambda: bwd_module.fast_backward(dout, q, k, v, out, lse, **call.kernel_options()), {}),
        ("validate.tensors x5 + Operand (the backward's)", checked_backward_operands, {}),
        ("interop.current_device_id()", interop.current_device_id, {}),
        ("no-op autograd.Function fwd+bwd", lambda: Noop.apply(x).backward(ones), {}),
        ("SDPA EFFICIENT fwd+bwd", sdpa_fwd_bwd, {}),
    ]
    for _, fn, _ in specs:           # the warm-up: every kernel any row runs is compiled here
        for _ in range(WARMUP):
            fn()
    sync()
    log(f"warm-up (compiles every kernel timed below; not counted): {time.perf_counter() - t0:.1f} s")

    rows = []
    for name, fn, options in specs:
        def measure(fn=fn, options=options):
            return host_us(fn, sync=sync, sync_each=options.get("sync_each", False))
        result = on_thread(measure) if options.get("thread") else measure()
        rows.append({"row": name, **result})
        print(f"  {name:<50}{result['us']:9.1f} us", file=sys.stderr, flush=True)
    log(format_rows(rows))

    wall_ms = next(r["us"] for r in rows if r["row"] == "fwd+bwd, synchronize after each") / 1e3
    iterations = runs_for(wall_ms, budget_s=1.0, least=20)
    layers, targets = Layers(), layer_targets(fwd_module, bwd_module)
    loop_labels = ["flash_attn_func (the loop)", "out.backward (the loop)"]
    with wrapped(targets, layers):
        for _ in range(WARMUP):
            fwd_bwd()
        sync()
        layers.clear()
        t0 = time.perf_counter()
        for _ in range(iterations):
            t1 = time.perf_counter()
            o = flashnumba.flash_attn_func(qg, kg, vg, causal=causal)
            t2 = time.perf_counter()
            o.backward(dout)
            t3 = time.perf_counter()
            layers.add(loop_labels[0], (t2 - t1) * 1e6)
            layers.add(loop_labels[1], (t3 - t2) * 1e6)
        loop_us = (time.perf_counter() - t0) / iterations * 1e6
        sync()
    table = layers.rows(iterations, order=loop_labels + [label for _, _, label in targets])
    log(format_layers(table, iterations, loop_us))

    result = payload(header, rows, table, iterations, loop_us)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result
