"""The `flashnumba` command: demo, step, train, accuracy, figures, bench, resources, course.

Nothing heavy is imported until a command runs, so ``flashnumba --help`` is
immediate and imports no numba. Every command runs inside ``quiet.launches()``:
flashnumba's own small grids print no Numba low-occupancy warnings.
"""

import argparse
import sys

from flashnumba import _device, registry


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
    "bench": ("flashnumba.bench.run", "benchmark against PyTorch (needs a GPU); --calls: the public calls' overhead"),
    "resources": ("flashnumba.tools.resources", "compile every kernel config, report registers/spills/smem"),
    "course": ("flashnumba.course.cli", "the graded lessons: list, check, build the notebooks"),
}

# commands that say where kernels run in their own output: no second line about it on stderr
ANNOUNCE_DEVICE = ("demo", "step", "train", "accuracy")


def parser():
    """The top-level parser: demo and step in full, the other commands listed by name."""
    top = argparse.ArgumentParser(
        prog="flashnumba",
        description="FlashAttention 1 and 2 in Python with Numba CUDA. "
                    "`flashnumba COMMAND --help` for a command's options.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    demo = sub.add_parser("demo", formatter_class=defaults,
                          help="run a small problem through every mirror and kernel",
                          description="One small attention problem through every NumPy mirror and "
                                      "every kernel, against the float64 reference.")
    demo.add_argument("--N", type=int, default=48, help="sequence length")
    demo.add_argument("--d", type=int, default=32, help="head dim")
    demo.add_argument("--causal", action="store_true", help="causal mask (bottom-right)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the random inputs")
    demo.set_defaults(run=_demo)

    kernels = registry.kernels()
    step = sub.add_parser("step", formatter_class=defaults,
                          help="step a kernel and its mirror side by side",
                          description="Run a kernel and its NumPy mirror for k = 1, 2, ... "
                                      "iterations and print the largest difference per state "
                                      "variable, naming the first that diverges.")
    step.add_argument("algorithm", nargs="?", default="all", choices=["all", *kernels],
                      metavar="ALGORITHM",
                      help=f"the kernel to step: all, or one of {', '.join(kernels)}")
    step.add_argument("--Nq", type=int, default=70, help="query sequence length")
    step.add_argument("--Nk", type=int, default=100, help="key sequence length")
    step.add_argument("--d", type=int, default=24, help="head dim")
    step.add_argument("--Br", type=int, default=None, help="tile rows, None for the kernel's own")
    step.add_argument("--Bc", type=int, default=None, help="tile columns, None for the kernel's own")
    step.add_argument("--causal", action="store_true", help="causal mask")
    step.add_argument("--top-left", action="store_true",
                      help="causal diagonal at the top left (PyTorch's), not bottom-right (flash-attn's)")
    step.add_argument("--dropout", type=float, default=0.0, metavar="P",
                      help="dropout probability (0: no dropout)")
    step.add_argument("--seed", type=int, default=0,
                      help="seeds the random inputs and the dropout mask")
    step.set_defaults(run=_step)

    for name, (_, text) in PASSTHROUGH.items():   # listed for --help; their own parsers take the rest
        sub.add_parser(name, help=text, add_help=False)
    return top


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    helping = "-h" in argv or "--help" in argv
    if helping or (argv and argv[0] in ANNOUNCE_DEVICE):
        _device.silence()                   # help only, or the command says it itself
    if argv and argv[0] in PASSTHROUGH:
        from importlib import import_module
        module = import_module(PASSTHROUGH[argv[0]][0])
        if helping:
            return module.main(argv[1:]) or 0
        return _quietly(lambda: module.main(argv[1:]))
    args = parser().parse_args(argv)
    return _quietly(lambda: args.run(args))


def _quietly(run):
    from flashnumba.kernels import quiet
    with quiet.launches():
        return run() or 0


if __name__ == "__main__":
    sys.exit(main())
