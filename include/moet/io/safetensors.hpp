#pragma once
/// \file io/safetensors.hpp
/// Reading and writing safetensors checkpoints (Hugging Face's format): `SafetensorsFile` (one
/// memory-mapped file), `SafetensorsCheckpoint` (a directory with `model.safetensors` or
/// shards listed in `model.safetensors.index.json`), `TensorView` (one tensor's dtype, shape
/// and bytes, read as float or bf16 rows without a whole-tensor copy) and `SafetensorsWriter`.
///
/// The format: an 8-byte little-endian header length `N`, `N` bytes of JSON (an object mapping
/// each tensor name to `{"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}`
/// plus an optional `"__metadata__"` object of strings; padded with spaces), then the data
/// section; `begin`/`end` are byte offsets into the data section. Tensors are row-major
/// (C order): a PyTorch `nn.Linear` weight is `[out_features, in_features]`.
///
/// Every file is checked when it is opened, before any tensor is read: the header length
/// against the file, the JSON, each entry's dtype, shape and offsets, byte counts against
/// shapes (with overflow checks), ranges inside the data section, overlapping ranges and
/// duplicate names. A bad file is a `moet::Error` naming the file and, where one is at fault,
/// the tensor:
/// `[moet::SafetensorsFile] model.safetensors: tensor 'lm_head.weight': shape [8, 4] of F32
/// needs 128 bytes, but data_offsets [0, 100] hold 100`. Gaps between tensors and bytes after
/// the last one are allowed (they are never read).
///
/// ```cpp
/// auto ckpt = moet::SafetensorsCheckpoint::open("Mixtral-8x7B");  // a directory
/// moet::TensorView w = ckpt.require("model.layers.0.block_sparse_moe.gate.weight", {8, 4096});
/// moet::RowMatrix<float> gate = w.to_matrix();                     // (8, 4096)
/// ```
///
/// The parts: io/tensor_view.hpp (`Dtype`, `TensorView`), io/safetensors_file.hpp,
/// io/safetensors_checkpoint.hpp, io/safetensors_writer.hpp.

#include "moet/io/safetensors_checkpoint.hpp"
#include "moet/io/safetensors_file.hpp"
#include "moet/io/safetensors_writer.hpp"
#include "moet/io/tensor_view.hpp"
