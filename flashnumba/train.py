"""Train a tiny causal transformer on Shakespeare's sonnets, with flashnumba's attention and PyTorch's.

    python -m flashnumba.train                        # both attentions, sized for the device
    python -m flashnumba.train --device cpu --steps 5 # CPU: flashnumba's kernels on the simulator

The model is a character-level GPT (Radford et al. 2018) with pre-norm blocks:

    x = E_tok[c_t] + E_pos[t]                         # (batch, T, dim)
    for each of --layers blocks:
        x = x + MultiheadSelfAttention(LayerNorm(x))  # causal
        x = x + MLP(LayerNorm(x))                     # dim -> 4 dim -> GELU -> dim
    logits = LayerNorm(x) W_head                      # next character, cross-entropy

trained with AdamW on ``flashnumba/data/sonnets.txt`` (the first 90% of its
characters; the last 10% are the held-out text).

With ``--attention both`` (the default) the same model is trained twice: once
with ``attention="flashnumba"`` and once with ``attention="torch"``
(``torch.nn.functional.scaled_dot_product_attention``). Both runs start from
one set of initial weights (a deep copy), see the same batches in the same
order (drawn up front from ``--seed``) and use the same optimizer, so the gap
between the two loss curves is the attention's rounding and nothing else. In
float32 it starts near 1e-6 and grows slowly as training amplifies it; with
``--dropout`` above 0 the two runs draw different masks (flashnumba's Philox
masks against PyTorch's) and agree only on average.

Time per step is the wall-clock time of forward, backward and optimizer step,
with ``torch.cuda.synchronize()`` before each reading of the clock on CUDA,
averaged over every step but the first (compilation and allocation warm-up).
On the CPU, flashnumba's kernels run on Numba's CUDA simulator, one Python
thread per CUDA thread: seconds per step, against milliseconds for PyTorch's
attention. Those times measure the simulator, not the algorithm.
"""

import argparse
import copy
import json
import math
import time
from importlib import resources

import torch
from torch import nn
from torch.nn import functional as F

import flashnumba
from flashnumba import registry
from flashnumba.torch.modules import ATTENTIONS, MultiheadSelfAttention

TEXT = "sonnets.txt"
HELD_OUT = 0.1                       # the last 10% of the characters

# Sizes by device, for options left unset: a GPU trains a small model for real;
# on the CPU flashnumba's attention runs on the simulator, so the model is tiny.
DEFAULTS = {
    "cuda": dict(steps=300, batch=32, seq_len=128, layers=4, heads=4, dim=128, eval_every=50),
    "cpu": dict(steps=8, batch=2, seq_len=16, layers=1, heads=2, dim=32, eval_every=4),
}


# ---------------------------------------------------------------------------
# Data: characters of the shipped text as integer ids
# ---------------------------------------------------------------------------

def load_text(name=TEXT):
    """The shipped text (package data, see flashnumba/data/README.md)."""
    return (resources.files("flashnumba") / "data" / name).read_text(encoding="utf-8")


class Characters:
    """The text's vocabulary: every distinct character, sorted; encode maps characters to ids."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, text):
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def windows(ids, starts, T):
    """Inputs ids[s : s+T] and targets ids[s+1 : s+T+1] for every start s: (..., T) each."""
    at = starts[..., None] + torch.arange(T)
    return ids[at], ids[at + 1]


def training_starts(n, steps, batch, T, seed):
    """(steps, batch) random window starts in a text of n ids, fixed by seed: every run's batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n - T - 1, (steps, batch), generator=g)


def held_out_starts(n, count, T):
    """`count` windows spread evenly over a text of n ids: the same held-out set at every evaluation."""
    return torch.linspace(0, n - T - 1, count).long()


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------

class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)): a pre-norm transformer block."""

    def __init__(self, dim, heads, kv_heads, dropout, algorithm):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = MultiheadSelfAttention(dim, heads, num_kv_heads=kv_heads, dropout=dropout,
                                           causal=True, algorithm=algorithm)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyTransformer(nn.Module):
    """Character-level causal language model: ids (batch, T) -> logits (batch, T, vocab)."""

    def __init__(self, vocab, seq_len, dim, layers, heads, kv_heads=None, dropout=0.0,
                 algorithm=None):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, dropout, algorithm)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        # Small embeddings (GPT-2's std 0.02): the first loss is then close to log(vocab).
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def set_attention(self, name):
        """Every block's attention core: "flashnumba" or "torch"; the weights are untouched."""
        for block in self.blocks:
            block.attn.attention = name

    def forward(self, ids):
        T = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_loss(model, x, y):
    """Mean cross-entropy of the next character over every position."""
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------

def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()                # the GPU's queued work is part of the step
    return time.perf_counter()


