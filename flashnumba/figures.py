"""``flashnumba figures``: regenerate every picture in figures/ from the mirrors' traces.

    python -m flashnumba.figures [--out figures] [--only loop_order.png ...]

Deterministic: fixed seeds, the Agg backend, no timestamps or version strings
in the files, so a rerun with the same code rewrites the same bytes. FIGURES
lists every file the command writes (CI checks it against the committed set).
"""

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

# file name -> (flashnumba.viz module, function returning its Figure (PNG) or Animation (GIF));
# imported when drawn, so `flashnumba figures --help` and --list load no matplotlib
FIGURES = {
    "loop_order.png": ("loop_order", "loop_order_figure"),
    "causal_skipping.png": ("causal", "causal_skipping_figure"),
    "on_chip_step.png": ("on_chip", "on_chip_figure"),
    "on_chip.gif": ("on_chip", "on_chip_animation"),
    "warp_partition.png": ("warps", "warp_partition_figure"),
    "backward_blocks.png": ("warps", "backward_blocks_figure"),
    "online_softmax.png": ("online_softmax", "online_softmax_figure"),
    "io_complexity.png": ("io", "io_figure"),
    "memory_footprint.png": ("memory", "memory_figure"),
    "mma_fragments.png": ("mma_fragments", "mma_fragments_figure"),
    "window_band.png": ("window", "window_figure"),
    "split_kv.png": ("split_kv", "split_kv_figure"),
    "varlen_tiles.png": ("varlen", "varlen_figure"),
}


def function(name):
    """The flashnumba.viz function that draws file `name` (a key of FIGURES)."""
    module, function_name = FIGURES[name]
    return getattr(importlib.import_module(f"flashnumba.viz.{module}"), function_name)


def draw(name):
    """The Figure or Animation of file `name` (a key of FIGURES)."""
    import matplotlib
    matplotlib.use("Agg")   # before anything draws: no display, same pixels everywhere
    return function(name)()

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "figures"


def _progress(done, total, name, started, stream):
    """A one-line bar redrawn in place on a terminal; one line per figure in a log."""
    width = 24
    filled = width * done // total
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{time.perf_counter() - started:5.1f}s  {name}")
    if stream.isatty():
        stream.write(f"\r{line:<70}" + ("\n" if done == total else ""))
    else:
        stream.write(line + "\n")
    stream.flush()


def generate(out_dir, names=None, stream=None):
    """Write the named figures (all by default) into out_dir; returns the paths written.
    Progress goes to `stream`, by default the sys.stderr of the moment of the call."""
    stream = sys.stderr if stream is None else stream
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(FIGURES) if names is None else list(names)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {list(FIGURES)}")
    written = []
    started = time.perf_counter()
    for n, name in enumerate(names):
        _progress(n, len(names), name, started, stream)
        path = out_dir / name
        from flashnumba.viz.style import save
        save(draw(name), path)
        written.append(path)
    _progress(len(names), len(names), "done", started, stream)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="flashnumba figures",
        description="Regenerate every picture in figures/ from the mirrors' traces "
                    "(deterministic: a rerun writes the same bytes).")
    parser.add_argument("--out", default=os.fspath(DEFAULT_OUT),
                        help="directory to write into (default: the repository's figures/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=list(FIGURES),
                        help="regenerate only these files")
    parser.add_argument("--list", action="store_true", help="print the file names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(FIGURES))
        return 0
    generate(args.out, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
