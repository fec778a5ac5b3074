#pragma once
/// \file io/safetensors_writer.hpp
/// `SafetensorsWriter`: collects named tensors (F32, BF16, F16) and metadata and writes one
/// safetensors file.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/bytes.hpp"
#include "moet/io/mmap.hpp"
#include "moet/io/tensor_view.hpp"
#include "moet/tensor.hpp"

namespace moet {
/// Writes a safetensors file: named F32, BF16 or F16 tensors (converted from float when
/// added) and `__metadata__` strings. Tensors are laid out by element size (4-byte first),
/// then name, with the header padded with spaces to a multiple of 8 bytes, so every tensor is
/// aligned to its element size in the file, as the format recommends.
///
/// ```cpp
/// moet::SafetensorsWriter w;
/// w.set_metadata("format", "pt");
/// w.add("model.layers.0.mlp.gate.weight", gate_w);          // (E, K) from a RowMatrix<float>
/// w.add("model.layers.0.mlp.experts.0.up_proj.weight", up, moet::Dtype::kBf16);
/// w.write("model.safetensors");
/// ```
class SafetensorsWriter {
 public:
  /// Sets `__metadata__[key] = value`.
  void set_metadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
  }
  /// Adds tensor `name` of `shape` with the row-major `values` (as many as the shape has
  /// elements), stored as `dtype` (F32, BF16 or F16; BF16 and F16 round to nearest even).
  /// Throws `moet::Error` for a repeated or reserved name, a negative dimension, a count
  /// mismatch or another dtype.
  void add(std::string name, std::span<const Index> shape, std::span<const float> values,
           Dtype dtype = Dtype::kF32) {
    if (name.empty() || name == "__metadata__") fail("'", name, "' cannot name a tensor");
    if (tensors_.contains(name)) fail("tensor '", name, "' was already added");
    if (!is_float_dtype(dtype)) fail("tensor '", name, "': cannot write dtype ", dtype_name(dtype));
    std::uint64_t n = 1;
    for (const Index d : shape) {
      if (d < 0 || !detail::mul_u64(n, static_cast<std::uint64_t>(d), n)) {
        fail("tensor '", name, "': bad shape ", detail::shape_string(shape));
      }
    }
    if (n != values.size()) {
      fail("tensor '", name, "': shape ", detail::shape_string(shape), " has ", n,
           " elements, given ", values.size());
    }
    Pending p{dtype, {shape.begin(), shape.end()}, {}};
    const std::size_t width = static_cast<std::size_t>(dtype_bits(dtype) / 8);
    p.bytes.resize(values.size() * width);
    for (std::size_t i = 0; i < values.size(); ++i) {
      std::uint32_t bits = 0;
      if (dtype == Dtype::kF32) {
        bits = std::bit_cast<std::uint32_t>(values[i]);
      } else if (dtype == Dtype::kBf16) {
        bits = detail::to_bf16(values[i]).bits;
      } else {
        bits = detail::to_f16(values[i]);
      }
      for (std::size_t b = 0; b < width; ++b) {
        p.bytes[i * width + b] = static_cast<std::byte>((bits >> (8 * b)) & 0xffU);
      }
    }
    tensors_.emplace(std::move(name), std::move(p));
  }
  /// Adds the matrix `m` `(rows, cols)` as a `[rows, cols]` tensor.
  void add(std::string name, const ConstRows<float>& m, Dtype dtype = Dtype::kF32) {
    std::vector<float> values(static_cast<std::size_t>(m.size()));
    for (Index r = 0; r < m.rows(); ++r) {
      for (Index c = 0; c < m.cols(); ++c) {
        values[static_cast<std::size_t>(r * m.cols() + c)] = m(r, c);
      }
    }
    const Index shape[2] = {m.rows(), m.cols()};
    add(std::move(name), shape, values, dtype);
  }
  /// Adds the vector `v` as a `[n]` tensor.
  void add_vector(std::string name, std::span<const float> v, Dtype dtype = Dtype::kF32) {
    const Index shape[1] = {static_cast<Index>(v.size())};
    add(std::move(name), shape, v, dtype);
  }

  /// The file's bytes.
  std::vector<std::byte> to_bytes() const {
    std::vector<std::pair<const std::string*, const Pending*>> order;
    for (const auto& [name, p] : tensors_) order.emplace_back(&name, &p);
    std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return dtype_bits(a.second->dtype) > dtype_bits(b.second->dtype);
    });
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto& [name, p] : order) {
      header[*name] = {{"dtype", dtype_name(p->dtype)},
                       {"shape", p->shape},
                       {"data_offsets", {offset, offset + p->bytes.size()}}};
      offset += p->bytes.size();
    }
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::json::exception& e) {
      fail("cannot write the header (", e.what(), ")");  // names or metadata not UTF-8
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    std::vector<std::byte> out;
    out.reserve(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    for (int b = 0; b < 8; ++b) out.push_back(static_cast<std::byte>((n >> (8 * b)) & 0xffU));
    for (const char c : text) out.push_back(static_cast<std::byte>(c));
    for (const auto& [name, p] : order) out.insert(out.end(), p->bytes.begin(), p->bytes.end());
    return out;
  }

  /// Writes the file to `path` (through `path` + ".tmp", renamed into place when complete).
  /// Throws `moet::Error` naming the path when it cannot be written.
  void write(const std::filesystem::path& path) const {
    const std::vector<std::byte> bytes = to_bytes();
    std::filesystem::path tmp = path;
    tmp += ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) fail("cannot create ", tmp.string());
      out.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
      out.flush();
      if (!out) fail("cannot write ", tmp.string());
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) fail("cannot rename ", tmp.string(), " to ", path.string(), ": ", ec.message());
  }

 private:
  struct Pending {
    Dtype dtype;
    std::vector<Index> shape;
    std::vector<std::byte> bytes;
  };
  template <class... Args>
  [[noreturn]] static void fail(Args&&... args) {
    detail::fail("SafetensorsWriter", std::forward<Args>(args)...);
  }

  std::map<std::string, std::string> metadata_;
  std::map<std::string, Pending, std::less<>> tensors_;
};

}  // namespace moet
