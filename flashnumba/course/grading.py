"""What a grader returns, and the comparisons graders are built from.

Every check compares a student's answer with a float64 answer (flashnumba.reference,
flashnumba.mirror, flashnumba.merge) and, when they differ, says where and by how
much, in words a student can act on: the case (shapes, options), the variable,
the first (step, tile, row, column) that differs, what was expected, what came.
"""

import ast
import builtins
import inspect
import textwrap
from dataclasses import dataclass

import numpy as np

TOL = 1e-9          # relative tolerance of NumPy float64 exercises (max |got - want| / max |want|)


@dataclass
class Result:
    """A grader's verdict: passed, a message for the student, points, and where it first went wrong."""
    exercise: str
    passed: bool
    message: str
    points: int = 0
    where: dict | None = None      # e.g. {"case": ..., "step": 3, "i": 1, "j": 0, "variable": "m"}

    def __str__(self):
        head = "PASS" if self.passed else "FAIL"
        return f"[{head}] {self.exercise}: {self.message}"

    def __bool__(self):
        return self.passed


class Mismatch(Exception):
    """Raised inside a check when an answer differs; carries the student message and where."""

    def __init__(self, message, **where):
        super().__init__(message)
        self.message = message
        self.where = where


def call(function, *args, **kwargs):
    """function(*args), turning an exception other than NotImplementedError into a Mismatch."""
    try:
        return function(*args, **kwargs)
    except (NotImplementedError, StopIteration):
        raise
    except Exception as e:
        raise Mismatch(f"your function raised {type(e).__name__}: {e}") from e


def on_gpu():
    """True when kernels run on a GPU: the graders of lessons 6-8 then check values only."""
    import flashnumba
    return flashnumba.device() != "sim"


def unconditional_raise(function):
    """The exception `function` raises before anything else, or None.

    That is, when its body (after a docstring) opens with ``raise E(...)``, E a built-in
    exception and its arguments literals, as every stub's ``raise NotImplementedError("FILL ME
    IN: ...")``. Graders of device functions ask this before compiling: on a GPU an exception
    raised inside a kernel never reaches the host (numba drops it unless the kernel is compiled
    with debug=True), so the stub would run on and fail with wrong values, not "not done yet".
    """
    function = getattr(function, "py_func", function)          # a @cuda.jit(device=True) function
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    if not tree.body or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]                                        # the docstring
    if not body or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return None
    exc = body[0].exc
    name, args = (exc.func, exc.args) if isinstance(exc, ast.Call) and not exc.keywords else (exc, [])
    cls = getattr(builtins, name.id, None) if isinstance(name, ast.Name) else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        return None
    try:
        return cls(*(ast.literal_eval(a) for a in args))
    except (ValueError, TypeError, SyntaxError):
        return None


def same_array(name, got, want, tol=TOL, case="", **where):
    """Raise Mismatch naming the worst entry unless got matches want (float64 want).

    Non-finite entries (-inf in m or L of a row that saw no key) must agree exactly;
    finite ones to tol relative to max |want|.
    """
    prefix = f"{case}: " if case else ""
    if got is None:
        raise Mismatch(f"{prefix}{name} is None, expected an array of shape {np.shape(want)}", **where)
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise Mismatch(f"{prefix}{name} is not numeric ({e})", **where) from e
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"{prefix}{name} has shape {got.shape}, expected {want.shape}",
                       variable=name, **where)
    finite = np.isfinite(want)
    wrong_kind = (np.isfinite(got) != finite) | (~finite & (got != want) & ~(np.isnan(got) & np.isnan(want)))
    if wrong_kind.any():
        index = tuple(int(k) for k in np.argwhere(wrong_kind)[0])
        raise Mismatch(f"{prefix}{name}{list(index)} = {got[index]}, expected {want[index]} "
                       f"(non-finite entries must match exactly: -inf for a row that saw no key, "
                       f"never NaN)", variable=name, index=index, **where)
    if not finite.any():
        return
    scale = max(float(np.abs(want[finite]).max()), 1e-300)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(got - want), 0.0)
    if diff.max() > tol * scale:
        index = tuple(int(k) for k in np.unravel_index(np.argmax(diff), diff.shape))
        raise Mismatch(f"{prefix}{name}{list(index)} = {got[index]:.6g}, expected {want[index]:.6g} "
                       f"(max |got - expected| / max |expected| = {diff.max() / scale:.1e} > {tol:.0e})",
                       variable=name, index=index, **where)


