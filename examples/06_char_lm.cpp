// What this shows: a character-level language model (embedding, causal self-attention,
// RMSNorm, MoE FFN, output head) trained on the fortunes corpus (Debian package fortunes) once
// per router, comparing validation bits per character against the experts each token used.
// The importance gate (DA-MoE) reads the model's real attention probabilities; THOR trains with
// its consistency loss between two stochastic passes. Writes results.md and SVG plots, and
// k_sweep.md / k_sweep.svg: the --sweep router's trained model (top_k:k=2 by default; "" for
// none) evaluated at the same weights with top-k at k = 1..4, top-p at several p and DA-MoE's
// importance budget at several mean k, through run-time overrides.
// What to copy: the model (support/char_lm.hpp), the training step in train(), and
// bits_per_char() for evaluation.
//
//   example_06_char_lm [--routers top_k:k=1,top_k:k=2,top_p:p=0.4,top_any,
//                       importance:k_max=4,stochastic,expert_choice,relu,
//                       null_experts:k=4,null=8] [--steps 2000] [--batch 16] [--len 64]
//                      [--seed 1 | --seeds 1,2,3] [--out char_lm] [--sweep top_k:k=2]
//                      [--bias-rate 1e-3] [--experts 8] [--dynmoe-coefficient 0.01]
//                      [--thor-alpha 1]
//
// With --seeds the comparison (and the k sweep) runs once per seed into <out>/seed_<s>/, and
// <out>/summary.md gives each router's mean and spread over the seeds (support/seeds.hpp).
//
// A gate with a selection-only score bias (grouped_top_k, e.g. grouped_top_k:k=2,renorm=1:
// softmax top-2 in one group) trains with auxiliary-loss-free balancing (DeepSeek-V3) at
// --bias-rate instead of a balance loss; --bias-rate 0 gives it Switch's loss instead.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <moet/moet.hpp>
#include <moet/train/losses.hpp>
#include <moet/train/optim.hpp>
#include <moet/train/thor.hpp>

#include "support/char_lm.hpp"
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
  long steps = 2000, batch = 16, len = 64, eval_windows = 256;
  std::uint64_t seed = 1;
  // Several seeds ("1,2,3"): the whole comparison once per seed (results in <out>/seed_<s>/),
  // then <out>/summary.md with the mean and spread of each router; "" = --seed alone.
  std::string seeds;
  // Auxiliary-loss-free balancing rate for gates with a score bias (grouped_top_k); 0 = train
  // them with Switch's balance loss instead.
  double bias_rate = 1e-3;
  // The knobs of the DynMoE / THOR study (docs/quality/claims.md): DynMoE's auxiliary-loss
  // coefficient, THOR's consistency-loss weight (alpha, per token: THOR sums its losses over
  // tokens) and the number of experts per MoE block.
  double dynmoe_coefficient = 0.01, thor_alpha = 1.0;
  long experts = 8;
  // The router whose trained model is re-evaluated with other routing (k_sweep.md); "" = none.
  std::string sweep = "top_k:k=2";
  std::string out = "char_lm";
};

// One row of the k sweep: the trained weights evaluated with another routing.
struct SweepRow {
  std::string family, routing;
  double bpc = 0, activated_params = 0;
  std::vector<double> mean_k;
};

struct Result {
  std::string router;
  double bpc = 0, train_bpc = 0, ms_per_step = 0, activated_params = 0;
  double train_k = 0, train_no_expert = 0;  // training routing over the last 10% of the steps
  std::vector<double> mean_k;               // per block, on the validation windows
  std::vector<double> load_ratio;           // per block: max / mean expert load, validation
  examples::Series curve;                   // training bits per character (EMA) over steps
  std::vector<SweepRow> sweep;              // the k sweep, for the --sweep router only
};

constexpr double kLn2 = 0.6931471805599453;

