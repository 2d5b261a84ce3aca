"""Write the first N layers of a GGUF model as a smaller GGUF model (same embedding, norm, tokenizer and
tensor types), e.g. to carry a slice of the default model to a GPU machine with a size limit.

    python scripts/slice_gguf.py --layers 6 -o slice.gguf [SRC.gguf]   (SRC defaults to the default model)
"""

from __future__ import annotations

import argparse
import re

import gguf

from perfxllm.model.loader import default_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?", default=None)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    reader = gguf.GGUFReader(args.src or default_model_path())
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(args.out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = args.layers if key == f"{arch}.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= args.layers:
            continue
        writer.add_tensor(t.name, t.data, raw_shape=None, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
