"""The quantization arithmetic read a chunk of rows at a time (what quantize_frozen does with a large weight) gives
the whole-matrix results bit for bit, and both reconstruct the weights within their step."""

import numpy as np
import pytest

from lars_export import quantization

RNG = np.random.default_rng(7)


def _reader(w, reads):
    def rows(a, b):
        reads.append((a, b))
        return w[a:b].copy()
    return rows


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_int8_in_chunks_is_the_whole_matrix_result(axis, chunk):
    w = RNG.normal(size=(13, 6)).astype(np.float32)
    w[4] = 0.0  # an all-zero row (scale 1 on axis 0)
    q, scale = quantization.int8_per_channel(w, axis=axis)
    reads = []
    scale_c, pieces = quantization.int8_per_channel_chunks(_reader(w, reads), w.shape, axis, chunk)
    pieces = list(pieces)
    assert max(b - a for a, b in reads) <= chunk and len(pieces) == -(-13 // chunk)
    np.testing.assert_array_equal(scale_c, scale)
    np.testing.assert_array_equal(np.concatenate(pieces), q)
    assert np.abs(quantization.dequantize_int8(q, scale, axis) - w).max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("shape,block,chunk", [((24, 5), 4, 3), ((40, 3), 8, 5), ((16, 2), 16, 100)])
def test_int4_in_chunks_is_the_whole_matrix_result(shape, block, chunk):
    """K/2 need not be a whole number of blocks (40 rows, blocks of 8): each packed byte's two rows take their own
    block's scale."""
    w = RNG.normal(size=shape).astype(np.float32)
    packed, scale, minimum = quantization.int4_blockwise(w, block)
    reads = []
    scale_c, minimum_c, pieces = quantization.int4_blockwise_chunks(_reader(w, reads), shape, block, chunk)
    pieces = list(pieces)
    assert max(b - a for a, b in reads) <= max(block, chunk)
    assert all(len(p) <= chunk for p in pieces) and packed.shape == (shape[0] // 2, shape[1])
    np.testing.assert_array_equal(scale_c, scale)
    np.testing.assert_array_equal(minimum_c, minimum)
    np.testing.assert_array_equal(np.concatenate(pieces), packed)
    # the format, computed here on whole blocks: float16 scale and minimum per block of `block` rows, each value
    # against the rounded ones, the first half of the rows in the low nibbles
    blocks = w.reshape(-1, block, shape[1])
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    np.testing.assert_array_equal(minimum, lo.astype(np.float16))
    np.testing.assert_array_equal(scale, np.maximum((hi - lo) / 15.0, 0).astype(np.float16))
    q = np.clip(np.rint((blocks - minimum.astype(np.float32)) / scale.astype(np.float32)), 0, 15)
    q = q.astype(np.uint8).reshape(shape)
    np.testing.assert_array_equal(packed, q[: shape[0] // 2] | (q[shape[0] // 2:] << 4))
    step = scale.astype(np.float32).max()
    assert np.abs(quantization.dequantize_int4(packed, scale, minimum) - w).max() <= step / 2 + 2e-3


def test_int4_refuses_a_matrix_of_partial_blocks():
    with pytest.raises(ValueError, match="divisible by the block size 8"):
        quantization.int4_blockwise_chunks(lambda a, b: None, (12, 4), 8, 4)
