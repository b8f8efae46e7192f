#!/usr/bin/env python3
"""Splits a GGUF file into a split set with gguf-py (llama.cpp's Python GGUF package, the writer
convert_hf_to_gguf.py --split-max-tensors uses), so that Nibble's reader of split sets is checked on
files another implementation wrote.

Usage: gguf_py_split.py IN.gguf OUT.gguf --split-max-tensors N
Writes OUT-00001-of-0000K.gguf ... (gguf-py's names for OUT.gguf): the metadata in the first file, the
tensors in IN's order, at most N a file. Needs `pip install gguf numpy`."""
import argparse
import sys

try:
    import gguf
except ImportError:
    sys.exit("gguf (pip install gguf) is needed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input")
    parser.add_argument("output", help="OUT.gguf: the files are OUT-00001-of-0000K.gguf ...")
    parser.add_argument("--split-max-tensors", type=int, required=True)
    args = parser.parse_args()

    reader = gguf.GGUFReader(args.input)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(args.output, arch, split_max_tensors=args.split_max_tensors)
    for field in reader.fields.values():
        # The header's own fields, and the keys the writer sets itself.
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
