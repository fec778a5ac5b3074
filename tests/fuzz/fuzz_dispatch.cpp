// libFuzzer target: GroupedDispatch against ReferenceDispatch on arbitrary plans. The input
// decodes into an expert bank shape, x, and a hand-built plan: any token and expert counts
// (also ones that disagree with x and the bank), any number of slots per token (0, repeats of
// one expert, more slots than experts), expert ids in and out of range, weights with zeros,
// signed zeros, denormals and large values; and the grouped dispatcher's block size. Checks:
// both dispatchers throw moet::Error exactly when the plan is malformed; otherwise the grouped
// result equals the reference to rounding, is bit-identical at 1 and 2 threads, and is
// bit-identical with a workspace reused across inputs.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/experts/glu.hpp"

#include "fuzz_common.hpp"

namespace {

using moet::Index;
using Experts = moet::SwiGluExperts<float>;

bool bit_equal(const moet::RowMatrix<float>& a, const moet::RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0);
}

// Runs `dispatch` and returns whether it threw moet::Error.
template <class D, class W>
bool run(const D& dispatch, const Experts& experts, const moet::RowMatrix<float>& x,
         const moet::Routing<float>& plan, moet::RowMatrix<float>& y, W& ws) {
  try {
    dispatch.run(experts, x, plan, y, ws);
  } catch (const moet::Error&) {
    return true;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  moet_fuzz::Bytes in(data, size);
  const Index model_dim = in.in_range(1, 8);
  const Index hidden_dim = in.in_range(1, 8);
  const Index num_experts = in.in_range(1, 8);
  const Index num_tokens = in.in_range(0, 48);
  const Experts experts({.model_dim = model_dim,
                         .hidden_dim = hidden_dim,
                         .num_experts = num_experts,
                         .init_seed = in.u8()});
  const moet::GroupedDispatch grouped(
      moet::GroupedDispatch::Options{.block_rows = in.flag() ? 128 : in.in_range(1, 9)});

  // The plan: mostly well formed, sometimes not.
  const std::uint8_t shape_mode = in.u8() % 16;
  const Index plan_tokens = shape_mode == 1 ? num_tokens + 1 : num_tokens;
  const Index plan_experts = shape_mode == 2 ? num_experts + 1 : num_experts;
  const bool wild_ids = shape_mode == 3;
  moet::Routing<float> plan;
  plan.reset(plan_tokens, plan_experts);
  for (auto& count : plan.counts()) count = in.in_range(0, std::min<Index>(num_experts + 2, 6));
  plan.commit_counts();
  bool ids_in_range = true;
  for (Index t = 0; t < plan_tokens; ++t) {
    const auto ids = plan.experts(t);
    const auto weights = plan.weights(t);
    for (std::size_t j = 0; j < ids.size(); ++j) {
      const std::int32_t e = wild_ids ? static_cast<std::int8_t>(in.u8())
                                      : static_cast<std::int32_t>(in.in_range(0, num_experts - 1));
      ids[j] = e;
      ids_in_range = ids_in_range && e >= 0 && e < num_experts;
      float w = in.value();
      if (!std::isfinite(w) || std::abs(w) > 1e4f) w = 0.5f;  // keep the outputs finite
      weights[j] = w;
    }
  }
  const bool well_formed = plan_tokens == num_tokens && plan_experts == num_experts && ids_in_range;
  moet::RowMatrix<float> x = in.matrix(num_tokens, model_dim, /*finite_only=*/true);
  for (Index i = 0; i < x.size(); ++i) {
    if (std::abs(x.data()[i]) > 1e3f) x.data()[i] = 1.0f;
  }

  moet::ReferenceDispatch::Workspace<Experts> ref_ws;
  moet::GroupedDispatch::Workspace<Experts> ws1;
  moet::GroupedDispatch::Workspace<Experts> ws2;
  static moet::GroupedDispatch::Workspace<Experts> reused;  // state from earlier inputs
  moet::RowMatrix<float> y_ref(num_tokens, model_dim);
  moet::RowMatrix<float> y1(num_tokens, model_dim);
  moet::RowMatrix<float> y2(num_tokens, model_dim);
  moet::RowMatrix<float> y3(num_tokens, model_dim);
  // The 2-thread runs only for some inputs (see use_two_threads); else everything at 1 thread.
  const bool two_threads = moet_fuzz::use_two_threads(data, size);
  moet::set_num_threads(two_threads ? 2 : 1);
  const bool ref_threw = run(moet::ReferenceDispatch{}, experts, x, plan, y_ref, ref_ws);
  const bool threw2 = run(grouped, experts, x, plan, y2, ws2);
  const bool threw3 = run(grouped, experts, x, plan, y3, reused);
  moet::set_num_threads(1);
  const bool threw1 = run(grouped, experts, x, plan, y1, ws1);
  MOET_FUZZ_CHECK(ref_threw == !well_formed, "reference %s a %s plan",
                  ref_threw ? "rejected" : "ran", well_formed ? "well-formed" : "malformed");
  MOET_FUZZ_CHECK(threw1 == ref_threw && threw2 == ref_threw && threw3 == ref_threw,
                  "grouped and reference disagree on throwing");
  if (ref_threw) return 0;
  MOET_FUZZ_CHECK(bit_equal(y1, y2), "grouped differs between 1 and %d threads",
                  two_threads ? 2 : 1);
  MOET_FUZZ_CHECK(bit_equal(y2, y3), "grouped differs with a reused workspace");

  // Rounding tolerance per token: the size of what is summed.
  Experts::Scratch scratch;
  moet::RowMatrix<float> row(1, model_dim);
  for (Index t = 0; t < num_tokens; ++t) {
    double scale = 0.0;
    for (std::size_t j = 0; j < plan.experts(t).size(); ++j) {
      moet::Rows<float> out(row);
      experts.forward(plan.experts(t)[j], x.middleRows(t, 1), out, scratch);
      scale += std::abs(static_cast<double>(plan.weights(t)[j])) *
               static_cast<double>(row.cwiseAbs().maxCoeff());
    }
    for (Index c = 0; c < model_dim; ++c) {
      const double diff =
          std::abs(static_cast<double>(y1(t, c)) - static_cast<double>(y_ref(t, c)));
      MOET_FUZZ_CHECK(std::isfinite(y1(t, c)) && diff <= 1e-5 * (1.0 + scale),
                      "token %ld column %ld: grouped %g, reference %g (scale %g)",
                      static_cast<long>(t), static_cast<long>(c), static_cast<double>(y1(t, c)),
                      static_cast<double>(y_ref(t, c)), scale);
    }
    if (plan.experts(t).empty()) {
      MOET_FUZZ_CHECK(y1.row(t).isZero(0.0f), "token %ld with k = 0 is not 0",
                      static_cast<long>(t));
    }
  }
  return 0;
}
