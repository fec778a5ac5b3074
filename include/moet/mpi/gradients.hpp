#pragma once
/// \file mpi/gradients.hpp
/// Data parallelism: `GradientReducer` sums the gradients of replicated parameters over the
/// ranks of a communicator, in rank order, so every rank holds the same bits.

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <mpi.h>

#include "moet/detail/buffer.hpp"
#include "moet/detail/parallel.hpp"
#include "moet/errors.hpp"
#include "moet/mpi/common.hpp"
#include "moet/tensor.hpp"

namespace moet::mpi {

/// Sums gradients over the ranks of a communicator for data-parallel training: after
/// `sum(module)` every rank's gradients hold `g_0 + g_1 + ... + g_{R-1}` (the ranks' gradients
/// before the call), **added in rank order** (`((g_0 + g_1) + g_2) + ...`) and therefore the
/// same bits on every rank and in every run, unlike `MPI_Allreduce`, whose order of additions
/// is the MPI library's choice. A reduce-scatter and an all-gather: each rank receives one
/// slice of every rank's gradients (`MPI_Alltoallv`), adds its slice in rank order and sends
/// the sums to every rank (`MPI_Allgatherv`): each rank sends and receives about twice the
/// gradients' bytes, as a ring all-reduce does.
///
/// `module` is anything with a `Scalar` type and `visit_parameters(f)` calling `f(name, value,
/// grad)` in the same order on every rank (a `MoELayer` replicated on every rank, or
/// `ExpertParallelLayer::replicated_parameters()` for the gate and shared experts of an
/// expert-parallel layer). For the mean instead of the sum, scale the loss (or `dy`) by `1 /
/// R`. Reuses its buffers: no allocation once it has seen the largest module. Like any
/// `visit_parameters` call, it leaves expert banks' packed weights stale (a bank's `forward`
/// throws until `parameters_changed()`): the optimiser step that follows calls it.
///
/// ```cpp
/// moet::mpi::GradientReducer reducer(MPI_COMM_WORLD);
/// layer.zero_grad();
/// layer.forward_train(x, y, ctx, ws);
/// layer.backward(x, dy, ctx, ws, dx);
/// reducer.sum(layer.replicated_parameters());   // the gate's and shared experts' gradients
/// optimizer.step(layer);                          // every rank applies the same update
/// ```
class GradientReducer {
 public:
  /// Collective over `comm` (works on a duplicate of it).
  explicit GradientReducer(MPI_Comm comm) : comm_(comm, kOp) {}

