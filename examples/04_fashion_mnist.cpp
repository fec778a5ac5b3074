// What this shows: training an image classifier whose hidden layers are MoE layers, on
// Fashion-MNIST (Debian package dataset-fashion-mnist), once per router, and comparing quality
// against activated compute: test accuracy, mean experts per token per layer, activated expert
// parameters, time per epoch, which classes get more experts, and DynMoE's live expert count
// over training. Writes results.md, SVG plots and each router's trained parameters
// (<router>.safetensors, moet::save_parameters: read by example 05) into --out.
// What to copy: the training step in train() (forward, cross-entropy, auxiliary losses inside
// MoeClassifier::backward, AdamW step) and, for THOR, the two passes tied by consistency_loss.
//
//   example_04_fashion_mnist [--routers top_k:k=1,top_k:k=2,top_p:p=0.4,top_any,
//                             importance:k_max=4,stochastic,expert_choice,relu,
//                             null_experts:k=4,null=8] [--epochs 8] [--train 60000]
//                            [--test 10000] [--batch 128] [--seed 1 | --seeds 1,2,3]
//                            [--out fashion_mnist]
//
// With --seeds the comparison runs once per seed into <out>/seed_<s>/, and <out>/summary.md
// gives each router's mean and spread over the seeds (support/seeds.hpp).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <moet/io/parameters.hpp>
#include <moet/moet.hpp>
#include <moet/train/losses.hpp>
#include <moet/train/optim.hpp>
#include <moet/train/thor.hpp>

#include "support/classifier.hpp"
#include "support/cli.hpp"
#include "support/data.hpp"
#include "support/progress.hpp"
#include "support/report.hpp"
#include "support/routers.hpp"
#include "support/seeds.hpp"

