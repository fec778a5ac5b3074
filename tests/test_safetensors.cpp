// Safetensors: the reader against hand-built files (conversions checked against bit patterns
// written here, not against moet's converters), the writer's round trip and layout, the
// matrix reads (blocks, transposes, bf16 output, slices), sharded checkpoints, and every
// bad-file case of issue 14 as its own section with the expected message.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/detail/bf16.hpp"
#include "moet/errors.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/tensor.hpp"

#include "io_test_util.hpp"

namespace test_safetensors {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using io_test::ByteWriter;
using moet::Dtype;
using moet::Index;
using moet::RowMatrix;
using moet::SafetensorsCheckpoint;
using moet::SafetensorsFile;
using moet::SafetensorsWriter;

// A safetensors file: the header length, the header text as given, then `data`.
std::vector<std::byte> st_bytes(const std::string& header, const std::vector<std::byte>& data) {
  ByteWriter w;
  w.u64(header.size()).raw(header);
  std::vector<std::byte> out = w.bytes();
  out.insert(out.end(), data.begin(), data.end());
  return out;
}
std::vector<std::byte> st_bytes(const std::string& header, std::size_t data_bytes) {
  return st_bytes(header, std::vector<std::byte>(data_bytes, std::byte{0}));
}

SafetensorsFile parse(const std::vector<std::byte>& bytes) {
  return SafetensorsFile::from_bytes(bytes, "bad.safetensors");
}

RowMatrix<float> counting(Index rows, Index cols, float scale = 1.0f) {
  RowMatrix<float> m(rows, cols);  // (rows, cols)
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * (static_cast<float>(i) - 3.25f);
  return m;
}

}  // namespace

TEST_CASE("SafetensorsFile converts F32, BF16 and F16 to the floats their bits encode",
          "[io][safetensors]") {
  // Bit patterns written here, with the values they encode worked out by hand.
  ByteWriter data;
  data.f32(1.5f).f32(-0.0f).f32(3.0e-39f).f32(-1234.5f);  // F32 [2, 2] at [0, 16)
  data.u16(0x3F80).u16(0xC020).u16(0x4049).u16(0x0001);   // BF16 [4]: 1, -2.5, 3.140625, 2^-133
  data.u16(0x3C00).u16(0xC100).u16(0x7BFF).u16(0x0001).u16(0x8400).u16(0x7C00);  // F16 [2, 3]
  const std::string header = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]},)"
                             R"("h":{"dtype":"F16","shape":[2,3],"data_offsets":[24,36]},)"
                             R"("__metadata__":{"format":"pt","note":"hand-made"}})";
  const auto bytes = st_bytes(header, data.bytes());
  const SafetensorsFile f = SafetensorsFile::from_bytes(bytes, "hand.safetensors");

  CHECK(f.size() == 3);
  CHECK(f.names() == std::vector<std::string>{"a", "b", "h"});
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "hand-made");
  CHECK(f.header_size() == header.size());

  const auto a = f.tensor("a");
  CHECK(a.dtype() == Dtype::kF32);
  CHECK(a.rows() == 2);
  CHECK(a.cols() == 2);
  CHECK(a.at(0) == 1.5f);
  CHECK(std::signbit(a.at(1)));
  CHECK(a.at(2) == 3.0e-39f);
  CHECK(a.at(3) == -1234.5f);

  const auto b = f.tensor("b");
  CHECK(b.dtype() == Dtype::kBf16);
  CHECK(b.rank() == 1);
  CHECK(b.rows() == 1);
  CHECK(b.cols() == 4);
  CHECK(b.at(0) == 1.0f);
  CHECK(b.at(1) == -2.5f);
  CHECK(b.at(2) == 3.140625f);
  CHECK(b.at(3) == std::ldexp(1.0f, -133));

  const auto h = f.tensor("h");
  CHECK(h.dtype() == Dtype::kF16);
  const RowMatrix<float> hm = h.to_matrix();  // (2, 3)
  CHECK(hm(0, 0) == 1.0f);
  CHECK(hm(0, 1) == -2.5f);
  CHECK(hm(0, 2) == 65504.0f);
  CHECK(hm(1, 0) == std::ldexp(1.0f, -24));   // the smallest subnormal half
  CHECK(hm(1, 1) == -std::ldexp(1.0f, -14));  // the smallest normal half, negative
  CHECK(std::isinf(hm(1, 2)));
}

