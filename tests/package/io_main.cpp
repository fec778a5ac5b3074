// A minimal user of moet's file readers (moet::io), built by both packaging consumers when
// moet::io is provided: it writes a safetensors file to memory and reads it back.
#include <cstdio>

#include <moet/io/gguf.hpp>
#include <moet/io/npy.hpp>
#include <moet/io/safetensors.hpp>

int main() {
  moet::RowMatrix<float> w(2, 3);
  w << 1, 2, 3, 4, 5, 6;
  moet::SafetensorsWriter writer;
  writer.add("w", w, moet::Dtype::kBf16);
  const auto bytes = writer.to_bytes();
  const auto file = moet::SafetensorsFile::from_bytes(bytes);
  const bool ok = file.require("w", {2, 3}).to_matrix() == w;
  std::printf("moet::io consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
