"""Weight quantization formats for frozen base weights, and their numpy reference dequantization.

The graph side (storage as initializers, dequantization inside the graph at each use) is the quantize_frozen pass;
this module holds only the arithmetic, so the pass, its test and the benchmarks agree on one definition.

- INT8 per channel, symmetric: w ≈ q·s, one float32 scale per output channel (per row of an embedding table).
- INT4 block-wise, asymmetric (the layout of GGUF's Q4_1): along the reduction axis, each block of `block` values
  has a float16 scale and minimum, w ≈ q·s + m with q in [0, 15]. Two values share a byte: the first half of the
  rows in the low nibbles, the second half in the high nibbles, so unpacking is two shifts and one Concat.
  With block 32 that is 5 bits per weight.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("none", "int8", "int4")


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32 [w.shape[axis]]) with w ≈ q · scale along `axis`."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    scale = _int8_scale(np.abs(w).max(axis=reduce))
    shape = [1] * w.ndim
    shape[axis] = -1
    return _int8_values(w, scale.reshape(shape)), scale


def _int8_scale(amax: np.ndarray) -> np.ndarray:
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def _int8_values(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8)


# Quantizing a matrix read a chunk of rows at a time (`rows(start, stop)` -> float32 [stop - start, N]), so a large
# weight (a 3B model's 1.6 GB embedding table) is never whole in memory in float32 nor with its temporaries. The
# results are bit-identical to the whole-matrix functions: the scales come from a first pass (a maximum or minimum
# taken chunk by chunk is the same number), the values from a second with the same elementwise arithmetic.

def int8_per_channel_chunks(rows, shape: tuple[int, int], axis: int, chunk: int):
    """int8_per_channel of a [K, N] matrix read by rows: (scale float32, q int8 in chunks of `chunk` rows)."""
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (per row) or 1 (per column), got {axis}")
    k, n = shape
    column_max, row_max = None, []
    for a in range(0, k, chunk):
        part = np.abs(np.asarray(rows(a, min(k, a + chunk)), dtype=np.float32)).max(axis=1 - axis)
        if axis == 1:
            column_max = part if column_max is None else np.maximum(column_max, part)
        else:
            row_max.append(part)
    scale = _int8_scale(column_max if axis == 1 else np.concatenate(row_max))

    def values():
        for a in range(0, k, chunk):
            b = min(k, a + chunk)
            w = np.asarray(rows(a, b), dtype=np.float32)
            yield _int8_values(w, scale.reshape(1, -1) if axis == 1 else scale[a:b].reshape(-1, 1))

    return scale, values()


def dequantize_int8(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def int4_fits(shape: tuple[int, ...], block: int) -> bool:
    """A [K, N] matrix can be stored block-wise along K: whole blocks, and an even K for the nibble pairs."""
    return len(shape) == 2 and block >= 2 and block % 2 == 0 and shape[0] % block == 0


def int4_blockwise(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 [K/2, N], scale float16 [K/block, 1, N], minimum float16 [K/block, 1, N]) of a [K, N] matrix,
    blocks along K."""
    w = np.asarray(w, dtype=np.float32)
    if not int4_fits(w.shape, block):
        raise ValueError(f"int4 needs a [K, N] matrix with K divisible by the block size {block}, got {w.shape}")
    scale, minimum, packed = int4_blockwise_chunks(lambda a, b: w[a:b], w.shape, block, w.shape[0])
    return np.concatenate(list(packed)), scale, minimum


def int4_blockwise_chunks(rows, shape: tuple[int, int], block: int, chunk: int):
    """int4_blockwise of a [K, N] matrix read by rows: (scale, minimum, packed uint8 in chunks of at most `chunk`
    rows of the packed [K/2, N])."""
    if not int4_fits(tuple(shape), block):
        raise ValueError(f"int4 needs a [K, N] matrix with K divisible by the block size {block}, got {shape}")
    k, n = shape
    step = max(block, chunk // block * block)  # whole blocks per read
    lo, hi = [], []
    for a in range(0, k, step):
        blocks = np.asarray(rows(a, min(k, a + step)), dtype=np.float32).reshape(-1, block, n)
        lo.append(blocks.min(axis=1, keepdims=True))
        hi.append(blocks.max(axis=1, keepdims=True))
    lo, hi = np.concatenate(lo), np.concatenate(hi)
    # Round scale and minimum to float16 first and quantize against the rounded values, so the stored numbers
    # reconstruct w as well as float16 allows.
    minimum = lo.astype(np.float16)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    minimum32, scale32 = minimum.astype(np.float32)[:, 0], scale.astype(np.float32)[:, 0]

    def values(a: int, b: int) -> np.ndarray:  # q of rows [a, b), each against its block's scale and minimum
        at = np.arange(a, b) // block
        w = np.asarray(rows(a, b), dtype=np.float32)
        return np.clip(np.rint((w - minimum32[at]) / scale32[at]), 0, 15).astype(np.uint8)

    def packed():  # the first half of the rows in the low nibbles, the second half in the high nibbles
        half = k // 2
        for a in range(0, half, chunk):
            b = min(half, a + chunk)
            yield (values(a, b) | (values(half + a, half + b) << 4)).astype(np.uint8)

    return scale, minimum, packed()


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    half, n = packed.shape
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=0).astype(np.float32)
    blocks = q.reshape(scale.shape[0], -1, n)
    return (blocks * scale.astype(np.float32) + minimum.astype(np.float32)).reshape(2 * half, n)
