"""`flashnumba` help: fast, banner-free, named as typed, with every default shown."""

import os
import subprocess
import sys

import pytest

from flashnumba import registry
from flashnumba.cli import PASSTHROUGH, main


def _help(capsys, *argv):
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _run(code):
    env = {k: v for k, v in os.environ.items() if k not in ("FLASHNUMBA_DEVICE", "FLASHNUMBA_QUIET")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False, timeout=120)


def test_top_level_help_lists_every_command_and_imports_no_numba():
    r = _run("import sys\nfrom flashnumba.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('numba imported:', 'numba' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                   # no simulator line
    assert "numba imported: False" in r.stdout
    for command in ("demo", "step", *PASSTHROUGH):
        assert command in r.stdout


def test_a_command_that_loads_kernels_prints_no_banner_for_help():
    r = _run("from flashnumba.cli import main\n"
             "try:\n    main(['resources', '--help'])\nexcept SystemExit:\n    pass\n")
    assert r.returncode == 0, r.stderr
    assert "simulator" not in r.stderr and "usage: flashnumba resources" in r.stdout


def test_step_help_names_every_kernel_and_shows_defaults(capsys):
    out = " ".join(_help(capsys, "step").split())          # argparse wraps lines
    for kernel in registry.kernels():
        assert kernel in out
    assert "(default: all)" in out and "(default: 70)" in out and "(default: 100)" in out


def test_demo_help_shows_defaults(capsys):
    out = " ".join(_help(capsys, "demo").split())
    assert "(default: 48)" in out and "(default: 32)" in out


@pytest.mark.parametrize("command", ["figures", "accuracy", "bench", "course"])
def test_subcommand_help_names_itself_and_is_plain_text(capsys, command):
    out = _help(capsys, command)
    assert out.startswith(f"usage: flashnumba {command}")
    assert "``" not in out and "python -m" not in out


def test_silence_drops_the_simulator_line():
    r = _run("import flashnumba\nfrom flashnumba import _device\n_device.silence()\n"
             "import numba.cuda\nprint(flashnumba.device())")
    assert r.returncode == 0, r.stderr
    assert "simulator" not in r.stderr


def test_commands_that_name_the_device_print_no_second_line():
    r = _run("from flashnumba import cli, _device\n"
             "from unittest import mock\n"
             "with mock.patch('flashnumba.demo.main', return_value=0):\n"
             "    cli.main(['demo'])\n"
             "import numba.cuda\n"
             "print(_device._silent)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True" and "simulator" not in r.stderr
