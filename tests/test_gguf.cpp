// GGUF: the reader against files built here byte by byte from the published layout (every
// metadata value type, nested arrays, v2 and v3, general.alignment), tensor values checked
// against values worked out from the bits written (F32, F16, BF16, Q8_0, Q4_0, Q4_1 blocks),
// the block spans and slices of stacked experts, the architecture keys, and every
// malformed-file case of issue 15 as its own section with the expected message.
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/detail/bf16.hpp"
#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/gguf.hpp"
#include "moet/tensor.hpp"

#include "io_test_util.hpp"

namespace test_gguf {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using io_test::ByteWriter;
using moet::GgmlType;
using moet::GgufFile;
using moet::GgufValueType;
using moet::Index;
using moet::RowMatrix;

constexpr std::uint32_t kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6,
                        kBool = 7, kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12;

// Builds a GGUF file: metadata entries (each written by a callback after its key and type),
// tensors (name, ne, ggml type id, data), laid out with the alignment unless an offset is
// forced.
struct GgufBuilder {
  struct Tensor {
    std::string name;
    std::vector<std::uint64_t> ne;
    std::uint32_t type;
    std::vector<std::byte> data;
    std::optional<std::uint64_t> offset;
  };
  std::string magic = "GGUF";
  std::uint32_t version = 3;
  std::uint64_t alignment = 32;
  ByteWriter kv;
  std::uint64_t n_kv = 0;
  std::vector<Tensor> tensors;
  std::optional<std::uint64_t> n_tensors_override;
  std::optional<std::uint64_t> n_kv_override;

  GgufBuilder& entry(const std::string& key, std::uint32_t type,
                     const std::function<void(ByteWriter&)>& value) {
    kv.str(key).u32(type);
    value(kv);
    ++n_kv;
    return *this;
  }
  GgufBuilder& u32(const std::string& key, std::uint32_t v) {
    return entry(key, kU32, [&](ByteWriter& w) { w.u32(v); });
  }
  GgufBuilder& f32(const std::string& key, float v) {
    return entry(key, kF32, [&](ByteWriter& w) { w.f32(v); });
  }
  GgufBuilder& boolean(const std::string& key, bool v) {
    return entry(key, kBool, [&](ByteWriter& w) { w.u8(v ? 1 : 0); });
  }
  GgufBuilder& str(const std::string& key, const std::string& v) {
    return entry(key, kString, [&](ByteWriter& w) { w.str(v); });
  }
  GgufBuilder& tensor(const std::string& name, std::vector<std::uint64_t> ne, std::uint32_t type,
                      std::vector<std::byte> data, std::optional<std::uint64_t> offset = {}) {
    tensors.push_back({name, std::move(ne), type, std::move(data), offset});
    return *this;
  }

  std::vector<std::byte> build() const {
    ByteWriter w;
    w.raw(magic).u32(version);
    w.u64(n_tensors_override.value_or(tensors.size())).u64(n_kv_override.value_or(n_kv));
    std::vector<std::byte> out = w.bytes();
    out.insert(out.end(), kv.bytes().begin(), kv.bytes().end());
    ByteWriter infos;
    std::vector<std::uint64_t> offsets;
    std::uint64_t next = 0;
    for (const auto& t : tensors) {
      const std::uint64_t off = t.offset.value_or(next);
      offsets.push_back(off);
      next = off + t.data.size();
      next = (next + alignment - 1) / alignment * alignment;
      infos.str(t.name).u32(static_cast<std::uint32_t>(t.ne.size()));
      for (const auto d : t.ne) infos.u64(d);
      infos.u32(t.type).u64(off);
    }
    out.insert(out.end(), infos.bytes().begin(), infos.bytes().end());
    if (tensors.empty()) return out;
    out.resize((out.size() + alignment - 1) / alignment * alignment, std::byte{0});
    const std::size_t data_start = out.size();
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const std::size_t at = data_start + offsets[i];
      if (out.size() < at + tensors[i].data.size()) out.resize(at + tensors[i].data.size());
      std::copy(tensors[i].data.begin(), tensors[i].data.end(),
                out.begin() + static_cast<std::ptrdiff_t>(at));
    }
    return out;
  }
};

GgufFile parse(const std::vector<std::byte>& bytes) {
  return GgufFile::from_bytes(bytes, "bad.gguf");
}

