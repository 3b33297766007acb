"""The install split: the core pulls no torch, NVIDIA or Jupyter package; `make demo`
installs the core (plus the compiler wheels only where there is a GPU); `make test`
the test tools. Read from pyproject.toml and `make -n`, without installing anything."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CORE = {"numpy", "numba", "numba-cuda", "matplotlib", "ml_dtypes"}
HEAVY = re.compile(r"torch|nvidia|cuda-toolkit|jupyter|ipykernel|nbclient|pytest|\[cu1")


def _name(requirement):
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_core_is_what_the_kernels_mirrors_and_figures_need():
    deps = PROJECT["dependencies"]
    assert {_name(r) for r in deps} == CORE
    assert not [r for r in deps if HEAVY.search(r)]


def test_the_heavy_packages_are_extras():
    extras = PROJECT["optional-dependencies"]
    assert {"torch", "cu13", "cu12", "lessons", "dev"} <= set(extras)
    assert any(_name(r) == "torch" for r in extras["torch"])
    assert any("[cu13]" in r for r in extras["cu13"])
    assert any(_name(r) == "jupyterlab" for r in extras["lessons"])
    assert {"pytest", "torch", "nbclient", "nbformat"} <= {_name(r) for r in extras["dev"]}


def test_license_is_an_spdx_string():
    # a table ({text = ...}) makes setuptools >= 77 print a deprecation banner
    assert PROJECT["license"] == "MIT"


def _make_dry_run(target, tmp_path, gpu):
    """`make -n` of a target from scratch, with or without an nvidia-smi that finds a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # an nvidia-smi that finds a GPU or not, first on PATH, so a real one (on a GPU machine, in
    # make's own directory) is never asked
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: fake'\n" if gpu else "#!/bin/sh\nexit 9\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(shutil.which('make'))}"}
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], env=env,
                          capture_output=True, text=True, check=True, timeout=60)
    return [line for line in done.stdout.splitlines() if "pip install" in line]


def test_make_demo_installs_the_core_and_compiler_wheels_only_with_a_gpu(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    assert _make_dry_run("demo", tmp_path / "cpu", gpu=False) == [".venv/bin/pip install -q -e '.'"]
    assert _make_dry_run("demo", tmp_path / "gpu", gpu=True) == [
        ".venv/bin/pip install -q -e '.[cu13]'"]


def test_make_test_adds_the_dev_extra(tmp_path):
    installs = _make_dry_run("test", tmp_path, gpu=False)
    assert installs[-1] == ".venv/bin/pip install -q -e '.[dev,cu13]'"
