#pragma once
/// \file io/parameters.hpp
/// Saving and loading a trainable moet model (a layer, a gate, an expert bank, or anything with
/// `visit_parameters`) as a safetensors file, one tensor per visited parameter under its
/// parameter name (`gate.router.weight`, `experts.gate`, `shared.down`, ...), shaped as moet
/// stores it. The file is a plain safetensors file: PyTorch (`safetensors.torch.load_file`)
/// reads it too.
///
/// ```cpp
/// moet::save_parameters(layer, "layer.safetensors");   // after training
/// moet::load_parameters(other, "layer.safetensors");   // same architecture: same names, shapes
/// ```

#include <filesystem>
#include <set>
#include <string>
#include <string_view>

#include "moet/concepts.hpp"
#include "moet/errors.hpp"
#include "moet/io/safetensors.hpp"
#include "moet/tensor.hpp"
#include "moet/train/optim.hpp"
#include "moet/version.hpp"

namespace moet {

/// Writes every parameter `model.visit_parameters` visits to the safetensors file `path`, as a
/// `[rows, cols]` tensor named after the parameter, stored as `dtype` (F32, the default, keeps
/// float parameters exactly; BF16 or F16 round to nearest even), with `__metadata__`
/// `{"format": "moet", "moet_version": "..."}`. The model stays usable: the visit marks expert
/// banks' packed copies stale, so they are repacked afterwards (`parameters_changed`). Throws
/// `moet::Error` when the file cannot be written or two parameters share a name.
template <class Model>
void save_parameters(Model& model, const std::filesystem::path& path, Dtype dtype = Dtype::kF32) {
  SafetensorsWriter writer;
  writer.set_metadata("format", "moet");
  writer.set_metadata("moet_version", kVersion);
  RowMatrix<float> values;
  model.visit_parameters([&](std::string_view name, auto value, auto /*grad*/) {
    values = value.template cast<float>();
    writer.add(std::string(name), values, dtype);
  });
  notify_parameters_changed(model);  // nothing changed, but the visit marked it stale
  writer.write(path);
}

/// Reads the parameters of `model` from the safetensors file `path` (written by
/// `save_parameters` for a model of the same architecture): every visited parameter must be in
/// the file with its `[rows, cols]` shape, and every tensor of the file must be a parameter.
/// Then calls `parameters_changed` (expert banks check and repack their weights). Throws
/// `moet::Error` naming the file and the tensor for a missing or extra tensor, another shape, a
/// dtype moet does not read, or a non-finite weight; the model's values are then unspecified.
template <class Model>
void load_parameters(Model& model, const std::filesystem::path& path) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::set<std::string, std::less<>> unused;
  for (const auto& name : file.names()) unused.insert(name);
  RowMatrix<float> values;
  model.visit_parameters([&](std::string_view name, auto value, auto /*grad*/) {
    const TensorView t = file.require(name, {value.rows(), value.cols()});
    values.resize(value.rows(), value.cols());
    t.read_rows(0, values);
    value = values.template cast<typename decltype(value)::Scalar>();
    if (const auto it = unused.find(name); it != unused.end()) unused.erase(it);
  });
  detail::require(unused.empty(), "load_parameters", path.string(), ": tensor '",
                  unused.empty() ? std::string() : *unused.begin(),
                  "' is not a parameter of this model (", unused.size(),
                  " such tensors; was the file saved from another architecture?)");
  notify_parameters_changed(model);
}

}  // namespace moet