TEST_CASE("SafetensorsWriter round-trips F32 exactly and BF16 / F16 rounded to nearest even",
          "[io][safetensors]") {
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  const RowMatrix<float> m = counting(3, 5, 0.3f);
  w.add("w.f32", m);
  w.add("w.bf16", m, Dtype::kBf16);
  w.add("w.f16", m, Dtype::kF16);
  const std::vector<float> v = {1.0f + 1.0f / 256.0f, 1.0f + 3.0f / 256.0f, -0.1f};
  w.add_vector("v.bf16", v, Dtype::kBf16);
  const Index shape3[3] = {2, 3, 2};
  const std::vector<float> cube = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  w.add("cube", shape3, cube);
  const auto bytes = w.to_bytes();
  const SafetensorsFile f = SafetensorsFile::from_bytes(bytes);

  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.tensor("w.f32").to_matrix() == m);
  const RowMatrix<float> bf = f.tensor("w.bf16").to_matrix();
  const RowMatrix<float> hf = f.tensor("w.f16").to_matrix();
  for (Index i = 0; i < m.size(); ++i) {
    CHECK(bf.data()[i] == moet::detail::round_to_bf16(m.data()[i]));
    CHECK(std::abs(hf.data()[i] - m.data()[i]) <= std::abs(m.data()[i]) * 0x1p-11f);
    CHECK(std::abs(bf.data()[i] - m.data()[i]) <= std::abs(m.data()[i]) * 0x1p-8f);
  }
  // 1 + 2^-8 lies halfway between the bf16 values 1 and 1 + 2^-7: ties go to the even one (1);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6.
  const auto vb = f.tensor("v.bf16");
  CHECK(vb.at(0) == 1.0f);
  CHECK(vb.at(1) == 1.0f + 1.0f / 64.0f);
  CHECK(vb.at(2) == -0.10009765625f);  // bf16 0xBDCD
  CHECK(f.tensor("cube").rows() == 6);
  CHECK(f.tensor("cube").cols() == 2);
  CHECK(f.tensor("cube").slice(1).to_matrix()(2, 1) == 11.0f);

  SECTION("the layout: header padded to 8 bytes, each tensor aligned to its element size") {
    const std::uint64_t n = f.header_size();
    CHECK((8 + n) % 8 == 0);
    const auto text = std::string(reinterpret_cast<const char*>(bytes.data()) + 8, n);
    CHECK(text.substr(text.find_last_of('}') + 1).find_first_not_of(' ') == std::string::npos);
    for (const auto& name : f.names()) {
      const auto t = f.tensor(name);
      const auto offset = static_cast<std::size_t>(t.bytes().data() - bytes.data());
      CHECK(offset % static_cast<std::size_t>(moet::dtype_bits(t.dtype()) / 8) == 0);
    }
  }
  SECTION("written to disk, opened mapped, alone and as a checkpoint") {
    const io_test::TempDir dir;
    w.write(dir / "model.safetensors");
    CHECK(!std::filesystem::exists(dir / "model.safetensors.tmp"));
    const SafetensorsFile g = SafetensorsFile::open(dir / "model.safetensors");
    CHECK(g.tensor("w.f32").to_matrix() == m);
    const auto ckpt = SafetensorsCheckpoint::open(dir.path());
    CHECK(!ckpt.sharded());
    CHECK(ckpt.size() == 5);
    CHECK(ckpt.require("w.bf16", {3, 5}).to_matrix() == bf);
    SafetensorsFile moved = SafetensorsFile::open(dir / "model.safetensors");
    const auto view = moved.tensor("w.f32");
    const SafetensorsFile after = std::move(moved);  // the mapping does not move
    CHECK(view.to_matrix() == m);
    CHECK(after.tensor("w.f32").to_matrix() == m);
  }
}

