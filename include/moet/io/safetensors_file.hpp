#pragma once
/// \file io/safetensors_file.hpp
/// `SafetensorsFile`: one safetensors file, memory-mapped, its header parsed and checked (see
/// io/safetensors.hpp for the format and every check).

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
namespace detail {
/// One tensor entry of a safetensors header (offsets into the data section).
struct SafetensorsEntry {
  Dtype dtype;
  std::vector<Index> shape;
  std::uint64_t begin;
  std::uint64_t end;
};

/// Parses JSON text `[first, last)`, throwing `moet::Error` (op, `where`) for invalid JSON and
/// for a key repeated in the top-level object, or (when `nested` names a top-level key) in the
/// object under it. nlohmann keeps the last of repeated keys; a checkpoint with two entries of
/// one name is ambiguous, so it is refused instead.
inline nlohmann::json parse_json_unique(const char* first, const char* last, const char* op,
                                        const std::string& where, const char* nested = nullptr) {
  std::set<std::string, std::less<>> top;
  std::set<std::string, std::less<>> inner;
  std::string current_top;
  const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                            nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (depth == 1) {
        if (!top.insert(key).second) fail(op, where, ": key '", key, "' appears twice");
        current_top = key;
      } else if (depth == 2 && nested != nullptr && current_top == nested) {
        if (!inner.insert(key).second) {
          fail(op, where, ": key '", key, "' appears twice in '", nested, "'");
        }
      }
    }
    return true;
  };
  try {
    return nlohmann::json::parse(first, last, callback);
  } catch (const nlohmann::json::exception& e) {
    fail(op, where, ": not valid JSON (", e.what(), ")");
  }
}

/// A non-negative JSON integer as `std::uint64_t`, or none (negative, fractional, not a
/// number, or beyond 64 bits: nlohmann stores those as floats).
inline std::optional<std::uint64_t> json_uint(const nlohmann::json& v) {
  if (!v.is_number_unsigned()) return std::nullopt;
  return v.get<std::uint64_t>();
}
}  // namespace detail

/// One safetensors file, memory-mapped (or a caller's buffer), its header parsed and checked.
/// Lookups return `TensorView`s into the mapping. Movable; immutable once opened, so several
/// threads may read it at once.
class SafetensorsFile : public detail::RequireTensor<SafetensorsFile> {
 public:
  /// Maps and checks the file at `path`. Throws `moet::Error` (naming the file, and the tensor
  /// where one is at fault) for a missing or unreadable file and for every bad header: the
  /// file shorter than 8 bytes, a header length past the end of the file or over 100 MB, JSON
  /// that does not parse or is not an object, a repeated tensor name, `__metadata__` that is
  /// not an object of strings, an entry that lacks a known `dtype`, a `shape` of non-negative
  /// integers or `data_offsets` `[begin, end]` with `begin <= end`, a range outside the data
  /// section, a byte count that differs from the shape's (element counts that overflow
  /// included), and ranges that overlap.
  static SafetensorsFile open(const std::filesystem::path& path) {
    MappedFile map = MappedFile::open(path);
    const std::span<const std::byte> bytes = map.bytes();
    SafetensorsFile out(path.string(), bytes);
    out.map_ = std::move(map);  // the mapping does not move, so the parsed spans stay valid
    return out;
  }
  /// Parses a safetensors file held in memory, which must outlive the object (it is borrowed,
  /// not copied). Checks as `open`; `name` is used in messages.
  static SafetensorsFile from_bytes(std::span<const std::byte> bytes,
                                    std::string name = "<memory>") {
    return SafetensorsFile(std::move(name), bytes);
  }

