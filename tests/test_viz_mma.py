"""viz.mma_fragments: the m16n8k16 lane maps cover each element once, and S's accumulators are
P's A fragments lane for lane; the figure draws."""

import numpy as np

from flashnumba.viz import mma_fragments, style


def test_every_element_has_one_lane_and_each_lane_its_share():
    for elements, shape, per_lane in ((mma_fragments.a_elements, (16, 16), 8),
                                      (mma_fragments.b_elements, (16, 8), 4),
                                      (mma_fragments.c_elements, (16, 8), 4)):
        lanes, _ = mma_fragments.lane_map(elements, shape)
        assert np.array_equal(np.bincount(lanes.ravel(), minlength=32), np.full(32, per_lane))


def test_accumulators_of_two_n_tiles_are_the_a_fragment():
    s_lane, a_lane, a_reg = mma_fragments.handoff_lanes()
    assert np.array_equal(s_lane, a_lane)
    # register a0..a3 = (rows 0-7 | 8-15) x (keys 0-7 | 8-15)
    assert a_reg[0, 0] == 0 and a_reg[8, 0] == 1 and a_reg[0, 8] == 2 and a_reg[8, 8] == 3
    assert s_lane[5, 3] == 4 * 5 + 3 // 2                   # lane 4g + t holds row g, column 2t(+1)


def test_figure_draws():
    fig = mma_fragments.mma_fragments_figure()
    assert len(fig.axes) == 4
    assert len(style.png_bytes(fig)) > 10_000