// Validation bits per character on fixed windows, inference routing; fills the mean k per block.
// With `load_ratio`, also the max / mean expert load per block.
template <class Model>
double bits_per_char(Model& model, const Config& cfg, const std::vector<int>& val,
                     std::vector<double>& mean_k, std::vector<double>* load_ratio = nullptr) {
  typename Model::Pass pass;
  const examples::CharBatch w = examples::sample_windows(val, cfg.eval_windows, cfg.len, 999, 0);
  const RowMatrix<S>& logits = model.forward(w.inputs, cfg.eval_windows, cfg.len, {}, pass);
  mean_k.clear();
  for (const auto& ws : pass.ws) mean_k.push_back(ws.stats.mean_k);
  if (load_ratio != nullptr) {
    load_ratio->clear();
    for (const auto& ws : pass.ws) load_ratio->push_back(ws.stats.max_mean_load_ratio);
  }
  return examples::softmax_cross_entropy<S>(logits, w.targets, nullptr) / kLn2;
}

// Copies every parameter of `from` into `to` by name (same shapes: the routers of top-k, top-p
// and importance gates are all W_r (d, E)), then repacks `to`'s experts.
template <class From, class To>
void copy_parameters(From& from, To& to) {
  std::map<std::string, RowMatrix<S>> saved;
  from.visit_parameters(
      [&](std::string_view name, auto value, auto) { saved.emplace(std::string(name), value); });
  to.visit_parameters([&](std::string_view name, auto value, auto) {
    const auto it = saved.find(std::string(name));
    if (it == saved.end() || it->second.rows() != value.rows() ||
        it->second.cols() != value.cols()) {
      throw moet::Error("k sweep: no parameter " + std::string(name) + " of that shape to copy");
    }
    value = it->second;
  });
  to.parameters_changed();
}

template <class Model>
SweepRow sweep_row(Model& model, const Config& cfg, const std::vector<int>& val, std::string family,
                   std::string routing) {
  SweepRow row;
  row.family = std::move(family);
  row.routing = std::move(routing);
  row.bpc = bits_per_char(model, cfg, val, row.mean_k);
  for (int l = 0; l < model.shape().blocks; ++l) {
    row.activated_params +=
        row.mean_k[std::size_t(l)] * double(model.layer(l).experts().params_per_expert());
  }
  std::printf("  sweep %-28s %.4f bits/char, %.0f activated expert params / token\n",
              row.routing.c_str(), row.bpc, row.activated_params);
  return row;
}

// The k sweep of issue 16: the model trained with top-k evaluated, at the same weights, with
// top-k at k = 1..4 (ctx overrides), top-p at several p and DA-MoE's importance budget at
// several mean k (the same router weights driving those gates).
template <class Trained>
std::vector<SweepRow> k_sweep(Trained& trained, const Config& cfg,
                              const examples::CharLmShape& shape, const std::vector<int>& val) {
  std::vector<SweepRow> rows;
  const auto set_all = [](auto& model, const moet::RoutingOverrides& o) {
    for (int l = 0; l < model.shape().blocks; ++l) model.layer(l).set_overrides(o);
  };
  for (const Index k : {1, 2, 3, 4}) {
    set_all(trained, {.k = k});
    rows.push_back(sweep_row(trained, cfg, val, "top-k", "top_k:k=" + std::to_string(k)));
  }
  set_all(trained, {});
  using TopP = moet::TopPGate<S>;
  examples::MoeCharLm<TopP> top_p(
      shape,
      [&](int) { return TopP({.model_dim = shape.model_dim, .num_experts = shape.experts}); },
      cfg.seed);
  copy_parameters(trained, top_p);
  for (const double p : {0.2, 0.4, 0.6, 0.8, 0.9}) {
    set_all(top_p, {.p = p});
    char name[32];
    std::snprintf(name, sizeof name, "top_p:p=%.1f", p);
    rows.push_back(sweep_row(top_p, cfg, val, "top-p", name));
  }
  using Importance = moet::ImportanceGate<S>;
  examples::MoeCharLm<Importance> importance(
      shape,
      [&](int) {
        return Importance({.model_dim = shape.model_dim,
                           .num_experts = shape.experts,
                           .k_max = 4,
                           .norm = moet::ImportanceNorm::kBudget,
                           .renormalize = true});
      },
      cfg.seed);
  copy_parameters(trained, importance);
  for (const double k_avg : {1.0, 1.5, 2.0, 3.0}) {
    set_all(importance, {.k_avg = k_avg});
    char name[48];
    std::snprintf(name, sizeof name, "importance:norm=budget,k_avg=%.1f", k_avg);
    rows.push_back(sweep_row(importance, cfg, val, "importance (budget)", name));
  }
  std::filesystem::create_directories(cfg.out);
  std::ofstream md(cfg.out + "/k_sweep.md");
  md << "The `" << cfg.sweep << "` model evaluated with other routing at the same weights:\n\n"
     << "| routing at evaluation | validation bits/char | mean k per block | activated expert "
        "params / token |\n|---|---|---|---|\n";
  std::vector<examples::Series> series;
  for (const SweepRow& r : rows) {
    std::string k;
    char cell[64];
    for (const double v : r.mean_k) {
      std::snprintf(cell, sizeof cell, "%s%.2f", k.empty() ? "" : " / ", v);
      k += cell;
    }
    std::snprintf(cell, sizeof cell, "%.3f", r.bpc);
    md << "| `" << r.routing << "` | " << cell << " | " << k << " | "
       << static_cast<long>(r.activated_params) << " |\n";
    if (series.empty() || series.back().name != r.family) series.push_back({r.family, {}});
    series.back().points.emplace_back(r.activated_params, r.bpc);
  }
  examples::save_scatter_chart(cfg.out + "/k_sweep.svg",
                               "One trained " + cfg.sweep + " model, other routing at evaluation",
                               "activated expert parameters / token", "bits / char", series);
  return rows;
}

