#pragma once
/// \file examples/support/data.hpp
/// Data sets for the real-data examples, read from files that Debian packages install:
///
/// - Fashion-MNIST (`dataset-fashion-mnist`): gzipped IDX files under
///   `/usr/share/datasets/fashion-mnist/`; `parse_idx` decodes one IDX buffer,
///   `load_fashion_mnist` reads a split into `(n, 784)` pixels in [0, 1] and labels 0..9.
/// - The fortunes corpus (`fortunes`): text files under `/usr/share/games/fortunes/`, one
///   fortune per `%`-separated record; `load_fortunes` reads every file in name order and splits
///   the fortunes deterministically into training and validation text.
///
/// Not part of the moet library (no API promise); examples copy what they need. Errors throw
/// `moet::Error` naming the operation, the file and the offending values.

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <moet/moet.hpp>

namespace examples {

/// A decoded IDX array (the MNIST file format): unsigned bytes with their dimensions.
struct IdxArray {
  std::vector<std::int64_t> dims;
  std::vector<std::uint8_t> data;  // row-major, product(dims) bytes
};

/// Decodes an IDX buffer: two zero bytes, the element type (0x08 = unsigned byte, the only type
/// accepted), the number of dimensions (1..4), then that many big-endian uint32 sizes, then the
/// data. Throws `moet::Error` naming `parse_idx` and `what` (a file name, for the message) on a
/// bad magic, an unsupported type, a zero dimension count, a size over 2^31 elements, or a
/// length that disagrees with the header (too short or trailing bytes).
inline IdxArray parse_idx(std::span<const std::uint8_t> bytes, const std::string& what = "buffer") {
  constexpr const char* kOp = "parse_idx";
  moet::detail::require(bytes.size() >= 4, kOp, what, ": ", bytes.size(),
                        " bytes, an IDX header needs at least 4");
  moet::detail::require(bytes[0] == 0 && bytes[1] == 0, kOp, what,
                        ": bad magic (first two bytes must be 0, got ", int{bytes[0]}, ", ",
                        int{bytes[1]}, ")");
  moet::detail::require(bytes[2] == 0x08, kOp, what, ": element type 0x", std::hex,
                        int{bytes[2]}, std::dec, " is not supported (only 0x08, unsigned byte)");
  const int rank = bytes[3];
  moet::detail::require(rank >= 1 && rank <= 4, kOp, what, ": rank must be in [1, 4], got ",
                        rank);
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(rank);
  moet::detail::require(bytes.size() >= header, kOp, what, ": ", bytes.size(),
                        " bytes, the header of a rank-", rank, " array needs ", header);
  IdxArray out;
  std::int64_t count = 1;
  for (int i = 0; i < rank; ++i) {
    const std::size_t at = 4 + 4 * static_cast<std::size_t>(i);
    const std::int64_t dim = (std::int64_t{bytes[at]} << 24) | (std::int64_t{bytes[at + 1]} << 16) |
                             (std::int64_t{bytes[at + 2]} << 8) | std::int64_t{bytes[at + 3]};
    out.dims.push_back(dim);
    count *= dim;
    moet::detail::require(count <= (std::int64_t{1} << 31), kOp, what,
                          ": more than 2^31 elements (dimension ", i, " is ", dim, ")");
  }
  const std::size_t expected = header + static_cast<std::size_t>(count);
  moet::detail::require(bytes.size() == expected, kOp, what, ": header promises ", count,
                        " elements (", expected, " bytes), file has ", bytes.size(), " bytes");
  out.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
  return out;
}

/// Reads a whole file, gunzipping it when it is gzip-compressed (zlib reads plain files as they
/// are). Throws `moet::Error` naming `read_file` when the file cannot be opened or read.
inline std::vector<std::uint8_t> read_file(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  moet::detail::require(file != nullptr, "read_file", "cannot open ", path);
  std::vector<std::uint8_t> out;
  std::uint8_t chunk[1 << 16];
  for (;;) {
    const int got = gzread(file, chunk, sizeof chunk);
    if (got < 0) {
      gzclose(file);
      moet::detail::fail("read_file", "cannot read ", path, " (corrupt gzip data?)");
    }
    if (got == 0) break;
    out.insert(out.end(), chunk, chunk + got);
  }
  gzclose(file);
  return out;
}

/// Where Debian's `dataset-fashion-mnist` installs the data.
inline const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

/// The ten Fashion-MNIST class names, by label.
inline constexpr const char* kFashionMnistClasses[10] = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

/// One split of an image-classification data set.
struct ImageSet {
  moet::RowMatrix<float> images;  // (n, rows * cols), pixels / 255
  std::vector<int> labels;        // n labels in [0, 10)
};

/// Loads the `train` (60,000 images) or `t10k` (10,000) split from `dir`, keeping the first
/// `limit` images when `limit > 0`. Throws `moet::Error` naming `load_fashion_mnist` for an
/// unknown split, missing files, or images and labels that disagree.
inline ImageSet load_fashion_mnist(const std::string& split, std::int64_t limit = 0,
                                   const std::string& dir = kFashionMnistDir) {
  constexpr const char* kOp = "load_fashion_mnist";
  moet::detail::require(split == "train" || split == "t10k", kOp,
                        "split must be \"train\" or \"t10k\", got \"", split, "\"");
  const std::string image_path = dir + "/" + split + "-images-idx3-ubyte.gz";
  const std::string label_path = dir + "/" + split + "-labels-idx1-ubyte.gz";
  moet::detail::require(std::filesystem::exists(image_path), kOp, image_path,
                        " not found (install the Debian package dataset-fashion-mnist)");
  const std::vector<std::uint8_t> image_bytes = read_file(image_path);
  const std::vector<std::uint8_t> label_bytes = read_file(label_path);
  const IdxArray images = parse_idx(image_bytes, image_path);
  const IdxArray labels = parse_idx(label_bytes, label_path);
  moet::detail::require(images.dims.size() == 3 && labels.dims.size() == 1 &&
                            images.dims[0] == labels.dims[0],
                        kOp, image_path, " and ", label_path,
                        " must hold (n, rows, cols) images and n labels");
  std::int64_t n = images.dims[0];
  if (limit > 0) n = std::min(n, limit);
  const std::int64_t pixels = images.dims[1] * images.dims[2];
  ImageSet out;
  out.images.resize(n, pixels);
  for (std::int64_t i = 0; i < n * pixels; ++i) {
    out.images.data()[i] = static_cast<float>(images.data[static_cast<std::size_t>(i)]) / 255.0f;
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const int label = labels.data[static_cast<std::size_t>(i)];
    moet::detail::require(label < 10, kOp, label_path, ": label ", label, " at ", i,
                          " is outside [0, 10)");
    out.labels.push_back(label);
  }
  return out;
}

/// Where Debian's `fortunes` package installs its text files.
inline const char* kFortunesDir = "/usr/share/games/fortunes";

/// A character corpus split into training and validation text.
struct TextCorpus {
  std::string train;
  std::string validation;
  std::int64_t num_fortunes = 0;
};

/// Splits fortune-file `text` into fortunes (records separated by lines holding only `%`),
/// dropping empty ones; each fortune keeps its text and ends with one `\n`.
inline std::vector<std::string> split_fortunes(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(begin, end - begin);
    if (line == "%") {
      if (!current.empty()) out.push_back(current);
      current.clear();
    } else {
      current += line;
      current += '\n';
    }
    begin = end + 1;
  }
  if (!current.empty()) out.push_back(current);
  return out;
}

