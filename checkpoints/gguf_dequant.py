"""Dequantize GGUF tensor data (llama.cpp's ggml block formats) to float32 with numpy.

Each ggml type stores a row as blocks: 32 values for the classic types (Q4_0 ... Q8_0),
256 for the K-quants (Q2_K ... Q6_K), with one or two float16 scales per block and packed
integers. The functions here are written from the ggml block layouts, vectorised over
blocks, and compute in float32 in ggml's order of operations (scale * sub-scale first),
so they agree with `gguf.quants.dequantize` (llama.cpp's own Python) exactly; the tests
check that on every type. `dequantize(raw_bytes, type_name, n)` is the one entry point.
"""

from __future__ import annotations

import numpy as np

QK = 32      # values per block, classic types
QK_K = 256   # values per super-block, K-quants

# type name -> (values per block, bytes per block)
BLOCKS = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (QK, 18), "Q4_1": (QK, 20), "Q5_0": (QK, 22), "Q5_1": (QK, 24), "Q8_0": (QK, 34),
    "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
}
SUPPORTED = tuple(BLOCKS)


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n, 1] float32 (a little-endian float16 per row)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the 16 low nibbles, then the 16 high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 quants: nibble plus bit j of the 32-bit qh as the fifth bit of value j."""
    bits = np.ascontiguousarray(qh).view("<u4")                      # [n, 1]
    high = ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    return _nibbles(qs) | high


def _q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)


def _q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _q5_0(b):
    q = _five_bit(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16)
    return _f16(b[:, :2]) * q.astype(np.float32)


def _q5_1(b):
    q = _five_bit(b[:, 4:8], b[:, 8:])
    return _f16(b[:, :2]) * q.astype(np.float32) + _f16(b[:, 2:4])


def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, [n, 8] each."""
    lo, hi = s[:, 0:4], s[:, 4:8]
    last = s[:, 8:12]
    sc = np.concatenate([lo & 63, (last & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (last >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q2_k(b):
    scales, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    n = len(b)
    # value (h, j, s, l) = 128h + 32j + 16s + l: byte qs[32h + 16s + l], bits 2j, scale 8h + 2j + s
    q = qs.reshape(n, 2, 1, 2, 16) >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1, 1)
    q = (q & 3).astype(np.float32)                                    # [n, 2, 4, 2, 16]
    sc = scales.reshape(n, 2, 4, 2, 1)
    dl = d.reshape(n, 1, 1, 1, 1) * (sc & 0x0F).astype(np.float32)
    ml = dmin.reshape(n, 1, 1, 1, 1) * (sc >> 4).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    hmask, qs, s = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    n = len(b)
    i = np.arange(16)
    low = (s[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    high = (s[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    scales = (low | (high << 4)).astype(np.int8) - np.int8(32)       # [n, 16]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1, 1)
    q = ((qs.reshape(n, 2, 1, 2, 16) >> shifts) & 3).astype(np.int8)  # [n, 2, 4, 2, 16]
    bit = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1, 1)         # 4h + j
    hm = (hmask.reshape(n, 1, 1, 2, 16) >> bit) & 1
    q = q - np.where(hm == 1, np.int8(0), np.int8(4)).astype(np.int8)
    dl = d.reshape(n, 1, 1, 1, 1) * scales.reshape(n, 2, 4, 2, 1).astype(np.float32)
    return (dl * q.astype(np.float32)).reshape(n, QK_K)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    n = len(b)
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)   # [n, 4, 2, 32]
    dl = (d * sc).reshape(n, 4, 2, 1)
    ml = (dmin * mn).reshape(n, 4, 2, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k4_scales(b[:, 4:16])
    n = len(b)
    qh = b[:, 16:48].reshape(n, 1, 1, 32)
    qs = b[:, 48:176].reshape(n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2)                       # [n, 4, 2, 32]
    bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)            # 2j + half
    q = (q + (((qh >> bit) & 1) << 4)).astype(np.float32)
    dl = (d * sc).reshape(n, 4, 2, 1)
    ml = (dmin * mn).reshape(n, 4, 2, 1)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b):
    n = len(b)
    ql = b[:, 0:128].reshape(n, 2, 2, 32)         # [half, ql[l] / ql[l+32], l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).reshape(n, 2, 4, 2)   # [half, quarter, l // 16]
    d = _f16(b[:, 208:210])
    # quarter k of a half: (ql[l + 32 * (k % 2)] >> 4 * (k // 2)) & 15, high bits qh >> 2k
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4],
                   axis=2)                                          # [n, 2, 4, 32]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = np.repeat(scales, 16, axis=3).astype(np.float32)           # [n, 2, 4, 32]
    return (d.reshape(n, 1, 1, 1) * sc * q.astype(np.float32)).reshape(n, QK_K)


_BLOCK_FNS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
              "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def nbytes(type_name: str, n: int) -> int:
    """Bytes that `n` values of this type take (n a multiple of the block size)."""
    size, type_size = BLOCKS[type_name]
    return n // size * type_size


def dequantize(raw: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """`n` float32 values (flat) from the raw bytes of one tensor of ggml type `type_name`."""
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    size, type_size = BLOCKS[type_name]
    blocks = raw.reshape(n // size, type_size)
    out = np.empty((n // size, size), np.float32)
    step = max(1, (1 << 22) // size)              # bounded temporaries on big tensors
    for i in range(0, len(blocks), step):
        out[i:i + step] = _BLOCK_FNS[type_name](blocks[i:i + step])
    return out.reshape(-1)
