"""Warp intrinsics and barriers: the same kernels must give the same results on simulator and GPU.

The first part launches small kernels and compares with results worked out by
hand or with NumPy; it runs wherever flashnumba runs kernels. The second part
(marked ``sim_only``) tests what only the simulator can do: poison values
for undefined reads, clear errors instead of hangs, and the patch itself.
"""

import threading

import numpy as np
import pytest
from numba import cuda, float32, int32  # conftest.py imported flashnumba first

import flashnumba
from flashnumba.simulator.errors import DeadlockError, WarpDivergenceError

FULL = 0xFFFFFFFF
ON_SIM = flashnumba.device() == "sim"
sim_only = pytest.mark.skipif(not ON_SIM, reason="tests the simulator's internals")


def lane_values(n, scale=10.0, offset=0.5):
    """float32 values that identify their lane: 10*i + 0.5."""
    return (scale * np.arange(n) + offset).astype(np.float32)


# -- shuffles ----------------------------------------------------------------

@cuda.jit
def shfl_idx_kernel(out, src_shift):
    i = cuda.threadIdx.x
    v = float32(10 * i + 0.5)
    # read lane (i + src_shift); src_lane past 31 wraps: src_lane % 32
    out[i] = cuda.shfl_sync(FULL, v, i % 32 + src_shift)


@pytest.mark.parametrize("src_shift", [0, 3, 32, 37])
def test_shfl_sync_reads_src_lane_mod_32(src_shift):
    out = np.zeros(64, np.float32)
    shfl_idx_kernel[1, 64](out, src_shift)
    v = lane_values(64)
    for t in range(64):
        warp, lane = divmod(t, 32)
        assert out[t] == v[32 * warp + (lane + src_shift) % 32], t


@cuda.jit
def shfl_broadcast_kernel(out, src_lane):
    i = cuda.threadIdx.x
    out[i] = cuda.shfl_sync(FULL, int32(3 * i), src_lane)


@pytest.mark.parametrize("src_lane", [7, 39, -1, 100])
def test_shfl_sync_broadcasts_one_lane(src_lane):
    out = np.zeros(32, np.int32)
    shfl_broadcast_kernel[1, 32](out, src_lane)
    np.testing.assert_array_equal(out, np.full(32, 3 * (src_lane % 32)))


@cuda.jit
def shfl_up_down_kernel(up, down, delta):
    i = cuda.threadIdx.x
    v = float32(10 * i + 0.5)
    up[i] = cuda.shfl_up_sync(FULL, v, delta)
    down[i] = cuda.shfl_down_sync(FULL, v, delta)


@pytest.mark.parametrize("delta", [0, 1, 3, 16, 31, 32, 33, 63, -1])
def test_shfl_up_and_down_keep_own_value_past_the_warp_edge(delta):
    up = np.zeros(64, np.float32)
    down = np.zeros(64, np.float32)
    shfl_up_down_kernel[1, 64](up, down, delta)
    v = lane_values(64)
    b = delta & 31  # the hardware reads only the low 5 bits (checked on an H200)
    for t in range(64):
        lane = t % 32
        assert up[t] == (v[t - b] if lane - b >= 0 else v[t]), t
        assert down[t] == (v[t + b] if lane + b < 32 else v[t]), t


@cuda.jit
def shfl_xor_kernel(out, lane_mask):
    i = cuda.threadIdx.x
    out[i] = cuda.shfl_xor_sync(FULL, float32(10 * i + 0.5), lane_mask)