template <class Gate, class MakeGate>
Result train(const Config& cfg, const std::string& spec, MakeGate&& make_gate,
             examples::CharLmShape shape, const std::vector<int>& tr, const std::vector<int>& val) {
  constexpr bool kThor = std::is_same_v<Gate, moet::StochasticGate<S>>;
  using Model = examples::MoeCharLm<Gate>;
  Model model(shape, make_gate, cfg.seed);
  if constexpr (std::is_same_v<Gate, moet::TopAnyGate<S>>) {
    model.set_dynmoe_coefficient(cfg.dynmoe_coefficient);
  }
  if constexpr (moet::ScoreBiasGate<Gate, S>) {
    if (cfg.bias_rate > 0) model.enable_loss_free_balancing(cfg.bias_rate);
  }
  moet::AdamW<S> opt({.lr = 3e-3, .weight_decay = 0.0});
  typename Model::Pass pass[2];
  RowMatrix<S> d0, d1;
  Result r;
  r.router = spec;
  const double tokens = double(cfg.batch * cfg.len);
  examples::Progress bar(spec, cfg.steps);
  double ema = 0;
  Index counted = 0;
  for (long step = 0; step < cfg.steps; ++step) {
    const examples::CharBatch b =
        examples::sample_windows(tr, cfg.batch, cfg.len, cfg.seed, std::uint64_t(step));
    moet::RouteContext ctx{.training = true, .seed = cfg.seed, .step = std::uint64_t(step)};
    model.zero_grad();
    double loss = 0;
    if constexpr (kThor) {  // two stochastic passes + consistency (docs/algorithms.md §7.2)
      for (int p = 0; p < 2; ++p) {
        model.forward(b.inputs, cfg.batch, cfg.len, moet::thor_pass_context(ctx, p), pass[p]);
      }
      loss = 0.5 * (examples::softmax_cross_entropy(pass[0].logits, b.targets, &d0) +
                    examples::softmax_cross_entropy(pass[1].logits, b.targets, &d1));
      moet::consistency_loss<S>(pass[0].logits, pass[1].logits, d0, d1,
                                {.alpha = cfg.thor_alpha / tokens});
      model.backward(pass[0], d0);
      model.backward(pass[1], d1);
    } else {
      model.forward(b.inputs, cfg.batch, cfg.len, ctx, pass[0]);
      loss = examples::softmax_cross_entropy(pass[0].logits, b.targets, &d0);
      model.backward(pass[0], d0);
    }
    opt.step(model);
    model.end_step();                  // loss-free balancing: the score bias moves after the step
    if (10 * step >= 9 * cfg.steps) {  // training-mode routing (top-any may give a token none)
      for (const auto& ws : pass[0].ws) {
        r.train_k += ws.stats.mean_k;
        r.train_no_expert += double(ws.stats.k_histogram[0]) / double(ws.stats.num_tokens);
      }
      counted += Index(pass[0].ws.size());
    }
    const double bpc = loss / kLn2;
    ema = step == 0 ? bpc : 0.95 * ema + 0.05 * bpc;
    bar.update(step + 1, ema);
    if (step % 5 == 0) r.curve.points.emplace_back(double(step), ema);
  }
  bar.finish();
  r.ms_per_step = 1e3 * bar.elapsed() / double(cfg.steps);
  r.train_bpc = ema;
  r.train_k /= double(std::max<Index>(counted, 1));
  r.train_no_expert /= double(std::max<Index>(counted, 1));
  r.bpc = bits_per_char(model, cfg, val, r.mean_k, &r.load_ratio);
  for (int l = 0; l < shape.blocks; ++l) {
    r.activated_params +=
        r.mean_k[std::size_t(l)] * double(model.layer(l).experts().params_per_expert());
  }
  std::printf("%-20s validation %.4f bits/char  mean k", spec.c_str(), r.bpc);
  for (const double k : r.mean_k) std::printf(" %.2f", k);
  std::printf("  %.0f ms/step\n", r.ms_per_step);
  if constexpr (std::is_same_v<Gate, moet::TopKGate<S>>) {
    if (spec == cfg.sweep) r.sweep = k_sweep(model, cfg, shape, val);
  }
  return r;
}

