#pragma once
/// \file errors.hpp
/// `moet::Error` for bad caller input, `MOET_ASSERT` for the library's own invariants.

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moet {

/// Thrown when a caller passes bad input (a shape, a range, a NaN). The message names the
/// operation and the offending values: `[moet::TopPGate] p must be in (0, 1], got 1.5`.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Streams every argument into one string.
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}

/// Throws `Error("[moet::<op>] <message...>")`.
template <class... Args>
[[noreturn]] void fail(const char* op, Args&&... args) {
  throw Error(concat("[moet::", op, "] ", std::forward<Args>(args)...));
}

/// Throws unless `cond`; the message is only built on failure.
template <class... Args>
void require(bool cond, const char* op, Args&&... args) {
  if (!cond) [[unlikely]] {
    fail(op, std::forward<Args>(args)...);
  }
}

[[noreturn]] inline void assert_fail(const char* cond, const char* why, const char* file,
                                     int line) {
  std::fprintf(stderr, "moet: internal assertion `%s` failed at %s:%d: %s\n", cond, file, line,
               why);
  std::abort();
}

}  // namespace detail
}  // namespace moet

/// Checks one of moet's own invariants in debug builds. Define `MOET_ASSERT` before including
/// moet to replace it, or `MOET_ENABLE_ASSERTS` to keep it in release builds.
#ifndef MOET_ASSERT
#if !defined(NDEBUG) || defined(MOET_ENABLE_ASSERTS)
#define MOET_ASSERT(cond, why) \
  ((cond) ? static_cast<void>(0) : ::moet::detail::assert_fail(#cond, why, __FILE__, __LINE__))
#else
#define MOET_ASSERT(cond, why) static_cast<void>(0)
#endif
#endif
