"""Every lesson executes in its instructor form (every grader passes), and the committed
student notebooks in lessons/ are built from the current lesson sources, with their outputs.

Each instructor notebook runs top to bottom in a fresh kernel (errors fatal, as in CI), on
the simulator when no GPU is present; its grading cells assert their result passed.
"""

from pathlib import Path

import nbformat
import pytest

from flashnumba import course
from flashnumba.course import build

LESSONS_DIR = Path(__file__).parent.parent / "lessons"
SOURCES = build.lesson_sources()


def _outputs(nb):
    return [(cell, o) for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _text(output):
    if output.get("output_type") == "stream":
        return output["text"]
    return output.get("data", {}).get("text/plain", "")


def _figures_are_pictures(nb):
    """Every Figure a cell shows is embedded as a PNG, not only as its text repr."""
    shown = [o for _, o in _outputs(nb) if "data" in o and "<Figure" in _text(o)]
    assert shown, "a lesson shows at least one figure"
    assert all("image/png" in o["data"] for o in shown), "a Figure shown as text: %matplotlib inline?"


def test_there_are_lessons():
    assert len(SOURCES) >= 4, SOURCES
    exercised = {course.exercise(e).LESSON for e in course.exercises()}
    assert exercised <= {int(stem[:2]) for stem in SOURCES}


@pytest.mark.parametrize("stem", list(SOURCES))
def test_instructor_lesson_executes_and_every_grader_passes(stem, tmp_path):
    nb = build.execute(build.notebook(SOURCES[stem], "instructor"), tmp_path)
    outputs = _outputs(nb)
    assert not [o for _, o in outputs if o.get("output_type") == "error"]
    graded = [cell for cell in nb.cells if cell.get("metadata", {}).get("flashnumba", {}).get("grades")]
    lesson = int(stem[:2])
    assert sorted(c.metadata["flashnumba"]["grades"] for c in graded) == sorted(course.exercises(lesson=lesson))
    for cell in graded:
        text = "".join(_text(o) for o in cell.outputs)
        assert "[PASS]" in text, text
    _figures_are_pictures(nb)


@pytest.mark.parametrize("stem", list(SOURCES))
def test_committed_student_notebook_is_current_and_has_outputs(stem):
    path = LESSONS_DIR / f"{stem}.ipynb"
    assert path.exists(), f"run: flashnumba course student --out lessons   ({path} is missing)"
    committed = nbformat.read(path, as_version=4)
    fresh = build.notebook(SOURCES[stem], "student")
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], (
        f"{path} is stale: run  flashnumba course student --out lessons --lesson {stem[:2]}")
    assert not [o for _, o in _outputs(committed) if o.get("output_type") == "error"]
    for cell in committed.cells:
        if cell.get("metadata", {}).get("flashnumba", {}).get("grades"):
            assert "[FAIL]" in "".join(_text(o) for o in cell.outputs)     # the stubs are in place
    _figures_are_pictures(committed)


def test_no_notebook_without_a_source():
    stale = {p.stem for p in LESSONS_DIR.glob("*.ipynb")} - set(SOURCES)
    assert not stale, f"notebooks in lessons/ with no source in flashnumba/course/lessons: {stale}"
