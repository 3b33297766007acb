"""The course's graders: every solution passes, every stub and every perturbed solution fails.

Also the exercise files themselves (found by name, complete, stub and solution with one
signature), the lesson builder's markers, and `flashnumba course list / check`.
"""

import inspect
import re
import textwrap

import pytest

import flashnumba
from flashnumba import course
from flashnumba.course import build
from flashnumba.course.cli import main as course_main
from flashnumba.course.grading import unconditional_raise

IDS = course.exercises()
# a missing barrier in a block of one warp: a GPU runs the warp in step and gets the right values;
# only the simulator's race check (flashnumba.simulator.access) fails it, every time
RACE = "a missing barrier is found by the simulator's race check; a GPU may hide it"
sim_only = pytest.mark.skipif(not flashnumba.on_simulator(), reason=RACE)


def _ids(racy):
    """IDS, those in `racy` marked to run on the simulator only."""
    return [pytest.param(e, marks=sim_only) if e in racy else e for e in IDS]


def test_exercises_are_found_in_course_order():
    assert len(IDS) >= 8, IDS
    assert len(set(IDS)) == len(IDS)
    lessons = [course.exercise(e).LESSON for e in IDS]
    assert lessons == sorted(lessons), f"exercise files out of lesson order: {list(zip(IDS, lessons))}"
    for lesson in set(lessons):
        assert len(course.exercises(lesson=lesson)) >= 2, f"lesson {lesson} needs at least 2 exercises"


@pytest.mark.parametrize("exercise_id", IDS)
def test_exercise_module_is_complete(exercise_id):
    module = course.exercise(exercise_id)
    number = re.fullmatch(r"e(\d\d)[a-z]?_" + exercise_id, module.__name__.rsplit(".", 1)[1])
    assert number, module.__name__
    assert int(number.group(1)) in (2 * module.LESSON - 1, 2 * module.LESSON), (
        f"{module.__name__}: lesson {module.LESSON}'s exercises are numbered "
        f"e{2 * module.LESSON - 1:02d}, e{2 * module.LESSON:02d} (then e{2 * module.LESSON:02d}b, ...)")
    for name in ("ID", "LESSON", "TITLE", "SPEC", "NAME", "stub", "solution", "perturbed", "check"):
        assert hasattr(module, name), f"{module.__name__} has no {name}"
    assert "\n" not in module.SPEC
    signature = inspect.signature(module.solution)
    assert inspect.signature(module.stub) == signature
    assert inspect.signature(module.perturbed) == signature
    assert "FILL ME IN" in inspect.getsource(module.stub)


@pytest.mark.parametrize("exercise_id", IDS)
def test_solution_passes(exercise_id):
    result = course.check(exercise_id, course.solution(exercise_id))
    assert result.passed, result.message
    assert result.points == 1 and str(result).startswith("[PASS]")


@pytest.mark.parametrize("exercise_id", _ids({"tree_sum"}))      # its stub has no barrier at all
def test_stub_fails(exercise_id):
    result = course.check(exercise_id, course.stub(exercise_id))
    assert not result.passed and result.points == 0
    if "raise NotImplementedError" in inspect.getsource(course.stub(exercise_id)):
        assert result.message.startswith("not done yet") and "FILL ME IN" in result.message


@pytest.mark.parametrize("exercise_id", _ids({"tiled_qk", "tree_sum"}))   # each misses a barrier
def test_perturbed_solution_fails_with_a_message(exercise_id):
    result = course.check(exercise_id, course.perturbed(exercise_id))
    assert not result.passed
    assert not result.message.startswith("not done yet")
    assert "expected" in result.message or "mirror" in result.message, result.message


@pytest.mark.parametrize("exercise_id", IDS)
def test_an_exception_in_the_students_code_is_a_message(exercise_id):
    def broken(*args):
        raise ZeroDivisionError("oops")
    result = course.check(exercise_id, broken)
    assert not result.passed and "ZeroDivisionError: oops" in result.message


def test_step_graders_name_the_step_tile_and_variable():
    result = course.check("fa1_steps", course.perturbed("fa1_steps"))
    assert result.where["step"] == 2 and (result.where["i"], result.where["j"]) == (0, 1)
    assert result.where["variable"] == "O"
    assert "step 2 (tile i=0, j=1)" in result.message
    skipped = course.check("fa1_causal", course.perturbed("fa1_causal"))
    assert "loop order" in skipped.message and skipped.where["step"] == 2


def test_unknown_exercise_is_named():
    with pytest.raises(ValueError, match="exercise_id='nope'"):
        course.check("nope", lambda: None)


def test_builder_markers():
    source = textwrap.dedent('''\
        # %% [markdown]
        # # Title
        #
        # text
        # %%
        x = 1
        # BEGIN SOLUTION
        y = 2
        # END SOLUTION
        # STUDENT: y = ...
        # %% [exercise] attention
        ''')
    cells = build.parse(source)
    assert [kind for kind, _, _ in cells] == ["markdown", "code", "exercise"]
    assert build._markdown(cells[0][2]) == "# Title\n\ntext"
    assert build._code(cells[1][2], "instructor") == "x = 1\ny = 2"
    assert build._code(cells[1][2], "student") == "x = 1\ny = ..."
    stub_cell, grade_cell = build._exercise_cells("attention", [], "student")
    assert "def attention(Q, K, V):" in stub_cell and "FILL ME IN" in stub_cell
    assert "assert" not in grade_cell and "course.check('attention', attention)" in grade_cell
    solution_cell, grade_cell = build._exercise_cells("attention", [], "instructor")
    assert "FILL ME IN" not in solution_cell and "assert result.passed" in grade_cell


