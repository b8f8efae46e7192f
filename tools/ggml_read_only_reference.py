#!/usr/bin/env python3
"""Writes llama.cpp's own bytes, dequantization and dot products for the GGUF types Nibble reads but does
not write (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4): the hard rows of
tools/ggml_quantize_reference.py quantized by GGML's ggml_quantize_chunk (the i-quants with its importance
row, as llama-quantize needs an imatrix for most of them), GGML's to_float of those bytes, and GGML's CPU
vec_dot of each row with one activation row (quantized by GGML to the type's vec_dot_type: Q8_K, or Q8_0
for MXFP4). `tests/test_kernels_read_only.cpp` checks kernels::dequantize_row and matmul against them.
Usage: ggml_read_only_reference.py OUT.bin   (needs llama-cpp-python: its libggml-base and libggml-cpu)

File: "NBQROT01", uint32 n_rows, uint32 n_per_row, float32 activation[n_per_row], uint32 n_types, then per
type: uint32 GGML type id, uint32 byte count, the quantized rows, float32 dequantized[n_rows][n_per_row],
float32 dot[n_rows]."""
import ctypes
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ggml_quantize_reference import N_PER_ROW, hard_rows, importance_row  # noqa: E402

try:
    import llama_cpp
except ImportError:
    sys.exit("llama_cpp (pip install llama-cpp-python) is not installed")

TYPES = {"iq2_xxs": 16, "iq2_xs": 17, "iq3_xxs": 18, "iq1_s": 19, "iq3_s": 21, "iq2_s": 22, "iq1_m": 29,
         "tq1_0": 34, "tq2_0": 35, "mxfp4": 39}
WITH_IMPORTANCE = {16, 17, 18, 19, 21, 22, 29}


class TypeTraits(ctypes.Structure):  # ggml.h's struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class TypeTraitsCpu(ctypes.Structure):  # ggml-cpu.h's struct ggml_type_traits_cpu
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    ggml = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    cpu = ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so"))
    cpu.ggml_cpu_init.restype = None
    cpu.ggml_cpu_init()
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_row_size.restype = ctypes.c_size_t
    ggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    ggml.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    ggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]

    rows = np.ascontiguousarray(hard_rows(), dtype=np.float32)
    n_rows = rows.shape[0]
    importance = np.ascontiguousarray(importance_row(), dtype=np.float32)
    activation = np.ascontiguousarray(np.random.default_rng(11).standard_normal(N_PER_ROW), dtype=np.float32)

    with open(sys.argv[1], "wb") as out:
        out.write(b"NBQROT01" + struct.pack("<II", n_rows, N_PER_ROW) + activation.tobytes())
        out.write(struct.pack("<I", len(TYPES)))
        for name, type_id in TYPES.items():
            row_size = ggml.ggml_row_size(type_id, N_PER_ROW)
            size = row_size * n_rows
            dst = (ctypes.c_uint8 * size)()
            weights = importance.ctypes.data if type_id in WITH_IMPORTANCE else None
            written = ggml.ggml_quantize_chunk(type_id, rows.ctypes.data, dst, 0, n_rows, N_PER_ROW, weights)
            if written != size:
                sys.exit(f"{name}: ggml wrote {written} bytes, expected {size}")
            floats = np.zeros((n_rows, N_PER_ROW), dtype=np.float32)
            TO_FLOAT(ggml.ggml_get_type_traits(type_id).contents.to_float)(
                ctypes.addressof(dst), floats.ctypes.data, n_rows * N_PER_ROW)
            traits = cpu.ggml_get_type_traits_cpu(type_id).contents
            act_type = traits.vec_dot_type
            act = (ctypes.c_uint8 * ggml.ggml_row_size(act_type, N_PER_ROW))()
            FROM_FLOAT(cpu.ggml_get_type_traits_cpu(act_type).contents.from_float)(
                activation.ctypes.data, ctypes.addressof(act), N_PER_ROW)
            dots = np.zeros(n_rows, dtype=np.float32)
            vec_dot = VEC_DOT(traits.vec_dot)
            for r in range(n_rows):
                result = ctypes.c_float()
                vec_dot(N_PER_ROW, ctypes.addressof(result), 0, ctypes.addressof(dst) + r * row_size, 0,
                        ctypes.addressof(act), 0, 1)
                dots[r] = result.value
            out.write(struct.pack("<II", type_id, size) + bytes(dst) + floats.tobytes() + dots.tobytes())
            print(f"{name}: {size} bytes, activations as ggml type {act_type}")


if __name__ == "__main__":
    main()
