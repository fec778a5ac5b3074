#pragma once
/// \file io/safetensors_checkpoint.hpp
/// `SafetensorsCheckpoint`: a Hugging Face checkpoint directory, one `model.safetensors` or the
/// shards of `model.safetensors.index.json`, opened shard by shard on first use.

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
#include "moet/io/safetensors_file.hpp"
#include "moet/tensor.hpp"

namespace moet {
/// A checkpoint: one `model.safetensors`, or shards listed in `model.safetensors.index.json`
/// (Hugging Face's layout: `{"metadata": {...}, "weight_map": {tensor: shard file}}`, the
/// shards in the index's directory). Shards are opened (mapped and checked) the first time a
/// tensor in them is looked up, so reading one layer of a large checkpoint touches one shard;
/// `open_all` opens and cross-checks them all. Lookups are safe from several threads.
class SafetensorsCheckpoint : public detail::RequireTensor<SafetensorsCheckpoint> {
 public:
  /// Opens `path`: a directory (its `model.safetensors.index.json` if present, else its
  /// `model.safetensors`), an index file (a name ending in `.index.json`), or one safetensors
  /// file. Throws `moet::Error` for a missing path or file, and for an index that is not JSON,
  /// not an object, has no `weight_map` object, maps a tensor to anything but a plain file
  /// name in its directory (no `/`, no `..`), or repeats a tensor.
  static SafetensorsCheckpoint open(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    SafetensorsCheckpoint out;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      out.directory_ = path;
      if (fs::exists(path / "model.safetensors.index.json", ec)) {
        out.load_index(path / "model.safetensors.index.json");
      } else if (fs::exists(path / "model.safetensors", ec)) {
        out.load_single(path / "model.safetensors");
      } else {
        detail::fail("SafetensorsCheckpoint", path.string(),
                     ": no model.safetensors or model.safetensors.index.json in this directory");
      }
    } else {
      out.directory_ = path.parent_path();
      const std::string file = path.filename().string();
      const std::string suffix = ".index.json";
      if (file.size() > suffix.size() &&
          file.compare(file.size() - suffix.size(), suffix.size(), suffix) == 0) {
        out.load_index(path);
      } else {
        out.load_single(path);
      }
    }
    return out;
  }

  /// Whether the tensors come from an index (even one naming a single shard).
  bool sharded() const { return !index_.empty(); }
  /// The directory the shards are read from.
  const std::filesystem::path& directory() const { return directory_; }
  /// The index's `metadata` object (empty for a single file or when absent).
  const nlohmann::json& index_metadata() const { return index_metadata_; }
  /// Number of tensors listed.
  Index size() const { return static_cast<Index>(weight_map_.size()); }
  /// Every tensor name, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(weight_map_.size());
    for (const auto& [name, shard] : weight_map_) out.push_back(name);
    return out;
  }
  /// The distinct shard file names, sorted.
  std::vector<std::string> shard_names() const {
    std::set<std::string> s;
    for (const auto& [name, shard] : weight_map_) s.insert(shard);
    return {s.begin(), s.end()};
  }
  bool contains(std::string_view name) const { return weight_map_.contains(name); }

  /// The tensor `name`, from its shard (opened now if it was not). Throws `moet::Error` naming
  /// the tensor when the checkpoint lists no such tensor, when its shard is missing or bad
  /// (the shard's own error, with the tensor and the index named), and when the shard lacks a
  /// tensor the index maps to it.
  TensorView tensor(std::string_view name) const {
    const auto it = weight_map_.find(name);
    if (it == weight_map_.end()) {
      detail::fail("SafetensorsCheckpoint", where(), ": no tensor '", name, "'");
    }
    const SafetensorsFile& file = shard(it->second, name);
    auto view = file.find(name);
    if (!view) {
      detail::fail("SafetensorsCheckpoint", where(), " maps tensor '", name, "' to ", it->second,
                   ", which has no such tensor");
    }
    return *std::move(view);
  }
  /// `require(name, shape)`, the tensor checked to be F32, BF16 or F16 and of `shape`, comes
  /// from `detail::RequireTensor`.

  /// Opens every shard and checks that each holds the tensors the index maps to it (throws
  /// `moet::Error` at the first problem, as `tensor` would).
  void open_all() const {
    for (const auto& [name, shard_name] : weight_map_) {
      if (!shard(shard_name, name).contains(name)) {
        detail::fail("SafetensorsCheckpoint", where(), " maps tensor '", name, "' to ", shard_name,
                     ", which has no such tensor");
      }
    }
  }

 private:
  SafetensorsCheckpoint() = default;

  std::string where() const { return index_.empty() ? single_ : index_; }

  template <class... Args>
  [[noreturn]] void fail_index(Args&&... args) const {
    detail::fail("SafetensorsCheckpoint", index_, ": ", std::forward<Args>(args)...);
  }

  void load_single(const std::filesystem::path& path) {
    auto file = std::make_unique<SafetensorsFile>(SafetensorsFile::open(path));
    single_ = file->name();
    const std::string shard_name = path.filename().string();
    for (auto& name : file->names()) weight_map_.emplace(std::move(name), shard_name);
    shards_.emplace(shard_name, std::move(file));
  }

  void load_index(const std::filesystem::path& path) {
    index_ = path.string();
    const MappedFile map = MappedFile::open(path);
    const auto* text = reinterpret_cast<const char*>(map.bytes().data());
    const nlohmann::json index = detail::parse_json_unique(
        text, text + map.size(), "SafetensorsCheckpoint", index_, "weight_map");
    if (!index.is_object()) fail_index("not a JSON object");
    if (const auto meta = index.find("metadata"); meta != index.end()) {
      if (!meta->is_object()) fail_index("\"metadata\" is not an object");
      index_metadata_ = *meta;
    }
    const auto wm = index.find("weight_map");
    if (wm == index.end() || !wm->is_object()) fail_index("no \"weight_map\" object");
    for (const auto& [name, shard] : wm->items()) {
      if (!shard.is_string())
        fail_index("tensor '", name, "' is mapped to ", shard.dump(), ", not a file name");
      const auto& file = shard.get_ref<const std::string&>();
      if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
          file.find('\\') != std::string::npos || file.find('\0') != std::string::npos) {
        fail_index("tensor '", name, "' is mapped to '", file,
                   "', not a plain file name in the index's directory");
      }
      weight_map_.emplace(name, file);
    }
  }

  const SafetensorsFile& shard(const std::string& shard_name, std::string_view tensor) const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    auto it = shards_.find(shard_name);
    if (it == shards_.end()) {
      try {
        auto file =
            std::make_unique<SafetensorsFile>(SafetensorsFile::open(directory_ / shard_name));
        it = shards_.emplace(shard_name, std::move(file)).first;
      } catch (const Error& e) {
        detail::fail("SafetensorsCheckpoint", where(), ": shard ", shard_name, " of tensor '",
                     tensor, "' cannot be read: ", e.what());
      }
    }
    return *it->second;
  }

  std::filesystem::path directory_;
  std::string index_;   // the index file, when sharded
  std::string single_;  // the file, when not
  nlohmann::json index_metadata_ = nlohmann::json::object();
  std::map<std::string, std::string, std::less<>> weight_map_;  // tensor -> shard file name
  std::unique_ptr<std::mutex> mutex_ = std::make_unique<std::mutex>();
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>, std::less<>> shards_;
};

}  // namespace moet
