#!/usr/bin/env python3
"""Writes the seed corpora of the file-parser fuzzers: tests/fuzz/corpus/safetensors/,
tests/fuzz/corpus/gguf/ and tests/fuzz/corpus/npy/ (committed; re-run only to regenerate them).
Each gets a few small valid files (every dtype / value type / ggml type moet reads) and a few
invalid ones (truncated, overlapping, bad magic, ...), built here byte by byte from the published
layouts with the standard library alone. libFuzzer mutates from there. Inputs the fuzzers found
(found_*) are kept in the corpora as regression seeds; this script leaves them alone."""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    out = os.path.join(HERE, "corpus", target)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


# --- safetensors -------------------------------------------------------------------------
def safetensors(entries, data, metadata=None, pad=True):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


f32 = struct.pack("<6f", 1.5, -2.0, 0.0, 3.25, 7.0, -0.5)
bf16 = struct.pack("<4H", 0x3F80, 0xC020, 0x4049, 0x0001)
f16 = struct.pack("<4H", 0x3C00, 0xC100, 0x7BFF, 0x0001)
valid = safetensors({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                     "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [24, 32]},
                     "c": {"dtype": "F16", "shape": [4], "data_offsets": [32, 40]},
                     "i": {"dtype": "I64", "shape": [1], "data_offsets": [40, 48]},
                     "e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [48, 48]}},
                    f32 + bf16 + f16 + struct.pack("<q", -1), {"format": "pt"})
put("safetensors", "valid_mixed", valid)
put("safetensors", "valid_empty", safetensors({}, b""))
put("safetensors", "valid_3d", safetensors(
    {"w": {"dtype": "BF16", "shape": [2, 2, 3], "data_offsets": [0, 24]}}, bytes(24), pad=False))
put("safetensors", "truncated", valid[:-5])
put("safetensors", "overlap", safetensors(
    {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
     "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)))
put("safetensors", "count_mismatch", safetensors(
    {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16)))
put("safetensors", "bad_dtype", safetensors(
    {"a": {"dtype": "Q4_0", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)))
put("safetensors", "header_past_end", struct.pack("<Q", 1 << 20) + b"{}")
put("safetensors", "not_json", struct.pack("<Q", 9) + b"{\"a\": [1,")
put("safetensors", "overflow", safetensors(
    {"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}, b""))


# --- GGUF --------------------------------------------------------------------------------
def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return gstr(key) + struct.pack("<I", vtype) + payload


def gguf(kvs, tensors, version=3, alignment=32):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    offsets, offset = [], 0
    for name, ne, ggml_type, data in tensors:
        offsets.append(offset)
        offset += len(data)
        offset = (offset + alignment - 1) // alignment * alignment
    for (name, ne, ggml_type, data), off in zip(tensors, offsets):
        out += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", ggml_type, off)
    if tensors:
        out += bytes((alignment - len(out) % alignment) % alignment)
        start = len(out)
        for (name, ne, ggml_type, data), off in zip(tensors, offsets):
            out += bytes(start + off - len(out)) + data
    return out


q8_0 = struct.pack("<H", 0x3800) + bytes((i - 16) & 0xFF for i in range(32))
q4_0 = struct.pack("<H", 0x3C00) + bytes(j | ((15 - j) << 4) for j in range(16))
kvs = [kv("general.architecture", 8, gstr("qwen2moe")),
       kv("general.alignment", 4, struct.pack("<I", 32)),
       kv("qwen2moe.expert_count", 4, struct.pack("<I", 4)),
       kv("qwen2moe.expert_used_count", 4, struct.pack("<I", 2)),
       kv("qwen2moe.expert_weights_norm", 7, b"\x01"),
       kv("qwen2moe.expert_weights_scale", 6, struct.pack("<f", 2.5)),
       kv("t.i8", 1, b"\x80"), kv("t.u16", 2, struct.pack("<H", 7)),
       kv("t.i16", 3, struct.pack("<h", -7)), kv("t.i32", 5, struct.pack("<i", -9)),
       kv("t.u64", 10, struct.pack("<Q", 1 << 40)), kv("t.i64", 11, struct.pack("<q", -3)),
       kv("t.f64", 12, struct.pack("<d", 0.5)), kv("t.u8", 0, b"\x05"),
       kv("t.strs", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("bc")),
       kv("t.nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2))]
tensors = [("blk.0.ffn_gate_inp.weight", [4, 2], 0, struct.pack("<8f", *range(8))),
           ("f16", [4], 1, f16), ("bf16", [4], 30, bf16),
           ("blk.0.ffn_up_exps.weight", [32, 1, 2], 8, q8_0 * 2),
           ("q4_0", [32], 2, q4_0), ("q6_k", [256], 14, bytes(210))]
valid = gguf(kvs, tensors)
put("gguf", "valid_v3", valid)
put("gguf", "valid_v2", gguf(kvs[:3], tensors[:3], version=2))
put("gguf", "valid_align64", gguf([kv("general.alignment", 4, struct.pack("<I", 64))],
                                  tensors[3:5], alignment=64))
put("gguf", "valid_no_tensors", gguf(kvs[:2], []))
put("gguf", "truncated", valid[:-7])
put("gguf", "bad_magic", b"GGML" + valid[4:])
put("gguf", "v1", valid[:4] + struct.pack("<I", 1) + valid[8:])
put("gguf", "big_count", b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40))
put("gguf", "string_past_end", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40))
put("gguf", "bad_bool", gguf([kv("a.flag", 7, b"\x02")], []))


# --- npy ---------------------------------------------------------------------------------
def npy(header, data, major=1):
    header = header.encode()
    if major == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data
    return b"\x93NUMPY" + bytes([major, 0]) + struct.pack("<I", len(header)) + header + data


put("npy", "valid_2d", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }\n", f32))
put("npy", "valid_1d_v2", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }\n", f32, 2))
put("npy", "bad_descr", npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }\n", f32))
put("npy", "short_data", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 3), }\n", f32))
put("npy", "bad_header", npy("{'descr': '<f4', 'shape': (2,", b""))
print("wrote the safetensors, gguf and npy seed corpora under", os.path.join(HERE, "corpus"))
