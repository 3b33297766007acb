"""Tensor-core instructions for Numba kernels: mma.sync, ldmatrix, cp.async, bf16/f16 packing.

numba-cuda 0.30 has no API for the tensor cores, so each instruction here is a
numba ``@intrinsic`` that emits one inline-PTX statement (PTX ISA 7.0+, sm_80+).
Fragments travel as scalars and tuples, so they stay in registers.

    mma_bf16(a, b, c) -> d        D = A B + C, m16n8k16, A, B bf16, C, D fp32:
    mma_f16(a, b, c) -> d           a: 4 x uint32, b: 2 x uint32, c, d: 4 x float32
    ldmatrix_x4(tile, index)      four 8x8 b16 matrices from shared memory -> 4 x uint32
    ldmatrix_x2(tile, index)      two of them -> 2 x uint32
    ldmatrix_x4_trans, ldmatrix_x2_trans   the same, each matrix transposed
    cp_async_16(dst, dst_index, src, src_index)   16 bytes global -> shared, asynchronous
    cp_async_16_at(dst, dst_index, src, offset)   the same from src's element `offset` (C order)
    cp_async_commit()             close the group of copies issued so far
    cp_async_wait(n)              wait until at most n committed groups are in flight (n a constant)
    red_add_v2(array, index, a, b)   array[index] += a, the next element += b: one 8-byte
                                  atomic add in global memory (sm_90+; index's element 8-byte aligned)
    pack_bf16x2(lo, hi) -> uint32    two float32, rounded to nearest even, in one register
    pack_f16x2(lo, hi) -> uint32       (lo in bits 0-15: the element with the smaller column)
    unpack_bf16x2(x) -> (lo, hi), unpack_f16x2(x) -> (lo, hi)   back to float32

``tile`` and ``dst`` are shared uint16 arrays, ``index`` a tuple naming one
element: ldmatrix and cp.async take that element's shared-memory address
(``_shared_address``: the element pointer cast to address space 3, as a
32-bit integer). It must be 16-byte aligned: declare shared tiles with
``alignment=16`` on the GPU and keep row lengths a multiple of 8 elements.

Fragment layout of m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16";
lane = 4 g + t, so g = lane // 4 names a row and t = lane % 4 a column pair)::

    A (16 x 16, row-major)  a0 = A[g,   2t:2t+2]   a1 = A[g+8, 2t:2t+2]
                            a2 = A[g, 2t+8:2t+10]  a3 = A[g+8, 2t+8:2t+10]
    B (16 x 8, "col")       b0 = B[2t:2t+2, g]     b1 = B[2t+8:2t+10, g]
    C, D (16 x 8, fp32)     c0, c1 = C[g, 2t], C[g, 2t+1]    c2, c3 = C[g+8, 2t], C[g+8, 2t+1]

ldmatrix: lanes 8m .. 8m+7 give the addresses of the 8 rows of matrix m
(x2: lanes 0-15, x4: all 32); register m of lane 4g + t then holds row g,
elements 2t, 2t+1 of matrix m, or with .trans those of its transpose
(elements [2t][g], [2t+1][g]). So an 8x8 block of a row-major K_j, loaded
plainly, is a B fragment of Q K^T; one of V_j loaded with .trans is a B
fragment of P V.

On the simulator each instruction is a Python function meeting the other
lanes of its warp at the rendezvous of ``flashnumba.simulator.warp``: every
lane leaves its part, the last to arrive rebuilds the matrices from the
layout above (inputs read as bf16/f16 with ml_dtypes, products summed in
float32), and hands each lane its part. cp.async copies are held per thread
and land in shared memory at the ``cp_async_wait`` that covers their group,
as late as the hardware may land them, so a missing wait shows. The
stand-ins and the kernels share one reading of the layout: only a GPU run
proves that reading is the hardware's (tests/test_mma.py runs there too).
"""

import threading

import ml_dtypes
import numpy as np
from numba import config as numba_config
from numba import cuda, types

WARP_SIZE = 32
from flashnumba.kernels.hardware import FULL_MASK  # noqa: E402

