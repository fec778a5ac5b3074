// What this shows: inference with a model trained elsewhere. Builds the classifier of example 04
// with the same router, loads the parameters example 04 saved, and classifies Fashion-MNIST
// test images, printing the accuracy, a few predictions and how many experts each image used.
// What to copy: build the same model, moet::load_parameters(model, path) (a safetensors file of
// the parameters under their names, from moet::save_parameters), then forward with a default
// (inference) RouteContext.
//
//   example_05_classify [--params fashion_mnist/top_k_k_2.safetensors] [--router top_k:k=2]
//                       [--test 10000] [--show 8]
#include <cstdio>
#include <filesystem>
#include <string>

#include <moet/io/parameters.hpp>
#include <moet/moet.hpp>

#include "support/classifier.hpp"
#include "support/cli.hpp"
#include "support/data.hpp"
#include "support/routers.hpp"

int main(int argc, char** argv) {
  std::string params = "fashion_mnist/top_k_k_2.safetensors", router = "top_k:k=2";
  long test = 10000, show = 8;
  examples::Flags flags;
  flags.add("--params", params).add("--router", router).add("--test", test).add("--show", show);
  if (!flags.parse(argc, argv)) return 2;
  if (!std::filesystem::exists(std::string(examples::kFashionMnistDir))) {
    std::fprintf(stderr, "dataset-fashion-mnist is not installed (apt-get install it); skipped\n");
    return 77;  // ctest's skip code
  }
  const examples::ImageSet set = examples::load_fashion_mnist("t10k", test);
  const examples::ClassifierShape shape;  // the sizes example 04 trains with
  return examples::with_router(
      router, shape.model_dim, shape.experts, 1, 50, [&](auto gate_type, auto make_gate) {
        examples::MoeClassifier<typename decltype(gate_type)::type> model(shape, make_gate, 1);
        moet::load_parameters(model, params);  // throws if names or shapes differ
        typename decltype(model)::Pass pass;
        const auto& logits = model.forward(set.images, {}, pass);  // inference routing
        long correct = 0;
        for (moet::Index t = 0; t < logits.rows(); ++t) {
          moet::Index best = 0;
          logits.row(t).maxCoeff(&best);
          correct += best == set.labels[static_cast<std::size_t>(t)];
          if (t < show) {
            std::printf("image %ld: predicted %-12s true %-12s experts %ld + %ld\n", long(t),
                        examples::kFashionMnistClasses[best],
                        examples::kFashionMnistClasses[set.labels[static_cast<std::size_t>(t)]],
                        long(pass.ws[0].routing.k(t)), long(pass.ws[1].routing.k(t)));
          }
        }
        const double accuracy = double(correct) / double(logits.rows());
        std::printf("%s: accuracy %.4f on %ld test images, mean experts per image %.2f + %.2f\n",
                    router.c_str(), accuracy, long(logits.rows()), pass.ws[0].stats.mean_k,
                    pass.ws[1].stats.mean_k);
        return accuracy > 0.5 ? 0 : 1;  // a trained model is far above chance (0.1)
      });
}
