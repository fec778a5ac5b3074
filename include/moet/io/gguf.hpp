#pragma once
/// \file io/gguf.hpp
/// Reading GGUF files (llama.cpp's format), versions 2 and 3: `GgufFile` maps the file and
/// parses its header, metadata and tensor infos; `GgufValue` is one metadata value;
/// `GgufTensor` is one tensor's type, dimensions and bytes, with its ggml blocks for the
/// quantised types moet packs (`Q8_0`, `Q4_0`, `Q4_1`: `detail::BlockQ8_0` ... in
/// detail/quant.hpp, the same bytes as ggml's) and float or bf16 rows for any readable type;
/// `GgufArchitecture` collects the MoE keys of `general.architecture`.
///
/// The format (little-endian): the magic `GGUF`, a `u32` version, `u64` tensor and metadata
/// counts, the metadata (each a string key, a `u32` value type, the value: integers, floats,
/// bools, `u64`-length strings, or arrays of a type with a `u64` length, nested arrays too),
/// the tensor infos (name, `u32` dimension count, `u64` dimensions `ne0` (fastest) first, the
/// `u32` ggml type, the `u64` offset into the data section), padding to `general.alignment`
/// (a `u32`, default 32), then the data section. A 2-D weight `ne = [K, N]` is `N` rows of `K`
/// (PyTorch's `[N, K]`); llama.cpp's stacked experts `blk.L.ffn_gate_exps.weight` are
/// `ne = [n_embd, n_ff, n_expert]`, `ffn_down_exps` `[n_ff, n_embd, n_expert]`, and
/// `ffn_gate_inp` `[n_embd, n_expert]`; the block formats run along `ne0`.
///
/// Everything is checked when the file is opened, and a malformed file is a `moet::Error`
/// naming the file and the key or tensor at fault: a bad magic or version (v1, big-endian,
/// newer), counts that cannot fit in the file, a string, array or value running past the end,
/// an unknown value or ggml type, a bool that is neither 0 nor 1, a repeated key or tensor, a
/// `general.alignment` that is not a `u32` power of two, more than 4 dimensions, element or
/// byte counts that overflow, rows that are not whole blocks, offsets that are misaligned, past
/// the data section, or overlapping.
///
/// ```cpp
/// auto gguf = moet::GgufFile::open("qwen3moe-q8_0.gguf");
/// moet::GgufArchitecture arch = gguf.architecture();  // arch.expert_count, ...
/// moet::GgufTensor up = gguf.tensor("blk.0.ffn_up_exps.weight");
/// std::span<const moet::detail::BlockQ8_0> blocks = up.slice(3).blocks<moet::detail::BlockQ8_0>();
/// ```
///
/// The parts: io/gguf_types.hpp (ggml types, `GgufValue`, `GgufTensor`), io/gguf_file.hpp
/// (`GgufFile`, `GgufArchitecture`), io/gguf_parser.hpp (the checked reader); this header holds
/// the definitions that need them all.

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/bytes.hpp"
#include "moet/io/gguf_parser.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {

inline GgufFile GgufFile::open(const std::filesystem::path& path) {
  GgufFile out;
  out.map_ = MappedFile::open(path);
  out.name_ = path.string();
  out.bytes_ = out.map_.bytes();
  detail::GgufParser(out, out.bytes_).parse();
  return out;
}

inline GgufFile GgufFile::from_bytes(std::span<const std::byte> bytes, std::string name) {
  GgufFile out;
  out.name_ = std::move(name);
  out.bytes_ = bytes;
  detail::GgufParser(out, out.bytes_).parse();
  return out;
}

inline std::optional<GgufTensor> GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) return std::nullopt;
  const auto& t = it->second;
  GgufTensor out;
  out.file_ = name_;
  out.name_ = it->first;
  out.info_ = t.info;
  out.n_dims_ = t.n_dims;
  out.ne_ = t.ne;
  out.offset_ = t.offset;
  out.bytes_ = bytes_.subspan(static_cast<std::size_t>(data_offset_ + t.offset),
                              static_cast<std::size_t>(t.bytes));
  return out;
}

}  // namespace moet
