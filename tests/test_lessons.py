"""Every lesson notebook executes top to bottom without error (as in CI, errors fatal).

Each notebook runs in a fresh kernel from this interpreter, on the simulator when
no GPU is present. Cells assert what they claim, so a lesson that drifts fails here.
"""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

LESSONS = sorted((Path(__file__).parent.parent / "lessons").glob("*.ipynb"))


def test_there_are_lessons():
    assert len(LESSONS) >= 2, f"expected the lessons in lessons/, found {LESSONS}"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_executes(path):
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("FLASHNUMBA_QUIET")
    os.environ["FLASHNUMBA_QUIET"] = "1"
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("FLASHNUMBA_QUIET", None)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "stream" for o in outputs), "a lesson prints something"
