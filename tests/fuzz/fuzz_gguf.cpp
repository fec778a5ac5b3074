// libFuzzer target: GgufFile's parser (header, every metadata value type, tensor infos, data
// ranges) and its tensor reads on arbitrary bytes. Any input either parses or throws
// moet::Error; a file that parses has every tensor inside the input, every value reads back
// through its accessors, and every readable tensor (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
// converts to float whole and by slices without an error.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "moet/detail/quant.hpp"
#include "moet/errors.hpp"
#include "moet/io/gguf.hpp"
#include "moet/tensor.hpp"

#include "fuzz_common.hpp"

namespace {

double visit(const moet::GgufValue& v) {
  double sum = 0.0;
  if (v.is_array()) {
    for (std::size_t i = 0; i < v.size(); ++i) sum += visit(v.at(i));
    return sum;
  }
  if (const auto u = v.to_uint()) sum += static_cast<double>(*u);
  if (const auto i = v.to_int()) sum += static_cast<double>(*i);
  if (const auto d = v.to_double()) sum += *d;
  if (const auto b = v.to_bool()) sum += *b ? 1.0 : 0.0;
  if (const auto s = v.to_string()) sum += static_cast<double>(s->size());
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  std::optional<moet::GgufFile> file;
  try {
    file.emplace(moet::GgufFile::from_bytes(bytes, "fuzz.gguf"));
  } catch (const moet::Error&) {
    return 0;  // refused with a message: fine
  }
  double sink = 0.0;
  for (const auto& key : file->keys()) sink += visit(*file->find(key));
  try {
    sink += static_cast<double>(file->architecture().expert_count.value_or(0));
  } catch (const moet::Error&) {
    // a missing or mistyped architecture key: refused with a message
  }
  for (const auto& name : file->tensor_names()) {
    const moet::GgufTensor t = file->tensor(name);
    const std::byte* begin = t.bytes().data();
    MOET_FUZZ_CHECK(t.bytes().empty() ||
                        (begin >= bytes.data() && begin + t.bytes().size() <= bytes.data() + size),
                    "tensor '%s' outside the input", name.c_str());
    MOET_FUZZ_CHECK(static_cast<moet::Index>(t.bytes().size()) == t.rows() * t.row_bytes(),
                    "tensor '%s': byte count", name.c_str());
    if (!moet::ggml_type_readable(t.type())) continue;
    const moet::RowMatrix<float> m = t.to_matrix();  // (rows, cols)
    if (m.size() > 0) sink += static_cast<double>(m(m.rows() - 1, m.cols() - 1));
    if (t.n_dims() > 0 && t.ne(t.n_dims() - 1) > 0) {
      const moet::GgufTensor last = t.slice(t.ne(t.n_dims() - 1) - 1);
      sink += static_cast<double>(last.to_matrix().size());
    }
    try {
      if (t.type() == moet::GgmlType::kQ8_0) {
        sink += static_cast<double>(t.blocks<moet::detail::BlockQ8_0>().size());
      } else if (t.type() == moet::GgmlType::kQ4_0) {
        sink += static_cast<double>(t.blocks<moet::detail::BlockQ4_0>().size());
      }
    } catch (const moet::Error&) {
      // data not aligned for the block type in this buffer: refused with a message
    }
  }
  volatile double keep = sink;
  (void)keep;
  return 0;
}