/// Reads every fortune file in `dir` (regular files without an extension: the `.dat` indexes
/// and `.u8` links are skipped), in file-name order, and sends every `validation_every`-th
/// fortune (counting from 0 over all files) to the validation text, the rest to training. Bytes
/// outside printable ASCII, tab and newline are replaced by `?` so that the vocabulary is
/// 7-bit. Throws `moet::Error` naming `load_fortunes` when `dir` holds no fortune, or
/// `validation_every < 2`.
inline TextCorpus load_fortunes(const std::string& dir = kFortunesDir,
                                std::int64_t validation_every = 10) {
  constexpr const char* kOp = "load_fortunes";
  moet::detail::require(validation_every >= 2, kOp, "validation_every must be >= 2, got ",
                        validation_every);
  std::vector<std::filesystem::path> files;
  if (std::filesystem::is_directory(dir)) {
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      if (entry.is_regular_file() && !entry.is_symlink() && !entry.path().has_extension()) {
        files.push_back(entry.path());
      }
    }
  }
  std::sort(files.begin(), files.end());
  TextCorpus out;
  for (const auto& path : files) {
    std::ifstream in(path, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (char& c : text) {
      const auto u = static_cast<unsigned char>(c);
      if (!(u == '\n' || u == '\t' || (u >= 32 && u < 127))) c = '?';
    }
    for (const std::string& fortune : split_fortunes(text)) {
      std::string& target = out.num_fortunes % validation_every == 0 ? out.validation : out.train;
      target += fortune;
      target += '\n';  // a blank line between fortunes
      ++out.num_fortunes;
    }
  }
  moet::detail::require(out.num_fortunes > 0, kOp, "no fortunes found in ", dir,
                        " (install the Debian package fortunes)");
  return out;
}