def train_one(model, attention, data, args, device, log):
    """Trains `model` in place with `attention`; returns its curve: losses, held-out, times."""
    model.set_attention(attention)
    model.train()
    torch.manual_seed(args.seed)                # the same dropout seeds for every run
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def held_out():
        model.eval()
        with torch.no_grad(), autocast:
            total = sum(float(lm_loss(model, x, y)) for x, y in data["held_out"])
        model.train()
        return total / len(data["held_out"])

    # Row s of the curve is the model after s updates: the loss of batch s before
    # its update and, every --eval-every steps, the held-out loss of the same weights.
    curve = {"attention": attention, "train_loss": [], "held_out": [], "step_s": []}
    for s in range(args.steps):
        evaluated = None
        if s % args.eval_every == 0:
            evaluated = held_out()
            curve["held_out"].append([s, evaluated])
        x, y = data["train"][s]
        start = _clock(device)
        with autocast:
            loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve["step_s"].append(_clock(device) - start)
        curve["train_loss"].append(loss.item())
        log(s, curve, evaluated)
    curve["held_out"].append([args.steps, held_out()])    # after the last update
    log(args.steps, curve, curve["held_out"][-1][1])
    timed = curve["step_s"][1:]                 # the first step is warm-up
    curve["ms_per_step"] = 1e3 * sum(timed) / len(timed) if timed else None   # one step: untimed
    return curve


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------

def _describe(attention, args):
    if attention == "torch":
        return "torch.nn.functional.scaled_dot_product_attention"
    where = "on the CUDA simulator" if flashnumba.on_simulator() else "on the GPU"
    return f"flashnumba.flash_attn_func, algorithm {args.algorithm!r}, kernels {where}"


def _table_logger(other):
    """Prints one row per step; with `other` (a finished curve), also the gap to it."""
    head = f"{'step':>6} {'train loss':>11} {'held-out':>9} {'ms/step':>10}"
    if other is not None:
        head += f"  {'|diff| vs ' + other['attention']:>21}"
    print(head, flush=True)

    def log(s, curve, evaluated):
        held = f"{evaluated:.4f}" if evaluated is not None else ""
        if s == len(curve["train_loss"]):                 # after the last update: held-out only
            print(f"{s:>6} {'':>11} {held:>9}", flush=True)
            return
        ms = "warm-up" if s == 0 else f"{1e3 * curve['step_s'][s]:.1f}"
        row = f"{s:>6} {curve['train_loss'][s]:>11.4f} {held:>9} {ms:>10}"
        if other is not None:
            row += f"  {abs(curve['train_loss'][s] - other['train_loss'][s]):>21.2e}"
        print(row, flush=True)
    return log


