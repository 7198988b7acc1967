"""Bit packing of masks against numpy.packbits and an entry-by-entry reading of the layout."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_jax import _packing


def read_bit(packed, shape, index):
    """Entry ``index`` of a mask of ``shape``, read from ``packed`` as the module docstring says."""
    for axis in range(len(shape) - 2, -1, -1):
        if shape[axis] % 8 == 0:
            byte = list(index)
            byte[axis] //= 8
            return bool(packed[tuple(byte)] >> (index[axis] % 8) & 1)
    flat = int(np.ravel_multi_index(index, shape)) if shape else 0
    stretch = -(-int(np.prod(shape)) // 8)
    return bool(packed[flat % stretch] >> (flat // stretch) & 1)


@pytest.mark.slow  # over ~8 s of CPU; kept green by `pytest -m slow`
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([1, 2, 3, 5, 8, 12, 16, 24]), min_size=0, max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_layout_read_entry_by_entry_and_round_trip(shape, seed):
    shape = tuple(shape)
    mask = np.random.default_rng(seed).random(shape) < 0.5
    packed = np.asarray(_packing.pack_bits(mask))
    assert packed.dtype == np.uint8
    assert packed.shape == _packing.packed_shape(shape)
    for index in itertools.islice(np.ndindex(*shape), 400):
        assert read_bit(packed, shape, index) == mask[index], index
    np.testing.assert_array_equal(np.asarray(_packing.unpack_bits(packed, shape)), mask)
    axis = _packing.packed_axis(shape)
    if axis is not None:  # packing along an axis is numpy's packbits along it
        np.testing.assert_array_equal(packed, np.packbits(mask, axis=axis, bitorder="little"))


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((3, 3, 64, 128), 2),  # conv HWIO: the input channels
        ((768, 12, 64), 0),  # BERT-base q/k/v kernel: 12 heads, not a multiple of 8
        ((12, 64, 768), 1),  # BERT-base attention output kernel: the head dim
        ((12, 64), None),  # a head-split bias: only the last axis is a multiple of 8
        ((1000,), None),
        ((7, 5), None),
    ],
)
def test_bits_per_entry(shape, axis):
    size = int(np.prod(shape))
    assert _packing.packed_axis(shape) == axis
    nbytes = np.asarray(_packing.pack_bits(np.ones(shape, bool))).nbytes
    if size % 8 == 0:
        assert nbytes * 8 == size  # exactly 1 bit per entry
    else:
        assert nbytes == -(-size // 8)  # at most 7 padding bits per leaf


def test_unpack_rejects_a_packed_array_of_another_shape():
    packed = _packing.pack_bits(np.ones((16, 8), bool))
    with pytest.raises(ValueError, match=r"packed mask of shape \(2, 8\) cannot hold a mask of shape \(8, 8\)"):
        _packing.unpack_bits(packed, (8, 8))