/// A character vocabulary: the sorted distinct bytes of a training text, plus id 0 for any byte
/// it never saw.
struct CharVocab {
  std::vector<char> chars;  // id - 1 -> byte
  int ids[256] = {};        // byte -> id (0 = unknown)

  explicit CharVocab(const std::string& text) {
    bool seen[256] = {};
    for (const char c : text) seen[static_cast<unsigned char>(c)] = true;
    for (int b = 0; b < 256; ++b) {
      if (seen[b]) {
        chars.push_back(static_cast<char>(b));
        ids[b] = static_cast<int>(chars.size());
      }
    }
  }
  /// Ids including the unknown id 0.
  int size() const { return static_cast<int>(chars.size()) + 1; }
  /// The ids of `text`'s bytes.
  std::vector<int> encode(const std::string& text) const {
    std::vector<int> out;
    out.reserve(text.size());
    for (const char c : text) out.push_back(ids[static_cast<unsigned char>(c)]);
    return out;
  }
  /// The byte of `id` (`?` for the unknown id).
  char decode(int id) const {
    return id >= 1 && id <= static_cast<int>(chars.size()) ? chars[static_cast<std::size_t>(id - 1)]
                                                           : '?';
  }
};

/// A batch of next-character windows: `inputs[b * len + i]` is followed by
/// `targets[b * len + i]` in the text.
struct CharBatch {
  std::vector<int> inputs;
  std::vector<int> targets;
};

/// `batch` windows of `len + 1` consecutive ids starting at offsets drawn uniformly from
/// `rng`-style key `(seed, step)` (deterministic), as inputs and shifted targets. Throws
/// `moet::Error` naming `sample_windows` when the text is not longer than `len` or a size is < 1.
inline CharBatch sample_windows(const std::vector<int>& ids, std::int64_t batch, std::int64_t len,
                                std::uint64_t seed, std::uint64_t step) {
  constexpr const char* kOp = "sample_windows";
  moet::detail::require(batch >= 1 && len >= 1, kOp, "batch and len must be >= 1, got ", batch,
                        ", ", len);
  moet::detail::require(static_cast<std::int64_t>(ids.size()) > len, kOp, "text of ",
                        ids.size(), " ids is too short for windows of ", len + 1);
  const auto starts = static_cast<std::uint64_t>(static_cast<std::int64_t>(ids.size()) - len);
  CharBatch out;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::uint64_t key = moet::detail::hash_key(seed, step, static_cast<std::uint64_t>(b));
    const std::uint64_t start = key % starts;
    for (std::int64_t i = 0; i < len; ++i) {
      out.inputs.push_back(ids[start + static_cast<std::uint64_t>(i)]);
      out.targets.push_back(ids[start + static_cast<std::uint64_t>(i) + 1]);
    }
  }
  return out;
}

}  // namespace examples
