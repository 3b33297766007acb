"""The `flashnumba` command: demo, step, train, accuracy, figures, bench, resources, course."""

import argparse
import sys

from flashnumba import registry


def _demo(args):
    from flashnumba.demo import main
    return main(args)


def _step(args):
    from flashnumba.stepping import main
    return main(args)


# commands whose modules parse their own options: (module, help)
PASSTHROUGH = {
    "train": ("flashnumba.train", "train a tiny transformer with flashnumba's and PyTorch's attention"),
    "accuracy": ("flashnumba.tools.accuracy", "the accuracy table: every dtype and algorithm against float64"),
    "figures": ("flashnumba.figures", "regenerate figures/"),
    "bench": ("flashnumba.bench.run", "benchmark against PyTorch (needs a GPU)"),
    "resources": ("flashnumba.tools.resources", "compile every kernel config, report registers/spills/smem"),
    "course": ("flashnumba.course.cli", "the graded lessons: list, check, build the notebooks"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="flashnumba",
        description="FlashAttention 1 and 2 in Python with Numba CUDA.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a small problem through every mirror and kernel")
    demo.add_argument("--N", type=int, default=48, help="sequence length (default 48)")
    demo.add_argument("--d", type=int, default=32, help="head dim (default 32)")
    demo.add_argument("--causal", action="store_true", help="causal mask (bottom-right)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    step = sub.add_parser("step", help="step a kernel and its mirror side by side")
    step.add_argument("algorithm", nargs="?", default="all",
                      choices=["all", *registry.kernels()])
    step.add_argument("--Nq", type=int, default=70)
    step.add_argument("--Nk", type=int, default=100)
    step.add_argument("--d", type=int, default=24)
    step.add_argument("--Br", type=int, default=None, help="tile rows (default: the kernel's)")
    step.add_argument("--Bc", type=int, default=None, help="tile columns (default: the kernel's)")
    step.add_argument("--causal", action="store_true")
    step.add_argument("--top-left", action="store_true",
                      help="causal diagonal at the top left (PyTorch's); default bottom-right (flash-attn's)")
    step.add_argument("--dropout", type=float, default=0.0, metavar="P",
                      help="dropout probability (default 0: no dropout)")
    step.add_argument("--seed", type=int, default=0,
                      help="seeds the random inputs and the dropout mask (default 0)")
    step.set_defaults(run=_step)

    for name, (_, text) in PASSTHROUGH.items():   # listed for --help; their own parsers take the rest
        sub.add_parser(name, help=text, add_help=False)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        from importlib import import_module
        return import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:]) or 0
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
