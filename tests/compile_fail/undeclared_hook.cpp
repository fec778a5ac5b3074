// A gate that declares kHooks but leaves out a hook it has: a compile error (the declaration is
// the list of hooks moet calls, so it must be complete).
// expect: has on_training_forward but its kHooks does not declare it
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"

template <class S>
class UndeclaredHookGate {
 public:
  using Scalar = S;
  static constexpr moet::Hooks kHooks{};
  moet::Index num_experts() const { return 2; }
  moet::Index model_dim() const { return 4; }
  void route(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& out) const {
    out.reset(x.rows(), 2);
    out.commit_counts();
  }
  void on_training_forward(const moet::ConstRows<S>& /*x*/, const moet::Routing<S>& /*routing*/) {}
};

using Layer = moet::MoELayer<UndeclaredHookGate<float>, moet::SwiGluExperts<float>>;
static_assert(sizeof(Layer) > 0);
