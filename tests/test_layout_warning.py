"""An input in the other layout (more heads than positions in q and k) is named before any kernel runs."""

import warnings

import numpy as np
import pytest

import flashnumba
from flashnumba import validate
from flashnumba.interop import Operand


def _ops(q_shape, k_shape):
    q = np.zeros(q_shape, np.float32)
    k = np.zeros(k_shape, np.float32)
    return Operand("q", q), Operand("k", k), Operand("v", k.copy())


def test_sdpa_layout_given_to_flash_attn_func_warns_naming_both_layouts():
    q = np.zeros((2, 4, 8, 16), np.float32)         # (B, H=4, N=8, d): SDPA's layout
    with warnings.catch_warnings():
        warnings.simplefilter("error", flashnumba.LayoutWarning)
        with pytest.raises(flashnumba.LayoutWarning) as caught:
            flashnumba.flash_attn_func(q, q, q)     # raises before any kernel runs
    text = str(caught.value)
    assert validate.FLASH_LAYOUT in text and validate.SDPA_LAYOUT in text
    assert "8 heads, 4 positions" in text


def test_flash_layout_given_to_sdpa_warns():
    q = np.zeros((2, 8, 4, 16), np.float32)         # (B, N=8, H=4, d): flash-attn's layout
    with warnings.catch_warnings():
        warnings.simplefilter("error", flashnumba.LayoutWarning)
        with pytest.raises(flashnumba.LayoutWarning, match="flash_attn_func"):
            flashnumba.scaled_dot_product_attention(q, q, q)


def test_the_warning_points_at_the_callers_line():
    q = np.zeros((1, 4, 8, 16), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", flashnumba.LayoutWarning)
        validate.attention_shapes(*_ops(q.shape, q.shape))
    assert caught and caught[0].filename == __file__


@pytest.mark.parametrize("q_shape, k_shape", [
    ((2, 64, 8, 16), (2, 64, 8, 16)),     # the flash layout, N > H
    ((2, 1, 8, 16), (2, 300, 2, 16)),     # decoding: one query, more heads than positions in q only
    ((2, 3, 3, 16), (2, 3, 3, 16)),       # as many heads as positions
])
def test_plausible_flash_shapes_do_not_warn(q_shape, k_shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error", flashnumba.LayoutWarning)
        validate.attention_shapes(*_ops(q_shape, k_shape))


def test_plausible_sdpa_shapes_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", flashnumba.LayoutWarning)
        validate.attention_shapes(*_ops((2, 8, 64, 16), (2, 2, 64, 16)), layout=validate.SDPA_LAYOUT)
