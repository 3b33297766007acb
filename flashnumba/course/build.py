"""Lesson sources (percent format) -> student and instructor notebooks, executed with outputs.

A lesson source is a Python file of cells, each opened by a header line:

    # %% [markdown]            markdown: every line below starts with "# " (or is "#")
    # %%                       code, the same in both forms
    # %% [exercise] <id>       the exercise's stub (student) or solution (instructor),
                               renamed to its NAME, then a grading cell

In code cells, lines between "# BEGIN SOLUTION" and "# END SOLUTION" are kept in
the instructor form only, lines "# STUDENT: <code>" become "<code>" in the
student form only, and an IPython magic is written commented, as jupytext does
("# %matplotlib inline" becomes "%matplotlib inline"), so the source stays Python. See the flashnumba.course docstring for the whole guide.
"""

import inspect
import os
import re
import textwrap
import time
from importlib import resources
from pathlib import Path

FORMS = ("student", "instructor")
_HEADER = re.compile(r"^# %%(?:\s*\[(\w+)\])?\s*(.*)$")
_MAGIC = re.compile(r"^# (%[a-z]\w*.*)$")              # "# %matplotlib inline" -> "%matplotlib inline"


def lesson_sources():
    """{stem: path} of every lesson source shipped in flashnumba/course/lessons, in course order."""
    folder = resources.files("flashnumba.course") / "lessons"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if re.match(r"^\d\d_\w+\.py$", p.name)}


def parse(text):
    """The cells of a lesson source: a list of (kind, argument, lines)."""
    cells = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            cells.append([header.group(1) or "code", header.group(2).strip(), []])
        elif cells:
            cells[-1][2].append(line)
        elif line.strip():
            raise ValueError(f"a lesson source must start with a '# %%' cell header, got {line!r}")
    return [(kind, arg, _trim(lines)) for kind, arg, lines in cells]


def _trim(lines):
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def _markdown(lines):
    out = []
    for line in lines:
        if line == "#":
            out.append("")
        elif line.startswith("# "):
            out.append(line[2:])
        else:
            raise ValueError(f"a markdown line must start with '# ', got {line!r}")
    return "\n".join(out)


def _code(lines, form):
    out, in_solution = [], False
    for line in lines:
        stripped = line.strip()
        if stripped == "# BEGIN SOLUTION":
            in_solution = True
        elif stripped == "# END SOLUTION":
            in_solution = False
        elif stripped.startswith("# STUDENT: "):
            if form == "student":
                out.append(line[:len(line) - len(line.lstrip())] + stripped[len("# STUDENT: "):])
        elif not in_solution or form == "instructor":
            magic = _MAGIC.match(line)
            out.append(magic.group(1) if magic else line)
    return "\n".join(out)


def function_source(exercise_id, which):
    """The source of an exercise's stub / solution / perturbed, renamed to the exercise's NAME."""
    from flashnumba import course
    module = course.exercise(exercise_id)
    source = textwrap.dedent(inspect.getsource(getattr(module, which)))
    return re.sub(rf"^def {which}\(", f"def {module.NAME}(", source, count=1)


def _exercise_cells(exercise_id, lines, form):
    from flashnumba import course
    module = course.exercise(exercise_id)
    which = "stub" if form == "student" else "solution"
    intro = f"# Exercise {module.ID}: {module.TITLE}\n# {module.SPEC}\n"
    body = "\n".join(lines)
    code = intro + (body + "\n" if body else "") + function_source(exercise_id, which).rstrip()
    grade = (f"result = course.check({module.ID!r}, {module.NAME})\nprint(result)"
             + ("\nassert result.passed, result.message" if form == "instructor" else ""))
    return code, grade


def notebook(source_path, form):
    """The nbformat notebook of one lesson source in `form` ("student" or "instructor"), not executed."""
    import nbformat
    if form not in FORMS:
        raise ValueError(f"form={form!r}: expected one of {FORMS}")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["flashnumba"] = {"lesson": Path(source_path).stem, "form": form}
    for kind, arg, lines in parse(Path(source_path).read_text()):
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(_markdown(lines)))
        elif kind == "code":
            nb.cells.append(nbformat.v4.new_code_cell(_code(lines, form)))
        elif kind == "exercise":
            code, grade = _exercise_cells(arg, lines, form)
            nb.cells.append(nbformat.v4.new_code_cell(code))
            nb.cells.append(nbformat.v4.new_code_cell(grade, metadata={"flashnumba": {"grades": arg}}))
        else:
            raise ValueError(f"{source_path}: unknown cell kind [{kind}]")
    for k, cell in enumerate(nb.cells):         # stable ids: rebuilding gives the same file
        cell["id"] = f"cell-{k:03d}"
    return nb


def execute(nb, cwd, timeout=300):
    """Run every cell in a fresh kernel (errors fatal); the notebook keeps its outputs."""
    from nbclient import NotebookClient
    quiet = os.environ.get("FLASHNUMBA_QUIET")
    os.environ["FLASHNUMBA_QUIET"] = "1"       # no "running on the simulator" banner in outputs
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        if quiet is None:
            os.environ.pop("FLASHNUMBA_QUIET", None)
    for cell in nb.cells:                       # execution counts and timings vary between runs
        cell.metadata.pop("execution", None)
    return nb


def build(form, out, lessons=None, run=True, log=print):
    """Write the `form` notebooks of every lesson (or those whose stem starts with one of `lessons`)."""
    import nbformat
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, path in lesson_sources().items():
        if lessons and not any(stem.startswith(x) for x in lessons):
            continue
        start = time.perf_counter()
        nb = notebook(path, form)
        if run:
            execute(nb, out)
        target = out / f"{stem}.ipynb"
        nbformat.write(nb, target)
        written.append(target)
        log(f"{target}  ({form}{', executed in %.1f s' % (time.perf_counter() - start) if run else ''})")
    return written
