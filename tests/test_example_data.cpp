// The real-data examples' loaders (examples/support/data.hpp): the IDX decoder against
// hand-built buffers (every malformed header has its message), gzip and plain reads, the
// fortune splitter, and both loaders on tiny data sets written here; when the Debian packages
// are installed, the real files are read and their shapes checked.

#include <zlib.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../examples/support/cli.hpp"
#include "../examples/support/data.hpp"

namespace test_example_data {  // one per file: the unity build puts several files in one TU

namespace {

using Bytes = std::vector<std::uint8_t>;
using Catch::Matchers::Contains;

// An IDX header for unsigned bytes with the given dimensions, then `payload`.
Bytes idx(const std::vector<std::uint32_t>& dims, const Bytes& payload) {
  Bytes out = {0, 0, 0x08, static_cast<std::uint8_t>(dims.size())};
  for (const std::uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      out.push_back(static_cast<std::uint8_t>((d >> shift) & 0xffu));
    }
  }
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

std::filesystem::path temp_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("moet_test_" + name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void write_gz(const std::filesystem::path& path, const Bytes& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  REQUIRE(file != nullptr);
  REQUIRE(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())) ==
          static_cast<int>(bytes.size()));
  gzclose(file);
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

}  // namespace

TEST_CASE("parse_idx decodes big-endian dimensions and the data that follows", "[examples]") {
  const Bytes payload = {1, 2, 3, 4, 5, 6};
  const examples::IdxArray a = examples::parse_idx(idx({2, 3}, payload));
  REQUIRE(a.dims == std::vector<std::int64_t>{2, 3});
  CHECK(a.data == payload);
  // A dimension above 255 exercises every byte of the size.
  const examples::IdxArray b = examples::parse_idx(idx({0x102}, Bytes(0x102, 7)));
  REQUIRE(b.dims == std::vector<std::int64_t>{258});
  CHECK(b.data.size() == 258);
}

TEST_CASE("parse_idx rejects every malformed header with a message", "[examples][bad_input]") {
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{0, 0}, "f"), Contains("f: 2 bytes"));
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{1, 0, 8, 1, 0, 0, 0, 0}, "f"),
                    Contains("bad magic"));
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{0, 0, 0x0d, 1, 0, 0, 0, 0}, "f"),
                    Contains("element type 0xd is not supported"));
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{0, 0, 8, 0}, "f"),
                    Contains("rank must be in [1, 4], got 0"));
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{0, 0, 8, 5}, "f"),
                    Contains("rank must be in [1, 4], got 5"));
  CHECK_THROWS_WITH(examples::parse_idx(Bytes{0, 0, 8, 2, 0, 0, 0, 1}, "f"),
                    Contains("header of a rank-2 array needs 12"));
  CHECK_THROWS_WITH(examples::parse_idx(idx({2, 3}, Bytes(5, 0)), "f"),
                    Contains("header promises 6 elements (18 bytes), file has 17 bytes"));
  CHECK_THROWS_WITH(examples::parse_idx(idx({2, 3}, Bytes(7, 0)), "f"),
                    Contains("file has 19 bytes"));
  CHECK_THROWS_WITH(examples::parse_idx(idx({0xffffu, 0xffffu, 4}, {}), "f"),
                    Contains("more than 2^31 elements"));
}