def same_counts(name, got, want, case=""):
    """Raise Mismatch unless the dict of HBM element counts got equals want, tensor by tensor."""
    prefix = f"{case}: " if case else ""
    got = {k: int(v) for k, v in dict(got).items() if v}
    want = {k: int(v) for k, v in dict(want).items() if v}
    for tensor in sorted(set(got) | set(want)):
        if got.get(tensor, 0) != want.get(tensor, 0):
            raise Mismatch(f"{prefix}{name}[{tensor!r}] = {got.get(tensor, 0)} elements, expected "
                           f"{want.get(tensor, 0)} (all of {name}: got {got}, expected {want})",
                           variable=f"{name}[{tensor}]")


def step_through(student_steps, mirror_states, variables, tol=TOL, case=""):
    """Step a student's generator next to the mirror's states; raise Mismatch at the first divergence.

    student_steps yields dicts (with "i", "j" and the variables); mirror_states is a list of
    dicts with the same keys (the float64 mirror's, one per inner step). Returns the student
    generator's return value.
    """
    prefix = f"{case}: " if case else ""
    if not hasattr(student_steps, "__next__"):
        raise Mismatch(f"{prefix}your function returned {type(student_steps).__name__}, not a "
                       f"generator: yield each step's dict, then return the result")
    k = 0
    while True:
        try:
            got = call(next, student_steps)
        except StopIteration as stop:
            if k < len(mirror_states):
                want = mirror_states[k]
                raise Mismatch(f"{prefix}your generator stopped after {k} steps; the mirror takes "
                               f"{len(mirror_states)} (next: tile i={want['i']}, j={want['j']})",
                               step=k)
            return stop.value
        if k >= len(mirror_states):
            raise Mismatch(f"{prefix}your generator yields more than the mirror's "
                           f"{len(mirror_states)} steps", step=k)
        want = mirror_states[k]
        if not isinstance(got, dict):
            raise Mismatch(f"{prefix}step {k}: yield a dict with keys i, j, "
                           f"{', '.join(variables)}; got {type(got).__name__}", step=k)
        for key in ("i", "j"):
            if key in want and got.get(key) != want[key]:
                raise Mismatch(f"{prefix}step {k}: you visited tile i={got.get('i')}, j={got.get('j')}; "
                               f"the mirror visits i={want['i']}, j={want['j']} (loop order)",
                               step=k, i=want["i"], j=want["j"], variable=key)
        for name in variables:
            if name not in got:
                raise Mismatch(f"{prefix}step {k}: your dict has no {name!r} (keys: {sorted(got)})",
                               step=k, variable=name)
            tile = f"step {k} (tile i={want.get('i')}, j={want.get('j')})"
            same_array(name, got[name], want[name], tol=tol, case=f"{prefix}{tile}".strip(),
                       step=k, i=want.get("i"), j=want.get("j"))
        k += 1


def kernel_steps(algorithm, problem, kernel, case=""):
    """Step a student's kernel next to its float64 mirror; raise Mismatch at the first divergence.

    kernel(algorithm, problem, k) -> {variable: array}, the state after k iterations of each
    thread block's loop, as ``flashnumba.stepping.kernel_state`` returns it (launch the
    student's kernel with limit=k). problem: ``flashnumba.stepping.make_problem(...)``.
    Returns the stepping Report when every step agrees.
    """
    from flashnumba import stepping
    prefix = f"{case}: " if case else ""
    report = stepping.compare(algorithm, problem, kernel=lambda a, p, k: call(kernel, a, p, k))
    if report.divergence is not None:
        k, block, i, j, name, err = report.divergence
        raise Mismatch(f"{prefix}your kernel first differs from the mirror at step k={k} (iterations "
                       f"of each block's loop), block {block}, tile i={i}, j={j}, variable {name}: "
                       f"max |yours - mirror| / max |mirror| = {err:.1e} > {stepping.TOL:.0e}\n"
                       f"{report.table()}", step=k, block=block, i=i, j=j, variable=name)
    return report


def grade(exercise, run, gpu_limits=None):
    """Run a check body `run()` (which raises Mismatch or returns a success note) as a Result.

    gpu_limits: what this grader cannot check on a GPU, a sentence added to every message there."""
    after = f" [on a GPU: {gpu_limits}]" if gpu_limits and on_gpu() else ""
    try:
        note = run()
    except NotImplementedError as e:
        return Result(exercise, False, f"not done yet ({e}){after}")
    except Mismatch as m:
        return Result(exercise, False, m.message + after, where=m.where or None)
    return Result(exercise, True, (note or "correct") + after, points=1)
