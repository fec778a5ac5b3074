#pragma once
/// \file mpi/common.hpp
/// What moet's MPI parts share: MPI errors as `moet::Error`s, the status agreement that keeps
/// bad input on one rank from leaving the others waiting, and a communicator of moet's own.

#include <algorithm>
#include <climits>
#include <cstddef>
#include <exception>
#include <string>
#include <type_traits>
#include <utility>

#include <mpi.h>

#include "moet/errors.hpp"
#include "moet/tensor.hpp"

namespace moet::mpi {

namespace detail {

using moet::detail::fail;
using moet::detail::require;

/// Throws `moet::Error` naming `op` and the MPI function when `code` is not `MPI_SUCCESS` (the
/// communicators moet uses return errors instead of aborting: `MPI_ERRORS_RETURN`).
inline void check_mpi(int code, const char* op, const char* call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  fail(op, call, " failed: ", std::string(text, static_cast<std::size_t>(length)));
}

/// The MPI datatype of `S` (float or double).
template <class S>
MPI_Datatype datatype() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "moet::mpi supports float and double scalars");
  if constexpr (std::is_same_v<S, float>) {
    return MPI_FLOAT;
  } else {
    return MPI_DOUBLE;
  }
}

/// Collective: every rank of `comm` passes its own outcome (`failure` empty when it is fine).
/// Returns when every rank is fine; otherwise every rank throws the same `moet::Error`, naming
/// `op`, the lowest failing rank and that rank's message. Ranks agree before any exchange, so
/// bad input on one rank never leaves the others waiting.
inline void agree(MPI_Comm comm, int rank, const char* op, const std::string& failure) {
  const int mine = failure.empty() ? INT_MAX : rank;
  int first = INT_MAX;
  check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), op, "MPI_Allreduce");
  if (first == INT_MAX) return;
  int length = rank == first ? static_cast<int>(std::min<std::size_t>(failure.size(), 4096)) : 0;
  check_mpi(MPI_Bcast(&length, 1, MPI_INT, first, comm), op, "MPI_Bcast");
  std::string message(static_cast<std::size_t>(length), '\0');
  if (rank == first) message.assign(failure, 0, static_cast<std::size_t>(length));
  check_mpi(MPI_Bcast(message.data(), length, MPI_CHAR, first, comm), op, "MPI_Bcast");
  fail(op, "rank ", first, " failed: ", message);
}

/// Runs `f()`, returning the message of any exception it throws (empty when none): the local
/// half of `agree`.
template <class F>
std::string outcome(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return {};
}

/// An element count as MPI's `int`, or a message naming `what` when it does not fit.
inline int mpi_count(Index n, const char* what, std::string& failure) {
  if (n > static_cast<Index>(INT_MAX) && failure.empty()) {
    failure = moet::detail::concat(what, " needs ", n, " elements in one MPI call, more than ",
                                   INT_MAX, " (MPI's int counts); use smaller batches");
  }
  return static_cast<int>(std::min<Index>(n, INT_MAX));
}

}  // namespace detail

/// A duplicate of a communicator (`MPI_Comm_dup`) with `MPI_ERRORS_RETURN`, freed by the
/// destructor unless MPI is already finalised: moet's collectives never mix with the caller's
/// messages, and a failed MPI call is a `moet::Error` instead of an abort. Move-only.
class Communicator {
 public:
  /// Collective over `comm`. Throws `moet::Error` naming `op` when an MPI call fails.
  Communicator(MPI_Comm comm, const char* op) {
    detail::check_mpi(MPI_Comm_dup(comm, &comm_), op, "MPI_Comm_dup");
    try {
      detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), op,
                        "MPI_Comm_set_errhandler");
      detail::check_mpi(MPI_Comm_rank(comm_, &rank_), op, "MPI_Comm_rank");
      detail::check_mpi(MPI_Comm_size(comm_, &size_), op, "MPI_Comm_size");
    } catch (...) {
      free();
      throw;
    }
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  Communicator(Communicator&& other) noexcept
      : comm_(std::exchange(other.comm_, MPI_COMM_NULL)), rank_(other.rank_), size_(other.size_) {}
  Communicator& operator=(Communicator&&) = delete;
  ~Communicator() { free(); }

  /// The duplicate.
  MPI_Comm get() const { return comm_; }
  /// This process's rank and the number of ranks.
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  void free() {
    if (comm_ == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace moet::mpi
