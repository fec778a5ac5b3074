#pragma once
/// \file io/mmap.hpp
/// `MappedFile`: a whole file mapped read-only into memory (POSIX `mmap`), the byte source of
/// moet's checkpoint readers (io/safetensors.hpp, io/gguf.hpp). Pages are read from disk when
/// first touched, so opening a checkpoint of many gigabytes costs nothing until its tensors are
/// read, and several processes share one copy in the page cache.
///
/// ```cpp
/// moet::MappedFile file = moet::MappedFile::open("model.safetensors");
/// std::span<const std::byte> bytes = file.bytes();  // valid while `file` (or what it moved to)
/// lives
/// ```

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "moet/errors.hpp"

namespace moet {

/// A read-only memory map of one whole file (RAII: unmapped on destruction; movable, not
/// copyable). The mapping never moves, so spans into `bytes()` stay valid when the object is
/// moved, until the object that holds the mapping is destroyed. An empty file maps to an empty
/// span. The map is private and read-only: writing through it is impossible, and a file
/// changed by another process while mapped is undefined behaviour, as with any `mmap` reader
/// (truncating a mapped file makes reads past the new end fault with `SIGBUS`).
class MappedFile {
 public:
  /// No file (an empty span).
  MappedFile() = default;

  /// Maps `path` read-only. Throws `moet::Error` naming the path and the system's reason when
  /// the file is missing, unreadable, not a regular file, or cannot be mapped.
  static MappedFile open(const std::filesystem::path& path) {
    MappedFile out;
    out.path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_errno(path, "cannot open");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      errno = err;
      fail_errno(path, "cannot stat");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      detail::fail("MappedFile", path.string(), ": not a regular file");
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        errno = err;
        fail_errno(path, "cannot map");
      }
      out.data_ = static_cast<const std::byte*>(p);
      out.size_ = size;
    }
    ::close(fd);  // the mapping keeps its own reference to the file
    return out;
  }

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& other) noexcept
      : path_(std::move(other.path_)),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      unmap();
      path_ = std::move(other.path_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  /// The file's bytes (empty for an empty file or a default-constructed object).
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  /// The file's size in bytes.
  std::size_t size() const { return size_; }
  /// The path it was opened with.
  const std::filesystem::path& path() const { return path_; }

 private:
  [[noreturn]] static void fail_errno(const std::filesystem::path& path, const char* what) {
    const int err = errno;
    detail::fail("MappedFile", what, " ", path.string(), ": ", std::strerror(err));
  }

  void unmap() noexcept {
    if (data_ != nullptr) {
      // The const_cast only restores the pointer type munmap takes; nothing is written.
      ::munmap(const_cast<std::byte*>(data_),
               size_);  // NOLINT(cppcoreguidelines-pro-type-const-cast)
      data_ = nullptr;
      size_ = 0;
    }
  }

  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace moet
