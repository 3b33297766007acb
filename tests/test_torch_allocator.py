"""With torch CUDA tensors, numba's device memory comes from torch's caching allocator."""

import os
import subprocess
import sys

import pytest

import flashnumba

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=False, timeout=300)


def test_switched_off_by_the_environment():
    r = _run("from flashnumba import torch_allocator; print(torch_allocator.install())",
             FLASHNUMBA_TORCH_ALLOCATOR="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.skipif(flashnumba.on_simulator(), reason="torch CUDA tensors need a GPU")
def test_a_torch_call_allocates_from_torch():
    r = _run("import torch, flashnumba\n"
             "from numba.cuda.cudadrv import driver\n"
             "q = torch.randn(2, 128, 4, 64, device='cuda')\n"
             "before = torch.cuda.memory_allocated()\n"
             "out = flashnumba.flash_attn_func(q, q, q, causal=True)\n"
             "ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3, "
             "is_causal=True).transpose(1, 2)\n"
             "print(driver._memory_manager.__name__, torch.cuda.memory_allocated() - before >= "
             "out.numel() * 4, float((out - ref).abs().max()) < 1e-4)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["TorchMemoryManager", "True", "True"]


@pytest.mark.skipif(flashnumba.on_simulator(), reason="torch CUDA tensors need a GPU")
def test_a_view_keeps_its_block_after_the_array_it_came_from_is_gone():
    # numba's views hold only weak references to the base allocation: the plugin must keep
    # it alive while any view lives, as numba's own manager does
    r = _run("import gc, numpy as np, torch, flashnumba\n"
             "from flashnumba import torch_allocator\n"
             "from numba import cuda\n"
             "assert torch_allocator.install()\n"
             "base = cuda.to_device(np.arange(4096, dtype=np.float32))\n"
             "view = base[:2048].reshape(64, 32)\n"
             "del base\n"
             "gc.collect()\n"
             "others = [cuda.to_device(np.full(4096, -1, np.float32)) for _ in range(8)]\n"
             "print(np.array_equal(view.copy_to_host().ravel(), np.arange(2048)))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
