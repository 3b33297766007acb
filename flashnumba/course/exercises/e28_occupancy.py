"""Lesson 14: how many thread blocks of a kernel fit on one SM at once (its occupancy)."""

from flashnumba.course.grading import Mismatch, call, grade

ID = "occupancy"
LESSON = 14
TITLE = "blocks per SM from shared memory, registers and threads"
SPEC = ("blocks_per_sm(smem, registers, threads) -> int: resident blocks per sm_90 SM for a kernel "
        "with smem bytes of shared memory per block, registers per thread, threads per block")
NAME = "blocks_per_sm"


def stub(smem, registers, threads):
    raise NotImplementedError("FILL ME IN: the smallest of the shared-memory, register, thread and "
                              "block-count limits (round smem to 128 B + 1 KB, registers to 256 per warp)")


def solution(smem, registers, threads):
    from flashnumba.kernels.hardware import REGISTERS_PER_SM, SM_SHARED_BYTES, WARP_SIZE
    MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 2048, 32
    SMEM_UNIT, SMEM_RESERVED = 128, 1024            # bytes: allocation unit, reserved per block
    REGISTER_UNIT = 256                             # registers are allocated per warp, 256 at a time
    warps = -(-threads // WARP_SIZE)
    by_smem = SM_SHARED_BYTES // (-(-smem // SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED)
    per_warp = -(-registers * WARP_SIZE // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_threads = MAX_THREADS_PER_SM // (warps * WARP_SIZE)
    return min(by_smem, by_registers, by_threads, MAX_BLOCKS_PER_SM)


def perturbed(smem, registers, threads):
    from flashnumba.kernels.hardware import REGISTERS_PER_SM, SM_SHARED_BYTES, WARP_SIZE
    MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 2048, 32
    warps = -(-threads // WARP_SIZE)
    by_smem = SM_SHARED_BYTES // (-(-smem // 128) * 128 + 1024)
    by_registers = REGISTERS_PER_SM // (registers * warps * WARP_SIZE)   # no allocation granularity
    by_threads = MAX_THREADS_PER_SM // (warps * WARP_SIZE)
    return min(by_smem, by_registers, by_threads, MAX_BLOCKS_PER_SM)


def _limits(smem, registers, threads):
    """Each limit on its own, for the message."""
    from flashnumba.kernels.hardware import REGISTERS_PER_SM, SM_SHARED_BYTES
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    return {"shared memory": SM_SHARED_BYTES // (-(-smem // 128) * 128 + 1024),
            "registers": (REGISTERS_PER_SM // per_warp) // warps,
            "threads": 2048 // (warps * 32), "the 32-block cap": 32}


def _cases():
    from flashnumba.course import tile_report
    cases = [(row["smem"], row["registers"], 32 * row["num_warps"],
              (f"fa2_forward Br={row['Br']} Bc={row['Bc']} d_pad={row['d_pad']} w={row['num_warps']} "
               f"(ptxas: {row['registers']} registers, {row['smem']} B)"))
             for row in tile_report.load()["rows"]]
    cases += [(0, 16, 32, "a tiny kernel: 1 warp, 16 registers, no shared memory"),
              (48 * 1024, 64, 128, "48 KB of shared memory, 4 warps of 64 registers"),
              (1000, 100, 128, "100 registers a thread (not a multiple of 8)"),
              (2000, 40, 96, "3 warps of 40 registers, 2000 B (not a multiple of 128)"),
              (24708, 32, 64, "24708 B of shared memory (rounds up to 24832)"),
              (0, 16, 512, "16 warps of 16 registers, no shared memory"),
              (16384, 255, 1024, "1024 threads of 255 registers"),
              (100 * 1024, 32, 256, "100 KB of (dynamic) shared memory")]
    return cases


def check(implementation):
    def run():
        for smem, registers, threads, case in _cases():
            want = solution(smem, registers, threads)
            got = call(implementation, smem, registers, threads)
            if not isinstance(got, int) or isinstance(got, bool):
                try:
                    if got != int(got):
                        raise ValueError
                    got = int(got)
                except (TypeError, ValueError) as e:
                    raise Mismatch(f"{case}: return a whole number of blocks, got {got!r}") from e
            if got != want:
                limits = ", ".join(f"{k} allow {v}" for k, v in _limits(smem, registers, threads).items())
                raise Mismatch(f"{case}: blocks_per_sm({smem}, {registers}, {threads}) = {got}, "
                               f"expected {want} ({limits})", variable="blocks")
        return "every kernel's blocks per SM match, the compiler's real register counts included"
    return grade(ID, run)
