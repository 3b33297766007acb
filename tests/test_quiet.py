"""flashnumba's own launches are configured with Numba's low-occupancy warning off; the user's are not."""

import numpy as np
from numba import cuda
from numba.cuda.core import config

import flashnumba
from flashnumba import registry
from flashnumba.kernels import quiet


def test_launches_switches_the_warning_off_and_restores_it():
    before = config.CUDA_LOW_OCCUPANCY_WARNINGS
    with quiet.launches():
        assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 0
        with quiet.launches():
            pass
        assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 0
    assert config.CUDA_LOW_OCCUPANCY_WARNINGS == before


def test_public_calls_launch_their_kernels_quietly(monkeypatch):
    seen = []

    def forward(Q, K, V, **options):          # stands in for the kernels: records the setting
        seen.append(config.CUDA_LOW_OCCUPANCY_WARNINGS)
        B, N, H, d = Q.shape
        return (cuda.to_device(np.zeros((B, N, H, d), np.float32)),
                cuda.to_device(np.zeros((B, H, N), np.float32)))

    module = registry.version(registry.DEFAULT).module(registry.FORWARD)
    monkeypatch.setattr(module, "forward", forward)
    monkeypatch.setattr(config, "CUDA_LOW_OCCUPANCY_WARNINGS", 1)
    q = np.ones((1, 8, 8, 16), np.float32)
    flashnumba.flash_attn_func(q, q, q)
    flashnumba.scaled_dot_product_attention(q, q, q)
    assert seen == [0, 0]
    assert config.CUDA_LOW_OCCUPANCY_WARNINGS == 1      # the user's launches still warn
