"""Two one-instruction helpers for the fast kernels, with the simulator's Python equivalents.

    exp2_ftz(x)          2^x as the hardware's ex2.approx.ftz.f32: one MUFU.EX2. ``math.exp2``
                         compiles to ex2.approx.f32 without flush-to-zero, which ptxas wraps
                         in a range test and two predicated multiplies (5 instructions in all)
                         so that results below 2^-126 come out as denormals instead of 0.
    is_negative_zero(x)  x is -0.0, read off its bits: one integer compare. Written with
                         floats (x == 0 and copysign(1, x) < 0) it compiles to 4.

What flush-to-zero changes: a probability below 2^-126 (about 1.2e-38) becomes
+0.0. Such a P_ij contributes nothing measurable to any sum of fp32 values, and
+0.0 is not -0.0 (the fast backward's mark for a hidden key), so it keeps IEEE
semantics (0 times NaN is NaN). ex2.approx's own error is at most 2 ulp (PTX ISA,
``ex2``), far inside the 1e-5 the kernels are held to.

On a GPU both are numba intrinsics (LLVM's ``llvm.nvvm.ex2.approx.ftz.f`` and a
bit cast); on the simulator, plain Python with the same results.
"""

import math
import struct

from numba import config as numba_config
from numba import cuda, types

LOG2_E = 1.4426950408889634               # exp(x) = exp2(x log2 e)
LN_2 = 0.6931471805599453                 # log(x) = log2(x) ln 2

SMALLEST_NORMAL = 2.0 ** -126
NEGATIVE_ZERO_BITS = -2 ** 31            # 0x80000000 read as int32


def _exp2_ftz_python(x):
    if x != x:                                       # NaN
        return x
    y = math.exp2(x) if x < 128.0 else math.inf     # math.exp2 raises OverflowError past ~1024
    return 0.0 if y < SMALLEST_NORMAL else y


def _is_negative_zero_python(x):
    return struct.pack("<f", x) == struct.pack("<f", -0.0)


if numba_config.ENABLE_CUDASIM:
    exp2_ftz = cuda.jit(device=True)(_exp2_ftz_python)
    is_negative_zero = cuda.jit(device=True)(_is_negative_zero_python)
else:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    @intrinsic
    def exp2_ftz(typingctx, x):
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.nvvm.ex2.approx.ftz.f")
            return builder.call(fn, args)
        return types.float32(types.float32), codegen

    @intrinsic
    def _float_bits(typingctx, x):
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))
        return types.int32(types.float32), codegen

    @cuda.jit(device=True, inline="always")
    def is_negative_zero(x):
        return _float_bits(x) == NEGATIVE_ZERO_BITS
