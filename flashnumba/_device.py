"""Choose where kernels run: the GPU when there is one, Numba's CUDA simulator when not.

numba.cuda reads NUMBA_ENABLE_CUDASIM once, when it is first imported, so the
choice must be made before that. ``import flashnumba`` calls ``select()``
first thing; ``FLASHNUMBA_DEVICE=gpu|sim`` overrides the detection.

We look for a GPU through the CUDA driver (libcuda) with ctypes, so that the
detection itself never imports numba and ``import flashnumba`` stays fast (the
command line's ``--help`` imports nothing heavy). When the simulator is chosen,
flashnumba's extensions to it are installed the moment numba.cuda is imported
(an import hook), and the one line that says so is printed then.

Import order: ``import numba`` before ``import flashnumba`` is fine (numba.cuda
is a separate module, not yet imported; numba's own config is re-read). When
numba.cuda itself was imported first, its choice is made: flashnumba keeps it
and warns when the machine cannot run it (compiling needs no GPU).
"""

import ctypes
import importlib.abc
import importlib.util
import os
import sys
import warnings

_choice = None  # "gpu" or "sim", fixed by select()
_silent = False  # True: the caller announces the device itself (silence())


def _driver_has_device():
    """True when libcuda loads, initialises and reports at least one device."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            libcuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return False
    if libcuda.cuInit(0) != 0:
        return False
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def _cuda_imported_as_simulator():
    """numba.cuda is already imported: True when it is the simulator."""
    return "numba.cuda.simulator_init" in sys.modules


def _choice_of_imported_cuda(wanted):
    """numba.cuda was imported before flashnumba: keep its choice, or say why we cannot."""
    if _cuda_imported_as_simulator():
        if wanted == "gpu":
            raise RuntimeError(
                "FLASHNUMBA_DEVICE=gpu, but numba was imported earlier with "
                "NUMBA_ENABLE_CUDASIM=1; import flashnumba first or unset it")
        return "sim"
    if wanted == "sim":
        raise RuntimeError(
            "FLASHNUMBA_DEVICE=sim, but numba.cuda was imported before flashnumba "
            "without NUMBA_ENABLE_CUDASIM=1; set that variable or import "
            "flashnumba first")
    if not _driver_has_device():
        # A warning, not an error: compiling for a GPU needs none (the resource check).
        warnings.warn(
            "numba.cuda was imported before flashnumba, without NUMBA_ENABLE_CUDASIM=1, "
            "on a machine with no CUDA GPU: kernels compile but cannot run. Import "
            "flashnumba before numba.cuda (it then chooses the simulator), or set "
            "NUMBA_ENABLE_CUDASIM=1", RuntimeWarning, stacklevel=4)
    return "gpu"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then()`` right after module ``name`` is first imported, once."""

    def __init__(self, name, then):
        self.name, self.then, self.busy = name, then, False

    def find_spec(self, name, path, target=None):
        if name != self.name or self.busy:
            return None
        self.busy = True               # the finders after us may ask sys.meta_path again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, then = spec.loader.exec_module, self.then

        def exec_then(module):
            exec_module(module)
            then()
        spec.loader.exec_module = exec_then
        return spec


def _install_simulator():
    from flashnumba.simulator import install
    install()
    if os.environ.get("FLASHNUMBA_QUIET") != "1" and not _silent:
        print("flashnumba: no CUDA GPU, kernels run on Numba's CUDA simulator "
              "(set FLASHNUMBA_DEVICE=gpu to require one)", file=sys.stderr)


def select():
    """Decide gpu or sim once per process and set up numba accordingly."""
    global _choice
    if _choice is not None:
        return _choice
    wanted = os.environ.get("FLASHNUMBA_DEVICE", "").strip().lower()
    if wanted not in ("", "gpu", "sim"):
        raise ValueError(
            f"FLASHNUMBA_DEVICE={wanted!r}: expected 'gpu', 'sim' or unset (auto)")

    if "numba.cuda" in sys.modules:
        _choice = _choice_of_imported_cuda(wanted)
    elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        if wanted == "gpu" and "numba" in sys.modules:
            raise RuntimeError(
                "FLASHNUMBA_DEVICE=gpu, but numba was imported earlier with "
                "NUMBA_ENABLE_CUDASIM=1; import flashnumba first or unset it")
        _choice = "sim"
    elif wanted == "sim":
        _choice = "sim"
    elif wanted == "gpu":
        if not _driver_has_device():
            raise RuntimeError(
                "FLASHNUMBA_DEVICE=gpu, but no CUDA driver with a device was found")
        _choice = "gpu"
    else:
        _choice = "gpu" if _driver_has_device() else "sim"

    if _choice == "sim":
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        if "numba" in sys.modules:       # numba read its config without the variable
            sys.modules["numba"].config.reload_config()
        if "numba.cuda" in sys.modules:
            _install_simulator()
        else:
            sys.meta_path.insert(0, _AfterImport("numba.cuda", _install_simulator))
    return _choice


def silence():
    """No simulator line on stderr: the caller says where kernels run (or prints only help)."""
    global _silent
    _silent = True


def device():
    """'gpu' or 'sim': where flashnumba's kernels run in this process."""
    return select()


def on_simulator():
    return select() == "sim"