TEST_CASE("read_file reads gzip and plain files alike", "[examples]") {
  const auto dir = temp_dir("read_file");
  const Bytes bytes = {0, 1, 2, 250, 251, 252};
  write_gz(dir / "a.gz", bytes);
  write_text(dir / "b", std::string(bytes.begin(), bytes.end()));
  CHECK(examples::read_file((dir / "a.gz").string()) == bytes);
  CHECK(examples::read_file((dir / "b").string()) == bytes);
  CHECK_THROWS_WITH(examples::read_file((dir / "missing").string()), Contains("cannot open"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("split_fortunes cuts at lines holding only %", "[examples]") {
  const auto f = examples::split_fortunes("one\ntwo lines\n%\n%\nthree % not a cut\n%\nfour");
  REQUIRE(f.size() == 3);
  CHECK(f[0] == "one\ntwo lines\n");
  CHECK(f[1] == "three % not a cut\n");
  CHECK(f[2] == "four\n");
  CHECK(examples::split_fortunes("").empty());
}

TEST_CASE("load_fortunes reads files in name order and splits every n-th fortune off",
          "[examples]") {
  const auto dir = temp_dir("fortunes");
  write_text(dir / "b", "b0\n%\nb1\n");
  write_text(dir / "a", "a0\n%\na1\xff\n%\na2\n");  // a non-ASCII byte becomes '?'
  write_text(dir / "a.dat", "index, skipped\n");
  const examples::TextCorpus c = examples::load_fortunes(dir.string(), 2);
  CHECK(c.num_fortunes == 5);
  // Fortunes in order a0 a1 a2 b0 b1; indices 0, 2, 4 go to validation.
  CHECK(c.validation == "a0\n\na2\n\nb1\n\n");
  CHECK(c.train == "a1?\n\nb0\n\n");
  CHECK_THROWS_WITH(examples::load_fortunes(dir.string(), 1),
                    Contains("validation_every must be >= 2, got 1"));
  CHECK_THROWS_WITH(examples::load_fortunes((dir / "none").string()),
                    Contains("no fortunes found"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("load_fashion_mnist scales pixels and checks labels", "[examples]") {
  const auto dir = temp_dir("fmnist");
  write_gz(dir / "t10k-images-idx3-ubyte.gz", idx({3, 1, 2}, {0, 255, 51, 102, 204, 153}));
  write_gz(dir / "t10k-labels-idx1-ubyte.gz", idx({3}, {9, 0, 4}));
  const examples::ImageSet set = examples::load_fashion_mnist("t10k", 0, dir.string());
  REQUIRE(set.images.rows() == 3);
  REQUIRE(set.images.cols() == 2);
  CHECK(set.images(0, 1) == 1.0f);
  CHECK(set.images(1, 0) == Approx(0.2f));
  CHECK(set.labels == std::vector<int>{9, 0, 4});
  const examples::ImageSet two = examples::load_fashion_mnist("t10k", 2, dir.string());
  CHECK(two.images.rows() == 2);
  CHECK_THROWS_WITH(examples::load_fashion_mnist("test", 0, dir.string()),
                    Contains("split must be \"train\" or \"t10k\", got \"test\""));
  CHECK_THROWS_WITH(examples::load_fashion_mnist("train", 0, dir.string()),
                    Contains("not found"));
  write_gz(dir / "t10k-labels-idx1-ubyte.gz", idx({3}, {9, 10, 4}));
  CHECK_THROWS_WITH(examples::load_fashion_mnist("t10k", 0, dir.string()),
                    Contains("label 10 at 1 is outside [0, 10)"));
  write_gz(dir / "t10k-labels-idx1-ubyte.gz", idx({2}, {9, 1}));
  CHECK_THROWS_WITH(examples::load_fashion_mnist("t10k", 0, dir.string()),
                    Contains("must hold (n, rows, cols) images and n labels"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("The installed Debian data sets load with their documented shapes", "[examples]") {
  if (std::filesystem::exists(std::string(examples::kFashionMnistDir) +
                              "/t10k-images-idx3-ubyte.gz")) {
    const examples::ImageSet test = examples::load_fashion_mnist("t10k");
    CHECK(test.images.rows() == 10000);
    CHECK(test.images.cols() == 784);
    CHECK(test.images.minCoeff() >= 0.0f);
    CHECK(test.images.maxCoeff() <= 1.0f);
  } else {
    WARN("dataset-fashion-mnist is not installed; skipped");
  }
  if (std::filesystem::is_directory(examples::kFortunesDir)) {
    const examples::TextCorpus c = examples::load_fortunes();
    CHECK(c.num_fortunes > 1000);
    CHECK(c.validation.size() * 5 < c.train.size());
  } else {
    WARN("fortunes is not installed; skipped");
  }
}

TEST_CASE("CharVocab maps bytes to dense ids and back, with 0 for unseen bytes", "[examples]") {
  const examples::CharVocab vocab("hello, world");
  CHECK(vocab.size() == 10);  // 9 distinct bytes + unknown
  const std::vector<int> ids = vocab.encode("hold!");
  REQUIRE(ids.size() == 5);
  CHECK(ids[4] == 0);  // '!' never seen
  std::string back;
  for (const int id : ids) back += vocab.decode(id);
  CHECK(back == "hold?");
  // Ids follow byte order: ' ' < ',' < 'd' < 'e' ...
  CHECK(vocab.encode(" ")[0] == 1);
  CHECK(vocab.encode(",")[0] == 2);
}

TEST_CASE("sample_windows draws deterministic shifted windows", "[examples]") {
  std::vector<int> ids(50);
  for (int i = 0; i < 50; ++i) ids[std::size_t(i)] = i;
  const examples::CharBatch a = examples::sample_windows(ids, 3, 8, 1, 0);
  const examples::CharBatch again = examples::sample_windows(ids, 3, 8, 1, 0);
  const examples::CharBatch next = examples::sample_windows(ids, 3, 8, 1, 1);
  REQUIRE(a.inputs.size() == 24);
  CHECK(a.inputs == again.inputs);
  CHECK(a.inputs != next.inputs);
  for (std::size_t b = 0; b < 3; ++b) {
    for (std::size_t i = 0; i < 8; ++i) {
      CHECK(a.targets[b * 8 + i] == a.inputs[b * 8 + i] + 1);  // the next id in the text
      if (i > 0) CHECK(a.inputs[b * 8 + i] == a.inputs[b * 8 + i - 1] + 1);
    }
    CHECK(a.targets[b * 8 + 7] <= 49);
  }
  CHECK_THROWS_WITH(examples::sample_windows(ids, 1, 50, 1, 0),
                    Contains("too short for windows of 51"));
  CHECK_THROWS_WITH(examples::sample_windows(ids, 0, 5, 1, 0),
                    Contains("batch and len must be >= 1, got 0, 5"));
}

TEST_CASE("Example flags set their variables and reject bad command lines", "[examples][cli]") {
  long epochs = 1;
  std::uint64_t seed = 7;
  std::string out = "x";
  examples::Flags flags;
  flags.add("--epochs", epochs).add("--seed", seed).add("--out", out);
  const auto parse = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "prog");
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    return flags.parse(static_cast<int>(argv.size()), argv.data());
  };
  CHECK(parse({"--epochs", "12", "--seed", "18446744073709551615", "--out", "dir"}));
  CHECK(epochs == 12);
  CHECK(seed == 18446744073709551615ULL);
  CHECK(out == "dir");
  CHECK(parse({}));
  CHECK_FALSE(parse({"--epoch", "3"}));          // unknown flag
  CHECK_FALSE(parse({"--epochs"}));              // no value
  CHECK_FALSE(parse({"--epochs", "3x"}));        // not a number
  CHECK_FALSE(parse({"--epochs", "-3"}));        // negative
  CHECK_FALSE(parse({"--seed", "99999999999999999999999"}));  // out of range
  CHECK(epochs == 12);  // failed parses left the earlier value
  CHECK(examples::split_list("a,b,,c,") == std::vector<std::string>{"a", "b", "c"});
  CHECK(examples::split_list("").empty());
}

}  // namespace test_example_data
