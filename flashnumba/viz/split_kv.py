"""Split-KV decoding: the keys cut into splits, each split's partial result, and their merge.

One query against a long KV cache: ``kernels.split_kv`` gives each split of the
keys its own thread block, which returns a normalised partial output O_s and
its log-sum-exp L_s; ``flashnumba.merge`` combines them,

    L = log sum_s exp(L_s),   O = sum_s exp(L_s - L) O_s,

and the result is exactly attention over all the keys. The panels are computed
with the float64 reference on each split and ``merge.merge``, the same formula
the combine kernel runs: the scores coloured by split, each split's L_s and
weight exp(L_s - L), and the merged O beside attention over every key.
"""

import numpy as np

from flashnumba import merge, reference
from flashnumba.viz import style


def partials(Nk=96, d=8, splits=4, seed=0, causal=False):
    """The split-KV problem of the figure: scores, (O_s, L_s) per split, merged and full results."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, 1, d))
    k = rng.standard_normal((1, Nk, 1, d)) * 1.5
    v = rng.standard_normal((1, Nk, 1, d))
    per = -(-Nk // splits)
    bounds = [(s * per, min((s + 1) * per, Nk)) for s in range(splits)]
    O_parts, L_parts = [], []
    for lo, hi in bounds:
        O_s, L_s = reference.attention(q, k[:, lo:hi], v[:, lo:hi])
        O_parts.append(O_s[0, 0, 0])
        L_parts.append(L_s[0, 0, 0])
    O, L = merge.merge([o[None] for o in O_parts], [np.array([x]) for x in L_parts])
    O_full, L_full = reference.attention(q, k, v)
    scores = (q[0, 0, 0] @ k[0, :, 0].T) / np.sqrt(d)
    return {"scores": scores, "bounds": bounds, "O_parts": O_parts, "L_parts": np.array(L_parts),
            "O": O[0], "L": float(L[0]), "O_full": O_full[0, 0, 0], "L_full": float(L_full[0, 0, 0]),
            "weights": np.exp(np.array(L_parts) - L[0])}


def split_kv_figure(Nk=96, d=8, splits=4, seed=0):
    """Three panels: scores by split; L_s and merge weights; merged O against full attention."""
    data = partials(Nk, d, splits, seed)
    fig = style.new_figure(12, 3.8)
    ax_s, ax_l, ax_o = fig.subplots(1, 3, width_ratios=(2.2, 1, 1.3))
    for s, (lo, hi) in enumerate(data["bounds"]):
        ax_s.bar(np.arange(lo, hi), data["scores"][lo:hi], color=style.colour(s), width=1.0,
                 label=f"split {s}: keys {lo}-{hi - 1}")
        ax_s.axvline(lo - 0.5, color="grey", lw=0.6, ls=":")
    ax_s.set_title("S = q K^T / sqrt(d) for one query: each split is one thread block", fontsize=9)
    ax_s.set_xlabel("key c", fontsize=8)
    ax_s.legend(fontsize=7, ncols=2, frameon=False)
    xs = np.arange(splits)
    ax_l.bar(xs, data["L_parts"], color=[style.colour(s) for s in range(splits)])
    for s in range(splits):
        ax_l.text(s, data["L_parts"][s], f"w = {data['weights'][s]:.2f}", ha="center", va="bottom",
                  fontsize=7)
    ax_l.axhline(data["L"], color="black", ls="--", lw=1.0, label=f"L = log sum exp(L_s) = {data['L']:.3f}")
    ax_l.set_xticks(xs, [f"L_{s}" for s in range(splits)])
    ax_l.set_title("each split's log-sum-exp L_s,\nweight w_s = exp(L_s - L)", fontsize=9)
    ax_l.legend(fontsize=7, frameon=False, loc="lower center")
    dims = np.arange(d)
    for s in range(splits):
        ax_o.plot(dims, data["O_parts"][s], color=style.colour(s), lw=0.8, alpha=0.6, marker=".")
    ax_o.plot(dims, data["O_full"], color="black", lw=2.5, alpha=0.35, label="attention over all keys")
    ax_o.plot(dims, data["O"], color="black", lw=0, marker="x", label="sum_s w_s O_s (merged)")
    ax_o.set_title("partial outputs O_s (coloured) and their merge", fontsize=9)
    ax_o.set_xlabel("head dim", fontsize=8)
    ax_o.legend(fontsize=7, frameon=False)
    for ax in (ax_s, ax_l, ax_o):
        ax.tick_params(labelsize=7)
    fig.suptitle(f"Split-KV decoding: {Nk} keys in {splits} splits, merged by their log-sum-exps",
                 fontsize=11)
    fig.flashnumba_data = data
    return fig
