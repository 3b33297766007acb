"""Online softmax: how the running max m_i and running sum l_i of a row evolve, tile by tile.

After step j, for a row r of Q tile i (FA2 forward, Dao 2023 Algorithm 1):

    m_new = max(m_i, rowmax(S_ij))                      the running max
    l_i   = e^(m_i - m_new) l_i + rowsum(exp(S_ij - m_new))
    O_i   = e^(m_i - m_new) O_i + P~_ij V_j             rescaled by the same factor

The factor e^(m_old - m_new) is 1 while the max stays put and drops below 1
when a tile brings a larger score. After the last tile, m_i + log l_i is the
row's log-sum-exp, the same number the float64 reference computes (its lse).
Every value drawn is read from the mirror's Step.state after each step.
"""

import numpy as np

from flashnumba import registry
from flashnumba.reference import single_head
from flashnumba.viz import style
from flashnumba.viz.traces import record


def running_stats(trace, rows):
    """For each query row r: per step visiting r, the key tile j, m, l, the row's scores, and the rescale factor."""
    history = {}
    for r in rows:
        h = {"j": [], "m": [], "l": [], "scores": []}
        for s in trace.steps:
            r0, r1 = s.rows
            if not r0 <= r < r1:
                continue
            if "m_i" in s.state:                     # FA2: the on-chip tile state
                m, l = s.state["m_i"][r - r0], s.state["l_i"][r - r0]
            else:                                   # FA1: the whole HBM arrays
                m, l = s.state["m"][r], s.state["l"][r]
            h["j"].append(s.j)
            h["m"].append(float(m))
            h["l"].append(float(l))
            h["scores"].append(np.asarray(s.S_ij[r - r0], dtype=float))
        m = np.array(h["m"])
        m_old = np.concatenate([[-np.inf], m[:-1]])
        h["rescale"] = np.exp(m_old - m)             # e^(m_old - m_new); 0 at the first step (O_i = 0)
        h["lse"] = m + np.log(h["l"])                # m_i + log l_i so far
        history[r] = h
    return history


def _rows_with_most_new_maxima(history, n):
    """The n rows whose running max changes most often (ties: lower row first)."""
    count = {r: int(np.sum(np.diff(h["m"]) > 0)) for r, h in history.items()}
    return sorted(count, key=lambda r: (-count[r], r))[:n]


def online_softmax_figure(algorithm=None, Nq=16, Nk=64, d=8, Br=8, Bc=8, n_rows=3, seed=3):
    """Running m, l, rescale factor and m + log l for a few rows of Q tile 0, against the reference lse
    (algorithm: a tiled mirror's name; None: FA2's forward)."""
    algorithm = registry.FA2.mirror_forward if algorithm is None else algorithm
    trace = record(algorithm, Nq, Nk, d, Br, Bc, seed=seed)
    x = trace.inputs
    _, lse_ref = single_head(x["Q"], x["K"], x["V"])
    candidates = running_stats(trace, range(trace.tiling.rows(0).start, trace.tiling.rows(0).stop))
    rows = sorted(_rows_with_most_new_maxima(candidates, n_rows))
    history = {r: candidates[r] for r in rows}

    fig = style.new_figure(11, 7.2)
    (ax_m, ax_f), (ax_l, ax_lse) = fig.subplots(2, 2)
    width = 0.8 / len(rows)
    for n, r in enumerate(rows):
        h, c = history[r], style.colour(n)
        steps = np.arange(len(h["j"]))
        for k, scores in enumerate(h["scores"]):
            ax_m.scatter(np.full(scores.size, k) + (n - 1) * 0.12, scores, s=6, color=c, alpha=0.35,
                         linewidths=0)
        ax_m.step(steps, h["m"], where="post", color=c, lw=2, label=f"row {r}: running max m")
        ax_m.plot(steps, h["m"], "o", color=c, ms=4)
        ax_f.bar(steps[1:] + (n - (len(rows) - 1) / 2) * width, h["rescale"][1:], width=width,
                 color=c, label=f"row {r}")
        ax_l.plot(steps, h["l"], "o-", color=c, label=f"row {r}")
        ax_lse.plot(steps, h["lse"], "o-", color=c, label=f"row {r}: m + log l")
        ax_lse.axhline(lse_ref[r], color=c, ls="--", lw=1)

    n_steps = len(history[rows[0]]["j"])
    for ax in (ax_m, ax_f, ax_l, ax_lse):
        ax.set_xticks(range(n_steps))
        ax.set_xlabel("step = K/V tile j", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    ax_m.set_title("running max m_i (line) over the scores S_ij of each tile (dots)", fontsize=9)
    ax_m.legend(fontsize=7, loc="lower right")
    ax_f.set_title("rescale factor e^(m_old - m_new) applied to O_i and l_i\n"
                   "(1: max unchanged; < 1: this tile brought a larger score)", fontsize=9)
    ax_f.set_ylim(0, 1.1)
    ax_f.set_xlim(-0.5, n_steps - 0.5)
    ax_f.text(0, 0.5, "step 0:\nnothing to\nrescale\n(O_i = 0)", ha="center", va="center", fontsize=7)
    ax_f.legend(fontsize=7, loc="lower right")
    ax_l.set_title("running sum l_i = sum of exp(S - m_i) over the keys seen so far\n"
                   "(drops when m_i rises: the old terms are rescaled)", fontsize=9)
    ax_l.legend(fontsize=7)
    ax_lse.set_title("m_i + log l_i after each step; dashed: reference lse (float64)", fontsize=9)
    ax_lse.legend(fontsize=7, loc="lower right")
    name = next(a.title for a in registry.ALGORITHMS if a.mirror_forward == algorithm)
    fig.suptitle(f"Online softmax in the {name} mirror: rows {', '.join(map(str, rows))} of Q tile 0 "
                 f"(Nk = {Nk} keys in {trace.tiling.Tc} tiles of Bc = {Bc})", fontsize=10)
    final_lse = {r: history[r]["lse"][-1] for r in rows}
    fig.flashnumba_data = {"rows": rows, "history": history, "final_lse": final_lse,
                           "reference_lse": {r: float(lse_ref[r]) for r in rows}}
    return fig
