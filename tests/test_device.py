"""`import flashnumba` picks the GPU or the simulator once, and FLASHNUMBA_DEVICE overrides it.

Each case runs in a fresh interpreter: the choice is made before numba is imported.
"""

import os
import subprocess
import sys

import flashnumba


def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("FLASHNUMBA_DEVICE", "NUMBA_ENABLE_CUDASIM", "FLASHNUMBA_QUIET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], check=False, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_sim_override_selects_the_simulator_and_says_so_once():
    r = _run("import flashnumba, numba; from numba import config; "
             "import flashnumba.kernels.fa2_forward; "
             "print(flashnumba.device(), config.ENABLE_CUDASIM)", FLASHNUMBA_DEVICE="sim")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["sim", "1"]
    assert r.stderr.count("Numba's CUDA simulator") == 1


def test_quiet_silences_the_one_line():
    r = _run("import flashnumba", FLASHNUMBA_DEVICE="sim", FLASHNUMBA_QUIET="1")
    assert r.returncode == 0 and r.stderr == ""


def test_unknown_device_value_is_a_clear_error():
    r = _run("import flashnumba", FLASHNUMBA_DEVICE="tpu")
    assert r.returncode != 0
    assert "FLASHNUMBA_DEVICE='tpu'" in r.stderr and "'gpu', 'sim'" in r.stderr


def test_gpu_request_and_detection_follow_the_machine():
    asked = _run("import flashnumba; print(flashnumba.device())", FLASHNUMBA_DEVICE="gpu")
    auto = _run("import flashnumba; print(flashnumba.device())")
    if flashnumba.device() == "gpu":
        assert asked.stdout.strip() == "gpu" and auto.stdout.strip() == "gpu"
    else:                                     # no GPU here: asking for one is a clear error
        assert asked.returncode != 0
        assert "FLASHNUMBA_DEVICE=gpu, but no CUDA driver with a device was found" in asked.stderr
        assert auto.stdout.strip() == "sim"


def test_numba_imported_first_keeps_its_choice():
    r = _run("import numba; import flashnumba; print(flashnumba.device())",
             NUMBA_ENABLE_CUDASIM="1")
    assert r.returncode == 0 and r.stdout.strip() == "sim"
    r = _run("import numba; import flashnumba", NUMBA_ENABLE_CUDASIM="1", FLASHNUMBA_DEVICE="gpu")
    assert r.returncode != 0 and "imported earlier with NUMBA_ENABLE_CUDASIM=1" in r.stderr


def test_numba_imported_first_without_the_variable_still_gets_the_right_device():
    # numba reads NUMBA_ENABLE_CUDASIM at import; numba.cuda, a separate module, later.
    r = _run("import numba; import flashnumba; from numba import config, cuda; "
             "print(flashnumba.device(), config.ENABLE_CUDASIM, cuda.jit.__module__)")
    assert r.returncode == 0, r.stderr
    if flashnumba.device() == "sim":
        assert r.stdout.split() == ["sim", "1", "numba.cuda.simulator.api"]
    else:
        assert r.stdout.split()[0] == "gpu"


def test_numba_cuda_imported_first_without_a_gpu_is_named():
    r = _run("import numba.cuda; import flashnumba; print(flashnumba.device())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gpu"
    if flashnumba.device() == "sim":          # no GPU here: kernels cannot run, and we say so
        assert "imported before flashnumba" in r.stderr and "NUMBA_ENABLE_CUDASIM=1" in r.stderr


def test_help_imports_no_numba_and_prints_no_banner():
    r = _run("import sys; from flashnumba.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('numba' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("False") and r.stderr == ""
