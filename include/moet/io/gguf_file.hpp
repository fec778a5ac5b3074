#pragma once
/// \file io/gguf_file.hpp
/// `GgufFile`, one GGUF file (v2 or v3) mapped and checked, and `GgufArchitecture`, the MoE keys
/// of its `general.architecture` (see io/gguf.hpp for the format and every check).

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
#include "moet/io/gguf_types.hpp"
#include "moet/io/mmap.hpp"
#include "moet/tensor.hpp"

namespace moet {
/// The MoE hyper-parameters llama.cpp stores under `general.architecture` (`<arch>.<key>`), as
/// present in the file (absent keys stay empty). See `GgufFile::architecture`.
struct GgufArchitecture {
  std::string name;                                 ///< `general.architecture`, e.g. "qwen2moe"
  std::optional<Index> block_count;                 ///< layers
  std::optional<Index> embedding_length;            ///< model_dim
  std::optional<Index> expert_feed_forward_length;  ///< routed experts' hidden_dim
  std::optional<Index> expert_shared_feed_forward_length;  ///< shared experts' hidden_dim
  std::optional<Index> expert_count;                       ///< routed experts
  std::optional<Index> expert_used_count;                  ///< k
  std::optional<Index> expert_shared_count;                ///< shared experts
  std::optional<Index> leading_dense_block_count;          ///< first layers with a dense MLP
  std::optional<Index> expert_group_count;                 ///< DeepSeek's n_group
  std::optional<Index> expert_group_used_count;            ///< DeepSeek's topk_group
  std::optional<bool> expert_weights_norm;                 ///< renormalise the top-k weights
  std::optional<float> expert_weights_scale;               ///< routed_scaling_factor
  /// llama.cpp's gating function: 1 softmax, 2 sigmoid (3 softmax over the chosen weights).
  std::optional<std::uint32_t> expert_gating_func;
};

namespace detail {
struct GgufTensorInfo {
  GgmlTypeInfo info;
  int n_dims;
  std::array<Index, 4> ne;
  std::uint64_t offset;  // in the data section
  std::uint64_t bytes;
};
}  // namespace detail

/// One GGUF file (v2 or v3), memory-mapped (or a caller's buffer), checked when opened. Its
/// metadata and tensors are looked up by name; immutable once opened, so several threads may
/// read it at once. Movable; the views it hands out stay valid while it (or what it moved to)
/// lives.
class GgufFile {
 public:
  /// Maps and checks the file at `path` (see the file comment for every check). Throws
  /// `moet::Error` naming the file and the key or tensor at fault.
  static GgufFile open(const std::filesystem::path& path);
  /// Parses a GGUF file held in memory, which must outlive the object (borrowed, not copied).
  static GgufFile from_bytes(std::span<const std::byte> bytes, std::string name = "<memory>");

  const std::string& name() const { return name_; }
  /// 2 or 3.
  std::uint32_t version() const { return version_; }
  /// `general.alignment` (32 when absent).
  std::uint64_t alignment() const { return alignment_; }
  /// Where the data section starts in the file.
  std::uint64_t data_offset() const { return data_offset_; }

