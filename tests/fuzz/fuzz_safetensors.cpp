// libFuzzer target: SafetensorsFile's header parser and tensor reads on arbitrary bytes. Any
// input either parses or throws moet::Error (anything else, a crash or a sanitizer report is a
// finding); a file that parses has every tensor inside the input, and every F32/BF16/F16 tensor
// reads as float and bf16, whole, by rows and by slices, without an error.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "moet/detail/bf16.hpp"
#include "moet/errors.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/tensor.hpp"

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  std::optional<moet::SafetensorsFile> file;
  try {
    file.emplace(moet::SafetensorsFile::from_bytes(bytes, "fuzz.safetensors"));
  } catch (const moet::Error&) {
    return 0;  // refused with a message: fine
  }
  float sink = 0.0f;
  for (const auto& name : file->names()) {
    const moet::TensorView t = file->tensor(name);
    const std::byte* begin = t.bytes().data();
    MOET_FUZZ_CHECK(t.bytes().empty() ||
                        (begin >= bytes.data() && begin + t.bytes().size() <= bytes.data() + size),
                    "tensor '%s' outside the input", name.c_str());
    if (!moet::is_float_dtype(t.dtype())) continue;
    const moet::RowMatrix<float> m = t.to_matrix();  // (rows, cols)
    MOET_FUZZ_CHECK(m.size() == t.numel(), "tensor '%s': %ld floats for %ld elements", name.c_str(),
                    static_cast<long>(m.size()), static_cast<long>(t.numel()));
    if (m.size() > 0) sink += m(m.rows() - 1, m.cols() - 1);
    if (t.rows() > 0 && t.cols() > 0) {
      std::vector<moet::detail::Bf16> row(static_cast<std::size_t>(t.cols()));
      t.read_block(t.rows() - 1, 0, 1, t.cols(), row.data(), t.cols(), moet::Index{1});
      moet::RowMatrix<float> tr(t.cols(), 1);
      t.read_block_transposed(0, 0, tr);
      sink += tr(0, 0);
    }
    if (t.rank() >= 1 && t.dim(0) > 0) sink += static_cast<float>(t.slice(t.dim(0) - 1).numel());
  }
  volatile float keep = sink;
  (void)keep;
  return 0;
}
