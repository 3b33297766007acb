"""`flashnumba course`: list and check exercises, build the student and instructor notebooks."""

import argparse
import sys
from pathlib import Path


def _list(args):
    from flashnumba import course
    lesson = None
    for ident in course.exercises():
        module = course.exercise(ident)
        if module.LESSON != lesson:
            lesson = module.LESSON
            print(f"lesson {lesson}")
        print(f"  {ident:<18} {module.TITLE}\n  {'':<18} {module.SPEC}")
    return 0


def _check(args):
    from flashnumba import course
    module = course.exercise(args.exercise)
    if args.file is None:
        function = module.solution if args.solution else module.stub
        print(f"(no --file: checking the {'solution' if args.solution else 'stub'})")
    else:
        namespace = {"__name__": "student"}
        path = Path(args.file)
        exec(compile(path.read_text(), str(path), "exec"), namespace)   # the student's own file
        if module.NAME not in namespace:
            print(f"{path} defines no function {module.NAME!r} (exercise {module.ID}: {module.SPEC})")
            return 2
        function = namespace[module.NAME]
    result = course.check(args.exercise, function)
    print(result)
    return 0 if result.passed else 1


def _build(args):
    from flashnumba.course.build import build
    build(args.form, args.out, lessons=args.lesson, run=not args.no_execute)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="flashnumba course",
        description="The graded lessons: list and check exercises, build the student and "
                    "instructor notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises, lesson by lesson").set_defaults(run=_list)
    check = sub.add_parser("check", help="grade an exercise")
    check.add_argument("exercise", help="an id from `flashnumba course list`")
    check.add_argument("--file", help="a Python file defining the exercise's function")
    check.add_argument("--solution", action="store_true", help="without --file: grade the solution")
    check.set_defaults(run=_check)
    for form in ("student", "instructor"):
        b = sub.add_parser(form, help=f"write the {form} notebooks, executed, with their outputs")
        b.add_argument("--out", required=True, help="folder to write the notebooks to")
        b.add_argument("--lesson", action="append",
                       help="only lessons whose file name starts with this (e.g. 03); repeatable")
        b.add_argument("--no-execute", action="store_true", help="write without running them")
        b.set_defaults(run=_build, form=form)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
