'''The course: graded lessons on FlashAttention, from the float64 oracle to the kernels.

    from flashnumba import course
    course.exercises()                          # ids in course order: ["attention", ...]
    course.check("attention", my_attention)     # Result: .passed, .message, .points, .where
    course.stub("attention"), course.solution("attention")   # the starting point, the answer

    flashnumba course list | check ID [--file student.py] | student --out DIR | instructor --out DIR

Authoring guide (for whoever writes the next lesson)
====================================================

Layout
------
    flashnumba/course/exercises/eNN_<id>.py   one exercise per file; NN is its place in the course
    flashnumba/course/lessons/NN_<name>.py    one lesson per file, jupytext-style percent format
    flashnumba/course/grading.py              Result, Mismatch and the comparisons checks use
    flashnumba/course/build.py                lesson source -> student / instructor notebooks
    lessons/NN_<name>.ipynb                   the student notebooks, committed with outputs

Adding an exercise
------------------
Create ``exercises/eNN_<id>.py``; the id is the file name after ``eNN_``. Only the
order of the names matters, and there is no list to edit: the package finds
exercises by file name. So that writers working in parallel never pick the same
number, lesson L's exercises are numbered 2L-1 and 2L (lesson 5: e09, e10;
lesson 15: e29, e30) and a third or fourth takes a letter after the second
(e10b, e10c). The module defines

    ID = "<id>"                 same as the file name after eNN_
    LESSON = 5                  the lesson it belongs to
    TITLE = "..."               a few words
    SPEC = "..."                one line: what the function takes and returns
    NAME = "fa1_io"             the function's name in the notebook (and in a --file)
    def stub(...):              same signature; body raises NotImplementedError("FILL ME IN: ...")
    def solution(...):          the answer
    def perturbed(...):         a slightly wrong answer (the tests check the grader rejects it)
    def check(implementation):  -> Result, built with grading.grade(ID, run)

``stub``, ``solution`` and ``perturbed`` are copied into notebooks with
``inspect.getsource`` and renamed to NAME, so each must be self-contained: it may use
``np`` and ``math`` and whatever the lesson imported before the exercise cell, and
may import inside its body; no module-level helpers of the exercise file. For a
kernel exercise, make the function a launcher that defines its ``@cuda.jit`` kernel
in its own body (a cached factory is the library's way; a notebook can afford a
fresh compile per call on the simulator), so one function carries the kernel. A
stub may instead return a deliberately unfinished value (e.g. a kernel with an
empty loop body) as long as its grader fails it.

``check`` runs small cases (N <= 64, d <= 16) in well under a second each, in
float64 against flashnumba.reference / flashnumba.mirror / flashnumba.merge, and
raises ``grading.Mismatch`` with a message naming the case, the variable and the
first place it differs (use ``grading.same_array``, ``grading.same_counts``, and
``grading.step_through`` for step generators, which names the first
(step, tile i, tile j, variable) that diverges from the mirror). For a kernel,
wrap the student's kernel as ``kernel(algorithm, problem, k) -> state dict`` and
call ``flashnumba.stepping.compare(algorithm, problem, kernel=...)``; its
``divergence`` is (k, block, i, j, variable, error); ``grading.kernel_steps`` does
this and turns the divergence into a Mismatch. Include awkward cases:
Nq != Nk, N not a multiple of the tile, odd d, rows with no visible key.
For a kernel the student writes whole (lesson 6), launch it inside
``flashnumba.simulator.access.traced()``: the trace counts each thread's reads and writes of
every watched array and lists races on shared memory (two threads of a block touching one
element, one writing, with no ``syncthreads`` between), so a missing barrier fails every time,
not only when the simulator's thread order happens to expose it. For a device function
(lessons 7, 8), call it from a kernel the grader owns (``e13_warp_max.row_kernel``,
``e15_fa2_row_update.lesson_kernel``) and launch through ``e13_warp_max.launch``, which
turns an error in a simulated thread into the student's own exception type. A GPU kernel
drops exceptions, so ``as_device`` raises a function's leading ``raise`` (a stub's
NotImplementedError) on the host before compiling; a grader that checks less on a GPU (no
race check there) passes ``grade(..., gpu_limits="...")``, a sentence ending its messages there.
Never launch on a GPU what can be refused first: an atomic on a thread-local array, for
one, is an illegal address that leaves the process's CUDA context unusable.
Call the student's code through ``grading.call`` so its errors become messages.
``grade`` turns NotImplementedError into "not done yet" (never an exception),
so a student notebook executes to the end with every stub in place.

Adding a lesson
---------------
Create ``lessons/NN_<name>.py`` in percent format:

    # %% [markdown]
    # # Lesson 5: IO complexity
    # Goal: ...                               (markdown lines start with "# ")
    # %%
    import numpy as np                        (a code cell, run as is in both forms)
    # %% [exercise] fa1_io
    (empty, or a few lines that go above the function in the same cell)

An ``[exercise] <id>`` cell becomes the exercise's stub (student form) or its
solution (instructor form), followed by a grading cell

    result = course.check("<id>", <NAME>)
    print(result)

and, in the instructor form only, ``assert result.passed``. An ordinary code cell
can also mark lines for one form only (an ungraded "try it" with its answer):

    # BEGIN SOLUTION
    answer = tiling.count("skipped")          instructor form only
    # END SOLUTION
    # STUDENT: answer = ...                   student form only, as "answer = ..."

Prefer graded exercises; the student form of such a cell must still run.

Draw figures from mirrors and traces (``flashnumba.viz``: each function returns a
matplotlib Figure; make it the cell's last expression and it is embedded). The
lesson's first code cell starts with ``# %matplotlib inline`` (an IPython magic,
written commented as jupytext does; the builder uncomments it; without it a Figure
shown before any pyplot call appears as text) and imports ``from flashnumba import
course``. Cells after an exercise must not call the student's function: in the
student form it is still the stub. Keep a lesson's execution under about 40 s on
one core of the simulator (small N and d; ``flashnumba.viz.io.io_figure`` at its
default sizes is the slowest figure: give it smaller ones).

Add the lesson's row (title, time, laptop or GPU, exercise ids) to the syllabus
table in lessons/README.md.

Building and testing
--------------------
    flashnumba course student --out lessons          # what is committed (with outputs)
    flashnumba course instructor --out /tmp/inst     # solutions, every grader must pass
    flashnumba course student --out DIR --lesson 05  # one lesson only
    pytest tests/test_course.py                      # every solution passes, every stub and
                                                     # perturbed solution fails
    pytest tests/test_lessons.py                     # every lesson executes in instructor form

Re-run ``flashnumba course student --out lessons --lesson NN`` and commit
lessons/ after changing a lesson or an exercise; tests/test_lessons.py checks the
committed student notebooks are built from the current sources. Build them
without a GPU (the simulator): the committed outputs are the laptop's. A lesson
that uses a GPU when present must still run on the simulator at small sizes.
'''

