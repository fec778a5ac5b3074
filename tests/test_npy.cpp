// .npy: round trips of 1-D and 2-D float32 arrays, headers as NumPy writes them (version 1 and
// 2, single and double quotes, trailing commas) read from bytes written here, and every bad
// file as its own section.
#include <cstdint>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "moet/errors.hpp"
#include "moet/io/npy.hpp"
#include "moet/tensor.hpp"

#include "io_test_util.hpp"

namespace test_npy {  // one per file: the unity build puts several files in one TU

namespace {

using Catch::Matchers::Contains;
using io_test::ByteWriter;
using moet::Index;
using moet::RowMatrix;

// A .npy file with `header` as its dict (padded as given) and `values` as float32 data.
std::vector<std::byte> npy(const std::string& header, const std::vector<float>& values,
                           int major = 1) {
  ByteWriter w;
  w.raw("\x93NUMPY").u8(static_cast<std::uint8_t>(major)).u8(0);
  if (major == 1) {
    w.u16(static_cast<std::uint16_t>(header.size()));
  } else {
    w.u32(static_cast<std::uint32_t>(header.size()));
  }
  w.raw(header);
  for (const float v : values) w.f32(v);
  return w.bytes();
}

moet::NpyArray parse(const std::vector<std::byte>& bytes) {
  return moet::parse_npy(bytes, "bad.npy");
}

}  // namespace

TEST_CASE("npy files round-trip 1-D and 2-D float32 arrays", "[io][npy]") {
  const io_test::TempDir dir;
  RowMatrix<float> m(3, 4);  // (3, 4)
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = 0.5f * static_cast<float>(i) - 1.0f;
  moet::write_npy(dir / "m.npy", m);
  const auto a = moet::read_npy(dir / "m.npy");
  CHECK(a.shape == std::vector<Index>{3, 4});
  CHECK(a.matrix() == m);
  const auto bytes = io_test::read_file(dir / "m.npy");
  CHECK((bytes.size() - 48) % 64 == 0);  // header padded to 64 bytes, then 12 floats

  const std::vector<float> v = {1.0f, -2.0f, 3.5f};
  moet::write_npy(dir / "v.npy", std::span<const float>(v));
  const auto b = moet::read_npy(dir / "v.npy");
  CHECK(b.shape == std::vector<Index>{3});
  CHECK(b.values == v);
  CHECK(b.matrix().rows() == 1);

  const RowMatrix<float> empty(0, 5);
  moet::write_npy(dir / "e.npy", empty);
  CHECK(moet::read_npy(dir / "e.npy").matrix().cols() == 5);
}

TEST_CASE("parse_npy reads the header variants NumPy writes", "[io][npy]") {
  const auto a =
      parse(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }   \n", {1, 2, 3, 4}));
  CHECK(a.matrix()(1, 0) == 3.0f);
  const auto b = parse(
      npy("{\"shape\": (4,), \"fortran_order\": True, \"descr\": \"<f4\"}\n", {1, 2, 3, 4}, 2));
  CHECK(b.shape == std::vector<Index>{4});  // a 1-D array in Fortran order is the same bytes
  const auto c = parse(npy("{'descr':'<f4','fortran_order':False,'shape':(1,3)}", {7, 8, 9}, 3));
  CHECK(c.values[2] == 9.0f);
}

TEST_CASE("Every malformed npy file is a moet::Error naming the file", "[io][npy][bad_file]") {
  const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n";
  SECTION("no magic, an unknown version, a header length past the end") {
    CHECK_MOET_ERROR(parse(std::vector<std::byte>(4)),
                     Contains("[moet::npy] bad.npy: not a .npy file"));
    CHECK_MOET_ERROR(parse(npy(ok, {1, 2}, 7)), Contains("unsupported format version 7"));
    auto bytes = npy(ok, {});
    bytes[8] = std::byte{0xff};
    CHECK_MOET_ERROR(parse(bytes), Contains("header length") && Contains("runs past the end"));
  }
  SECTION("a header that is not the dict") {
    CHECK_MOET_ERROR(parse(npy("['descr']", {})), Contains("bad.npy: header expected '{'"));
    CHECK_MOET_ERROR(parse(npy("{'descr': '<f4', 'fortran_order': False}", {})),
                     Contains("lacks one of"));
    CHECK_MOET_ERROR(parse(npy("{'descr': '<f4', 'descr': '<f4'}", {})),
                     Contains("repeats 'descr'"));
    CHECK_MOET_ERROR(parse(npy("{'descr': '<f4', 'order': 1}", {})),
                     Contains("unknown key 'order'"));
    CHECK_MOET_ERROR(parse(npy("{'descr': '<f4", {})), Contains("unterminated string"));
    CHECK_MOET_ERROR(parse(npy("{'fortran_order': Maybe}", {})), Contains("True or False"));
    CHECK_MOET_ERROR(parse(npy("{'shape': (2, -1)}", {})), Contains("non-negative integer"));
    CHECK_MOET_ERROR(parse(npy("{'shape': (99999999999999999999,)}", {})),
                     Contains("shape entry overflows"));
    CHECK_MOET_ERROR(parse(npy(ok + "x", {1, 2})), Contains("text after the dict"));
  }
  SECTION("a dtype other than little-endian float32") {
    for (const char* descr : {"<f8", ">f4", "<i4", "|u1"}) {
      const std::string h =
          std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (2,), }\n";
      CHECK_MOET_ERROR(parse(npy(h, {1, 2})),
                       Contains("dtype '" + std::string(descr) + "' is not little-endian float32"));
    }
  }
  SECTION("Fortran order, and shapes that are not 1-D or 2-D") {
    CHECK_MOET_ERROR(
        parse(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2)}", {1, 2, 3, 4})),
        Contains("Fortran order is not supported"));
    CHECK_MOET_ERROR(parse(npy("{'descr': '<f4', 'fortran_order': False, 'shape': ()}", {1})),
                     Contains("shape [] is not 1-D or 2-D"));
    CHECK_MOET_ERROR(
        parse(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 2)}", {1, 2})),
        Contains("shape [1, 1, 2] is not 1-D or 2-D"));
  }
  SECTION("data that do not match the shape") {
    CHECK_MOET_ERROR(parse(npy(ok, {1, 2, 3})),
                     Contains("shape [2] needs 2 floats, the file holds 12 bytes of data"));
    CHECK_MOET_ERROR(parse(npy(ok, {1})), Contains("the file holds 4 bytes"));
    CHECK_MOET_ERROR(
        parse(
            npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296)}", {})),
        Contains("shape overflows"));
  }
  SECTION("a missing file") {
    const io_test::TempDir dir;
    CHECK_MOET_ERROR(moet::read_npy(dir / "x.npy"), Contains("cannot open"));
  }
}

}  // namespace test_npy