TEST_CASE("TensorView reads blocks, transposes, bf16 rows and slices straight from the bytes",
          "[io][safetensors]") {
  SafetensorsWriter w;
  const RowMatrix<float> m = counting(6, 7, 0.5f);  // (6, 7)
  w.add("f32", m);
  w.add("bf16", m, Dtype::kBf16);
  const auto bytes = w.to_bytes();
  const SafetensorsFile f = SafetensorsFile::from_bytes(bytes);
  for (const char* name : {"f32", "bf16"}) {
    const auto t = f.tensor(name);
    const RowMatrix<float> full = t.to_matrix();
    RowMatrix<float> block(3, 4);
    t.read_block(2, 1, 3, 4, block.data(), 4, 1);
    CHECK(block == full.block(2, 1, 3, 4));
    RowMatrix<float> tr(4, 3);  // (cols, rows) of the block
    t.read_block_transposed(2, 1, tr);
    CHECK(tr == full.block(2, 1, 3, 4).transpose());
    RowMatrix<float> rows(2, 7);
    t.read_rows(4, rows);
    CHECK(rows == full.bottomRows(2));
    std::vector<moet::detail::Bf16> b16(7);
    t.read_block(5, 0, 1, 7, b16.data(), 7, 1);
    for (Index j = 0; j < 7; ++j) {
      CHECK(moet::detail::from_bf16(b16[static_cast<std::size_t>(j)]) ==
            moet::detail::round_to_bf16(m(5, j)));
    }
    CHECK(t.slice(3).to_matrix() == full.row(3));
    CHECK(t.slice(3).rank() == 1);
  }
  const auto t = f.tensor("f32");
  RowMatrix<float> out(2, 2);
  CHECK_MOET_ERROR(t.read_block(5, 0, 2, 2, out.data(), 2, 1),
                   Contains("tensor 'f32'") && Contains("outside its matrix view (6, 7)"));
  CHECK_MOET_ERROR(t.read_block(-1, 0, 1, 1, out.data(), 2, 1), Contains("outside"));
  CHECK_MOET_ERROR(t.read_rows(0, out), Contains("has 7 columns, the output 2"));
  CHECK_MOET_ERROR(t.slice(6), Contains("has no slice 6"));
  CHECK_MOET_ERROR(t.at(42), Contains("has no element 42"));
}

TEST_CASE("require checks the dtype and names the file, the tensor and both shapes",
          "[io][safetensors]") {
  SafetensorsWriter w;
  w.add("model.layers.0.mlp.gate.weight", counting(4, 8));
  const auto bytes = w.to_bytes();
  const SafetensorsFile f = SafetensorsFile::from_bytes(bytes, "model.safetensors");
  CHECK(f.require("model.layers.0.mlp.gate.weight", {4, 8}).numel() == 32);
  CHECK_MOET_ERROR(f.require("model.layers.0.mlp.gate.weight", {8, 4}),
                   Contains("[moet::TensorView] model.safetensors") &&
                       Contains("tensor 'model.layers.0.mlp.gate.weight'") &&
                       Contains("shape [4, 8], expected [8, 4]"));
  CHECK_MOET_ERROR(f.require("model.layers.0.mlp.gate.weight", {4, 8, 1}),
                   Contains("expected [4, 8, 1]"));
  CHECK_MOET_ERROR(
      f.tensor("model.layers.0.mlp.up.weight"),
      Contains("model.safetensors") && Contains("no tensor 'model.layers.0.mlp.up.weight'"));
  CHECK_FALSE(f.find("nope").has_value());
}