A_TYPE = types.UniTuple(types.uint32, 4)
B_TYPE = types.UniTuple(types.uint32, 2)
C_TYPE = types.UniTuple(types.float32, 4)

_HALF = {"bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16)}


# ---------------------------------------------------------------------------
# The fragment layout, as functions of the lane (used by the stand-ins, tests and figures)
# ---------------------------------------------------------------------------

def a_elements(lane):
    """[(row, col) of A's two 16-bit halves (lo, hi)] for registers a0..a3 of `lane`."""
    g, t = divmod(lane, 4)
    return [((g, 2 * t), (g, 2 * t + 1)), ((g + 8, 2 * t), (g + 8, 2 * t + 1)),
            ((g, 2 * t + 8), (g, 2 * t + 9)), ((g + 8, 2 * t + 8), (g + 8, 2 * t + 9))]


def b_elements(lane):
    """[(row, col) of B's two halves (lo, hi)] for registers b0, b1 of `lane` (B is 16 x 8)."""
    g, t = divmod(lane, 4)
    return [((2 * t, g), (2 * t + 1, g)), ((2 * t + 8, g), (2 * t + 9, g))]


def c_elements(lane):
    """[(row, col)] of C/D for c0..c3 of `lane` (C is 16 x 8, fp32)."""
    g, t = divmod(lane, 4)
    return [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]


# ---------------------------------------------------------------------------
# Simulator stand-ins
# ---------------------------------------------------------------------------

def _halves_to_float(bits, kind):
    """uint32 registers -> (lo, hi) float32 values of their two 16-bit halves."""
    bits = np.asarray(bits, dtype=np.uint32)
    lo = (bits & 0xFFFF).astype(np.uint16).view(_HALF[kind]).astype(np.float32)
    hi = (bits >> 16).astype(np.uint16).view(_HALF[kind]).astype(np.float32)
    return lo, hi


def _pack_python(lo, hi, kind):
    """Two float32 rounded to nearest even (cvt.rn) and packed, lo in bits 0-15."""
    lo16 = int(np.array(np.float32(lo)).astype(_HALF[kind]).view(np.uint16))
    hi16 = int(np.array(np.float32(hi)).astype(_HALF[kind]).view(np.uint16))
    return np.uint32(lo16 | hi16 << 16)


def _unpack_python(x, kind):
    lo, hi = _halves_to_float(x, kind)
    return np.float32(lo), np.float32(hi)


def _this_lane(op):
    thread = threading.current_thread()
    if getattr(thread, "warp", None) is None:
        raise RuntimeError(f"{op} called outside a kernel running on the simulator")
    return thread


def _rebuild(meeting, kind):
    """A (16 x 16), B (16 x 8) as float32 and C (16 x 8) from the 32 lanes' fragments."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    C = np.zeros((16, 8), np.float32)
    for lane in range(WARP_SIZE):
        a, b, c = meeting.values[lane]
        lo, hi = _halves_to_float(a, kind)
        for reg, ((r0, c0), (r1, c1)) in enumerate(a_elements(lane)):
            A[r0, c0], A[r1, c1] = lo[reg], hi[reg]
        lo, hi = _halves_to_float(b, kind)
        for reg, ((r0, c0), (r1, c1)) in enumerate(b_elements(lane)):
            B[r0, c0], B[r1, c1] = lo[reg], hi[reg]
        for reg, (r, col) in enumerate(c_elements(lane)):
            C[r, col] = np.float32(c[reg])
    return A, B, C


def _mma_rule(kind):
    def combine(meeting):
        if meeting.members != FULL_MASK:
            raise RuntimeError(f"mma.sync needs all 32 lanes of the warp, got mask {meeting.members:#x}")
        A, B, C = _rebuild(meeting, kind)
        D = (A.astype(np.float64) @ B.astype(np.float64)).astype(np.float32) + C   # fp32 accumulate
        return [tuple(np.float32(D[r, col]) for r, col in c_elements(lane))
                for lane in range(WARP_SIZE)]
    return combine


_MMA_BF16 = _mma_rule("bf16")
_MMA_F16 = _mma_rule("f16")


def _mma_python(a, b, c, rule, op):
    thread = _this_lane(op)
    if len(a) != 4 or len(b) != 2 or len(c) != 4:
        raise TypeError(f"{op}: expected a (4 x uint32), b (2 x uint32), c (4 x float32)")
    return thread.warp.meet(thread, op, FULL_MASK, (tuple(a), tuple(b), tuple(c)), None, rule)


def _index(index):
    """An index as a tuple of ints (an integer indexes a 1-D array)."""
    if isinstance(index, (int, np.integer)):
        return (int(index),)
    return tuple(int(i) for i in index)


def _flat_offset(array, index):
    """Element offset of array[index] from the array's start (C order)."""
    return int(np.ravel_multi_index(_index(index), array.shape))


def _row_of_8(array, index, op):
    """The 8 uint16 elements starting at array[index] (along the last axis), 16-byte aligned."""
    index = _index(index)
    if array.dtype != np.uint16:
        raise TypeError(f"{op}: expected a uint16 shared array, got {array.dtype}")
    if _flat_offset(array, index) % 8:
        raise ValueError(f"{op}: element {index} of a {array.shape} array is not 16-byte aligned")
    *lead, col = index
    return np.asarray(array[tuple(lead)][col:col + 8], dtype=np.uint16)


def _ldmatrix_rule(count, trans, op):
    def combine(meeting):
        if meeting.members != FULL_MASK:
            raise RuntimeError(f"{op} needs all 32 lanes of the warp, got mask {meeting.members:#x}")
        out = [[None] * count for _ in range(WARP_SIZE)]
        for m in range(count):
            M = np.stack([_row_of_8(meeting.values[8 * m + r], meeting.args[8 * m + r], op)
                          for r in range(8)])                   # rows given by lanes 8m .. 8m+7
            if trans:
                M = M.T
            for lane in range(WARP_SIZE):
                g, t = divmod(lane, 4)
                out[lane][m] = np.uint32(int(M[g, 2 * t]) | int(M[g, 2 * t + 1]) << 16)
        return [tuple(regs) for regs in out]
    return combine


_LDMATRIX = {(count, trans): _ldmatrix_rule(count, trans, f"ldmatrix.x{count}{'.trans' if trans else ''}")
             for count in (2, 4) for trans in (False, True)}


def _ldmatrix_python(tile, index, count, trans):
    op = f"ldmatrix.x{count}{'.trans' if trans else ''}"
    thread = _this_lane(op)
    return thread.warp.meet(thread, op, FULL_MASK, tile, _index(index), _LDMATRIX[count, trans])


def _pending(thread):
    """This thread's cp.async state: copies not yet committed, and committed groups, oldest first."""
    state = getattr(thread, "cp_async", None)
    if state is None:
        state = thread.cp_async = {"open": [], "groups": []}
    return state


def _cp_async_16_python(dst, dst_index, src, src_index):
    thread = _this_lane("cp.async")
    if dst.dtype != np.uint16:
        raise TypeError(f"cp.async: expected a uint16 shared array, got {dst.dtype}")
    if _flat_offset(dst, dst_index) % 8:
        raise ValueError(f"cp.async: shared element {_index(dst_index)} is not 16-byte aligned")
    *lead, col = _index(src_index)
    values = np.array([src[(*lead, col + e)] for e in range(8)], dtype=np.uint16)  # read now
    _pending(thread)["open"].append((dst, _index(dst_index), values))


def _cp_async_16_at_python(dst, dst_index, src, offset):
    index = np.unravel_index(int(offset), src.shape)     # the C-order element at that offset
    _cp_async_16_python(dst, dst_index, src, tuple(int(i) for i in index))


def _red_add_v2_python(array, index, a, b):
    _this_lane("red.global.add.v2")
    if array.dtype != np.float32:
        raise TypeError(f"red.global.add.v2.f32: expected a float32 array, got {array.dtype}")
    if _flat_offset(array, index) % 2:
        raise ValueError(f"red.global.add.v2.f32: element {_index(index)} is not 8-byte aligned")
    *lead, col = _index(index)
    cuda.atomic.add(array, (*lead, col), a)
    cuda.atomic.add(array, (*lead, col + 1), b)


def _cp_async_commit_python():
    state = _pending(_this_lane("cp.async.commit_group"))
    state["groups"].append(state["open"])
    state["open"] = []


def _cp_async_wait_python(n):
    state = _pending(_this_lane("cp.async.wait_group"))
    while len(state["groups"]) > n:
        for dst, index, values in state["groups"].pop(0):      # land in shared memory only now
            *lead, col = index
            dst[tuple(lead)][col:col + 8] = values


if numba_config.ENABLE_CUDASIM:
    def mma_bf16(a, b, c):
        return _mma_python(a, b, c, _MMA_BF16, "mma.sync.bf16")

    def mma_f16(a, b, c):
        return _mma_python(a, b, c, _MMA_F16, "mma.sync.f16")

    def ldmatrix_x4(tile, index):
        return _ldmatrix_python(tile, index, 4, False)

    def ldmatrix_x2(tile, index):
        return _ldmatrix_python(tile, index, 2, False)

    def ldmatrix_x4_trans(tile, index):
        return _ldmatrix_python(tile, index, 4, True)

    def ldmatrix_x2_trans(tile, index):
        return _ldmatrix_python(tile, index, 2, True)

    def pack_bf16x2(lo, hi):
        return _pack_python(lo, hi, "bf16")

    def pack_f16x2(lo, hi):
        return _pack_python(lo, hi, "f16")

    def unpack_bf16x2(x):
        return _unpack_python(x, "bf16")

    def unpack_f16x2(x):
        return _unpack_python(x, "f16")

    cp_async_16 = _cp_async_16_python
    cp_async_16_at = _cp_async_16_at_python
    cp_async_commit = _cp_async_commit_python
    cp_async_wait = _cp_async_wait_python
    red_add_v2 = _red_add_v2_python

    # The kernels call these as device functions; on the simulator a device function is the
    # Python function itself, run by the calling simulated thread.
    (mma_bf16, mma_f16, ldmatrix_x4, ldmatrix_x2, ldmatrix_x4_trans, ldmatrix_x2_trans,
     pack_bf16x2, pack_f16x2, unpack_bf16x2, unpack_f16x2, cp_async_16, cp_async_16_at,
     cp_async_commit, cp_async_wait, red_add_v2) = (cuda.jit(device=True)(f) for f in (
        mma_bf16, mma_f16, ldmatrix_x4, ldmatrix_x2, ldmatrix_x4_trans, ldmatrix_x2_trans,
        pack_bf16x2, pack_f16x2, unpack_bf16x2, unpack_f16x2, cp_async_16, cp_async_16_at,
        cp_async_commit, cp_async_wait, red_add_v2))
else:
    from llvmlite import ir
    from numba.cuda import cgutils
    from numba.cuda.api_util import normalize_indices
    from numba.cuda.extending import intrinsic

    _I32 = ir.IntType(32)
    _F32 = ir.FloatType()

    def _element_pointer(context, builder, array_type, array, index_type, index):
        """Generic pointer to array[index] (index an integer or a tuple of integers)."""
        index_type, indices = normalize_indices(context, builder, index_type, index, array_type,
                                                array_type.dtype)
        struct = context.make_array(array_type)(context, builder, value=array)
        return cgutils.get_item_pointer(context, builder, array_type, struct, indices)

    def _shared_address(context, builder, array_type, array, index_type, index):
        """array[index]'s shared-memory address as a 32-bit integer (what ldmatrix and cp.async
        read): the generic element pointer cast to address space 3 (shared), then to an integer."""
        pointer = _element_pointer(context, builder, array_type, array, index_type, index)
        shared = builder.addrspacecast(pointer, pointer.type.pointee.as_pointer(3))
        return builder.ptrtoint(shared, _I32)

    def _global_address(context, builder, array_type, array, index_type, index):
        pointer = _element_pointer(context, builder, array_type, array, index_type, index)
        global_ = builder.addrspacecast(pointer, pointer.type.pointee.as_pointer(1))
        return builder.ptrtoint(global_, ir.IntType(64))

    def _is_index(index, ndim):
        if isinstance(index, types.Integer):
            return ndim == 1
        return (isinstance(index, types.BaseTuple) and len(index) == ndim
                and all(isinstance(i, types.Integer) for i in index))

    def _is_b16_array(array):
        return isinstance(array, types.Array) and array.dtype == types.uint16

    def _tuple(context, builder, tuple_type, values):
        return context.make_tuple(builder, tuple_type, values)

    def _mma(kind):
        ptx = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

        def typer(typingctx, a, b, c):
            if a != A_TYPE or b != B_TYPE or c != C_TYPE:
                return None
            sig = C_TYPE(A_TYPE, B_TYPE, C_TYPE)

            def codegen(context, builder, sig, args):
                a, b, c = args
                operands = ([builder.extract_value(a, i) for i in range(4)]
                            + [builder.extract_value(b, i) for i in range(2)]
                            + [builder.extract_value(c, i) for i in range(4)])
                fnty = ir.FunctionType(ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4)
                asm = ir.InlineAsm(fnty, ptx, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
                d = builder.call(asm, operands)
                return _tuple(context, builder, C_TYPE, [builder.extract_value(d, i) for i in range(4)])
            return sig, codegen
        return intrinsic(typer)

    mma_bf16 = _mma("bf16")
    mma_f16 = _mma("f16")

    def _ldmatrix(count, trans):
        ptx = (f"ldmatrix.sync.aligned.m8n8.x{count}{'.trans' if trans else ''}.shared.b16 "
               "{" + ",".join(f"${i}" for i in range(count)) + "}, " + f"[${count}];")
        constraints = ",".join(["=r"] * count + ["r"])
        out_type = types.UniTuple(types.uint32, count)

        def typer(typingctx, tile, index):
            if not _is_b16_array(tile) or not _is_index(index, tile.ndim):
                return None
            sig = out_type(tile, index)

            def codegen(context, builder, sig, args):
                address = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
                fnty = ir.FunctionType(ir.LiteralStructType([_I32] * count), [_I32])
                # side_effect: it reads shared memory, so it must stay after the barrier before it
                asm = ir.InlineAsm(fnty, ptx, constraints, side_effect=True)
                regs = builder.call(asm, [address])
                return _tuple(context, builder, out_type,
                              [builder.extract_value(regs, i) for i in range(count)])
            return sig, codegen
        return intrinsic(typer)

    ldmatrix_x4 = _ldmatrix(4, False)
    ldmatrix_x2 = _ldmatrix(2, False)
    ldmatrix_x4_trans = _ldmatrix(4, True)
    ldmatrix_x2_trans = _ldmatrix(2, True)

    def _emit_cp_async_16(context, builder, shared, global_):
        """cp.async of 16 bytes from a global address (64-bit) to a shared one (32-bit)."""
        fnty = ir.FunctionType(ir.VoidType(), [_I32, ir.IntType(64)])
        asm = ir.InlineAsm(fnty, "cp.async.cg.shared.global [$0], [$1], 16;", "r,l,~{memory}",
                           side_effect=True)
        builder.call(asm, [shared, global_])
        return context.get_dummy_value()

    @intrinsic
    def cp_async_16(typingctx, dst, dst_index, src, src_index):
        if not (_is_b16_array(dst) and _is_index(dst_index, dst.ndim)
                and _is_b16_array(src) and _is_index(src_index, src.ndim)):
            return None
        sig = types.void(dst, dst_index, src, src_index)

        def codegen(context, builder, sig, args):
            shared = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            global_ = _global_address(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            return _emit_cp_async_16(context, builder, shared, global_)
        return sig, codegen

    def _global_address_at(context, builder, array_type, array, offset_type, offset):
        """The global address of the element `offset` elements past the array's first (C order)."""
        struct = context.make_array(array_type)(context, builder, value=array)
        offset = context.cast(builder, offset, offset_type, types.intp)
        pointer = builder.gep(struct.data, [offset])
        global_ = builder.addrspacecast(pointer, pointer.type.pointee.as_pointer(1))
        return builder.ptrtoint(global_, ir.IntType(64))

    @intrinsic
    def cp_async_16_at(typingctx, dst, dst_index, src, offset):
        if not (_is_b16_array(dst) and _is_index(dst_index, dst.ndim) and _is_b16_array(src)
                and src.layout == "C" and isinstance(offset, types.Integer)):
            return None
        sig = types.void(dst, dst_index, src, offset)

        def codegen(context, builder, sig, args):
            shared = _shared_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            global_ = _global_address_at(context, builder, sig.args[2], args[2], sig.args[3], args[3])
            return _emit_cp_async_16(context, builder, shared, global_)
        return sig, codegen

    @intrinsic
    def red_add_v2(typingctx, array, index, a, b):
        if not (isinstance(array, types.Array) and array.dtype == types.float32
                and _is_index(index, array.ndim) and a == types.float32 and b == types.float32):
            return None
        sig = types.void(array, index, a, b)

        def codegen(context, builder, sig, args):
            address = _global_address(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64), _F32, _F32])
            asm = ir.InlineAsm(fnty, "red.global.add.v2.f32 [$0], {$1, $2};", "l,f,f,~{memory}",
                               side_effect=True)
            builder.call(asm, [address, args[2], args[3]])
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def cp_async_commit(typingctx):
        sig = types.void()

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "cp.async.commit_group;",
                               "~{memory}", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()
        return sig, codegen

    @intrinsic
    def cp_async_wait(typingctx, n):
        if not isinstance(n, types.IntegerLiteral):
            return None                             # wait_group takes a compile-time constant
        N = int(n.literal_value)
        sig = types.void(n)

        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), f"cp.async.wait_group {N};",
                               "~{memory}", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()
        return sig, codegen

    def _pack(kind):
        ptx = f"cvt.rn.{kind}x2.f32 $0, $1, $2;"      # $1 goes to the upper half

        def typer(typingctx, lo, hi):
            if lo != types.float32 or hi != types.float32:
                return None
            sig = types.uint32(types.float32, types.float32)

            def codegen(context, builder, sig, args):
                lo, hi = args
                asm = ir.InlineAsm(ir.FunctionType(_I32, [_F32, _F32]), ptx, "=r,f,f")
                return builder.call(asm, [hi, lo])
            return sig, codegen
        return intrinsic(typer)

    pack_bf16x2 = _pack("bf16")
    pack_f16x2 = _pack("f16")

    def _unpack(kind):
        pair_type = types.UniTuple(types.float32, 2)

        def typer(typingctx, x):
            if x != types.uint32:
                return None
            sig = pair_type(types.uint32)

            def codegen(context, builder, sig, args):
                (x,) = args
                lo16 = builder.trunc(x, ir.IntType(16))
                hi16 = builder.trunc(builder.lshr(x, ir.Constant(_I32, 16)), ir.IntType(16))
                if kind == "bf16":        # a bf16 is the upper half of the float32 of its value
                    lo = builder.bitcast(builder.shl(builder.zext(lo16, _I32), ir.Constant(_I32, 16)), _F32)
                    hi = builder.bitcast(builder.shl(builder.zext(hi16, _I32), ir.Constant(_I32, 16)), _F32)
                else:
                    lo = builder.fpext(builder.bitcast(lo16, ir.HalfType()), _F32)
                    hi = builder.fpext(builder.bitcast(hi16, ir.HalfType()), _F32)
                return _tuple(context, builder, pair_type, [lo, hi])
            return sig, codegen
        return intrinsic(typer)

    unpack_bf16x2 = _unpack("bf16")
    unpack_f16x2 = _unpack("f16")