  /// The name used in messages (the path as opened).
  const std::string& name() const { return name_; }
  /// The JSON header's length `N` in bytes; the data section starts at `8 + N`.
  std::uint64_t header_size() const { return header_size_; }
  /// The `__metadata__` strings (empty when absent).
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }
  /// Number of tensors.
  Index size() const { return static_cast<Index>(entries_.size()); }
  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& [name, entry] : entries_) out.push_back(name);
    return out;
  }
  bool contains(std::string_view name) const { return entries_.find(name) != entries_.end(); }
  /// The tensor `name`, or none.
  std::optional<TensorView> find(std::string_view name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) return std::nullopt;
    const auto& e = it->second;
    return TensorView(name_, it->first, e.dtype, e.shape,
                      data_.subspan(static_cast<std::size_t>(e.begin),
                                    static_cast<std::size_t>(e.end - e.begin)));
  }
  /// The tensor `name`; throws `moet::Error` naming the file and the tensor when it is absent.
  TensorView tensor(std::string_view name) const {
    auto view = find(name);
    if (!view) detail::fail("SafetensorsFile", name_, ": no tensor '", name, "'");
    return *std::move(view);
  }
  /// `require(name, shape)`, the tensor checked to be F32, BF16 or F16 and of `shape`, comes
  /// from `detail::RequireTensor`.

 private:
  SafetensorsFile(std::string name, std::span<const std::byte> bytes)
      : name_(std::move(name)), bytes_(bytes) {
    parse();
  }

  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("SafetensorsFile", name_, ": ", std::forward<Args>(args)...);
  }

  void parse() {
    const std::uint64_t size = bytes_.size();
    if (size < 8) fail("the file is ", size, " bytes, shorter than the 8-byte header length");
    header_size_ = detail::load_le<std::uint64_t>(bytes_.data());
    if (header_size_ > detail::kSafetensorsMaxHeader) {
      fail("header length ", header_size_, " is over the format's limit of ",
           detail::kSafetensorsMaxHeader, " bytes");
    }
    if (header_size_ > size - 8) {
      fail("header length ", header_size_, " runs past the end of the file (", size, " bytes)");
    }
    const auto* text = reinterpret_cast<const char*>(bytes_.data() + 8);
    const nlohmann::json header =
        detail::parse_json_unique(text, text + header_size_, "SafetensorsFile", name_ + " header");
    if (!header.is_object()) fail("the header is not a JSON object");
    data_ = bytes_.subspan(static_cast<std::size_t>(8 + header_size_));

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(value);
      } else {
        entries_.emplace(key, parse_entry(key, value));
      }
    }
    check_overlaps();
  }

  void parse_metadata(const nlohmann::json& value) {
    if (!value.is_object()) fail("__metadata__ is not a JSON object");
    for (const auto& [k, v] : value.items()) {
      if (!v.is_string()) fail("__metadata__ value of '", k, "' is not a string");
      metadata_.emplace(k, v.get<std::string>());
    }
  }

  template <class... Args>
  [[noreturn]] void fail_tensor(const std::string& name, Args&&... args) const {
    fail("tensor '", name, "': ", std::forward<Args>(args)...);
  }

  detail::SafetensorsEntry parse_entry(const std::string& name, const nlohmann::json& value) const {
    if (!value.is_object()) fail_tensor(name, "its entry is not a JSON object");
    const auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string()) fail_tensor(name, "no \"dtype\" string");
    const auto& dtype_text = dtype_it->get_ref<const std::string&>();
    const auto dtype = dtype_from_name(dtype_text);
    if (!dtype) fail_tensor(name, "unknown dtype '", dtype_text, "'");

    const auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array()) fail_tensor(name, "no \"shape\" array");
    std::vector<Index> shape;
    shape.reserve(shape_it->size());
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *shape_it) {
      const auto n = detail::json_uint(d);
      if (!n || *n > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
        fail_tensor(name, "shape ", shape_it->dump(), " holds ", d.dump(),
                    ", not a non-negative integer");
      }
      shape.push_back(static_cast<Index>(*n));
      overflow = overflow || !detail::mul_u64(numel, *n, numel);
    }

    const auto offsets_it = value.find("data_offsets");
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
      fail_tensor(name, "no \"data_offsets\" array of two offsets");
    }
    const auto begin = detail::json_uint((*offsets_it)[0]);
    const auto end = detail::json_uint((*offsets_it)[1]);
    if (!begin || !end)
      fail_tensor(name, "data_offsets ", offsets_it->dump(), " are not non-negative integers");
    const std::string range =
        "data_offsets [" + std::to_string(*begin) + ", " + std::to_string(*end) + "]";
    if (*end < *begin) fail_tensor(name, range, " end before they begin");
    if (*end > data_.size()) {
      fail_tensor(name, range, " run past the end of the data section (", data_.size(),
                  " bytes): the file is truncated or the offsets are wrong");
    }
    std::uint64_t bits = 0;
    if (overflow || !detail::extent_fits(shape) ||
        !detail::mul_u64(numel, static_cast<std::uint64_t>(dtype_bits(*dtype)), bits)) {
      fail_tensor(name, "shape ", detail::shape_string(shape),
                  " has more elements than fit in 64 bits");
    }
    if (bits % 8 != 0) {
      fail_tensor(name, "shape ", detail::shape_string(shape), " of ", dtype_text,
                  " is not a whole number of bytes");
    }
    if (bits / 8 != *end - *begin) {
      fail_tensor(name, "shape ", detail::shape_string(shape), " of ", dtype_text, " needs ",
                  bits / 8, " bytes, but ", range, " hold ", *end - *begin);
    }
    return {*dtype, std::move(shape), *begin, *end};
  }

  void check_overlaps() const {
    std::vector<std::pair<const std::string*, const detail::SafetensorsEntry*>> order;
    for (const auto& [name, e] : entries_) {
      if (e.end > e.begin) order.emplace_back(&name, &e);
    }
    std::sort(order.begin(), order.end(),
              [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
    for (std::size_t i = 1; i < order.size(); ++i) {
      const auto& [prev_name, prev] = order[i - 1];
      const auto& [name, e] = order[i];
      if (e->begin < prev->end) {
        fail("tensors '", *prev_name, "' [", prev->begin, ", ", prev->end, ") and '", *name, "' [",
             e->begin, ", ", e->end, ") overlap");
      }
    }
  }

  MappedFile map_;
  std::string name_;
  std::span<const std::byte> bytes_;
  std::span<const std::byte> data_;
  std::uint64_t header_size_ = 0;
  std::map<std::string, std::string, std::less<>> metadata_;
  std::map<std::string, detail::SafetensorsEntry, std::less<>> entries_;
};

}  // namespace moet