TEST_CASE("Recognised dtypes moet does not convert open, and refuse to be read as numbers",
          "[io][safetensors]") {
  const auto bytes = st_bytes(R"({"ids":{"dtype":"I64","shape":[3],"data_offsets":[0,24]},)"
                              R"("fp8":{"dtype":"F8_E4M3","shape":[2,2],"data_offsets":[24,28]},)"
                              R"("f4":{"dtype":"F4","shape":[2,3],"data_offsets":[28,31]}})",
                              31);
  const SafetensorsFile f = parse(bytes);
  CHECK(f.tensor("ids").dtype() == Dtype::kI64);
  CHECK(f.tensor("f4").bytes().size() == 3);
  CHECK_MOET_ERROR(f.tensor("ids").to_matrix(),
                   Contains("tensor 'ids'") && Contains("dtype I64 is not one moet reads"));
  CHECK_MOET_ERROR(f.require("fp8", {2, 2}), Contains("dtype F8_E4M3"));
  CHECK(moet::dtype_from_name("C64") == Dtype::kC64);
  CHECK_FALSE(moet::dtype_from_name("Q7").has_value());
}

TEST_CASE("Every malformed safetensors file is a moet::Error naming the file and the tensor",
          "[io][safetensors][bad_file]") {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";

  SECTION("a file shorter than the header length") {
    const std::vector<std::byte> tiny(5, std::byte{0});
    CHECK_MOET_ERROR(parse(tiny), Contains("[moet::SafetensorsFile] bad.safetensors") &&
                                      Contains("5 bytes, shorter than the 8-byte header"));
  }
  SECTION("a header length past the end of the file") {
    auto bytes = st_bytes(ok, 16);
    bytes[0] = std::byte{0xff};  // the length becomes 255 + (ok.size() & ~0xff)
    CHECK_MOET_ERROR(parse(bytes), Contains("header length") &&
                                       Contains("runs past the end of the file (" +
                                                std::to_string(bytes.size()) + " bytes)"));
  }
  SECTION("a header length over the format's 100 MB limit") {
    ByteWriter w;
    w.u64(std::uint64_t{1} << 40).raw(ok);
    CHECK_MOET_ERROR(parse(w.bytes()), Contains("header length 1099511627776 is over"));
  }
  SECTION("a header that is not JSON") {
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t": {"dtype": "F32",)", 16)),
                     Contains("bad.safetensors header: not valid JSON"));
    CHECK_MOET_ERROR(parse(st_bytes("", 0)), Contains("not valid JSON"));
    CHECK_MOET_ERROR(parse(st_bytes("{\"\xff\": 1}", 0)), Contains("not valid JSON"));
  }
  SECTION("a header that is JSON but not an object") {
    CHECK_MOET_ERROR(parse(st_bytes("[1, 2, 3]", 0)), Contains("the header is not a JSON object"));
    CHECK_MOET_ERROR(parse(st_bytes("\"t\"", 0)), Contains("not a JSON object"));
  }
  SECTION("a tensor name that appears twice") {
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                    R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                    8)),
                     Contains("key 't' appears twice"));
  }
  SECTION("__metadata__ that is not an object of strings") {
    CHECK_MOET_ERROR(parse(st_bytes(R"({"__metadata__":[1]})", 0)),
                     Contains("__metadata__ is not a JSON object"));
    CHECK_MOET_ERROR(parse(st_bytes(R"({"__metadata__":{"epoch":3}})", 0)),
                     Contains("__metadata__ value of 'epoch' is not a string"));
  }
  SECTION("an entry that is not an object, or lacks dtype, shape or offsets") {
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":[0, 16]})", 16)),
                     Contains("tensor 't': its entry is not a JSON object"));
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"shape":[4],"data_offsets":[0,16]}})", 16)),
                     Contains("tensor 't': no \"dtype\" string"));
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"dtype":"F32","data_offsets":[0,16]}})", 16)),
                     Contains("tensor 't': no \"shape\" array"));
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[4]}})", 16)),
                     Contains("tensor 't': no \"data_offsets\" array of two offsets"));
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,8,16]}})", 16)),
        Contains("no \"data_offsets\" array of two offsets"));
  }
  SECTION("an unknown dtype") {
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"Q4_0","shape":[4],"data_offsets":[0,16]}})", 16)),
        Contains("tensor 't': unknown dtype 'Q4_0'"));
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"f32","shape":[4],"data_offsets":[0,16]}})", 16)),
        Contains("unknown dtype 'f32'"));
  }
  SECTION("a shape with a negative, fractional or oversized dimension") {
    for (const char* dim : {"-4", "4.0", "18446744073709551616", "9223372036854775808", "\"4\""}) {
      const std::string header =
          std::string(R"({"t":{"dtype":"F32","shape":[)") + dim + R"(],"data_offsets":[0,16]}})";
      CHECK_MOET_ERROR(parse(st_bytes(header, 16)),
                       Contains("tensor 't': shape") && Contains("not a non-negative integer"));
    }
  }
  SECTION("offsets that are negative, reversed or outside the data section (a truncated file)") {
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[-16,0]}})", 16)),
        Contains("are not non-negative integers"));
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", 16)),
        Contains("tensor 't': data_offsets [16, 0] end before they begin"));
    CHECK_MOET_ERROR(parse(st_bytes(ok, 12)),
                     Contains("tensor 't': data_offsets [0, 16] run past the end of the data "
                              "section (12 bytes): the file is truncated"));
  }
  SECTION("a dtype and shape that do not match the byte count") {
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", 16)),
        Contains(
            "tensor 't': shape [2, 3] of F32 needs 24 bytes, but data_offsets [0, 16] hold 16"));
    CHECK_MOET_ERROR(
        parse(st_bytes(R"({"t":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", 16)),
        Contains("shape [2, 2] of BF16 needs 8 bytes"));
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2)),
                     Contains("shape [3] of F4 is not a whole number of bytes"));
  }
  SECTION("an element count that overflows 64 bits") {
    // 2^32 * 2^32 elements: the product wraps to 0, which would match an empty range.
    CHECK_MOET_ERROR(
        parse(st_bytes(
            R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0)),
        Contains(
            "tensor 't': shape [4294967296, 4294967296] has more elements than fit in 64 bits"));
    // An empty tensor whose other dimensions multiply past 64 bits: refused, so that its
    // matrix view's row count cannot overflow either.
    CHECK_MOET_ERROR(parse(st_bytes(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,0],)"
                                    R"("data_offsets":[0,0]}})",
                                    0)),
                     Contains("has more elements than fit in 64 bits"));
    // 2^62 elements of 4 bytes: the byte count overflows.
    CHECK_MOET_ERROR(
        parse(st_bytes(
            R"({"t":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0)),
        Contains("has more elements than fit in 64 bits"));
  }
  SECTION("overlapping ranges") {
    CHECK_MOET_ERROR(parse(st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                    16)),
                     Contains("tensors 'a' [0, 16) and 'b' [8, 16) overlap"));
    // Empty tensors anywhere and gaps between tensors are allowed.
    const auto fine = parse(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                     R"("e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},)"
                                     R"("b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})",
                                     20));
    CHECK(fine.tensor("e").numel() == 0);
    CHECK(fine.tensor("e").to_matrix().size() == 0);
  }
  SECTION("a file that does not exist or is not a regular file") {
    const io_test::TempDir dir;
    CHECK_MOET_ERROR(SafetensorsFile::open(dir / "missing.safetensors"),
                     Contains("[moet::MappedFile] cannot open") &&
                         Contains("missing.safetensors: No such file or directory"));
    CHECK_MOET_ERROR(SafetensorsFile::open(dir.path()), Contains("not a regular file"));
  }
}