std::vector<std::byte> f32_bytes(const std::vector<float>& v) {
  ByteWriter w;
  for (const float x : v) w.f32(x);
  return w.bytes();
}
std::vector<std::byte> u16_bytes(const std::vector<std::uint16_t>& v) {
  ByteWriter w;
  for (const auto x : v) w.u16(x);
  return w.bytes();
}

// Q8_0 [32, 2]: block 0 has d = 0.5 (half 0x3800), q_i = i - 16; block 1 d = -0.25 (0xB400),
// q_i = 127 - 8 i.
std::vector<std::byte> q8_0_bytes() {
  ByteWriter w;
  w.u16(0x3800);
  for (int i = 0; i < 32; ++i) w.u8(static_cast<std::uint8_t>(static_cast<std::int8_t>(i - 16)));
  w.u16(0xB400);
  for (int i = 0; i < 32; ++i)
    w.u8(static_cast<std::uint8_t>(static_cast<std::int8_t>(127 - 8 * i)));
  return w.bytes();
}
float q8_0_value(Index row, Index i) {
  return row == 0 ? 0.5f * static_cast<float>(i - 16) : -0.25f * static_cast<float>(127 - 8 * i);
}
// Q4_0 [64, 1]: blocks with d = 1 (0x3C00) and d = 2 (0x4000); byte j holds j % 16 in its low
// nibble (weight j) and 15 - j % 16 in its high nibble (weight j + 16); value d * (q - 8).
std::vector<std::byte> q4_0_bytes() {
  ByteWriter w;
  for (const std::uint16_t d : {std::uint16_t{0x3C00}, std::uint16_t{0x4000}}) {
    w.u16(d);
    for (int j = 0; j < 16; ++j) w.u8(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
  }
  return w.bytes();
}
float q4_0_value(Index i) {
  const float d = i < 32 ? 1.0f : 2.0f;
  const Index k = i % 32;
  const Index q = k < 16 ? k : 15 - (k - 16);
  return d * static_cast<float>(q - 8);
}
// Q4_1 [32, 1]: d = 0.5 (0x3800), m = -1 (0xBC00), nibbles as in Q4_0; value d * q + m.
std::vector<std::byte> q4_1_bytes() {
  ByteWriter w;
  w.u16(0x3800).u16(0xBC00);
  for (int j = 0; j < 16; ++j) w.u8(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
  return w.bytes();
}
float q4_1_value(Index i) {
  const Index q = i < 16 ? i : 15 - (i - 16);
  return 0.5f * static_cast<float>(q) - 1.0f;
}

// A file with one entry of every value type and one tensor of every readable type.
GgufBuilder full_file(std::uint32_t version) {
  GgufBuilder b;
  b.version = version;
  b.str("general.architecture", "qwen2moe");
  b.entry("t.u8", kU8, [](ByteWriter& w) { w.u8(200); });
  b.entry("t.i8", kI8, [](ByteWriter& w) { w.u8(0x80); });  // -128
  b.entry("t.u16", kU16, [](ByteWriter& w) { w.u16(65535); });
  b.entry("t.i16", kI16, [](ByteWriter& w) { w.u16(0xFFFE); });  // -2
  b.u32("t.u32", 4000000000U);
  b.entry("t.i32", kI32, [](ByteWriter& w) { w.u32(0xFFFFFFFFU); });  // -1
  b.f32("t.f32", 0.125f);
  b.boolean("t.bool", true);
  b.str("t.str", "h\xc3\xa9llo");
  b.entry("t.u64", kU64, [](ByteWriter& w) { w.u64(std::uint64_t{1} << 63); });
  b.entry("t.i64", kI64, [](ByteWriter& w) { w.u64(static_cast<std::uint64_t>(-5)); });
  b.entry("t.f64", kF64, [](ByteWriter& w) { w.u64(0x400921FB54442D18ULL); });  // pi
  b.entry("t.arr_u32", kArray, [](ByteWriter& w) { w.u32(kU32).u64(3).u32(7).u32(8).u32(9); });
  b.entry("t.arr_str", kArray, [](ByteWriter& w) { w.u32(kString).u64(2).str("a").str("bc"); });
  b.entry("t.arr_arr", kArray, [](ByteWriter& w) {
    w.u32(kArray).u64(2);
    w.u32(kI16).u64(2).u16(1).u16(0xFFFF);
    w.u32(kString).u64(1).str("deep");
  });
  b.entry("t.arr_empty", kArray, [](ByteWriter& w) { w.u32(kF64).u64(0); });
  b.u32("qwen2moe.expert_count", 4);
  b.u32("qwen2moe.expert_used_count", 2);
  b.u32("qwen2moe.block_count", 1);
  b.u32("qwen2moe.embedding_length", 32);
  b.u32("qwen2moe.expert_feed_forward_length", 16);
  b.u32("qwen2moe.expert_shared_feed_forward_length", 32);
  b.u32("qwen2moe.expert_shared_count", 1);
  b.boolean("qwen2moe.expert_weights_norm", false);
  b.f32("qwen2moe.expert_weights_scale", 2.5f);
  b.u32("qwen2moe.expert_gating_func", 2);
  b.tensor("f32", {3, 2}, 0, f32_bytes({1.5f, -2.0f, 0.0f, 1e-30f, 7.0f, -0.5f}));
  b.tensor("f16", {4}, 1, u16_bytes({0x3C00, 0xC100, 0x7BFF, 0x0001}));
  b.tensor("bf16", {2, 2}, 30, u16_bytes({0x3F80, 0xC020, 0x4049, 0x8000}));
  b.tensor("q8_0", {32, 2}, 8, q8_0_bytes());
  b.tensor("q4_0", {64}, 2, q4_0_bytes());
  b.tensor("q4_1", {32, 1}, 3, q4_1_bytes());
  b.tensor("q6_k", {256}, 14, std::vector<std::byte>(210, std::byte{0}));
  return b;
}

}  // namespace

TEST_CASE("GgufFile reads every metadata value type, v2 and v3", "[io][gguf]") {
  const std::uint32_t version = GENERATE(2u, 3u);
  const auto bytes = full_file(version).build();
  const GgufFile f = GgufFile::from_bytes(bytes, "full.gguf");
  CHECK(f.version() == version);
  CHECK(f.alignment() == 32);
  CHECK(f.data_offset() % 32 == 0);
  CHECK(f.keys().front() == "general.architecture");
  CHECK(f.keys().size() == 27);
  CHECK(*f.get_uint("t.u8") == 200);
  CHECK(*f.find("t.i8")->to_int() == -128);
  CHECK_FALSE(f.find("t.i8")->to_uint().has_value());
  CHECK(*f.get_uint("t.u16") == 65535);
  CHECK(*f.find("t.i16")->to_int() == -2);
  CHECK(*f.get_uint("t.u32") == 4000000000U);
  CHECK(*f.find("t.i32")->to_int() == -1);
  CHECK(*f.get_float("t.f32") == 0.125);
  CHECK(*f.get_float("t.u32") == 4e9);
  CHECK(*f.get_bool("t.bool"));
  CHECK(*f.get_string("t.str") == "h\xc3\xa9llo");
  CHECK(*f.get_uint("t.u64") == std::uint64_t{1} << 63);
  CHECK_FALSE(f.find("t.u64")->to_int().has_value());
  CHECK(*f.find("t.i64")->to_int() == -5);
  CHECK(*f.get_float("t.f64") == 3.141592653589793);
  CHECK(f.find("t.f64")->type() == GgufValueType::kF64);

  const auto& arr = *f.find("t.arr_u32");
  CHECK(arr.is_array());
  CHECK(arr.element_type() == GgufValueType::kU32);
  CHECK(arr.size() == 3);
  CHECK(*arr.at(2).to_uint() == 9);
  const auto& strs = *f.find("t.arr_str");
  CHECK(*strs.at(1).to_string() == "bc");
  const auto& nested = *f.find("t.arr_arr");
  CHECK(nested.element_type() == GgufValueType::kArray);
  CHECK(*nested.at(0).at(1).to_int() == -1);
  CHECK(*nested.at(1).at(0).to_string() == "deep");
  CHECK(f.find("t.arr_empty")->size() == 0);
  CHECK(f.find("nope") == nullptr);

  CHECK_MOET_ERROR(arr.at(3), Contains("index 3 past the array's 3"));
  CHECK_MOET_ERROR(f.find("t.u8")->size(), Contains("a u8 is not an array"));
  CHECK_MOET_ERROR(f.get_uint("t.str"),
                   Contains("[moet::GgufFile] full.gguf: key 't.str' is str, expected a "
                            "non-negative integer"));
  CHECK_MOET_ERROR(f.get_uint("t.i8"), Contains("key 't.i8' is i8"));
  CHECK_MOET_ERROR(f.get_bool("t.u8"), Contains("key 't.u8' is u8, expected a bool"));
  CHECK_MOET_ERROR(f.get_string("t.arr_str"), Contains("is an array, expected a string"));
  CHECK_MOET_ERROR(f.get_float("t.str"), Contains("expected a number"));
}

TEST_CASE("GgufFile converts tensors to the values their bits encode", "[io][gguf]") {
  const auto bytes = full_file(3).build();
  const GgufFile f = GgufFile::from_bytes(bytes, "full.gguf");
  CHECK(f.num_tensors() == 7);
  CHECK(f.tensor_names()[3] == "q8_0");

  const auto t = f.tensor("f32");
  CHECK(t.type() == GgmlType::kF32);
  CHECK(t.n_dims() == 2);
  CHECK(t.ne(0) == 3);
  CHECK(t.ne(1) == 2);
  CHECK(t.ne(3) == 1);
  CHECK(t.rows() == 2);
  CHECK(t.cols() == 3);
  CHECK(t.offset() == 0);
  RowMatrix<float> expect(2, 3);
  expect << 1.5f, -2.0f, 0.0f, 1e-30f, 7.0f, -0.5f;
  CHECK(t.to_matrix() == expect);

  const RowMatrix<float> h = f.tensor("f16").to_matrix();  // (1, 4)
  CHECK(h(0, 0) == 1.0f);
  CHECK(h(0, 1) == -2.5f);
  CHECK(h(0, 2) == 65504.0f);
  CHECK(h(0, 3) == std::ldexp(1.0f, -24));

  const RowMatrix<float> b = f.tensor("bf16").to_matrix();  // (2, 2)
  CHECK(b(0, 0) == 1.0f);
  CHECK(b(0, 1) == -2.5f);
  CHECK(b(1, 0) == 3.140625f);
  CHECK(b(1, 1) == 0.0f);
  CHECK(std::signbit(b(1, 1)));

  const auto q8 = f.tensor("q8_0");
  CHECK(q8.row_bytes() == 34);
  const RowMatrix<float> q8m = q8.to_matrix();  // (2, 32)
  for (Index r = 0; r < 2; ++r) {
    for (Index i = 0; i < 32; ++i) CHECK(q8m(r, i) == q8_0_value(r, i));
  }
  const auto blocks = q8.blocks<moet::detail::BlockQ8_0>();
  REQUIRE(blocks.size() == 2);
  CHECK(blocks[0].d == 0x3800);
  CHECK(blocks[1].qs[1] == 119);

  const RowMatrix<float> q4 = f.tensor("q4_0").to_matrix();  // (1, 64)
  for (Index i = 0; i < 64; ++i) CHECK(q4(0, i) == q4_0_value(i));
  CHECK(f.tensor("q4_0").blocks<moet::detail::BlockQ4_0>().size() == 2);
  const RowMatrix<float> q41 = f.tensor("q4_1").to_matrix();  // (1, 32)
  for (Index i = 0; i < 32; ++i) CHECK(q41(0, i) == q4_1_value(i));
  CHECK(f.tensor("q4_1").n_dims() == 2);

  SECTION("blocks, transposes and bf16 out of quantised rows") {
    RowMatrix<float> tr(5, 2);  // columns 30..34 of the two Q8_0 rows, transposed
    CHECK_MOET_ERROR(q8.read_block_transposed(0, 30, tr), Contains("outside its matrix view"));
    RowMatrix<float> tr2(2, 2);
    q8.read_block_transposed(0, 30, tr2);
    CHECK(tr2(0, 1) == q8_0_value(1, 30));
    CHECK(tr2(1, 0) == q8_0_value(0, 31));
    std::vector<moet::detail::Bf16> row(32);
    q8.read_block(1, 0, 1, 32, row.data(), 32, 1);
    for (Index i = 0; i < 32; ++i) {
      CHECK(moet::detail::from_bf16(row[static_cast<std::size_t>(i)]) ==
            moet::detail::round_to_bf16(q8_0_value(1, i)));
    }
  }
  SECTION("types moet does not read, and the wrong block type") {
    const auto q6 = f.tensor("q6_k");
    CHECK(q6.type() == GgmlType::kQ6K);
    CHECK(q6.bytes().size() == 210);
    CHECK_MOET_ERROR(q6.to_matrix(), Contains("[moet::GgufTensor] full.gguf: tensor 'q6_k' has "
                                              "type Q6_K, which moet does not read"));
    CHECK_MOET_ERROR(q8.blocks<moet::detail::BlockQ4_0>(),
                     Contains("tensor 'q8_0' has type Q8_0, expected Q4_0"));
    CHECK_MOET_ERROR(t.require_dims({2, 3}), Contains("has ne [3, 2], expected [2, 3]"));
    CHECK_NOTHROW(t.require_dims({3, 2}));
    CHECK_MOET_ERROR(f.tensor("missing"), Contains("full.gguf: no tensor 'missing'"));
  }
}

TEST_CASE("Stacked expert tensors slice into experts, and blocks stay ggml's", "[io][gguf]") {
  // ffn_up_exps-like: ne = [32 (K), 3 (N), 2 (E)] in Q8_0, with known codes.
  ByteWriter data;
  for (int e = 0; e < 2; ++e) {
    for (int n = 0; n < 3; ++n) {
      data.u16(moet::detail::to_f16(0.125f * static_cast<float>(e * 3 + n + 1)));
      for (int k = 0; k < 32; ++k) data.u8(static_cast<std::uint8_t>(k - 16 + e));
    }
  }
  GgufBuilder b;
  b.alignment = 64;
  b.u32("general.alignment", 64);
  b.tensor("pad", {3}, 0, f32_bytes({1, 2, 3}));
  b.tensor("blk.0.ffn_up_exps.weight", {32, 3, 2}, 8, data.bytes());
  const auto bytes = b.build();
  const GgufFile f = GgufFile::from_bytes(bytes);
  CHECK(f.alignment() == 64);
  CHECK(f.data_offset() % 64 == 0);
  const auto up = f.tensor("blk.0.ffn_up_exps.weight");
  CHECK(up.offset() == 64);
  CHECK(up.rows() == 6);
  const auto e1 = up.slice(1);
  CHECK(e1.n_dims() == 2);
  CHECK(e1.rows() == 3);
  CHECK(e1.cols() == 32);
  const auto blocks = e1.blocks<moet::detail::BlockQ8_0>();
  REQUIRE(blocks.size() == 3);
  CHECK(moet::detail::from_f16(blocks[2].d) == 0.75f);
  CHECK(blocks[2].qs[0] == -15);
  CHECK(e1.to_matrix()(2, 31) == 0.75f * 16.0f);
  CHECK(up.to_matrix().bottomRows(3) == e1.to_matrix());
  CHECK(up.slice(0).slice(2).to_matrix()(0, 0) == 0.375f * -16.0f);
  CHECK_MOET_ERROR(up.slice(2), Contains("has no slice 2 (outer dimension 2)"));
}

TEST_CASE("GgufFile::architecture collects the MoE keys of general.architecture", "[io][gguf]") {
  const auto bytes = full_file(3).build();
  const auto a = GgufFile::from_bytes(bytes).architecture();
  CHECK(a.name == "qwen2moe");
  CHECK(a.expert_count == 4);
  CHECK(a.expert_used_count == 2);
  CHECK(a.block_count == 1);
  CHECK(a.embedding_length == 32);
  CHECK(a.expert_feed_forward_length == 16);
  CHECK(a.expert_shared_feed_forward_length == 32);
  CHECK(a.expert_shared_count == 1);
  CHECK(a.expert_weights_norm == false);
  CHECK(a.expert_weights_scale == 2.5f);
  CHECK(a.expert_gating_func == 2u);
  CHECK_FALSE(a.leading_dense_block_count.has_value());
  CHECK_FALSE(a.expert_group_count.has_value());

  SECTION("missing architecture, wrong types, impossible counts") {
    GgufBuilder none;
    none.u32("x.expert_count", 4);
    CHECK_MOET_ERROR(GgufFile::from_bytes(none.build(), "n.gguf").architecture(),
                     Contains("n.gguf: no key 'general.architecture'"));
    GgufBuilder typed;
    typed.str("general.architecture", "olmoe").str("olmoe.expert_count", "64");
    CHECK_MOET_ERROR(GgufFile::from_bytes(typed.build()).architecture(),
                     Contains("key 'olmoe.expert_count' is str, expected a non-negative integer"));
    GgufBuilder used;
    used.str("general.architecture", "olmoe")
        .u32("olmoe.expert_count", 4)
        .u32("olmoe.expert_used_count", 5);
    CHECK_MOET_ERROR(
        GgufFile::from_bytes(used.build()).architecture(),
        Contains("key 'olmoe.expert_used_count' = 5 exceeds 'olmoe.expert_count' = 4"));
    GgufBuilder norm;
    norm.str("general.architecture", "olmoe").u32("olmoe.expert_weights_norm", 1);
    CHECK_MOET_ERROR(GgufFile::from_bytes(norm.build()).architecture(),
                     Contains("key 'olmoe.expert_weights_norm' is u32, expected a bool"));
  }
}

TEST_CASE("Every malformed GGUF file is a moet::Error naming the key or tensor",
          "[io][gguf][bad_file]") {
  SECTION("too short, bad magic") {
    CHECK_MOET_ERROR(parse(std::vector<std::byte>(3)),
                     Contains("[moet::GgufFile] bad.gguf: header: the file is 3 bytes"));
    GgufBuilder b;
    b.magic = "GGML";
    CHECK_MOET_ERROR(parse(b.build()), Contains("header: bad magic 'GGML', expected 'GGUF'"));
  }
  SECTION("versions other than 2 and 3") {
    GgufBuilder b;
    b.version = 1;
    CHECK_MOET_ERROR(parse(b.build()), Contains("GGUF version 1 is not supported"));
    b.version = 4;
    CHECK_MOET_ERROR(parse(b.build()), Contains("unsupported GGUF version 4"));
    b.version = 0;
    CHECK_MOET_ERROR(parse(b.build()), Contains("unsupported GGUF version 0"));
    b.version = 0x03000000;
    CHECK_MOET_ERROR(parse(b.build()), Contains("looks byte-swapped: big-endian GGUF"));
  }
  SECTION("a header cut short") {
    auto bytes = GgufBuilder{}.build();
    bytes.resize(12);
    CHECK_MOET_ERROR(parse(bytes), Contains("header: the tensor count (8 bytes at offset 8) runs "
                                            "past the end of the file (12 bytes)"));
  }
  SECTION("counts that cannot fit in the file") {
    GgufBuilder b;
    b.n_kv_override = std::uint64_t{1} << 60;
    CHECK_MOET_ERROR(parse(b.build()), Contains("metadata count 1152921504606846976 cannot fit"));
    GgufBuilder t;
    t.n_tensors_override = 1000;
    CHECK_MOET_ERROR(parse(t.build()),
                     Contains("tensor count 1000 cannot fit in the 0 bytes left"));
  }
  SECTION("a key or string whose length runs past the end") {
    GgufBuilder b;
    b.kv.u64(1000).raw("general.name");
    b.n_kv = 1;
    CHECK_MOET_ERROR(parse(b.build()), Contains("metadata entry 0: the key: string length 1000"));
    GgufBuilder s;
    s.entry("general.name", kString, [](ByteWriter& w) { w.u64(~std::uint64_t{0}).raw("x"); });
    CHECK_MOET_ERROR(parse(s.build()), Contains("key 'general.name': the string: string length "
                                                "18446744073709551615 at offset"));
  }
  SECTION("an empty or repeated key") {
    GgufBuilder e;
    e.u32("", 1);
    CHECK_MOET_ERROR(parse(e.build()), Contains("metadata entry 0: empty key"));
    GgufBuilder r;
    r.u32("a.b", 1).u32("a.b", 2);
    CHECK_MOET_ERROR(parse(r.build()), Contains("key 'a.b': repeated key"));
  }
  SECTION("an unknown value type, a value past the end") {
    GgufBuilder b;
    b.entry("a.b", 13, [](ByteWriter& w) { w.u32(0); });
    CHECK_MOET_ERROR(parse(b.build()), Contains("key 'a.b': unknown value type 13"));
    GgufBuilder c;
    c.entry("a.f64", kF64, [](ByteWriter& w) { w.u32(0); });
    CHECK_MOET_ERROR(parse(c.build()), Contains("key 'a.f64': f64 (8 bytes at offset"));
  }
  SECTION("an array whose length runs past the end") {
    GgufBuilder b;
    b.entry("a.arr", kArray, [](ByteWriter& w) { w.u32(kU32).u64(std::uint64_t{1} << 62); });
    CHECK_MOET_ERROR(parse(b.build()), Contains("key 'a.arr': array of 4611686018427387904 u32 "
                                                "runs past the end of the file"));
    GgufBuilder s;
    s.entry("tokenizer.ggml.tokens", kArray, [](ByteWriter& w) { w.u32(kString).u64(5).str("a"); });
    CHECK_MOET_ERROR(parse(s.build()), Contains("key 'tokenizer.ggml.tokens': array of 5 str"));
    GgufBuilder u;
    u.entry("a.arr", kArray, [](ByteWriter& w) { w.u32(99).u64(1); });
    CHECK_MOET_ERROR(parse(u.build()), Contains("key 'a.arr': unknown value type 99"));
  }
  SECTION("arrays nested too deep") {
    GgufBuilder b;
    b.entry("a.deep", kArray, [](ByteWriter& w) {
      for (int i = 0; i < 9; ++i) w.u32(kArray).u64(1);
      w.u32(kU8).u64(0);
    });
    CHECK_MOET_ERROR(parse(b.build()), Contains("key 'a.deep': arrays nested deeper than 8"));
  }
  SECTION("a bool that is neither 0 nor 1") {
    GgufBuilder b;
    b.entry("a.flag", kBool, [](ByteWriter& w) { w.u8(2); });
    CHECK_MOET_ERROR(parse(b.build()), Contains("key 'a.flag': bool value 2 is neither 0 nor 1"));
    GgufBuilder a;
    a.entry("a.flags", kArray, [](ByteWriter& w) { w.u32(kBool).u64(2).u8(1).u8(7); });
    CHECK_MOET_ERROR(parse(a.build()), Contains("key 'a.flags': bool value 7"));
  }
  SECTION("a general.alignment that is not a u32 power of two") {
    GgufBuilder t;
    t.entry("general.alignment", kU64, [](ByteWriter& w) { w.u64(32); });
    CHECK_MOET_ERROR(parse(t.build()), Contains("key 'general.alignment': is u64, expected u32"));
    for (const std::uint32_t a : {0u, 48u}) {
      GgufBuilder b;
      b.u32("general.alignment", a);
      CHECK_MOET_ERROR(parse(b.build()),
                       Contains("alignment " + std::to_string(a) + " is not a power of two"));
    }
  }
  SECTION("a tensor name past the end, empty or repeated") {
    GgufBuilder b;
    b.tensor(std::string(40, 'x'), {4}, 0, f32_bytes({1, 2, 3, 4}));
    auto bytes = b.build();
    bytes.resize(24 + 8 + 20);  // cut inside the 40-byte name
    CHECK_MOET_ERROR(parse(bytes), Contains("tensor info 0: the tensor name: string length 40 at "
                                            "offset 24 runs past the end of the file (52 bytes)"));
    GgufBuilder e;
    e.tensor("", {4}, 0, f32_bytes({1, 2, 3, 4}));
    CHECK_MOET_ERROR(parse(e.build()), Contains("tensor info 0: empty tensor name"));
    GgufBuilder r;
    r.tensor("w", {1}, 0, f32_bytes({1})).tensor("w", {1}, 0, f32_bytes({2}));
    CHECK_MOET_ERROR(parse(r.build()), Contains("tensor 'w': repeated tensor name"));
  }
  SECTION("too many dimensions, dimensions or element counts that overflow") {
    GgufBuilder b;
    b.tensor("w", {1, 1, 1, 1, 1}, 0, f32_bytes({1}));
    CHECK_MOET_ERROR(parse(b.build()), Contains("tensor 'w': 5 dimensions (at most 4)"));
    GgufBuilder big;
    big.tensor("w", {std::uint64_t{1} << 63}, 0, {});
    CHECK_MOET_ERROR(parse(big.build()), Contains("tensor 'w': dimension 0 = 9223372036854775808 "
                                                  "is too large"));
    GgufBuilder prod;
    prod.tensor("w", {std::uint64_t{1} << 32, std::uint64_t{1} << 32}, 0, {});
    CHECK_MOET_ERROR(parse(prod.build()),
                     Contains("tensor 'w': ne [4294967296, 4294967296] has more elements"));
    GgufBuilder empty;  // no elements, but rows() would overflow
    empty.tensor("w", {0, std::uint64_t{1} << 32, std::uint64_t{1} << 32}, 0, {});
    CHECK_MOET_ERROR(parse(empty.build()), Contains("tensor 'w': ne [0, 4294967296, 4294967296] "
                                                    "has more elements"));
    GgufBuilder empty_rows;  // found by fuzz_gguf: no elements, but row_bytes() overflowed
    empty_rows.tensor("w", {7021111980564807684ULL, 0}, 0, {});
    CHECK_MOET_ERROR(parse(empty_rows.build()),
                     Contains("tensor 'w': a row of 7021111980564807684 F32 elements has more "
                              "bytes than fit in 63 bits"));
    GgufBuilder bytes_overflow;  // 2^62 elements fit, their 2^64 F32 bytes do not
    bytes_overflow.tensor("w", {std::uint64_t{1} << 31, std::uint64_t{1} << 31}, 0, {});
    CHECK_MOET_ERROR(parse(bytes_overflow.build()), Contains("tensor 'w': byte count overflows"));
  }
  SECTION("an unknown or removed ggml type") {
    for (const std::uint32_t type : {4u, 31u, 40u, 77u}) {
      GgufBuilder b;
      b.tensor("w", {32}, type, std::vector<std::byte>(64));
      CHECK_MOET_ERROR(parse(b.build()),
                       Contains("tensor 'w': unknown ggml type id " + std::to_string(type)));
    }
  }
  SECTION("rows that are not whole blocks") {
    GgufBuilder b;
    b.tensor("w", {33, 2}, 8, std::vector<std::byte>(68));
    CHECK_MOET_ERROR(parse(b.build()), Contains("tensor 'w': 33 elements per row is not a whole "
                                                "number of Q8_0 blocks of 32"));
  }
  SECTION("a misaligned offset") {
    GgufBuilder b;
    b.tensor("w", {4}, 0, f32_bytes({1, 2, 3, 4}), 16);
    CHECK_MOET_ERROR(parse(b.build()),
                     Contains("tensor 'w': offset 16 is not a multiple of the alignment 32"));
  }
  SECTION("data past the end: a truncated file, or a type whose size does not fit") {
    GgufBuilder b;
    b.tensor("a", {8}, 0, f32_bytes({1, 2, 3, 4, 5, 6, 7, 8}));
    auto bytes = b.build();
    bytes.resize(bytes.size() - 1);
    CHECK_MOET_ERROR(parse(bytes), Contains("tensor 'a': F32 data [0, 0 + 32) run past the end of "
                                            "the data section (31 bytes): the file is truncated"));
    GgufBuilder t;  // 64 bytes of F16 data declared as F32: twice the bytes
    t.tensor("h", {32}, 0, std::vector<std::byte>(64));
    CHECK_MOET_ERROR(parse(t.build()),
                     Contains("tensor 'h': F32 data [0, 0 + 128) run past the end"));
  }
  SECTION("overlapping tensors: a type whose size does not match the space given") {
    GgufBuilder b;
    b.tensor("a", {16}, 0, std::vector<std::byte>(64), 0);  // F32 [16]: 64 bytes
    b.tensor("b", {16}, 0, std::vector<std::byte>(64), 32);
    CHECK_MOET_ERROR(parse(b.build()), Contains("data section: tensors 'a' [0, 64) and 'b' [32, "
                                                "96) overlap"));
  }
  SECTION("a data section that starts past the end of the file") {
    GgufBuilder b;
    b.tensor("e", {0}, 0, {});
    auto bytes = b.build();
    bytes.resize(bytes.size() - 1);  // drop the last padding byte
    CHECK_MOET_ERROR(parse(bytes), Contains("data section: starts at"));
  }
  SECTION("a missing file") {
    const io_test::TempDir dir;
    CHECK_MOET_ERROR(GgufFile::open(dir / "missing.gguf"),
                     Contains("cannot open") && Contains("missing.gguf"));
  }
}

TEST_CASE("GgufFile maps files from disk and keeps views valid across moves", "[io][gguf]") {
  const io_test::TempDir dir;
  io_test::write_file(dir / "full.gguf", full_file(3).build());
  GgufFile f = GgufFile::open(dir / "full.gguf");
  CHECK(f.name() == (dir / "full.gguf").string());
  const auto q8 = f.tensor("q8_0");
  const auto blocks = q8.blocks<moet::detail::BlockQ8_0>();  // the mapping is page-aligned
  const GgufFile moved = std::move(f);
  CHECK(blocks[0].d == 0x3800);
  CHECK(moved.tensor("q8_0").to_matrix()(1, 0) == q8_0_value(1, 0));
  CHECK(*moved.get_string("general.architecture") == "qwen2moe");
}

}  // namespace test_gguf