namespace {

using S = float;
using examples::Index;
using examples::RowMatrix;

struct Config {
  std::string routers =
      "top_k:k=1,top_k:k=2,top_p:p=0.4,top_any,importance:k_max=4,stochastic,expert_choice,relu,"
      "null_experts:k=4,null=8";
  long epochs = 8, train = 60000, test = 10000, batch = 128;
  std::uint64_t seed = 1;
  // Several seeds ("1,2,3"): the whole comparison once per seed (results in <out>/seed_<s>/),
  // then <out>/summary.md with the mean and spread of each router; "" = --seed alone.
  std::string seeds;
  std::string out = "fashion_mnist";
  examples::ClassifierShape shape;
};

struct Result {
  std::string router;
  double accuracy = 0, seconds_per_epoch = 0, activated_params = 0, final_loss = 0;
  double mean_k[2] = {0, 0};
  std::vector<double> class_k[2];  // mean k per class on the test set, per layer
  examples::Series loss, k_curve[2], live[2];
};

// The rows `order[begin, begin + n)` of `set` as a batch.
void gather(const examples::ImageSet& set, const std::vector<Index>& order, Index begin, Index n,
            RowMatrix<S>& x, std::vector<int>& y) {
  x.resize(n, set.images.cols());
  y.resize(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) {
    const Index r = order[static_cast<std::size_t>(begin + i)];
    x.row(i) = set.images.row(r);
    y[static_cast<std::size_t>(i)] = set.labels[static_cast<std::size_t>(r)];
  }
}

template <class Gate, class MakeGate>
Result train(const Config& cfg, const std::string& spec, MakeGate&& make_gate,
             const examples::ImageSet& train_set, const examples::ImageSet& test_set) {
  constexpr bool kThor = std::is_same_v<Gate, moet::StochasticGate<S>>;
  using Model = examples::MoeClassifier<Gate>;
  Model model(cfg.shape, make_gate, cfg.seed);
  moet::AdamW<S> opt({.lr = 2e-3, .weight_decay = 0.0});
  typename Model::Pass pass[2];
  Result r;
  r.router = spec;
  const Index n = train_set.images.rows(), steps = n / cfg.batch;
  std::vector<Index> order(static_cast<std::size_t>(n));
  RowMatrix<S> x, d0, d1;
  std::vector<int> y;
  examples::Progress bar(spec, cfg.epochs * steps);
  double ema = 0;
  moet::detail::Rng rng(cfg.seed);
  for (long epoch = 0; epoch < cfg.epochs; ++epoch) {
    std::iota(order.begin(), order.end(), Index{0});
    for (Index i = n - 1; i > 0; --i) {  // Fisher-Yates, deterministic in the seed
      std::swap(order[std::size_t(i)], order[rng.next() % std::uint64_t(i + 1)]);
    }
    for (Index step = 0; step < steps; ++step) {
      const auto global = static_cast<std::uint64_t>(epoch * steps + step);
      gather(train_set, order, step * cfg.batch, cfg.batch, x, y);
      moet::RouteContext ctx{.training = true, .seed = cfg.seed, .step = global};
      model.zero_grad();
      double loss = 0;
      if constexpr (kThor) {  // two stochastic passes + consistency (docs/algorithms.md §7.2)
        for (int p = 0; p < 2; ++p) model.forward(x, moet::thor_pass_context(ctx, p), pass[p]);
        loss = 0.5 * (examples::softmax_cross_entropy(pass[0].logits, y, &d0) +
                      examples::softmax_cross_entropy(pass[1].logits, y, &d1));
        loss += moet::consistency_loss<S>(pass[0].logits, pass[1].logits, d0, d1,
                                          {.alpha = 1.0 / double(cfg.batch)});
        model.backward(x, pass[0], d0);
        model.backward(x, pass[1], d1);
      } else {
        model.forward(x, ctx, pass[0]);
        loss = examples::softmax_cross_entropy(pass[0].logits, y, &d0);
        loss += model.backward(x, pass[0], d0);
      }
      opt.step(model);
      ema = global == 0 ? loss : 0.98 * ema + 0.02 * loss;
      bar.update(long(global) + 1, ema);
      if (global % 10 == 0) {
        r.loss.points.emplace_back(double(global), ema);
        for (int l = 0; l < 2; ++l) {
          const moet::RoutingStats& st = pass[0].ws[l].stats;
          r.k_curve[l].points.emplace_back(double(global), st.mean_k);
          r.live[l].points.emplace_back(double(global), double(st.live_experts));
        }
      }
    }
  }
  bar.finish();
  r.final_loss = ema;
  r.seconds_per_epoch = bar.elapsed() / double(cfg.epochs);

  // Test: inference routing, accuracy, mean k per layer and per class.
  std::vector<Index> all(static_cast<std::size_t>(test_set.images.rows()));
  std::iota(all.begin(), all.end(), Index{0});
  std::vector<double> class_count(10, 0.0);
  for (auto& c : r.class_k) c.assign(10, 0.0);
  Index correct = 0;
  const Index total = test_set.images.rows();
  for (Index begin = 0; begin < total; begin += 500) {
    const Index m = std::min<Index>(500, total - begin);
    gather(test_set, all, begin, m, x, y);
    const RowMatrix<S>& logits = model.forward(x, {}, pass[0]);
    for (Index t = 0; t < m; ++t) {
      Index best = 0;
      logits.row(t).maxCoeff(&best);
      const auto label = static_cast<std::size_t>(y[std::size_t(t)]);
      correct += best == Index(label);
      class_count[label] += 1;
      for (int l = 0; l < 2; ++l) {
        const double k = double(pass[0].ws[l].routing.k(t));
        r.mean_k[l] += k / double(total);
        r.class_k[l][label] += k;
      }
    }
  }
  for (int l = 0; l < 2; ++l) {
    for (std::size_t c = 0; c < 10; ++c) r.class_k[l][c] /= std::max(1.0, class_count[c]);
    r.activated_params += r.mean_k[l] * double(model.layer(l).experts().params_per_expert());
  }
  r.accuracy = double(correct) / double(total);
  std::filesystem::create_directories(cfg.out);
  std::string file = spec;
  for (char& c : file) c = (std::isalnum(static_cast<unsigned char>(c)) != 0) ? c : '_';
  moet::save_parameters(model, cfg.out + "/" + file + ".safetensors");  // under their names
  std::printf("%-20s test accuracy %.4f  mean k %.2f / %.2f  %.1f s/epoch\n", spec.c_str(),
              r.accuracy, r.mean_k[0], r.mean_k[1], r.seconds_per_epoch);
  return r;
}

// Trains and tests the router named by `spec` (support/routers.hpp).
Result run(const Config& cfg, const std::string& spec, const examples::ImageSet& tr,
           const examples::ImageSet& te) {
  return examples::with_router(spec, cfg.shape.model_dim, cfg.shape.experts, cfg.seed, 50,
                               [&](auto gate_type, auto make_gate) {
                                 return train<typename decltype(gate_type)::type>(
                                     cfg, spec, make_gate, tr, te);
                               });
}

void write_report(const Config& cfg, const std::vector<Result>& results) {
  std::ofstream md(cfg.out + "/results.md");
  md << "| router | test accuracy | mean k (layer 0 / 1) | activated expert params / image | "
        "s / epoch | final train loss |\n|---|---|---|---|---|---|\n";
  char row[256];
  for (const Result& r : results) {
    std::snprintf(row, sizeof row, "| `%s` | %.4f | %.2f / %.2f | %.0f | %.1f | %.4f |\n",
                  r.router.c_str(), r.accuracy, r.mean_k[0], r.mean_k[1], r.activated_params,
                  r.seconds_per_epoch, r.final_loss);
    md << row;
  }
  md << "\nMean experts per image by class (layer 0 / layer 1):\n\n| router |";
  for (const char* c : examples::kFashionMnistClasses) md << ' ' << c << " |";
  md << "\n|---|";
  for (int c = 0; c < 10; ++c) md << "---|";
  md << '\n';
  for (const Result& r : results) {
    md << "| `" << r.router << "` |";
    for (std::size_t c = 0; c < 10; ++c) {
      std::snprintf(row, sizeof row, " %.2f / %.2f |", r.class_k[0][c], r.class_k[1][c]);
      md << row;
    }
    md << '\n';
  }
  std::vector<examples::Series> loss, acc, k, live;
  for (const Result& r : results) {
    loss.push_back({r.router, r.loss.points});
    acc.push_back({r.router, {{r.activated_params, r.accuracy}}});
    for (int l = 0; l < 2; ++l) {
      k.push_back({r.router + " L" + std::to_string(l), r.k_curve[l].points});
      if (r.router.rfind("top_any", 0) == 0)
        live.push_back({"layer " + std::to_string(l), r.live[l].points});
    }
  }
  examples::save_line_chart(cfg.out + "/loss.svg", "Training loss (EMA)", "step", "loss", loss);
  examples::save_scatter_chart(cfg.out + "/accuracy_vs_params.svg",
                               "Test accuracy against activated expert parameters",
                               "activated expert parameters per image", "test accuracy", acc);
  examples::save_line_chart(cfg.out + "/mean_k.svg", "Mean experts per token over training", "step",
                            "mean k", k, true);
  if (!live.empty()) {
    examples::save_line_chart(cfg.out + "/dynmoe_experts.svg", "DynMoE live experts over training",
                              "step", "live experts", live, true);
  }
  std::printf("wrote %s/results.md and SVG plots\n", cfg.out.c_str());
}

// <out>/summary.md and summary.svg over the seeds: test accuracy as mean ± sd (range) per
// router, each compared with top_k:k=1 and top_k:k=2 (different only when the ranges over the
// seeds do not overlap).
void write_summary(const Config& cfg, const std::vector<std::uint64_t>& seeds,
                   const std::vector<std::vector<Result>>& runs) {
  const std::size_t routers = runs.front().size();
  const auto metric = [&](std::size_t i) {
    std::vector<double> v;
    for (const auto& run : runs) v.push_back(run[i].accuracy);
    return examples::spread(v);
  };
  const auto find = [&](const std::string& name) {
    for (std::size_t i = 0; i < routers; ++i)
      if (runs.front()[i].router == name) return std::optional<examples::Spread>(metric(i));
    return std::optional<examples::Spread>();
  };
  const auto top1 = find("top_k:k=1"), top2 = find("top_k:k=2");
  std::ofstream md(cfg.out + "/summary.md");
  md << "Test accuracy over " << seeds.size() << " seeds (";
  for (std::size_t s = 0; s < seeds.size(); ++s) md << (s ? ", " : "") << seeds[s];
  md << "): mean ± sample standard deviation (range). A router is better or worse than top-1 "
        "or top-2 only when its range over the seeds does not overlap theirs.\n\n"
     << "| router | test accuracy | mean k (layer 0 / 1) | activated expert params / image | s / "
        "epoch (median) | vs `top_k:k=1` | vs `top_k:k=2` |\n|---|---|---|---|---|---|---|\n";
  std::vector<examples::Series> points;
  for (std::size_t i = 0; i < routers; ++i) {
    const examples::Spread acc = metric(i);
    const std::string& name = runs.front()[i].router;
    double k[2] = {0, 0}, params = 0;
    std::vector<double> seconds;
    examples::Series series{runs.front()[i].router, {}};
    for (const auto& run : runs) {
      const double n = double(runs.size());
      for (int l = 0; l < 2; ++l) k[l] += run[i].mean_k[l] / n;
      params += run[i].activated_params / n;
      seconds.push_back(run[i].seconds_per_epoch);
      series.points.emplace_back(run[i].activated_params, run[i].accuracy);
    }
    std::sort(seconds.begin(), seconds.end());
    points.push_back(std::move(series));
    char cell[160];
    std::snprintf(cell, sizeof cell, " | %.2f / %.2f | %.0f | %.1f | ", k[0], k[1], params,
                  seconds[seconds.size() / 2]);
    md << "| `" << runs.front()[i].router << "` | " << examples::format_spread(acc, 4) << cell
       << (top1 && name != "top_k:k=1" ? examples::compare(acc, *top1, true) : std::string("-"))
       << " | "
       << (top2 && name != "top_k:k=2" ? examples::compare(acc, *top2, true) : std::string("-"))
       << " |\n";
  }
  examples::save_scatter_chart(cfg.out + "/summary.svg", "Test accuracy, one point per seed",
                               "activated expert parameters per image", "test accuracy", points);
  std::printf("wrote %s/summary.md and summary.svg\n", cfg.out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  examples::Flags flags;
  flags.add("--routers", cfg.routers).add("--epochs", cfg.epochs).add("--train", cfg.train);
  flags.add("--test", cfg.test)
      .add("--batch", cfg.batch)
      .add("--seed", cfg.seed)
      .add("--seeds", cfg.seeds)
      .add("--out", cfg.out);
  if (!flags.parse(argc, argv)) return 2;
  std::vector<std::uint64_t> seeds{cfg.seed};
  try {
    if (!cfg.seeds.empty()) seeds = examples::parse_seeds(cfg.seeds);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  if (!std::filesystem::exists(std::string(examples::kFashionMnistDir))) {
    std::fprintf(stderr, "dataset-fashion-mnist is not installed (apt-get install it); skipped\n");
    return 77;  // ctest's skip code
  }
  const examples::ImageSet tr = examples::load_fashion_mnist("train", cfg.train);
  const examples::ImageSet te = examples::load_fashion_mnist("t10k", cfg.test);
  std::vector<std::vector<Result>> runs;
  for (const std::uint64_t seed : seeds) {
    Config one = cfg;
    one.seed = seed;
    if (!cfg.seeds.empty()) {
      one.out = cfg.out + "/seed_" + std::to_string(seed);
      std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
    }
    std::vector<Result> results;
    for (const std::string& spec : moet::split_gate_specs(cfg.routers))
      results.push_back(run(one, spec, tr, te));
    write_report(one, results);
    runs.push_back(std::move(results));
  }
  if (!cfg.seeds.empty()) write_summary(cfg, seeds, runs);
  return 0;
}