TEST_CASE("A sharded checkpoint reads tensors from their shards, opened lazily",
          "[io][safetensors][sharded]") {
  const io_test::TempDir dir;
  const RowMatrix<float> a = counting(2, 3);
  const RowMatrix<float> b = counting(4, 2, -2.0f);
  {
    SafetensorsWriter s1;
    s1.add("model.layers.0.mlp.gate.weight", a);
    s1.write(dir / "model-00001-of-00002.safetensors");
    SafetensorsWriter s2;
    s2.add("model.layers.1.mlp.gate.weight", b, Dtype::kBf16);
    s2.write(dir / "model-00002-of-00002.safetensors");
  }
  const std::string index = R"({"metadata": {"total_size": 40}, "weight_map": {
      "model.layers.0.mlp.gate.weight": "model-00001-of-00002.safetensors",
      "model.layers.1.mlp.gate.weight": "model-00002-of-00002.safetensors"}})";
  io_test::write_text(dir / "model.safetensors.index.json", index);
  // A model.safetensors next to the index is ignored: the index wins.
  io_test::write_text(dir / "model.safetensors", "not a safetensors file");

  const auto ckpt = SafetensorsCheckpoint::open(dir.path());
  CHECK(ckpt.sharded());
  CHECK(ckpt.size() == 2);
  CHECK(ckpt.index_metadata().at("total_size") == 40);
  CHECK(ckpt.shard_names() == std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"});
  CHECK(ckpt.require("model.layers.0.mlp.gate.weight", {2, 3}).to_matrix() == a);
  // Shard 2 has not been opened yet: replace it with a truncated copy, and the lookup fails
  // naming the index, the shard and the tensor.
  const auto good = io_test::read_file(dir / "model-00002-of-00002.safetensors");
  auto cut = good;
  cut.resize(cut.size() - 4);
  io_test::write_file(dir / "model-00002-of-00002.safetensors", cut);
  CHECK_MOET_ERROR(ckpt.tensor("model.layers.1.mlp.gate.weight"),
                   Contains("[moet::SafetensorsCheckpoint]") &&
                       Contains("model.safetensors.index.json: shard "
                                "model-00002-of-00002.safetensors of tensor "
                                "'model.layers.1.mlp.gate.weight' cannot be read") &&
                       Contains("run past the end of the data section"));
  io_test::write_file(dir / "model-00002-of-00002.safetensors", good);
  const auto t1 = ckpt.tensor("model.layers.1.mlp.gate.weight");
  CHECK(t1.dtype() == Dtype::kBf16);
  CHECK(t1.file() == (dir / "model-00002-of-00002.safetensors").string());
  for (Index i = 0; i < b.size(); ++i) {
    CHECK(t1.to_matrix().data()[i] == moet::detail::round_to_bf16(b.data()[i]));
  }
  CHECK_NOTHROW(ckpt.open_all());
  CHECK_MOET_ERROR(ckpt.tensor("lm_head.weight"), Contains("no tensor 'lm_head.weight'"));

  SECTION("opened through the index file's path") {
    const auto again = SafetensorsCheckpoint::open(dir / "model.safetensors.index.json");
    CHECK(again.tensor("model.layers.0.mlp.gate.weight").to_matrix() == a);
  }
  SECTION("a missing shard") {
    std::filesystem::remove(dir / "model-00002-of-00002.safetensors");
    const auto c = SafetensorsCheckpoint::open(dir.path());
    CHECK_NOTHROW(c.tensor("model.layers.0.mlp.gate.weight"));
    CHECK_MOET_ERROR(c.tensor("model.layers.1.mlp.gate.weight"),
                     Contains("shard model-00002-of-00002.safetensors of tensor "
                              "'model.layers.1.mlp.gate.weight' cannot be read") &&
                         Contains("No such file or directory"));
    CHECK_THROWS_AS(c.open_all(), moet::Error);
  }
  SECTION("a tensor mapped to a shard that does not hold it") {
    io_test::write_text(dir / "model.safetensors.index.json",
                        R"({"weight_map": {"model.layers.0.mlp.gate.weight":
                            "model-00002-of-00002.safetensors"}})");
    const auto c = SafetensorsCheckpoint::open(dir.path());
    CHECK_MOET_ERROR(c.tensor("model.layers.0.mlp.gate.weight"),
                     Contains("maps tensor 'model.layers.0.mlp.gate.weight' to "
                              "model-00002-of-00002.safetensors, which has no such tensor"));
    CHECK_MOET_ERROR(c.open_all(), Contains("which has no such tensor"));
  }
}