void write_report(const Config& cfg, const std::vector<Result>& results) {
  std::filesystem::create_directories(cfg.out);
  std::ofstream md(cfg.out + "/results.md");
  md << "| router | validation bits/char | mean k per block | max / mean load per block | "
        "activated expert params / token | ms / step | final train bits/char | training mean k "
        "/ tokens with no expert |\n"
        "|---|---|---|---|---|---|---|---|\n";
  std::vector<examples::Series> curves, points;
  char cell[128];
  for (const Result& r : results) {
    std::string k;
    for (const double v : r.mean_k) {
      std::snprintf(cell, sizeof cell, "%s%.2f", k.empty() ? "" : " / ", v);
      k += cell;
    }
    std::string loads;
    for (const double v : r.load_ratio) {
      std::snprintf(cell, sizeof cell, "%s%.2f", loads.empty() ? "" : " / ", v);
      loads += cell;
    }
    k += " | " + loads;
    std::snprintf(cell, sizeof cell, " | %.0f | %.0f | %.3f | %.2f / %.1f%% |\n",
                  r.activated_params, r.ms_per_step, r.train_bpc, r.train_k,
                  100.0 * r.train_no_expert);
    md << "| `" << r.router << "` | " << std::to_string(r.bpc).substr(0, 5) << " | " << k << cell;
    double mean_k = 0;
    for (const double v : r.mean_k) mean_k += v / double(r.mean_k.size());
    curves.push_back({r.router, r.curve.points});
    points.push_back({r.router, {{mean_k, r.bpc}}});
  }
  examples::save_line_chart(cfg.out + "/loss.svg", "Training bits per character (EMA)", "step",
                            "bits / char", curves);
  examples::save_scatter_chart(cfg.out + "/bpc_vs_k.svg",
                               "Validation bits per character against "
                               "mean experts per token",
                               "mean k (over blocks)", "bits / char", points);
  std::printf("wrote %s/results.md and SVG plots\n", cfg.out.c_str());
}

