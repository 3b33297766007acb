"""Lesson 14: the largest tiles of the readable FA2 forward kernel that fit shared memory and registers."""

from flashnumba.course.grading import Mismatch, call, grade

ID = "choose_tiles"
LESSON = 14
TITLE = "the largest Br x Bc that fits"
SPEC = ("choose_tiles(d_pad, num_warps) -> (Br, Bc) with Br, Bc in (16, 32, 64, 128) of largest Br*Bc "
        "(ties: larger Br) that fa2_forward accepts for the padded head dim d_pad; None if none does")
NAME = "choose_tiles"
SIZES = (16, 32, 64, 128)


def stub(d_pad, num_warps):
    raise NotImplementedError("FILL ME IN: for every (Br, Bc): Br % num_warps == 0, Bc % 32 == 0, "
                              "shared memory <= 48 KB, register floats <= 128; keep the largest Br*Bc")


def solution(d_pad, num_warps):
    best = None
    for Br in (16, 32, 64, 128):
        for Bc in (16, 32, 64, 128):
            if Br % num_warps or Bc % 32:
                continue                                  # rows per warp, columns per lane: whole
            dims_per_lane = -(-d_pad // 32)
            floats = Br * d_pad + Bc * (d_pad + 1) + Bc * 32 * dims_per_lane + Br * Bc   # Q_i, K_j, V_j, P_ij
            if 4 * floats > 48 * 1024:
                continue                                  # static shared memory per block
            if (Br // num_warps) * (Bc // 32 + dims_per_lane + 3) > 128:
                continue                                  # register arrays per thread: would spill
            if best is None or (Br * Bc, Br) > (best[0] * best[1], best[0]):
                best = (Br, Bc)
    return best


def perturbed(d_pad, num_warps):
    best = None
    for Br in (16, 32, 64, 128):
        for Bc in (16, 32, 64, 128):
            if Br % num_warps or Bc % 32:
                continue
            dims_per_lane = -(-d_pad // 32)
            floats = Br * d_pad + Bc * (d_pad + 1) + Bc * 32 * dims_per_lane + Br * Bc
            if 4 * floats > 48 * 1024:                    # forgot the register limit
                continue
            if best is None or (Br * Bc, Br) > (best[0] * best[1], best[0]):
                best = (Br, Bc)
    return best


def accepted(Br, Bc, d_pad, num_warps):
    """None if fa2_forward.check_config accepts the config, else its reason (the library's own check)."""
    from flashnumba.kernels import fa2_forward
    from flashnumba.kernels.common import ConfigError, TileConfig
    try:
        fa2_forward.check_config(TileConfig(Br=Br, Bc=Bc, d_pad=d_pad, num_warps=num_warps))
    except ConfigError as e:
        return str(e)
    return None


def _best(d_pad, num_warps):
    fits = [(Br * Bc, Br, Bc) for Br in SIZES for Bc in SIZES if accepted(Br, Bc, d_pad, num_warps) is None]
    return max(fits)[1:] if fits else None


# (d_pad, num_warps): d_pad a compile-time head-dim bucket (kernels.common.HEAD_DIM_BUCKETS)
CASES = ((64, 4), (64, 8), (128, 4), (32, 1), (16, 2), (96, 8), (32, 8), (128, 2))


def check(implementation):
    def run():
        for d_pad, num_warps in CASES:
            want = _best(d_pad, num_warps)
            got = call(implementation, d_pad, num_warps)
            if got is not None:
                try:
                    got = tuple(int(x) for x in got)
                except (TypeError, ValueError) as e:
                    raise Mismatch(f"d_pad={d_pad}, num_warps={num_warps}: return (Br, Bc) or None, "
                                   f"got {got!r}") from e
            if got == want:
                continue
            case = f"d_pad={d_pad}, num_warps={num_warps}: choose_tiles = {got}, expected {want}"
            if got is not None and len(got) == 2 and accepted(*got, d_pad, num_warps) is not None:
                raise Mismatch(f"{case}; yours does not fit: {accepted(*got, d_pad, num_warps)}",
                               variable="tiles")
            raise Mismatch(f"{case}, which fits and has Br*Bc = {want[0] * want[1] if want else 0}",
                           variable="tiles")
        return "the largest fitting tiles for every head dim and warp count"
    return grade(ID, run)
