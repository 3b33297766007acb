"""The graders of lessons 9-12 say where an answer goes wrong, and refuse the shortcuts they name.

(tests/test_course.py already checks that every solution passes and every stub and perturbed
solution fails; these check the content of the messages of the kernel and Philox graders.)
"""

import linecache

from flashnumba import course
from flashnumba.course import build


def _variant(exercise_id, old, new):
    """The exercise's solution with `old` replaced by `new`, compiled with a readable source."""
    source = build.function_source(exercise_id, "solution")
    assert old in source
    source = source.replace(old, new)
    filename = f"<variant of {exercise_id}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(vars(course.exercise(exercise_id)))
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (as a notebook cell defines it)
    return namespace[course.exercise(exercise_id).NAME]


def test_skipping_by_the_wrong_row_is_named_as_loop_order():
    result = course.check("fa2_causal", course.perturbed("fa2_causal"))
    assert "loop order" in result.message and result.where["variable"] == "i"


def test_kernel_grader_names_the_step_block_and_variable():
    result = course.check("dkdv_kernel", course.perturbed("dkdv_kernel"))
    assert (result.where["step"], result.where["variable"]) == (1, "dQ")
    assert "first differs from the mirror at step k=1" in result.message
    assert "  k         dQ        dK        dV" in result.message      # the stepping table


def test_dq_without_an_atomic_is_refused():
    plain = _variant("dkdv_kernel", "cuda.atomic.add(dQ, (r, x), scale * ds * K_c[x])",
                     "dQ[r, x] += scale * ds * K_c[x]")
    result = course.check("dkdv_kernel", plain)
    assert not result.passed and "cuda.atomic.add" in result.message


def test_the_deterministic_pass_refuses_atomics():
    atomic = _variant("dq_kernel", "dQ_r[x] += ds * K_j[cc, x]",
                      "cuda.atomic.add(dQ_r, x, ds * K_j[cc, x])")
    result = course.check("dq_kernel", atomic)
    assert not result.passed and "atomic" in result.message


def test_an_atomic_on_a_local_array_is_refused_before_any_launch():
    # on a GPU it is an illegal address, and every later kernel of the process fails
    local = _variant("dkdv_kernel", "dV_c[x] += p * dO_i[rr, x]", "cuda.atomic.add(dV_c, x, p * dO_i[rr, x])")
    result = course.check("dkdv_kernel", local)
    assert not result.passed and "thread-local array dV_c" in result.message
    assert result.where["variable"] == "dV_c"


def test_keep_tile_refuses_the_library_mask():
    shortcut = _variant("keep_tile", "keep[a, e] = float(x) * 2.0 ** -32 >= p",
                        "keep[a, e] = philox.keep_mask(seed, p, b + 1, h + 1, r + 1, c + 1)[b, h, r, c]")
    result = course.check("keep_tile", shortcut)
    assert not result.passed and "philox4x32" in result.message
