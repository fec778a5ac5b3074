// libFuzzer target: parse_npy (magic, version, header dict, dtype, shape, data size) on
// arbitrary bytes: either a float32 array whose values match its shape, or a moet::Error.
#include <cstddef>
#include <cstdint>
#include <span>

#include "moet/errors.hpp"
#include "moet/io/npy.hpp"
#include "moet/tensor.hpp"

#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const moet::NpyArray a = moet::parse_npy(bytes, "fuzz.npy");
    moet::Index n = 1;
    for (const moet::Index d : a.shape) n *= d;
    MOET_FUZZ_CHECK(static_cast<moet::Index>(a.values.size()) == n, "%zu values for %ld",
                    a.values.size(), static_cast<long>(n));
    MOET_FUZZ_CHECK(a.matrix().size() == n, "matrix size");
  } catch (const moet::Error&) {
    // refused with a message: fine
  }
  return 0;
}