// The mean of each value over the seeds, element by element ("2.00 / 1.98").
std::string mean_per_block(const std::vector<const std::vector<double>*>& per_seed) {
  std::string cell;
  char v[32];
  for (std::size_t b = 0; b < per_seed.front()->size(); ++b) {
    double m = 0;
    for (const auto* k : per_seed) m += (*k)[b] / double(per_seed.size());
    std::snprintf(v, sizeof v, "%s%.2f", cell.empty() ? "" : " / ", m);
    cell += v;
  }
  return cell;
}

// <out>/summary.md and summary.svg over the seeds: validation bits/char as mean ± sd (range)
// per router, each compared with top_k:k=1 and top_k:k=2 (different only when the ranges over
// the seeds do not overlap), and the k sweep the same way.
void write_summary(const Config& cfg, const std::vector<std::uint64_t>& seeds,
                   const std::vector<std::vector<Result>>& runs) {
  const std::size_t routers = runs.front().size();
  const auto metric = [&](std::size_t i) {
    std::vector<double> v;
    for (const auto& run : runs) v.push_back(run[i].bpc);
    return examples::spread(v);
  };
  const auto find = [&](const std::string& name) {
    for (std::size_t i = 0; i < routers; ++i)
      if (runs.front()[i].router == name) return std::optional<examples::Spread>(metric(i));
    return std::optional<examples::Spread>();
  };
  const auto top1 = find("top_k:k=1"), top2 = find("top_k:k=2");
  std::ofstream md(cfg.out + "/summary.md");
  md << "Validation bits/char over " << seeds.size() << " seeds (";
  for (std::size_t s = 0; s < seeds.size(); ++s) md << (s ? ", " : "") << seeds[s];
  md << "): mean ± sample standard deviation (range). A router is better or worse than top-1 "
        "or top-2 only when its range over the seeds does not overlap theirs.\n\n"
     << "| router | validation bits/char | mean k per block | activated expert params / token "
        "| ms / step (median) | training: tokens with no expert | vs `top_k:k=1` | vs "
        "`top_k:k=2` |\n|---|---|---|---|---|---|---|---|\n";
  std::vector<examples::Series> points;
  for (std::size_t i = 0; i < routers; ++i) {
    const examples::Spread bpc = metric(i);
    const std::string& name = runs.front()[i].router;
    std::vector<const std::vector<double>*> k;
    std::vector<double> ms;
    double params = 0, none = 0;
    examples::Series series{runs.front()[i].router, {}};
    for (const auto& run : runs) {
      k.push_back(&run[i].mean_k);
      ms.push_back(run[i].ms_per_step);
      params += run[i].activated_params / double(runs.size());
      none += run[i].train_no_expert / double(runs.size());
      series.points.emplace_back(run[i].activated_params, run[i].bpc);
    }
    std::sort(ms.begin(), ms.end());
    points.push_back(std::move(series));
    char cell[160];
    std::snprintf(cell, sizeof cell, " | %.0f | %.0f | %.1f%% | ", params, ms[ms.size() / 2],
                  100.0 * none);
    md << "| `" << runs.front()[i].router << "` | " << examples::format_spread(bpc, 3) << " | "
       << mean_per_block(k) << cell
       << (top1 && name != "top_k:k=1" ? examples::compare(bpc, *top1, false) : std::string("-"))
       << " | "
       << (top2 && name != "top_k:k=2" ? examples::compare(bpc, *top2, false) : std::string("-"))
       << " |\n";
  }
  examples::save_scatter_chart(cfg.out + "/summary.svg",
                               "Validation bits per character, one point per seed",
                               "activated expert parameters / token", "bits / char", points);
  // The k sweep of each seed's --sweep model, compared with its routing as trained.
  std::vector<const std::vector<SweepRow>*> sweeps;
  for (const auto& run : runs)
    for (const Result& r : run)
      if (!r.sweep.empty()) sweeps.push_back(&r.sweep);
  if (sweeps.size() != runs.size()) return;
  const auto sweep_values = [&](std::size_t j) {
    std::vector<double> v;
    for (const auto* rows : sweeps) v.push_back((*rows)[j].bpc);
    return v;
  };
  std::optional<std::vector<double>> trained;
  for (std::size_t j = 0; j < sweeps.front()->size(); ++j)
    if ((*sweeps.front())[j].routing == cfg.sweep) trained = sweep_values(j);
  md << "\nThe k sweep: each seed's `" << cfg.sweep
     << "` model evaluated with other routing at the same weights, over the seeds; the last "
        "column compares each row with the same seeds' models as trained, seed by seed:\n\n"
     << "| routing at evaluation | validation bits/char | mean k per block | activated expert "
        "params / token | vs `"
     << cfg.sweep << "` as trained |\n|---|---|---|---|---|\n";
  for (std::size_t j = 0; j < sweeps.front()->size(); ++j) {
    std::vector<const std::vector<double>*> k;
    double params = 0;
    for (const auto* rows : sweeps) {
      k.push_back(&(*rows)[j].mean_k);
      params += (*rows)[j].activated_params / double(sweeps.size());
    }
    const std::vector<double> bpc = sweep_values(j);
    md << "| `" << (*sweeps.front())[j].routing << "` | "
       << examples::format_spread(examples::spread(bpc), 3) << " | " << mean_per_block(k) << " | "
       << static_cast<long>(params) << " | "
       << (trained && (*sweeps.front())[j].routing != cfg.sweep
               ? examples::compare_paired(bpc, *trained, false, 3)
               : std::string("-"))
       << " |\n";
  }
  std::printf("wrote %s/summary.md and summary.svg\n", cfg.out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  examples::Flags flags;
  flags.add("--routers", cfg.routers).add("--steps", cfg.steps).add("--batch", cfg.batch);
  flags.add("--len", cfg.len).add("--seed", cfg.seed).add("--out", cfg.out);
  flags.add("--sweep", cfg.sweep).add("--bias-rate", cfg.bias_rate).add("--seeds", cfg.seeds);
  flags.add("--dynmoe-coefficient", cfg.dynmoe_coefficient).add("--thor-alpha", cfg.thor_alpha);
  flags.add("--experts", cfg.experts);
  if (!flags.parse(argc, argv)) return 2;
  std::vector<std::uint64_t> seeds{cfg.seed};
  try {
    if (!cfg.seeds.empty()) seeds = examples::parse_seeds(cfg.seeds);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  if (!std::filesystem::is_directory(examples::kFortunesDir)) {
    std::fprintf(stderr, "the fortunes package is not installed (apt-get install it); skipped\n");
    return 77;  // ctest's skip code
  }
  const examples::TextCorpus corpus = examples::load_fortunes();
  const examples::CharVocab vocab(corpus.train);
  const std::vector<int> tr = vocab.encode(corpus.train), val = vocab.encode(corpus.validation);
  std::printf("fortunes: %ld fortunes, %zu training and %zu validation characters, vocabulary %d\n",
              long(corpus.num_fortunes), tr.size(), val.size(), vocab.size());
  examples::CharLmShape shape;
  shape.vocab = vocab.size();
  if (cfg.experts < 1 || cfg.experts > 64) {
    std::fprintf(stderr, "--experts: %ld is outside [1, 64]\n", cfg.experts);
    return 2;
  }
  shape.experts = cfg.experts;
  std::vector<std::vector<Result>> runs;
  for (const std::uint64_t seed : seeds) {
    Config run = cfg;
    run.seed = seed;
    if (!cfg.seeds.empty()) {
      run.out = cfg.out + "/seed_" + std::to_string(seed);
      std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
    }
    std::vector<Result> results;
    for (const std::string& spec : moet::split_gate_specs(cfg.routers)) {
      results.push_back(examples::with_router(
          spec, shape.model_dim, shape.experts, run.seed, 50, [&](auto gate_type, auto make_gate) {
            return train<typename decltype(gate_type)::type>(run, spec, make_gate, shape, tr, val);
          }));
    }
    write_report(run, results);
    runs.push_back(std::move(results));
  }
  if (!cfg.seeds.empty()) {
    std::filesystem::create_directories(cfg.out);
    write_summary(cfg, seeds, runs);
  }
  return 0;
}
