#!/usr/bin/env python3
"""Quantizes a GGUF with llama.cpp's own quantizer (llama-quantize's mixes, through llama-cpp-python),
so that benchmarks can run on the files llama.cpp users have, e.g. a Q4_K_M of `nibble make-model`'s
F16 model. Usage:
llama_cpp_quantize.py IN.gguf OUT.gguf [q4_k_m|q4_k_s|q5_k_m|q5_k_s|q3_k_s|q3_k_m|q3_k_l|q2_k|q4_0|q4_1|
                                            q5_0|q5_1|q6_k|q8_0|iq4_xs|iq4_nl|iq1_s|iq1_m|iq2_xxs|iq2_xs|
                                            iq2_s|iq2_m|iq3_xxs|iq3_xs|iq3_s|iq3_m|tq1_0|tq2_0] [IMATRIX.gguf]
With IMATRIX.gguf (llama-imatrix's GGUF format, e.g. `nibble eval imatrix`'s), each matrix with an entry
is quantized with its importance row sums / count, as llama-quantize --imatrix loads it."""
import ctypes
import sys

try:
    import llama_cpp
except ImportError:
    sys.exit("llama_cpp (pip install llama-cpp-python) is not installed")

FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    # The sub-4-bit mixes (Nibble reads them, does not write them); all but iq3_s / iq3_m / tq* need IMATRIX.
    "iq1_s": "LLAMA_FTYPE_MOSTLY_IQ1_S",
    "iq1_m": "LLAMA_FTYPE_MOSTLY_IQ1_M",
    "iq2_xxs": "LLAMA_FTYPE_MOSTLY_IQ2_XXS",
    "iq2_xs": "LLAMA_FTYPE_MOSTLY_IQ2_XS",
    "iq2_s": "LLAMA_FTYPE_MOSTLY_IQ2_S",
    "iq2_m": "LLAMA_FTYPE_MOSTLY_IQ2_M",
    "iq3_xxs": "LLAMA_FTYPE_MOSTLY_IQ3_XXS",
    "iq3_xs": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
    "iq3_s": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "iq3_m": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "tq1_0": "LLAMA_FTYPE_MOSTLY_TQ1_0",
    "tq2_0": "LLAMA_FTYPE_MOSTLY_TQ2_0",
}
if len(sys.argv) not in (3, 4, 5) or (len(sys.argv) >= 4 and sys.argv[3] not in FTYPES):
    sys.exit(__doc__)
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, FTYPES[sys.argv[3] if len(sys.argv) >= 4 else "q4_k_m"])
keep_alive = []
if len(sys.argv) == 5:
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(sys.argv[4])
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).ravel() for t in reader.tensors}
    entries = []
    for name in sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")):
        sums, count = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        if count.size != 1:
            sys.exit(f"{name}: expert matrices are not handled here")
        row = np.ascontiguousarray(sums / count[0] if count[0] > 0 else np.ones_like(sums), dtype=np.float32)
        keep_alive.append(row)
        entries.append((name.encode(), row))
    data = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for i, (name, row) in enumerate(entries):
        data[i].name = name
        data[i].data = row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        data[i].size = row.size
    keep_alive.append(data)
    params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) != 0:
    sys.exit(f"llama.cpp could not quantize {sys.argv[1]}")
