"""Arrays in, arrays of the same kind out: NumPy (ml_dtypes bfloat16 too, and non-contiguous views)
and Numba device arrays. PyTorch, CuPy and other __cuda_array_interface__ objects: test_interop_torch.py."""

import ml_dtypes
import numpy as np
import pytest
from conftest import rel_err
from numba import cuda

import flashnumba
from flashnumba import reference
from flashnumba.tools import emulation

TOL = 1e-5
gpu_only = pytest.mark.skipif(flashnumba.on_simulator(),
                              reason="device memory is shared with frameworks only on a GPU")


def make(rng, B=1, Nq=19, Nk=23, Hq=2, Hkv=1, d=16):
    return (rng.standard_normal((B, Nq, Hq, d)).astype(np.float32),
            rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32),
            rng.standard_normal((B, Nk, Hkv, d)).astype(np.float32))


def test_non_contiguous_numpy_inputs_are_read_right(rng):
    q, k, v = make(rng)
    views = [np.asfortranarray(x) for x in (q, k, v)]
    assert not views[0].flags.c_contiguous
    out = flashnumba.flash_attn_func(*views, causal=True)
    assert rel_err(out, reference.attention(q, k, v, causal=True)[0]) <= TOL


def test_numba_device_arrays_in_device_arrays_out(rng):
    q, k, v = make(rng)
    out, lse, _ = flashnumba.flash_attn_func(*(cuda.to_device(x) for x in (q, k, v)), causal=True,
                                             return_attn_probs=True)
    assert not isinstance(out, np.ndarray) and hasattr(out, "copy_to_host")
    out_ref, lse_ref = reference.attention(q, k, v, causal=True)
    assert rel_err(out.copy_to_host(), out_ref) <= TOL
    assert rel_err(lse.copy_to_host(), lse_ref) <= TOL


def test_strided_device_slices_of_a_packed_array(rng):
    qkv = rng.standard_normal((1, 21, 3, 2, 16)).astype(np.float32)
    out = flashnumba.flash_attn_qkvpacked_func(cuda.to_device(qkv), causal=True)
    ref = reference.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)[0]
    assert rel_err(out.copy_to_host(), ref) <= TOL


def test_bfloat16_numpy_through_ml_dtypes(rng):
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in make(rng))
    out = flashnumba.flash_attn_func(q, k, v)
    assert out.dtype == ml_dtypes.bfloat16
    ref = reference.attention(*(x.astype(np.float64) for x in (q, k, v)))[0]
    low = emulation.attention_in_dtype(*(x.astype(np.float64) for x in (q, k, v)), "bfloat16")
    assert np.abs(out.astype(np.float64) - ref).max() <= 2 * np.abs(low - ref).max()


def test_host_arrays_reach_the_device_with_fresh_strides():
    # NumPy calls a[:, 3:4][None] contiguous whatever the strides of its length-1 axes; numba's
    # device arrays do not, and the varlen calls' one-row lse slices failed on a GPU that way
    from flashnumba.interop import c_order
    a = np.zeros((2, 8), np.float32)
    odd = np.ascontiguousarray(a[:, 3:4])[None]
    assert odd.flags.c_contiguous and odd.strides != (8, 4, 4)
    assert c_order(odd).strides == (8, 4, 4) and np.array_equal(c_order(odd), odd)
    assert c_order(a) is a


@pytest.mark.skipif(flashnumba.on_simulator(), reason="asks the CUDA driver: a GPU only")
def test_current_device_id_is_numbas_in_every_thread():
    """interop.current_device_id asks the driver for the current context's device: the id Numba's
    own query gives, on the main thread and on a fresh thread (where no context is current yet,
    so Numba makes one)."""
    import threading

    from flashnumba.interop import current_device_id
    from flashnumba.validate import compute_capability
    assert current_device_id() == cuda.get_current_device().id
    assert compute_capability() == tuple(cuda.get_current_device().compute_capability)
    seen = []
    worker = threading.Thread(target=lambda: seen.append((current_device_id(), cuda.get_current_device().id)))
    worker.start()
    worker.join()
    assert seen and seen[0][0] == seen[0][1]