  /// Metadata keys in file order.
  const std::vector<std::string>& keys() const { return key_order_; }
  /// The value of `key`, or null.
  const GgufValue* find(std::string_view key) const {
    const auto it = values_.find(key);
    return it == values_.end() ? nullptr : &it->second;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  /// The value of `key` as a non-negative integer; none when absent. Throws `moet::Error`
  /// naming the key when it is present with another type or a negative value.
  std::optional<std::uint64_t> get_uint(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto u = v->to_uint();
    if (!u) bad_key(key, *v, "a non-negative integer");
    return u;
  }
  /// The value of `key` as a double (floats and integers); none when absent; throws for
  /// another type.
  std::optional<double> get_float(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto d = v->to_double();
    if (!d) bad_key(key, *v, "a number");
    return d;
  }
  /// The value of `key` as a bool; none when absent; throws for another type.
  std::optional<bool> get_bool(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto b = v->to_bool();
    if (!b) bad_key(key, *v, "a bool");
    return b;
  }
  /// The value of `key` as a string; none when absent; throws for another type.
  std::optional<std::string_view> get_string(std::string_view key) const {
    const GgufValue* v = find(key);
    if (v == nullptr) return std::nullopt;
    const auto s = v->to_string();
    if (!s) bad_key(key, *v, "a string");
    return s;
  }

  /// `general.architecture` and its MoE keys (`<arch>.expert_count`, `.expert_used_count`,
  /// `.expert_shared_count`, `.expert_weights_norm`, `.expert_weights_scale`,
  /// `.expert_gating_func`, `.expert_group_count`, `.expert_group_used_count`,
  /// `.leading_dense_block_count`, `.block_count`, `.embedding_length`,
  /// `.expert_feed_forward_length`, `.expert_shared_feed_forward_length`). Throws
  /// `moet::Error` naming the key when `general.architecture` is missing or any of them has
  /// the wrong type or an impossible value (an integer past `Index`, more experts used than
  /// there are).
  GgufArchitecture architecture() const {
    GgufArchitecture a;
    const auto arch = get_string("general.architecture");
    if (!arch) detail::fail("GgufFile", name_, ": no key 'general.architecture'");
    a.name = std::string(*arch);
    const auto count = [&](const char* suffix) -> std::optional<Index> {
      const std::string key = a.name + "." + suffix;
      const auto v = get_uint(key);
      if (!v) return std::nullopt;
      if (*v > static_cast<std::uint64_t>(std::numeric_limits<std::int32_t>::max())) {
        detail::fail("GgufFile", name_, ": key '", key, "' = ", *v, " is too large");
      }
      return static_cast<Index>(*v);
    };
    a.block_count = count("block_count");
    a.embedding_length = count("embedding_length");
    a.expert_feed_forward_length = count("expert_feed_forward_length");
    a.expert_shared_feed_forward_length = count("expert_shared_feed_forward_length");
    a.expert_count = count("expert_count");
    a.expert_used_count = count("expert_used_count");
    a.expert_shared_count = count("expert_shared_count");
    a.leading_dense_block_count = count("leading_dense_block_count");
    a.expert_group_count = count("expert_group_count");
    a.expert_group_used_count = count("expert_group_used_count");
    a.expert_weights_norm = get_bool(a.name + ".expert_weights_norm");
    if (const auto s = get_float(a.name + ".expert_weights_scale")) {
      a.expert_weights_scale = static_cast<float>(*s);
    }
    if (const auto g = count("expert_gating_func")) {
      a.expert_gating_func = static_cast<std::uint32_t>(*g);
    }
    if (a.expert_count && a.expert_used_count && *a.expert_used_count > *a.expert_count) {
      detail::fail("GgufFile", name_, ": key '", a.name,
                   ".expert_used_count' = ", *a.expert_used_count, " exceeds '", a.name,
                   ".expert_count' = ", *a.expert_count);
    }
    return a;
  }

  /// Number of tensors.
  Index num_tensors() const { return static_cast<Index>(tensor_order_.size()); }
  /// Tensor names in file order.
  const std::vector<std::string>& tensor_names() const { return tensor_order_; }
  bool has_tensor(std::string_view name) const { return tensors_.contains(name); }
  /// The tensor `name`, or none.
  std::optional<GgufTensor> find_tensor(std::string_view name) const;
  /// The tensor `name`; throws `moet::Error` naming the file and the tensor when absent.
  GgufTensor tensor(std::string_view name) const {
    auto t = find_tensor(name);
    if (!t) detail::fail("GgufFile", name_, ": no tensor '", name, "'");
    return *std::move(t);
  }

 private:
  friend class detail::GgufParser;
  GgufFile() = default;

  [[noreturn]] void bad_key(std::string_view key, const GgufValue& v, const char* want) const {
    detail::fail("GgufFile", name_, ": key '", key, "' is ",
                 v.is_array() ? "an array" : gguf_value_type_name(v.type()), ", expected ", want);
  }

  MappedFile map_;
  std::string name_;
  std::span<const std::byte> bytes_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = detail::kGgufDefaultAlignment;
  std::uint64_t data_offset_ = 0;
  std::vector<std::string> key_order_;
  std::map<std::string, GgufValue, std::less<>> values_;
  std::vector<std::string> tensor_order_;
  std::map<std::string, detail::GgufTensorInfo, std::less<>> tensors_;
};

}  // namespace moet
