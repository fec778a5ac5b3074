#pragma once
/// \file moet.hpp
/// The umbrella header: everything a user of moet needs, inference and training (losses,
/// optimisers, THOR's two-pass step).
///
/// ```cpp
/// #include <moet/moet.hpp>
/// moet::MoELayer layer(moet::TopPGate<float>({.model_dim = 512, .num_experts = 16, .p = 0.4}),
///                      moet::SwiGluExperts<float>({.model_dim = 512, .hidden_dim = 1024,
///                                                  .num_experts = 16}));
/// moet::RowMatrix<float> y = layer.forward(x);  // x: (num_tokens, 512)
/// ```

#include "moet/activations.hpp"
#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/dispatch/dense.hpp"
#include "moet/dispatch/grouped.hpp"
#include "moet/dispatch/reference.hpp"
#include "moet/dispatch/shared_gate.hpp"
#include "moet/errors.hpp"
#include "moet/experts/bank.hpp"
#include "moet/experts/ffn.hpp"
#include "moet/experts/glu.hpp"
#include "moet/gates/cosine_router.hpp"
#include "moet/gates/expert_choice.hpp"
#include "moet/gates/grouped_top_k.hpp"
#include "moet/gates/importance.hpp"
#include "moet/gates/null_experts.hpp"
#include "moet/gates/relu.hpp"
#include "moet/gates/router.hpp"
#include "moet/gates/spec.hpp"
#include "moet/gates/spec_keys.hpp"
#include "moet/gates/stochastic.hpp"
#include "moet/gates/top_any.hpp"
#include "moet/gates/top_any_adaptive.hpp"
#include "moet/gates/top_k.hpp"
#include "moet/gates/top_p.hpp"
#include "moet/layer.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"
#include "moet/tensor.hpp"
#include "moet/train/bias_balance.hpp"
#include "moet/train/losses.hpp"
#include "moet/train/null_balance.hpp"
#include "moet/train/optim.hpp"
#include "moet/train/relu_routing.hpp"
#include "moet/train/thor.hpp"
#include "moet/train/top_any_losses.hpp"
#include "moet/version.hpp"
