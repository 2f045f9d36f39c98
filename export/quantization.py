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
    amax = np.abs(w).max(axis=reduce)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


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
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    # Round scale and minimum to float16 first and quantize against the rounded values, so the stored numbers
    # reconstruct w as well as float16 allows.
    minimum = lo.astype(np.float16)
    scale = ((hi - lo) / 15.0).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    q = np.clip(np.rint((blocks - minimum.astype(np.float32)) / scale.astype(np.float32)), 0, 15).astype(np.uint8)
    q = q.reshape(k, n)
    packed = (q[: k // 2] | (q[k // 2:] << 4)).astype(np.uint8)
    return packed, scale, minimum


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    half, n = packed.shape
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=0).astype(np.float32)
    blocks = q.reshape(scale.shape[0], -1, n)
    return (blocks * scale.astype(np.float32) + minimum.astype(np.float32)).reshape(2 * half, n)
