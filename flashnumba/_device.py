"""Choose where kernels run: the GPU when there is one, Numba's CUDA simulator when not.

The choice must be made before numba is first imported, because numba reads
NUMBA_ENABLE_CUDASIM once, at import. ``import flashnumba`` calls ``select()``
first thing. ``FLASHNUMBA_DEVICE=gpu|sim`` overrides the detection.

We look for a GPU through the CUDA driver (libcuda) with ctypes, so that the
detection itself never imports numba.
"""

import ctypes
import os
import sys

_choice = None  # "gpu" or "sim", fixed by select()


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


def select():
    """Decide gpu or sim once per process and set up numba accordingly."""
    global _choice
    if _choice is not None:
        return _choice
    wanted = os.environ.get("FLASHNUMBA_DEVICE", "").strip().lower()
    if wanted not in ("", "gpu", "sim"):
        raise ValueError(
            f"FLASHNUMBA_DEVICE={wanted!r}: expected 'gpu', 'sim' or unset (auto)")

    if "numba" in sys.modules:
        # numba was imported before us: its choice is already made, respect it.
        from numba import config
        already_sim = bool(config.ENABLE_CUDASIM)
        if wanted == "gpu" and already_sim:
            raise RuntimeError(
                "FLASHNUMBA_DEVICE=gpu, but numba was imported earlier with "
                "NUMBA_ENABLE_CUDASIM=1; import flashnumba first or unset it")
        if wanted == "sim" and not already_sim:
            raise RuntimeError(
                "FLASHNUMBA_DEVICE=sim, but numba was imported before flashnumba "
                "without NUMBA_ENABLE_CUDASIM=1; set that variable or import "
                "flashnumba first")
        _choice = "sim" if already_sim else "gpu"
    elif wanted == "sim" or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
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
        from flashnumba.simulator import install
        install()
        if os.environ.get("FLASHNUMBA_QUIET") != "1":
            print("flashnumba: no CUDA GPU, kernels run on Numba's CUDA simulator "
                  "(set FLASHNUMBA_DEVICE=gpu to require one)", file=sys.stderr)
    return _choice


def device():
    """'gpu' or 'sim': where flashnumba's kernels run in this process."""
    return select()


def on_simulator():
    return select() == "sim"
