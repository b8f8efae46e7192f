#!/usr/bin/env python3
"""Writes llama.cpp's own quantization of a fixed set of hard rows: the rows (float32) and, for each
weight type Nibble writes, the bytes GGML's ggml_quantize_chunk gives them (its quantize_row_*_ref
without an importance matrix: what llama-quantize writes); and, in a second file, the bytes GGML gives
them with an importance row (an imatrix entry: quantize_row_*_impl) for the types Nibble quantizes with
one. `tests/test_ggml_quantize_reference.cpp` checks that kernels::quantize_row (and
quantize_row_weighted) give the same bytes. Usage:
ggml_quantize_reference.py OUT.bin [OUT-IMATRIX.bin]   (needs llama-cpp-python, whose libggml-base is
called directly)

File: "NBQREF01", uint32 n_rows, uint32 n_per_row, float32 rows[n_rows][n_per_row], uint32 n_types,
then per type: uint32 GGML type id, uint32 byte count, the quantized rows. The imatrix file is the same
with the magic "NBQIMX01" and float32 importance[n_per_row] after the rows."""
import ctypes
import os
import struct
import sys

import numpy as np

try:
    import llama_cpp
except ImportError:
    sys.exit("llama_cpp (pip install llama-cpp-python) is not installed")

N_PER_ROW = 512  # two K-quant super-blocks, sixteen blocks of 32
# GGML type ids (ggml.h) of the types Nibble's quantize_row writes.
TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_K": 10, "q3_K": 11, "q4_K": 12,
         "q5_K": 13, "q6_K": 14, "iq4_nl": 20, "iq4_xs": 23}
# Every one of them with an importance row too (Q8_0 ignores it).
IMATRIX_TYPES = TYPES


def hard_rows():
    rng = np.random.default_rng(20261206)
    n = N_PER_ROW
    rows = []
    gauss = lambda: rng.standard_normal(n).astype(np.float32)
    rows.append(gauss())                                       # plain Gaussian
    rows.append(gauss() * np.float32(0.02))                    # typical weight magnitudes
    r = gauss(); r[16:32] *= 1e-4; r[288:320] *= 1e-3; rows.append(r)  # a sub-block whose scale rounds to 0
    rows.append(np.abs(gauss()) + np.float32(0.5))             # all positive: the min clamps to 0
    rows.append(-np.abs(gauss()) - np.float32(0.5))            # all negative
    r = gauss(); r[0:32] = 0.25; r[64:80] = -3.0; r[256:512] = 0.0; rows.append(r)  # constant and zero runs
    r = gauss(); r[7] = 100.0; r[300] = -250.0; rows.append(r)  # outliers
    rows.append(rng.standard_t(2, n).astype(np.float32))       # heavy tails
    rows.append(gauss() * np.float32(1e-6))                    # fp16 scales in the subnormal range
    rows.append(gauss() * np.float32(3e3))                     # large values
    # Values on rounding midpoints of a simple grid (ties in nearest_int and roundf).
    rows.append((rng.integers(-16, 16, n) * 0.5 + 0.25).astype(np.float32))
    rows.append(rng.integers(-4, 4, n).astype(np.float32))     # exactly representable at 3 bits
    rows.append(np.zeros(n, np.float32))                       # all zero
    r = np.zeros(n, np.float32); r[5] = 1.0; r[400] = -1.0; rows.append(r)  # one value a super-block
    rows.append(np.where(rng.random(n) < 0.9, 0.0, gauss()).astype(np.float32))  # sparse
    rows.append((gauss() * np.float32(1e-2) + np.float32(0.03)).astype(np.float32))  # offset from 0
    return np.stack(rows)


def importance_row():
    """An imatrix entry's shape: mean squares of the inputs, most near 1, some columns 100x larger (the
    outlier channels imatrices exist for), a few near 0."""
    rng = np.random.default_rng(7)
    row = np.exp(rng.standard_normal(N_PER_ROW)).astype(np.float32)
    row[rng.integers(0, N_PER_ROW, 12)] *= 100.0
    row[rng.integers(0, N_PER_ROW, 6)] = 1e-6
    return row


def write(path, magic, rows, types, quantize, importance=None):
    with open(path, "wb") as out:
        out.write(magic + struct.pack("<II", rows.shape[0], N_PER_ROW) + rows.tobytes())
        if importance is not None:
            out.write(importance.tobytes())
        out.write(struct.pack("<I", len(types)))
        for name, type_id in types.items():
            data = quantize(type_id)
            out.write(struct.pack("<II", type_id, len(data)) + data)
            print(f"{path}: {name}: {len(data)} bytes")


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    rows = np.ascontiguousarray(hard_rows(), dtype=np.float32)
    n_rows = rows.shape[0]
    importance = np.ascontiguousarray(importance_row(), dtype=np.float32)

    def quantize(type_id, imatrix):
        size = ggml.ggml_row_size(type_id, N_PER_ROW) * n_rows
        dst = (ctypes.c_uint8 * size)()
        weights = imatrix.ctypes.data if imatrix is not None else None
        written = ggml.ggml_quantize_chunk(type_id, rows.ctypes.data, dst, 0, n_rows, N_PER_ROW, weights)
        if written != size:
            sys.exit(f"type {type_id}: ggml wrote {written} bytes, expected {size}")
        return bytes(dst)

    write(sys.argv[1], b"NBQREF01", rows, TYPES, lambda t: quantize(t, None))
    if len(sys.argv) == 3:
        write(sys.argv[2], b"NBQIMX01", rows, IMATRIX_TYPES, lambda t: quantize(t, importance), importance)


if __name__ == "__main__":
    main()
