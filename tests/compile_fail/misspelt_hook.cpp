// A gate that declares the training-forward hook in kHooks but misspells it: a compile error
// (without the declaration moet could not tell, and would skip the hook silently).
// expect: declares kHooks.training_forward, but has no on_training_forward
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"

template <class S>
class MisspeltHookGate {
 public:
  using Scalar = S;
  static constexpr moet::Hooks kHooks{.training_forward = true};
  moet::Index num_experts() const { return 2; }
  moet::Index model_dim() const { return 4; }
  void route(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& out) const {
    out.reset(x.rows(), 2);
    out.commit_counts();
  }
  void on_training_foward(const moet::ConstRows<S>& /*x*/, const moet::Routing<S>& /*routing*/) {}
};

using Layer = moet::MoELayer<MisspeltHookGate<float>, moet::SwiGluExperts<float>>;
static_assert(sizeof(Layer) > 0);
