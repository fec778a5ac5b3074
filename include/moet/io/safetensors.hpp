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
#include "moet/tensor.hpp"

namespace moet {

/// The element types of the safetensors format. Every one is recognised (so a file holding
/// integer or 8-bit float tensors opens), but moet converts only `kF32`, `kBf16` and `kF16`;
/// reading another as numbers is a `moet::Error` naming the tensor and its dtype.
enum class Dtype : std::uint8_t {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kI16,
  kU16,
  kF16,
  kBf16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kC64,
  kF4,
  kF6E2M3,
  kF6E3M2,
};

namespace detail {
struct DtypeInfo {
  Dtype dtype;
  const char* name;  // as the format spells it
  int bits;          // per element
};
inline constexpr DtypeInfo kDtypes[] = {
    {Dtype::kBool, "BOOL", 8},      {Dtype::kU8, "U8", 8},          {Dtype::kI8, "I8", 8},
    {Dtype::kF8E5M2, "F8_E5M2", 8}, {Dtype::kF8E4M3, "F8_E4M3", 8}, {Dtype::kF8E8M0, "F8_E8M0", 8},
    {Dtype::kI16, "I16", 16},       {Dtype::kU16, "U16", 16},       {Dtype::kF16, "F16", 16},
    {Dtype::kBf16, "BF16", 16},     {Dtype::kI32, "I32", 32},       {Dtype::kU32, "U32", 32},
    {Dtype::kF32, "F32", 32},       {Dtype::kF64, "F64", 64},       {Dtype::kI64, "I64", 64},
    {Dtype::kU64, "U64", 64},       {Dtype::kC64, "C64", 64},       {Dtype::kF4, "F4", 4},
    {Dtype::kF6E2M3, "F6_E2M3", 6}, {Dtype::kF6E3M2, "F6_E3M2", 6},
};
/// The largest header the reference implementation accepts (100 MB).
inline constexpr std::uint64_t kSafetensorsMaxHeader = 100'000'000;
}  // namespace detail

/// The format's spelling of `d` ("F32", "BF16", "F8_E4M3", ...).
inline const char* dtype_name(Dtype d) {
  for (const auto& info : detail::kDtypes) {
    if (info.dtype == d) return info.name;
  }
  return "?";
}
/// Bits per element of `d` (4 and 6 for the packed float formats).
inline int dtype_bits(Dtype d) {
  for (const auto& info : detail::kDtypes) {
    if (info.dtype == d) return info.bits;
  }
  return 0;
}
/// The dtype the format spells `name`, or none.
inline std::optional<Dtype> dtype_from_name(std::string_view name) {
  for (const auto& info : detail::kDtypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}
/// Whether moet converts `d` to float: F32, BF16 and F16.
constexpr bool is_float_dtype(Dtype d) {
  return d == Dtype::kF32 || d == Dtype::kBf16 || d == Dtype::kF16;
}

/// A read-only view of one tensor of a checkpoint: its dtype, shape (row-major, outermost
/// first) and bytes, which live in the file's mapping (the view must not outlive the
/// `SafetensorsFile` or `SafetensorsCheckpoint` it came from; moving those keeps it valid).
///
/// As a matrix the tensor is `(rows(), cols())`: the last dimension is the columns, all others
/// the rows (a `[E, F, K]` tensor is `(E * F, K)`, a vector `[n]` is `(1, n)`, a scalar
/// `(1, 1)`). The readers convert F32, BF16 and F16 elements to float (exactly) or to bf16
/// (BF16 copied, others rounded to nearest even) straight from the mapped bytes, a block at a
/// time, with any output strides: a loader packs from them row by row, never through a float
/// copy of the whole tensor.
class TensorView {
 public:
  /// A view of `bytes` as a `dtype` tensor of `shape`. Throws `moet::Error` when a dimension is
  /// negative or `bytes` is not exactly the tensor's size. `file` and `name` are for messages.
  TensorView(std::string file, std::string name, Dtype dtype, std::vector<Index> shape,
             std::span<const std::byte> bytes)
      : file_(std::move(file)),
        name_(std::move(name)),
        dtype_(dtype),
        shape_(std::move(shape)),
        bytes_(bytes) {
    if (!detail::extent_fits(shape_)) fail("shape ", detail::shape_string(shape_), " is invalid");
    std::uint64_t n = 1;
    for (const Index d : shape_) n *= static_cast<std::uint64_t>(d);
    std::uint64_t bits = 0;
    if (!detail::mul_u64(n, static_cast<std::uint64_t>(dtype_bits(dtype)), bits) ||
        bits / 8 != bytes.size() || bits % 8 != 0 ||
        n > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())) {
      fail("shape ", detail::shape_string(shape_), " of ", dtype_name(dtype), " does not match ",
           bytes.size(), " bytes");
    }
    numel_ = static_cast<Index>(n);
  }

  /// The tensor's name in its file.
  const std::string& name() const { return name_; }
  /// The file it was read from (as opened; "<memory>" for a buffer).
  const std::string& file() const { return file_; }
  Dtype dtype() const { return dtype_; }
  /// Dimensions, outermost first (PyTorch's order).
  std::span<const Index> shape() const { return shape_; }
  Index rank() const { return static_cast<Index>(shape_.size()); }
  /// Dimension `i` (throws when `i` is not below `rank()`).
  Index dim(Index i) const {
    if (i < 0 || i >= rank()) fail("has no dimension ", i, " (rank ", rank(), ")");
    return shape_[static_cast<std::size_t>(i)];
  }
  /// Number of elements.
  Index numel() const { return numel_; }
  /// The raw little-endian bytes, exactly `numel() * dtype_bits(dtype()) / 8` of them.
  std::span<const std::byte> bytes() const { return bytes_; }

  /// Rows of the matrix view: the product of all dimensions but the last (1 for rank < 2).
  Index rows() const {
    if (shape_.size() < 2) return 1;
    Index r = 1;
    for (std::size_t i = 0; i + 1 < shape_.size(); ++i) r *= shape_[i];
    return r;
  }
  /// Columns of the matrix view: the last dimension (1 for a scalar).
  Index cols() const { return shape_.empty() ? 1 : shape_.back(); }

  /// Throws `moet::Error` naming the file, the tensor and both shapes unless the shape is
  /// `expected`.
  void require_shape(std::span<const Index> expected) const {
    if (!std::equal(shape_.begin(), shape_.end(), expected.begin(), expected.end())) {
      fail("shape ", detail::shape_string(shape_), ", expected ", detail::shape_string(expected));
    }
  }
  void require_shape(std::initializer_list<Index> expected) const {
    require_shape(std::span<const Index>(expected.begin(), expected.size()));
  }
  /// Throws `moet::Error` unless the dtype is one moet converts (F32, BF16, F16).
  void require_float() const {
    if (!is_float_dtype(dtype_)) {
      fail("dtype ", dtype_name(dtype_), " is not one moet reads as numbers (F32, BF16, F16)");
    }
  }

  /// The sub-tensor at index `i` of the first dimension (rank one lower), e.g. expert `i` of a
  /// stacked `[E, F, K]` weight. F32, BF16, F16 only.
  TensorView slice(Index i) const {
    require_float();
    if (shape_.empty()) fail("is a scalar and has no slices");
    if (i < 0 || i >= shape_[0]) fail("has no slice ", i, " (first dimension ", shape_[0], ")");
    const auto part =
        shape_[0] == 0 ? std::size_t{0} : bytes_.size() / static_cast<std::size_t>(shape_[0]);
    std::vector<Index> sub(shape_.begin() + 1, shape_.end());
    return TensorView(file_, concat_name(i), dtype_, std::move(sub),
                      bytes_.subspan(static_cast<std::size_t>(i) * part, part));
  }

  /// Element `i` in row-major order, as float (F32, BF16, F16).
  float at(Index i) const {
    require_float();
    if (i < 0 || i >= numel_) fail("has no element ", i, " (", numel_, " elements)");
    return detail::load_element(codec(), bytes_.data(), i);
  }

  /// Writes the `(rows, cols)` block at `(row0, col0)` of the matrix view to
  /// `out[i * out_row_stride + j * out_col_stride]`, as float (`T = float`) or bf16
  /// (`T = detail::Bf16`). Strides `(1, ld)` write the transpose. F32, BF16, F16 only; throws
  /// `moet::Error` when the block is not inside the matrix.
  template <class T>
  void read_block(Index row0, Index col0, Index n_rows, Index n_cols, T* out, Index out_row_stride,
                  Index out_col_stride) const {
    require_float();
    check_block(row0, col0, n_rows, n_cols);
    if (n_rows == 0 || n_cols == 0) return;
    detail::convert_block(codec(), bytes_.data(), cols() * dtype_bits(dtype_) / 8, row0, col0,
                          n_rows, n_cols, out, out_row_stride, out_col_stride);
  }
  /// Reads rows `[row0, row0 + out.rows())` of the matrix view into `out`
  /// `(n, cols())`.
  void read_rows(Index row0, Rows<float> out) const {
    if (out.cols() != cols()) {
      fail("has ", cols(), " columns, the output ", out.cols());
    }
    read_block(row0, 0, out.rows(), out.cols(), out.data(), out.outerStride(), Index{1});
  }
  /// Reads the transpose of the block at `(row0, col0)` into `out` `(n_cols, n_rows)`:
  /// `out(j, i) = M(row0 + i, col0 + j)`. An `nn.Linear` weight `[out, in]` read this way
  /// lands as moet's `(in, out)`.
  void read_block_transposed(Index row0, Index col0, Rows<float> out) const {
    read_block(row0, col0, out.cols(), out.rows(), out.data(), Index{1}, out.outerStride());
  }
  /// The whole matrix view `(rows(), cols())` as float (a copy: for small tensors and tests).
  RowMatrix<float> to_matrix() const {
    RowMatrix<float> m(rows(), cols());
    read_rows(0, m);
    return m;
  }

 private:
  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail("TensorView", file_, ": tensor '", name_, "' ", std::forward<Args>(args)...);
  }
  std::string concat_name(Index i) const { return name_ + "[" + std::to_string(i) + "]"; }
  detail::ElementCodec codec() const {
    return dtype_ == Dtype::kF32    ? detail::ElementCodec::kF32
           : dtype_ == Dtype::kBf16 ? detail::ElementCodec::kBf16
                                    : detail::ElementCodec::kF16;
  }
  void check_block(Index row0, Index col0, Index n_rows, Index n_cols) const {
    if (row0 < 0 || col0 < 0 || n_rows < 0 || n_cols < 0 || row0 > rows() - n_rows ||
        col0 > cols() - n_cols) {
      fail("block (", n_rows, ", ", n_cols, ") at (", row0, ", ", col0,
           ") is outside its matrix view (", rows(), ", ", cols(), ")");
    }
  }

