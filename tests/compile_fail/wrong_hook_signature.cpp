// A gate (no kHooks) whose on_training_forward cannot be called as the hook is: a compile error,
// where moet would otherwise skip it silently.
// expect: has a member named on_training_forward that cannot be called as
#include "moet/experts/glu.hpp"
#include "moet/layer.hpp"

template <class S>
class WrongSignatureGate {
 public:
  using Scalar = S;
  moet::Index num_experts() const { return 2; }
  moet::Index model_dim() const { return 4; }
  void route(const moet::ConstRows<S>& x, const moet::RouteContext& /*ctx*/,
             moet::Routing<S>& out) const {
    out.reset(x.rows(), 2);
    out.commit_counts();
  }
  // The plan is missing: moet calls on_training_forward(x, routing).
  void on_training_forward(const moet::ConstRows<S>& /*x*/) {}
};

using Layer = moet::MoELayer<WrongSignatureGate<float>, moet::SwiGluExperts<float>>;
static_assert(sizeof(Layer) > 0);
