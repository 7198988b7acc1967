"""Bit packing of masks against numpy.packbits."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_jax import _packing


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_pack_matches_numpy_and_round_trips(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    packed = np.asarray(_packing.pack_bits(mask))
    assert packed.dtype == np.uint8
    assert packed.shape == _packing.packed_shape(tuple(shape))
    np.testing.assert_array_equal(packed, np.packbits(mask, axis=max(mask.ndim - 2, 0), bitorder="little"))
    np.testing.assert_array_equal(np.asarray(_packing.unpack_bits(packed, tuple(shape))), mask)


def test_one_bit_per_weight_when_the_packed_axis_is_a_multiple_of_8():
    mask = np.ones((3, 3, 64, 128), dtype=bool)
    assert np.asarray(_packing.pack_bits(mask)).nbytes * 8 == mask.size