def test_cli_list_and_check(tmp_path, capsys):
    assert course_main(["list"]) == 0
    listing = capsys.readouterr().out
    for exercise_id in IDS:
        assert exercise_id in listing
    right = tmp_path / "right.py"
    right.write_text("import numpy as np\n\n" + build.function_source("attention", "solution"))
    assert course_main(["check", "attention", "--file", str(right)]) == 0
    assert "[PASS]" in capsys.readouterr().out
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import numpy as np\n\n" + build.function_source("attention", "perturbed"))
    assert course_main(["check", "attention", "--file", str(wrong)]) == 1
    assert "[FAIL] attention: Nq=" in capsys.readouterr().out
    other = tmp_path / "other.py"
    other.write_text("def something_else():\n    pass\n")
    assert course_main(["check", "attention", "--file", str(other)]) == 2
    assert "defines no function 'attention'" in capsys.readouterr().out


def test_flashnumba_cli_passes_course_through(capsys):
    from flashnumba.cli import main
    assert main(["course", "check", "merge", "--solution"]) == 0
    assert "[PASS] merge" in capsys.readouterr().out


def test_kernel_steps_names_where_a_kernel_goes_wrong():
    # the readable FA2 forward kernel as a "student's" kernel, then with a planted bug:
    # from step 2 on, row 20 (Q tile i = 1) forgets to rescale its sum l
    from flashnumba import stepping
    from flashnumba.course.grading import Mismatch, kernel_steps
    p = stepping.make_problem(24, 40, 8, Br=16, Bc=32, algorithm="fa2_forward")
    assert kernel_steps("fa2_forward", p, stepping.kernel_state).agrees

    def buggy(algorithm, problem, k):
        state = stepping.kernel_state(algorithm, problem, k)
        if k >= 2:
            state["l"][20] *= 1.5
        return state
    with pytest.raises(Mismatch) as caught:
        kernel_steps("fa2_forward", p, buggy, case="Nq=24")
    where = caught.value.where
    assert (where["step"], where["block"], where["i"], where["j"], where["variable"]) == (2, "i=1", 1, 1, "l")
    assert caught.value.message.startswith("Nq=24: your kernel first differs from the mirror at step k=2")


@pytest.mark.skipif(not flashnumba.on_simulator(), reason="the race check is the simulator's")
def test_race_check_names_the_array_the_threads_and_the_barrier():
    # the tree reduction's stub has no barrier at all: the first conflict is before any barrier
    stub = course.check("tree_sum", course.stub("tree_sum"))
    assert stub.where["variable"] == "P_s"
    assert "race on shared P_s[" in stub.message and "before the first syncthreads" in stub.message
    # the tiled Q K^T without its second barrier: a write of the next phase meets a read of this one
    late = course.check("tiled_qk", course.perturbed("tiled_qk"))
    assert "after syncthreads number 1" in late.message and late.where["variable"] in ("Q_s", "K_s")


def test_kernel_exercise_graders_name_the_step_block_and_variable():
    result = course.check("fa2_accumulate", course.perturbed("fa2_accumulate"))
    assert (result.where["step"], result.where["block"], result.where["variable"]) == (2, "i=1", "O")
    lanes = course.check("warp_sum", course.perturbed("warp_sum"))
    assert lanes.where["lane"] == 1 and lanes.where["variable"] == "l"


def test_a_function_that_raises_first_is_found_before_any_compile():
    # how the device-function graders report a stub on a GPU too, where a kernel drops exceptions
    first = unconditional_raise(course.stub("warp_max"))
    assert isinstance(first, NotImplementedError) and "FILL ME IN" in str(first)
    assert unconditional_raise(course.solution("warp_max")) is None

    def later(x):
        if x > 0:
            raise ValueError("only sometimes")
        return x

    def computed(x):
        raise ValueError(f"x = {x}")
    assert unconditional_raise(later) is None and unconditional_raise(computed) is None


def test_graders_say_what_a_gpu_cannot_check():
    from flashnumba.course.exercises import e11_tiled_qk, e12_tree_sum, e13_warp_max
    from flashnumba.course.grading import Mismatch, grade
    for limits in (e11_tiled_qk.GPU_LIMITS, e12_tree_sum.GPU_LIMITS, e13_warp_max.GPU_LIMITS):
        assert "FLASHNUMBA_DEVICE=sim" in limits
    on_gpu = not flashnumba.on_simulator()

    def wrong():
        raise Mismatch("x = 1, expected 2")
    for result in (grade("e", lambda: "right", gpu_limits="values only"), grade("e", wrong, gpu_limits="values only")):
        assert result.message.endswith(" [on a GPU: values only]") == on_gpu, result.message