  /// Collective: replaces every gradient `module` visits by its sum over the ranks, in rank
  /// order. Throws the same `moet::Error` on every rank, before any gradient changes, when
  /// the ranks' modules differ in their number of tensors or of scalars (naming the first
  /// rank that differs from rank 0), or when a slice is too large for MPI's int counts.
  /// Scalars: float or double.
  template <class M>
  void sum(M&& module) {
    using S = typename std::remove_cvref_t<M>::Scalar;
    static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                  "GradientReducer sums float or double gradients");
    // Pack the gradients, and describe them for the consistency check.
    Index total = 0;
    long long tensors = 0;
    module.visit_parameters([&](std::string_view, auto, auto grad) {
      total += static_cast<Index>(grad.size());
      ++tensors;
    });
    const int ranks = comm_.size();
    const int me = comm_.rank();
    std::string failure;
    {
      const long long mine[2] = {tensors, static_cast<long long>(total)};
      auto& all = shapes_;  // kept: a warmed-up step does not allocate
      all.assign(2 * static_cast<std::size_t>(ranks), 0);
      detail::check_mpi(
          MPI_Allgather(mine, 2, MPI_LONG_LONG, all.data(), 2, MPI_LONG_LONG, comm_.get()), kOp,
          "MPI_Allgather");
      for (int r = 1; r < ranks && failure.empty(); ++r) {
        const auto i = 2 * static_cast<std::size_t>(r);
        if (all[i] != all[0] || all[i + 1] != all[1]) {
          failure = moet::detail::concat("rank ", r, " has ", all[i], " gradient tensors of ",
                                         all[i + 1], " scalars in all, rank 0 has ", all[0], " of ",
                                         all[1], ": every rank must pass the same parameters");
        }
      }
    }
    // Slice r of the packed gradients: [begin(r), begin(r + 1)).
    const auto begin = [&](int r) { return total * r / ranks; };
    const Index mine_size = begin(me + 1) - begin(me);
    counts_.assign(static_cast<std::size_t>(ranks), 0);
    displs_.assign(static_cast<std::size_t>(ranks), 0);
    slice_counts_.assign(static_cast<std::size_t>(ranks), 0);
    slice_displs_.assign(static_cast<std::size_t>(ranks), 0);
    for (int r = 0; r < ranks; ++r) {
      const auto ri = static_cast<std::size_t>(r);
      counts_[ri] = detail::mpi_count(begin(r + 1) - begin(r), "a gradient slice", failure);
      displs_[ri] = detail::mpi_count(begin(r), "the gradients", failure);
      slice_counts_[ri] = detail::mpi_count(mine_size, "a gradient slice", failure);
      slice_displs_[ri] = detail::mpi_count(mine_size * r, "the gradient slices", failure);
    }
    if (failure.empty()) detail::mpi_count(total, "the gradients", failure);
    detail::agree(comm_.get(), me, kOp, failure);
    if (total == 0) return;

    S* packed = buffer<S>(packed_f_, packed_d_, total);
    S* slices = buffer<S>(slices_f_, slices_d_, mine_size * ranks);
    Index at = 0;
    module.visit_parameters([&](std::string_view, auto, auto grad) {
      std::copy(grad.data(), grad.data() + grad.size(), packed + at);
      at += static_cast<Index>(grad.size());
    });
    const MPI_Datatype type = detail::datatype<S>();
    // Slice r of every rank to rank r.
    detail::check_mpi(MPI_Alltoallv(packed, counts_.data(), displs_.data(), type, slices,
                                    slice_counts_.data(), slice_displs_.data(), type, comm_.get()),
                      kOp, "MPI_Alltoallv");
    // This rank's slice, added in rank order (element-wise: any thread count, same bits).
    S* sum = packed + begin(me);
    moet::detail::parallel_blocks(mine_size, 4096, [&](Index b, Index e) {
      for (Index i = b; i < e; ++i) {
        S acc = slices[i];
        for (int r = 1; r < ranks; ++r) acc += slices[static_cast<Index>(r) * mine_size + i];
        sum[i] = acc;
      }
    });
    detail::check_mpi(MPI_Allgatherv(MPI_IN_PLACE, 0, type, packed, counts_.data(), displs_.data(),
                                     type, comm_.get()),
                      kOp, "MPI_Allgatherv");
    at = 0;
    module.visit_parameters([&](std::string_view, auto, auto grad) {
      std::copy(packed + at, packed + at + grad.size(), grad.data());
      at += static_cast<Index>(grad.size());
    });
  }

  /// This rank and the number of ranks.
  int rank() const { return comm_.rank(); }
  int num_ranks() const { return comm_.size(); }

 private:
  static constexpr const char* kOp = "GradientReducer";

  template <class S>
  S* buffer(moet::detail::Buffer<float>& f, moet::detail::Buffer<double>& d, Index n) {
    if constexpr (std::is_same_v<S, float>) {
      return f.data(n);
    } else {
      return d.data(n);
    }
  }

  Communicator comm_;
  std::vector<long long> shapes_;  // every rank's tensor and scalar counts
  std::vector<int> counts_, displs_, slice_counts_, slice_displs_;
  moet::detail::Buffer<float> packed_f_, slices_f_;
  moet::detail::Buffer<double> packed_d_, slices_d_;
};

}  // namespace moet::mpi