@pytest.mark.parametrize("lane_mask", [1, 5, 16, 31])
def test_shfl_xor_swaps_with_lane_xor_mask(lane_mask):
    out = np.zeros(64, np.float32)
    shfl_xor_kernel[1, 64](out, lane_mask)
    v = lane_values(64)
    expect = [v[32 * (t // 32) + ((t % 32) ^ lane_mask)] for t in range(64)]
    np.testing.assert_array_equal(out, expect)


@cuda.jit
def butterfly_kernel(x, row_max, row_sum):
    i = cuda.threadIdx.x
    m = x[i]
    s = x[i]
    # m = max over the warp, s = sum over the warp: 5 butterfly steps,
    # after which every lane holds the result.
    for offset in (16, 8, 4, 2, 1):
        m = max(m, cuda.shfl_xor_sync(FULL, m, offset))
        s += cuda.shfl_xor_sync(FULL, s, offset)
    row_max[i] = m
    row_sum[i] = s


def test_butterfly_reduction_gives_every_lane_the_warp_max_and_sum(rng):
    x = rng.standard_normal(128).astype(np.float32)
    row_max = np.zeros(128, np.float32)
    row_sum = np.zeros(128, np.float32)
    butterfly_kernel[1, 128](x, row_max, row_sum)
    per_warp = x.reshape(4, 32)
    np.testing.assert_array_equal(row_max, per_warp.max(axis=1).repeat(32))
    np.testing.assert_allclose(row_sum, per_warp.sum(axis=1, dtype=np.float64).repeat(32),
                               rtol=1e-5, atol=1e-5)


@cuda.jit
def int_sum_kernel(out):
    i = cuda.threadIdx.x
    s = int32(i)
    for offset in (16, 8, 4, 2, 1):
        s += cuda.shfl_down_sync(FULL, s, offset)
    out[i] = s  # only lane 0 holds the full sum with shfl_down


def test_shfl_down_tree_sum_of_ints_lands_in_lane_0():
    out = np.zeros(64, np.int32)
    int_sum_kernel[1, 64](out)
    assert out[0] == sum(range(32))
    assert out[32] == sum(range(32, 64))


@cuda.jit
def half_masks_kernel(out):
    i = cuda.threadIdx.x
    v = float32(i)
    # lanes 0-15 and 16-31 reduce separately, each half naming only itself
    mask = 0x0000FFFF if i < 16 else 0xFFFF0000
    for offset in (8, 4, 2, 1):
        v += cuda.shfl_xor_sync(mask, v, offset)
    out[i] = v


def test_shuffles_with_disjoint_half_warp_masks():
    out = np.zeros(32, np.float32)
    half_masks_kernel[1, 32](out)
    np.testing.assert_array_equal(out[:16], sum(range(16)))
    np.testing.assert_array_equal(out[16:], sum(range(16, 32)))


@cuda.jit
def quarter_mask_kernel(out):
    i = cuda.threadIdx.x
    if i < 8:  # only lanes 0-7 take part; the others skip the shuffle
        out[i] = cuda.shfl_up_sync(0x000000FF, int32(100 + i), 2)


def test_partial_mask_with_other_lanes_absent():
    out = np.full(32, -1, np.int32)
    quarter_mask_kernel[1, 32](out)
    np.testing.assert_array_equal(out[:8], [100, 101, 100, 101, 102, 103, 104, 105])
    assert (out[8:] == -1).all()


# -- votes, masks and syncwarp -----------------------------------------------

@cuda.jit
def vote_kernel(ballot, count, first, all_, any_, eq):
    i = cuda.threadIdx.x
    odd = i % 2 == 1
    b = cuda.ballot_sync(FULL, odd)
    ballot[i] = b
    count[i] = cuda.popc(b)
    first[i] = cuda.ffs(b)
    all_[i] = cuda.all_sync(FULL, i < 100)
    any_[i] = cuda.any_sync(FULL, i == 5)
    eq[i] = cuda.eq_sync(FULL, odd)


def test_votes_over_a_full_warp():
    arrays = [np.zeros(32, np.int32) for _ in range(6)]
    vote_kernel[1, 32](*arrays)
    ballot, count, first, all_, any_, eq = arrays
    odd_lanes = np.uint32(0xAAAAAAAA).view(np.int32)  # bit 31 set: negative as int32
    np.testing.assert_array_equal(ballot, odd_lanes)
    np.testing.assert_array_equal(count, 16)
    np.testing.assert_array_equal(first, 2)  # lowest set bit is lane 1: ffs is 1-based
    np.testing.assert_array_equal(all_, 1)
    np.testing.assert_array_equal(any_, 1)
    np.testing.assert_array_equal(eq, 0)


@cuda.jit
def ballot_sign_kernel(negative):
    negative[cuda.threadIdx.x] = cuda.ballot_sync(FULL, cuda.threadIdx.x == 31) < 0


def test_ballot_has_the_type_numba_cuda_gives_it_on_the_gpu():
    # numba-cuda types ballot_sync as int32 (intrinsics.ballot_sync: signature(types.i4, ...)),
    # not uint32: lane 31's vote is the sign bit on the GPU too, and the simulator agrees.
    from numba.cuda import intrinsics, types
    declared = intrinsics.ballot_sync._defn(None, types.uint32, types.boolean)[0].return_type
    assert declared == types.int32
    negative = np.zeros(32, np.bool_)
    ballot_sign_kernel[1, 32](negative)
    assert negative.all()


@cuda.jit
def masked_ballot_kernel(out):
    i = cuda.threadIdx.x
    if i % 8 < 4:  # lanes 0-3, 8-11, 16-19, 24-27
        out[i] = cuda.ballot_sync(0x0F0F0F0F, i >= 10)


def test_ballot_only_counts_lanes_in_the_mask():
    out = np.zeros(32, np.int32)
    masked_ballot_kernel[1, 32](out)
    expect = 0x0F0F0F0F & ~((1 << 10) - 1)
    np.testing.assert_array_equal(out[np.arange(32) % 8 < 4], expect)


@cuda.jit
def masks_kernel(active, lt):
    i = cuda.threadIdx.x
    active[i] = cuda.activemask()
    lt[i] = cuda.lanemask_lt()


def test_activemask_and_lanemask_lt_in_full_and_partial_warps():
    active = np.zeros(48, np.int64)
    lt = np.zeros(48, np.int64)
    masks_kernel[1, 48](active, lt)
    np.testing.assert_array_equal(active[:32], 0xFFFFFFFF)
    np.testing.assert_array_equal(active[32:], 0x0000FFFF)  # only 16 lanes exist
    np.testing.assert_array_equal(lt, [(1 << (t % 32)) - 1 for t in range(48)])


@cuda.jit
def syncwarp_kernel(out):
    i = cuda.threadIdx.x
    s = cuda.shared.array(32, int32)
    s[i] = 7 * i
    cuda.syncwarp()  # every lane's s[i] written before any lane reads s[31 - i]
    out[i] = s[31 - i]
    cuda.syncwarp(0xFFFFFFFF)


def test_syncwarp_orders_shared_memory_within_a_warp():
    out = np.zeros(32, np.int32)
    syncwarp_kernel[1, 32](out)
    np.testing.assert_array_equal(out, 7 * (31 - np.arange(32)))


# -- partial warps and multi-dimensional blocks ------------------------------

@cuda.jit
def partial_warp_kernel(total, ballot, all_):
    i = cuda.threadIdx.x
    s = int32(i)
    # warp 1 of a 48-thread block has lanes 0-15 only: reduce over 16 lanes
    for offset in (8, 4, 2, 1):
        s += cuda.shfl_xor_sync(FULL, s, offset)
    total[i] = s
    ballot[i] = cuda.ballot_sync(FULL, True)
    all_[i] = cuda.all_sync(FULL, True)


def test_partial_last_warp_has_only_its_existing_lanes():
    total = np.zeros(48, np.int32)
    ballot = np.zeros(48, np.int32)
    all_ = np.zeros(48, np.int32)
    partial_warp_kernel[1, 48](total, ballot, all_)
    for t in range(48):
        group = t // 16  # lanes of 16 reduce together
        assert total[t] == sum(range(16 * group, 16 * group + 16)), t
    np.testing.assert_array_equal(ballot[:32], -1)  # 0xFFFFFFFF as int32
    np.testing.assert_array_equal(ballot[32:], 0x0000FFFF)
    np.testing.assert_array_equal(all_, 1)


@cuda.jit
def multidim_kernel(lane, lane0_id):
    tx, ty, tz = cuda.threadIdx.x, cuda.threadIdx.y, cuda.threadIdx.z
    t = tx + cuda.blockDim.x * (ty + cuda.blockDim.y * tz)  # linear thread id
    lane[tz, ty, tx] = cuda.laneid
    # the linear id of lane 0 of my warp
    lane0_id[tz, ty, tx] = cuda.shfl_sync(FULL, int32(t), 0)


@pytest.mark.parametrize("block", [(8, 4, 2), (5, 3, 3), (16, 4, 1), (1, 40, 1)])
def test_warps_follow_the_linear_thread_id_in_multidim_blocks(block):
    bx, by, bz = block
    lane = np.zeros((bz, by, bx), np.int32)
    lane0 = np.zeros((bz, by, bx), np.int32)
    multidim_kernel[1, block](lane, lane0)
    t = np.arange(bx * by * bz).reshape(bz, by, bx)
    np.testing.assert_array_equal(lane, t % 32)
    np.testing.assert_array_equal(lane0, t // 32 * 32)


# -- block barrier and errors that must surface ------------------------------

@cuda.jit
def cross_warp_kernel(out, iters):
    i = cuda.threadIdx.x
    s = cuda.shared.array(128, int32)
    acc = 0
    for k in range(iters):
        s[i] = i * k
        cuda.syncthreads()  # all of s written before thread i reads another warp's entry
        acc += s[127 - i]
        cuda.syncthreads()  # all reads done before the next iteration overwrites s
    out[i] = acc


def test_syncthreads_orders_shared_memory_across_warps():
    out = np.zeros(128, np.int32)
    cross_warp_kernel[2, 128](out, 8)
    np.testing.assert_array_equal(out, (127 - np.arange(128)) * sum(range(8)))


@cuda.jit
def two_shared_arrays_kernel(out):
    i = cuda.threadIdx.x
    a = cuda.shared.array(64, int32)
    b = cuda.shared.array(64, int32)
    dyn = cuda.shared.array(0, int32)  # dynamic: 64 int32 given at launch
    a[i] = i
    b[i] = 1000 + i
    dyn[i] = 2000 + i
    cuda.syncthreads()  # a, b, dyn fully written before reading others' entries
    out[i] = a[63 - i] + b[63 - i] + dyn[63 - i]


def test_shared_arrays_are_per_call_site_and_dynamic_memory_works():
    out = np.zeros(64, np.int32)
    two_shared_arrays_kernel[1, 64, 0, 64 * 4](out)
    np.testing.assert_array_equal(out, 3 * (63 - np.arange(64)) + 3000)


@cuda.jit
def barrier_votes_kernel(count, all_, any_):
    i = cuda.threadIdx.x
    # Numba takes integer predicates here (a bool does not compile)
    count[i] = cuda.syncthreads_count(1 if i % 3 == 0 else 0)
    all_[i] = cuda.syncthreads_and(1 if i < 1000 else 0)
    any_[i] = cuda.syncthreads_or(1 if i == 77 else 0)


def test_syncthreads_count_and_or_over_the_block():
    count, all_, any_ = (np.zeros(96, np.int32) for _ in range(3))
    barrier_votes_kernel[1, 96](count, all_, any_)
    np.testing.assert_array_equal(count, 32)
    np.testing.assert_array_equal(all_, 1)
    np.testing.assert_array_equal(any_, 1)


@cuda.jit
def early_exit_kernel(out):
    i = cuda.threadIdx.x
    if i >= 40:
        return  # the barrier below must not wait for these threads
    s = cuda.shared.array(64, int32)
    s[i] = i
    cuda.syncthreads()
    out[i] = s[39 - i]


def test_exited_threads_do_not_hold_up_syncthreads():
    out = np.full(64, -1, np.int32)
    early_exit_kernel[1, 64](out)
    np.testing.assert_array_equal(out[:40], 39 - np.arange(40))


# -- simulator only: undefined reads, errors instead of hangs ----------------

def launch_with_timeout(kernel, config, *args, seconds=10):
    """Launch on a helper thread; fail (rather than hang) if it does not return."""
    outcome = {}

    def go():
        try:
            kernel[config](*args)
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the test)
            outcome["error"] = e

    helper = threading.Thread(target=go, daemon=True)
    helper.start()
    helper.join(seconds)
    assert not helper.is_alive(), f"kernel still running after {seconds} s: a hang"
    if "error" in outcome:
        raise outcome["error"]


@cuda.jit
def read_outside_mask_kernel(out):
    i = cuda.threadIdx.x
    if i < 16:
        out[i] = cuda.shfl_down_sync(0x0000FFFF, float32(i), 8)


@sim_only
def test_reading_a_lane_outside_the_mask_gives_poison():
    out = np.zeros(16, np.float32)
    read_outside_mask_kernel[1, 32](out)
    np.testing.assert_array_equal(out[:8], np.arange(8, 16))
    assert np.isnan(out[8:]).all()  # lanes 16-23 did not take part: undefined on a GPU


seen_types = []


@cuda.jit
def type_kernel(out):
    i = cuda.threadIdx.x
    v = cuda.shfl_xor_sync(FULL, float32(i), 1)
    w = cuda.shfl_xor_sync(FULL, 2.5 * i, 1)
    if i == 0:
        seen_types.append(type(v))
        seen_types.append(type(w))
    out[i] = v


@sim_only
def test_shuffled_values_keep_their_type():
    seen_types.clear()
    type_kernel[1, 32](np.zeros(32, np.float32))
    assert seen_types == [np.float32, float]


@cuda.jit
def bad_value_kernel(flag):
    cuda.shfl_xor_sync(FULL, flag[0] > 0, 1)  # a bool: Numba rejects it on a GPU


@cuda.jit
def float_delta_kernel(out):
    i = cuda.threadIdx.x
    out[i] = cuda.shfl_down_sync(FULL, out[i], 1.0)  # a float delta: Numba rejects it


@cuda.jit
def bool_barrier_vote_kernel(out):
    out[cuda.threadIdx.x] = cuda.syncthreads_count(cuda.threadIdx.x > 3)


@sim_only
def test_bool_predicate_to_syncthreads_count_is_an_error_as_on_the_gpu():
    with pytest.raises(TypeError, match="integer predicate"):
        launch_with_timeout(bool_barrier_vote_kernel, (1, 32), np.zeros(32, np.int32))


@sim_only
def test_shuffling_a_type_numba_rejects_is_an_error():
    with pytest.raises(TypeError, match="32- and 64-bit ints and floats"):
        launch_with_timeout(bad_value_kernel, (1, 32), np.ones(1, np.int32))
    with pytest.raises(TypeError, match="lane argument must be an integer"):
        launch_with_timeout(float_delta_kernel, (1, 32), np.ones(32, np.float32))


@cuda.jit
def exit_before_shuffle_kernel(out):
    i = cuda.threadIdx.x
    if i == 37:
        return  # lane 5 of warp 1 leaves: its warp-mates wait for it in vain
    out[i] = cuda.shfl_xor_sync(FULL, float32(i), 1)


@sim_only
def test_lane_exiting_before_a_shuffle_is_an_error_not_a_hang():
    with pytest.raises(WarpDivergenceError) as info:
        launch_with_timeout(exit_before_shuffle_kernel, (1, 64), np.zeros(64, np.float32))
    msg = str(info.value)
    assert "block (0, 0, 0), warp 1" in msg
    assert "shfl_xor_sync(mask=0xffffffff)" in msg
    assert "lane 5 exited" in msg
    assert "arrived: lanes 0-4" in msg and "missing: lanes 5" in msg


@cuda.jit
def divergent_ops_kernel(out):
    i = cuda.threadIdx.x
    if i < 16:
        out[i] = cuda.shfl_xor_sync(FULL, float32(i), 1)
    else:
        out[i] = cuda.ballot_sync(FULL, True)


@sim_only
def test_lanes_calling_different_collectives_is_an_error():
    with pytest.raises(WarpDivergenceError) as info:
        launch_with_timeout(divergent_ops_kernel, (1, 32), np.zeros(32, np.float32))
    msg = str(info.value)
    assert "warp 0" in msg and "shfl_xor_sync" in msg and "ballot_sync" in msg
    assert "arrived: lanes 0-15" in msg and "missing: lanes 16-31" in msg


@cuda.jit
def shuffle_vs_barrier_kernel(out, low_half_shuffles):
    i = cuda.threadIdx.x
    if (i < 16) == low_half_shuffles:
        out[i] = cuda.shfl_xor_sync(FULL, float32(i), 1)
    cuda.syncthreads()


@sim_only
@pytest.mark.parametrize("low_half_shuffles", [True, False])
def test_lanes_at_syncthreads_while_others_shuffle_is_an_error(low_half_shuffles):
    # lanes run in order, so either the shufflers or the barrier waiters come first
    with pytest.raises(WarpDivergenceError, match="syncthreads") as info:
        launch_with_timeout(shuffle_vs_barrier_kernel, (1, 32), np.zeros(32, np.float32),
                            low_half_shuffles)
    msg = str(info.value)
    assert "block (0, 0, 0), warp 0, shfl_xor_sync(mask=0xffffffff)" in msg
    assert "missing: lanes" in msg


@cuda.jit
def own_lane_not_in_mask_kernel(out):
    i = cuda.threadIdx.x
    out[i] = cuda.shfl_xor_sync(0x0000FFFF, float32(i), 1)  # lanes 16-31 are not in it


@sim_only
def test_calling_with_a_mask_without_ones_own_lane_is_an_error():
    with pytest.raises(WarpDivergenceError,
                       match="without its own lane"):
        launch_with_timeout(own_lane_not_in_mask_kernel, (1, 32), np.zeros(32, np.float32))


@cuda.jit
def cyclic_syncwarps_kernel(out):
    i = cuda.threadIdx.x
    # lane 0 waits for 1, lane 1 for 2, lane 2 for 0: nobody can go on
    if i == 0:
        cuda.syncwarp(0b011)
    elif i == 1:
        cuda.syncwarp(0b110)
    elif i == 2:
        cuda.syncwarp(0b101)
    out[i] = 1


@sim_only
def test_a_cycle_of_waits_is_reported_as_deadlock():
    with pytest.raises(DeadlockError) as info:
        launch_with_timeout(cyclic_syncwarps_kernel, (1, 32), np.zeros(32, np.int32))
    msg = str(info.value)
    assert "deadlock" in msg and "syncwarp(mask=0x00000003)" in msg


@cuda.jit
def raising_kernel(out):
    i = cuda.threadIdx.x
    cuda.syncthreads()
    if i == 17 and cuda.blockIdx.x == 1:
        out[100] = 1  # past the end of out; the other threads wait at the barrier below
    cuda.syncthreads()


@sim_only
def test_exception_in_one_thread_is_raised_with_its_ids():
    with pytest.raises(IndexError, match=r"tid=\[17, 0, 0\] ctaid=\[1, 0, 0\]"):
        launch_with_timeout(raising_kernel, (2, 64), np.zeros(64, np.int32))
    # and the simulator is usable again afterwards
    out = np.zeros(128, np.int32)
    cross_warp_kernel[1, 128](out, 2)
    np.testing.assert_array_equal(out, 127 - np.arange(128))


@cuda.jit
def pass_through_kernel(out):
    out[cuda.threadIdx.x] = cuda.threadIdx.x


@sim_only
def test_install_is_idempotent_and_uninstall_restores_stock():
    from numba.cuda.simulator import kernel, kernelapi

    from flashnumba import simulator
    from flashnumba.simulator.block import BlockManager

    simulator.install()
    assert kernel.BlockManager is BlockManager
    try:
        simulator.uninstall()
        assert kernel.BlockManager is not BlockManager
        assert not hasattr(kernelapi.FakeCUDAModule, "shfl_xor_sync")
    finally:
        simulator.install()
        simulator.install()
    assert kernel.BlockManager is BlockManager
    assert hasattr(kernelapi.FakeCUDAModule, "shfl_xor_sync")
    out = np.zeros(32, np.int32)
    pass_through_kernel[1, 32](out)
    np.testing.assert_array_equal(out, np.arange(32))