TEST_CASE("Every malformed index file is a moet::Error naming the index and the tensor",
          "[io][safetensors][sharded][bad_file]") {
  const io_test::TempDir dir;
  const auto index = dir / "model.safetensors.index.json";
  const auto open_with = [&](const std::string& text) {
    io_test::write_text(index, text);
    return SafetensorsCheckpoint::open(dir.path());
  };
  SECTION("not JSON") {
    CHECK_MOET_ERROR(open_with(R"({"weight_map": {)"),
                     Contains("model.safetensors.index.json: not valid JSON"));
  }
  SECTION("not an object") {
    CHECK_MOET_ERROR(open_with("[]"), Contains("index.json: not a JSON object"));
  }
  SECTION("no weight_map, or one that is not an object") {
    CHECK_MOET_ERROR(open_with(R"({"metadata": {}})"), Contains("no \"weight_map\" object"));
    CHECK_MOET_ERROR(open_with(R"({"weight_map": ["a"]})"), Contains("no \"weight_map\" object"));
  }
  SECTION("metadata that is not an object") {
    CHECK_MOET_ERROR(open_with(R"({"metadata": 3, "weight_map": {}})"),
                     Contains("\"metadata\" is not an object"));
  }
  SECTION("a tensor mapped to something other than a plain file name") {
    CHECK_MOET_ERROR(open_with(R"({"weight_map": {"w": 3}})"),
                     Contains("tensor 'w' is mapped to 3, not a file name"));
    for (const char* file :
         {"../secret.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""}) {
      CHECK_MOET_ERROR(open_with(std::string(R"({"weight_map": {"w": ")") + file + "\"}}"),
                       Contains("tensor 'w' is mapped to '") &&
                           Contains("not a plain file name in the index's directory"));
    }
  }
  SECTION("a tensor listed twice") {
    CHECK_MOET_ERROR(open_with(R"({"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}})"),
                     Contains("key 'w' appears twice in 'weight_map'"));
  }
  SECTION("a directory with no checkpoint, and a path that does not exist") {
    CHECK_MOET_ERROR(SafetensorsCheckpoint::open(dir.path()),
                     Contains("no model.safetensors or model.safetensors.index.json"));
    CHECK_MOET_ERROR(SafetensorsCheckpoint::open(dir / "nothing.safetensors"),
                     Contains("cannot open") && Contains("nothing.safetensors"));
  }
}

TEST_CASE("SafetensorsWriter refuses what it cannot write", "[io][safetensors]") {
  SafetensorsWriter w;
  w.add("a", counting(1, 2));
  CHECK_MOET_ERROR(w.add("a", counting(1, 2)), Contains("tensor 'a' was already added"));
  CHECK_MOET_ERROR(w.add("__metadata__", counting(1, 2)), Contains("cannot name a tensor"));
  CHECK_MOET_ERROR(w.add("i", counting(1, 2), Dtype::kI32), Contains("cannot write dtype I32"));
  const Index shape[2] = {3, 3};
  const std::vector<float> four(4, 1.0f);
  CHECK_MOET_ERROR(w.add("s", shape, four), Contains("shape [3, 3] has 9 elements, given 4"));
  w.add("\xff bad utf-8", counting(1, 1));
  CHECK_MOET_ERROR(w.to_bytes(), Contains("cannot write the header"));
  const io_test::TempDir dir;
  SafetensorsWriter ok;
  ok.add("a", counting(1, 1));
  CHECK_MOET_ERROR(ok.write(dir / "no_such_dir" / "x.safetensors"), Contains("cannot create"));
}

}  // namespace test_safetensors