import importlib
import pkgutil
import re

# the package of exercise files, imported before the function exercises() below is defined:
# importing a subpackage sets the parent's attribute of that name, once, when it first loads
from flashnumba.course import exercises as _exercise_files
from flashnumba.course.grading import Result

__all__ = ["Result", "check", "exercise", "exercises", "perturbed", "solution", "stub"]

_FILE = re.compile(r"^e(\d\d[a-z]?)_(\w+)$")     # e07_fa1_steps, e30b_capstone_grads


def _modules():
    """{id: module name} of every exercise file, in course order."""
    found = sorted((m.group(1), m.group(2), info.name)
                   for info in pkgutil.iter_modules(_exercise_files.__path__)
                   if (m := _FILE.match(info.name)))
    modules = {}
    for _, ident, name in found:
        if ident in modules:
            raise RuntimeError(f"two exercise files with id {ident!r}: {modules[ident]} and {name}")
        modules[ident] = name
    return modules


def exercises(lesson=None):
    """The exercise ids in course order (only those of `lesson`, when given)."""
    ids = list(_modules())
    if lesson is None:
        return ids
    return [e for e in ids if exercise(e).LESSON == int(lesson)]


def exercise(exercise_id):
    """The module of exercise `exercise_id` (ID, LESSON, TITLE, SPEC, NAME, stub, solution, check)."""
    modules = _modules()
    if exercise_id not in modules:
        raise ValueError(f"exercise_id={exercise_id!r}: expected one of {list(modules)}")
    module = importlib.import_module(f"flashnumba.course.exercises.{modules[exercise_id]}")
    if module.ID != exercise_id:
        raise RuntimeError(f"{module.__name__}.ID = {module.ID!r}, expected {exercise_id!r} (its file name)")
    return module


def check(exercise_id, implementation):
    """Grade `implementation` on exercise `exercise_id`: a Result (.passed, .message, .points, .where)."""
    if not callable(implementation):
        raise TypeError(f"implementation must be a function, got {type(implementation).__name__}")
    return exercise(exercise_id).check(implementation)


def stub(exercise_id):
    """The function the student starts from (raises NotImplementedError or returns an unfinished value)."""
    return exercise(exercise_id).stub


def solution(exercise_id):
    """The reference solution, same signature as the stub."""
    return exercise(exercise_id).solution


def perturbed(exercise_id):
    """A slightly wrong solution: its grader must fail it."""
    return exercise(exercise_id).perturbed
