// A model that declares the parameters-changed hook but misspells it: the optimiser's step is a
// compile error instead of leaving derived copies stale.
// expect: declares kHooks.parameters_changed, but has no parameters_changed
#include <string_view>

#include "moet/train/optim.hpp"

struct Model {
  static constexpr moet::Hooks kHooks{.parameters_changed = true};
  moet::RowMatrix<float> w = moet::RowMatrix<float>::Zero(2, 2);
  moet::RowMatrix<float> g = moet::RowMatrix<float>::Zero(2, 2);
  template <class F>
  void visit_parameters(F&& f) {
    f(std::string_view("w"), moet::ParamMap<float>(w.data(), 2, 2),
      moet::ParamMap<float>(g.data(), 2, 2));
  }
  void parameter_changed() {}
};

void step(Model& model) {
  moet::Sgd<float> opt({.lr = 0.1});
  opt.step(model);
}