def gap(a, b):
    """How far apart two curves are: the largest |difference| of training loss, and at the end."""
    diffs = [abs(x - y) for x, y in zip(a["train_loss"], b["train_loss"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"max_abs_diff": diffs[worst], "max_at_step": worst, "final_abs_diff": diffs[-1],
            "held_out_final_abs_diff": abs(a["held_out"][-1][1] - b["held_out"][-1][1])}


def summary(curves, between):
    print("\nsummary")
    print(f"{'attention':>12} {'first loss':>11} {'final loss':>11} {'held-out':>9} {'ms/step':>10}")
    for c in curves:
        ms = "n/a" if c["ms_per_step"] is None else f"{c['ms_per_step']:.1f}"
        print(f"{c['attention']:>12} {c['train_loss'][0]:>11.4f} {c['train_loss'][-1]:>11.4f} "
              f"{c['held_out'][-1][1]:>9.4f} {ms:>10}")
    if between is not None:
        print(f"gap between the curves: largest |diff| {between['max_abs_diff']:.2e} "
              f"(step {between['max_at_step']}), final {between['final_abs_diff']:.2e}, "
              f"held-out final {between['held_out_final_abs_diff']:.2e}")


def plot(result, path):
    """Both loss curves (training, and held-out as points) over the steps, and the gap between
    them, drawn from `result` (what ``run`` returns or --json wrote) into a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})
    colours = {"flashnumba": "tab:orange", "torch": "tab:blue"}
    for c in result["curves"]:
        ms = "" if c["ms_per_step"] is None else f", {c['ms_per_step']:.1f} ms/step"
        colour = colours.get(c["attention"])
        top.plot(c["train_loss"], lw=1, color=colour, label=f"{c['attention']} (train{ms})")
        steps, losses = zip(*c["held_out"])
        top.plot(steps, losses, "o--", ms=4, color=colour, label=f"{c['attention']} (held-out)")
    top.set_ylabel("cross-entropy (nats per character)")
    config = result["config"]
    top.set_title(f"{config['layers']} layers, {config['heads']} heads, dim {config['dim']}, "
                  f"seq-len {config['seq_len']}, batch {config['batch']}, {config['device']} "
                  f"{config['dtype']}, flashnumba on the {result['flashnumba_device']}", fontsize=9)
    top.legend(fontsize=8)
    if len(result["curves"]) == 2:
        a, b = (c["train_loss"] for c in result["curves"])
        bottom.semilogy([max(abs(x - y), 1e-9) for x, y in zip(a, b)], lw=1, color="k")
        bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="flashnumba train",
        description="Train a tiny causal character-level transformer on Shakespeare's sonnets "
                    "with flashnumba's attention and with PyTorch's, from the same initial weights.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu",
                   help="where the model lives (default: cuda if torch sees a GPU)")
    p.add_argument("--attention", choices=[*ATTENTIONS, "both"], default="both",
                   help="which attention to train with (default both: one run each, same start)")
    p.add_argument("--algorithm", choices=registry.names(), default=None,
                   help=f"flashnumba's kernel version (default: chosen by dtype, {registry.DEFAULT} for "
                        f"float32, {registry.DEFAULT_HALF} for bfloat16 where it runs)")
    sized = [("--steps", "training steps"), ("--batch", "sequences per batch"),
             ("--seq-len", "characters per sequence"), ("--layers", "transformer blocks"),
             ("--heads", "attention heads"), ("--dim", "embedding width"),
             ("--eval-every", "held-out loss every this many steps, and after the last")]
    for flag, text in sized:
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, type=int, default=None,
                       help=f"{text} (default {DEFAULTS['cuda'][key]} on cuda, "
                            f"{DEFAULTS['cpu'][key]} on cpu)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads, fewer than --heads for grouped-query attention")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (default 0)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches per evaluation (default 4)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="float32, or bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and dropout")
    p.add_argument("--json", metavar="PATH", default=None, help="write the curves to PATH as JSON")
    p.add_argument("--plot", metavar="PATH", default=None, help="draw both curves into a PNG at PATH")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="do not train: read the curves a run wrote with --json, print the summary "
                        "and (with --plot) draw them")
    args = p.parse_args(argv)
    if args.from_json:
        return args
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.eval_every < 1 or args.eval_batches < 1:
        p.error("--steps, --eval-every and --eval-batches must be at least 1")
    if args.device == "cuda" and not cuda:
        p.error("--device cuda, but torch sees no CUDA GPU")
    if args.algorithm is not None and not registry.version(args.algorithm).takes(args.dtype):
        p.error(f"--algorithm {args.algorithm} takes {' or '.join(registry.version(args.algorithm).dtypes)} "
                f"inputs, not --dtype {args.dtype}")
    return args


def run(args):
    """Trains as `args` says, printing as it goes; returns the curves and the gap between them."""
    device = torch.device(args.device)
    text = load_text()
    chars = Characters(text)
    ids = chars.encode(text)
    split = int(len(ids) * (1 - HELD_OUT))
    train_ids, held_ids = ids[:split], ids[split:]
    T = args.seq_len
    data = {
        "train": [tuple(t.to(device) for t in windows(train_ids, starts, T))
                  for starts in training_starts(len(train_ids), args.steps, args.batch, T, args.seed)],
        "held_out": [tuple(t.to(device) for t in windows(held_ids, starts, T))
                     for starts in held_out_starts(len(held_ids), args.eval_batches * args.batch,
                                                   T).split(args.batch)],
    }

    torch.manual_seed(args.seed)
    start = TinyTransformer(len(chars), T, args.dim, args.layers, args.heads, args.kv_heads,
                            args.dropout, args.algorithm).to(device)
    n_params = sum(p.numel() for p in start.parameters())
    print(f"{TEXT}: {len(text)} characters, vocabulary {len(chars)}, {len(held_ids)} held out "
          f"(log(vocabulary) = {math.log(len(chars)):.4f})")
    print(f"model: {args.layers} layer(s), {args.heads} heads"
          f"{f' ({args.kv_heads} kv)' if args.kv_heads else ''}, dim {args.dim}, seq-len {T}, "
          f"{n_params} parameters; AdamW lr {args.lr}, batch {args.batch}, {args.steps} steps, "
          f"{args.device} {args.dtype}, seed {args.seed}")

    names = list(ATTENTIONS) if args.attention == "both" else [args.attention]
    curves = []
    for name in names:
        print(f"\nattention = {name}: {_describe(name, args)}", flush=True)
        log = _table_logger(curves[0] if curves else None)
        curves.append(train_one(copy.deepcopy(start), name, data, args, device, log))

    between = gap(curves[1], curves[0]) if len(curves) == 2 else None
    summary(curves, between)
    result = {"config": vars(args), "parameters": n_params, "vocabulary": len(chars),
              "flashnumba_device": flashnumba.device(), "curves": curves, "gap": between}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"curves written to {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"curves drawn in {args.plot}")
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        summary(result["curves"], result["gap"])
        if args.plot:
            plot(result, args.plot)
            print(f"curves drawn in {args.plot}")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
