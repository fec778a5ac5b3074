#pragma once
/// \file io/gguf_parser.hpp
/// `detail::GgufParser`: reads a GGUF file front to back into a `GgufFile`, every read
/// bounds-checked (internal; use `GgufFile::open`).

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
#include "moet/io/gguf_file.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {
namespace detail {

/// Reads a GGUF file front to back; every read is bounds-checked and every error names where
/// the parser is (the key or tensor being read).
class GgufParser {
 public:
  GgufParser(GgufFile& out, std::span<const std::byte> bytes) : out_(out), bytes_(bytes) {}

  void parse() {
    where_ = "header";
    if (bytes_.size() < 4) fail("the file is ", bytes_.size(), " bytes, too short for the magic");
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
      std::string shown;
      for (int i = 0; i < 4; ++i) {
        const auto c = std::to_integer<unsigned char>(bytes_[static_cast<std::size_t>(i)]);
        shown += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
      }
      fail("bad magic '", shown, "', expected 'GGUF'");
    }
    pos_ = 4;
    const auto version = read<std::uint32_t>("the version");
    if (version != 0 && (version & 0xffffU) == 0) {
      fail("version ", version, " looks byte-swapped: big-endian GGUF files are not supported");
    }
    if (version == 1) fail("GGUF version 1 is not supported (moet reads versions 2 and 3)");
    if (version < 2 || version > 3) {
      fail("unsupported GGUF version ", version, " (moet reads versions 2 and 3)");
    }
    out_.version_ = version;
    const auto n_tensors = read<std::uint64_t>("the tensor count");
    const auto n_kv = read<std::uint64_t>("the metadata count");
    // Each metadata entry takes at least 13 bytes (key length, value type, a 1-byte value),
    // each tensor info at least 24 (name length, dimension count, type, offset).
    if (n_kv > remaining() / 13) {
      fail("metadata count ", n_kv, " cannot fit in the ", remaining(), " bytes left");
    }
    if (n_tensors > remaining() / 24) {
      fail("tensor count ", n_tensors, " cannot fit in the ", remaining(), " bytes left");
    }

    out_.key_order_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      where_ = concat("metadata entry ", i);
      std::string key(read_string("the key"));
      if (key.empty()) fail("empty key");
      where_ = concat("key '", key, "'");
      if (out_.values_.contains(key)) fail("repeated key");
      const auto type = read_value_type("the value type");
      GgufValue value = read_value(type, 0);
      out_.values_.emplace(key, std::move(value));
      out_.key_order_.push_back(std::move(key));
    }

