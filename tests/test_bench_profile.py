"""bench.profile's argument handling (launching needs a GPU): every version with a launcher,
the tensor-core one included, and backward configs in its own head-dim bucket."""

import pytest
from numba import config as numba_config

from flashnumba import registry
from flashnumba.bench import profile


def test_every_version_with_a_launcher_is_a_choice_the_tensor_core_one_too():
    for version in registry.VERSIONS:
        if version.launcher:
            assert profile.parse_args(["--version", version.name]).version == version.name
    assert profile.parse_args(["--version", "fa2_tc"]).version == "fa2_tc"


def test_a_backward_config_takes_its_versions_bucket():
    config = profile.parse_config("16,64,8", 128, registry.version("fa2_tc"))
    assert (config.Br, config.Bc, config.num_warps, config.d_pad) == (16, 64, 8, 128)
    with pytest.raises(SystemExit, match="Br,Bc,warps"):
        profile.parse_config("16,64", 128, registry.version("fa2_tc"))


@pytest.mark.skipif(not numba_config.ENABLE_CUDASIM, reason="a GPU is present: it profiles for real")
def test_it_refuses_the_simulator():
    assert profile.main(["--version", "fa2_tc"]) == 2
