"""The GPU's numbers that bound a kernel's tiles, and the warp-wide constants: one home for all kernels.

sm_80 (A100) and sm_90 (H100/H200) share every number here but the shared
memory per SM, which is sm_90's (sm_80 has 163 KB): a configuration that fits
sm_90 is also checked for sm_80 by ``flashnumba resources``.
"""

WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF                   # every lane of the warp takes part in a shuffle or vote
STATIC_SMEM_LIMIT = 48 * 1024            # bytes of static shared memory per block
SM_SHARED_BYTES = 227 * 1024             # usable shared memory per SM on sm_90 (sm_80: 163 KB)
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_REGISTER_TILE = 128                  # floats per thread in register arrays; more would spill
FLOAT_BYTES = 4