  std::string file_;
  std::string name_;
  Dtype dtype_;
  std::vector<Index> shape_;
  std::span<const std::byte> bytes_;
  Index numel_ = 0;
};

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
class SafetensorsFile {
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
  /// The tensor `name`, checked to be F32, BF16 or F16 and of `shape`; the errors name the
  /// file, the tensor and both shapes.
  TensorView require(std::string_view name, std::span<const Index> shape) const {
    TensorView view = tensor(name);
    view.require_float();
    view.require_shape(shape);
    return view;
  }
  TensorView require(std::string_view name, std::initializer_list<Index> shape) const {
    return require(name, std::span<const Index>(shape.begin(), shape.size()));
  }

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

/// A checkpoint: one `model.safetensors`, or shards listed in `model.safetensors.index.json`
/// (Hugging Face's layout: `{"metadata": {...}, "weight_map": {tensor: shard file}}`, the
/// shards in the index's directory). Shards are opened (mapped and checked) the first time a
/// tensor in them is looked up, so reading one layer of a large checkpoint touches one shard;
/// `open_all` opens and cross-checks them all. Lookups are safe from several threads.
class SafetensorsCheckpoint {
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
  /// The tensor `name`, checked to be F32, BF16 or F16 and of `shape` (errors name the file,
  /// the tensor and both shapes).
  TensorView require(std::string_view name, std::span<const Index> shape) const {
    TensorView view = tensor(name);
    view.require_float();
    view.require_shape(shape);
    return view;
  }
  TensorView require(std::string_view name, std::initializer_list<Index> shape) const {
    return require(name, std::span<const Index>(shape.begin(), shape.size()));
  }

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