    if (const GgufValue* a = out_.find("general.alignment")) {
      where_ = "key 'general.alignment'";
      if (a->type() != GgufValueType::kU32) {
        fail("is ", a->is_array() ? "an array" : gguf_value_type_name(a->type()), ", expected u32");
      }
      const std::uint64_t alignment = *a->to_uint();
      if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        fail("alignment ", alignment, " is not a power of two");
      }
      out_.alignment_ = alignment;
    }

    out_.tensor_order_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      where_ = concat("tensor info ", i);
      std::string name(read_string("the tensor name"));
      if (name.empty()) fail("empty tensor name");
      where_ = concat("tensor '", name, "'");
      if (out_.tensors_.contains(name)) fail("repeated tensor name");
      out_.tensors_.emplace(name, read_tensor_info());
      out_.tensor_order_.push_back(std::move(name));
    }

    // The data section starts at the next multiple of the alignment.
    where_ = "data section";
    const std::uint64_t a = out_.alignment_;
    std::uint64_t start = 0;
    if (!add_u64(pos_, a - 1, start)) fail("start overflows");
    start = start / a * a;
    if (start > bytes_.size()) {
      if (n_tensors > 0) {
        fail("starts at ", start, ", past the end of the file (", bytes_.size(), " bytes)");
      }
      start = bytes_.size();
    }
    out_.data_offset_ = start;
    check_tensor_ranges(bytes_.size() - start);
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("GgufFile", out_.name_, ": ", where_, ": ", std::forward<Args>(args)...);
  }
  std::uint64_t remaining() const { return bytes_.size() - pos_; }
  void need(std::uint64_t n, const char* what) const {
    if (n > remaining()) {
      fail(what, " (", n, " bytes at offset ", pos_, ") runs past the end of the file (",
           bytes_.size(), " bytes)");
    }
  }
  template <class U>
  U read(const char* what) {
    need(sizeof(U), what);
    const U v = load_le<U>(bytes_.data() + pos_);
    pos_ += sizeof(U);
    return v;
  }
  std::string_view read_string(const char* what) {
    const auto n = read<std::uint64_t>(what);
    if (n > remaining()) {
      fail(what, ": string length ", n, " at offset ", pos_ - 8, " runs past the end of the file (",
           bytes_.size(), " bytes)");
    }
    const std::string_view s(reinterpret_cast<const char*>(bytes_.data() + pos_),
                             static_cast<std::size_t>(n));
    pos_ += n;
    return s;
  }
  GgufValueType read_value_type(const char* what) {
    const auto t = read<std::uint32_t>(what);
    if (t > 12) fail("unknown value type ", t);
    return static_cast<GgufValueType>(t);
  }
  void check_bools(std::span<const std::byte> raw) const {
    for (const std::byte b : raw) {
      const int v = std::to_integer<int>(b);
      if (v > 1) fail("bool value ", v, " is neither 0 nor 1");
    }
  }

  GgufValue read_value(GgufValueType type, int depth) {
    GgufValue v;
    v.type_ = type;
    const std::size_t width = gguf_value_size(type);
    if (width > 0) {
      need(width, gguf_value_type_name(type));
      v.raw_ = bytes_.subspan(static_cast<std::size_t>(pos_), width);
      pos_ += width;
      if (type == GgufValueType::kBool) check_bools(v.raw_);
      return v;
    }
    if (type == GgufValueType::kString) {
      v.text_ = read_string("the string");
      return v;
    }
    // An array: element type, length, elements.
    if (depth >= kGgufMaxArrayDepth) fail("arrays nested deeper than ", kGgufMaxArrayDepth);
    v.element_ = read_value_type("the array's element type");
    const auto count = read<std::uint64_t>("the array length");
    v.count_ = static_cast<std::size_t>(count);
    const std::size_t elem = gguf_value_size(v.element_);
    if (elem > 0) {
      if (count > remaining() / elem) {
        fail("array of ", count, " ", gguf_value_type_name(v.element_),
             " runs past the end of the file (", remaining(), " bytes left)");
      }
      v.raw_ =
          bytes_.subspan(static_cast<std::size_t>(pos_), static_cast<std::size_t>(count) * elem);
      pos_ += count * elem;
      if (v.element_ == GgufValueType::kBool) check_bools(v.raw_);
      return v;
    }
    // Strings take at least their 8-byte length, arrays their 12-byte type and length.
    const std::uint64_t min_bytes = v.element_ == GgufValueType::kString ? 8 : 12;
    if (count > remaining() / min_bytes) {
      fail("array of ", count, " ", gguf_value_type_name(v.element_),
           " runs past the end of the file (", remaining(), " bytes left)");
    }
    auto items = std::make_shared<std::vector<GgufValue>>();
    items->reserve(static_cast<std::size_t>(count));
    for (std::uint64_t i = 0; i < count; ++i) items->push_back(read_value(v.element_, depth + 1));
    v.items_ = std::move(items);
    return v;
  }

  GgufTensorInfo read_tensor_info() {
    GgufTensorInfo t{};
    const auto n_dims = read<std::uint32_t>("the dimension count");
    if (n_dims > 4) fail(n_dims, " dimensions (at most 4)");
    t.n_dims = static_cast<int>(n_dims);
    t.ne = {1, 1, 1, 1};
    std::uint64_t numel = 1;
    bool overflow = false;
    for (std::uint32_t j = 0; j < n_dims; ++j) {
      const auto d = read<std::uint64_t>("a dimension");
      if (d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
        fail("dimension ", j, " = ", d, " is too large");
      }
      t.ne[j] = static_cast<Index>(d);
      overflow = overflow || !mul_u64(numel, d, numel);
    }
    if (overflow ||
        !extent_fits(std::span<const Index>(t.ne.data(), static_cast<std::size_t>(n_dims)))) {
      fail("ne ", shape_string(std::span<const Index>(t.ne.data(), n_dims)),
           " has more elements than fit in 63 bits");
    }
    const auto type_id = read<std::uint32_t>("the ggml type");
    const auto info = ggml_type_info(type_id);
    if (!info) fail("unknown ggml type id ", type_id);
    t.info = *info;
    if (t.ne[0] % info->block != 0) {
      fail(t.ne[0], " elements per row is not a whole number of ", info->name, " blocks of ",
           info->block);
    }
    std::uint64_t row_bytes = 0;  // a row's bytes must fit Index even when the tensor is empty
    if (!mul_u64(static_cast<std::uint64_t>(t.ne[0] / info->block),
                 static_cast<std::uint64_t>(info->block_bytes), row_bytes) ||
        row_bytes > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
      fail("a row of ", t.ne[0], " ", info->name, " elements has more bytes than fit in 63 bits");
    }
    if (!mul_u64(numel / static_cast<std::uint64_t>(info->block),
                 static_cast<std::uint64_t>(info->block_bytes), t.bytes)) {
      fail("byte count overflows");
    }
    t.offset = read<std::uint64_t>("the data offset");
    return t;
  }

  void check_tensor_ranges(std::uint64_t data_size) {
    std::vector<std::pair<const std::string*, const GgufTensorInfo*>> order;
    for (const auto& [name, t] : out_.tensors_) {
      where_ = concat("tensor '", name, "'");
      if (t.offset % out_.alignment_ != 0) {
        fail("offset ", t.offset, " is not a multiple of the alignment ", out_.alignment_);
      }
      std::uint64_t end = 0;
      if (!add_u64(t.offset, t.bytes, end) || end > data_size) {
        fail(ggml_type_name(t.info.type), " data [", t.offset, ", ", t.offset, " + ", t.bytes,
             ") run past the end of the data section (", data_size,
             " bytes): the file is truncated or the offset or type is wrong");
      }
      if (t.bytes > 0) order.emplace_back(&name, &t);
    }
    std::sort(order.begin(), order.end(),
              [](const auto& x, const auto& y) { return x.second->offset < y.second->offset; });
    where_ = "data section";
    for (std::size_t i = 1; i < order.size(); ++i) {
      const auto& [prev_name, prev] = order[i - 1];
      const auto& [name, t] = order[i];
      if (t->offset < prev->offset + prev->bytes) {
        fail("tensors '", *prev_name, "' [", prev->offset, ", ", prev->offset + prev->bytes,
             ") and '", *name, "' [", t->offset, ", ", t->offset + t->bytes, ") overlap");
      }
    }
  }

  GgufFile& out_;
  std::span<const std::byte> bytes_;
  std::uint64_t pos_ = 0;
  std::string where_;
};

}  // namespace detail

}  // namespace moet
