#pragma once
/// \file detail/param_names.hpp
/// Parameter names of composed modules (`MoELayer`, `mpi::ExpertParallelLayer`): each part's
/// `visit_parameters` names its tensors (`weight`, `gate`, ...) and the module hands them on
/// as `prefix + name` (`gate.weight`, `experts.gate`, ...) without allocating, so that an
/// optimiser step over a warmed-up module stays off the heap.

#include <algorithm>
#include <array>
#include <cstddef>
#include <iterator>
#include <string>
#include <string_view>

#include "moet/concepts.hpp"

namespace moet::detail {

/// Composes `prefix + part` in a stack buffer; a name longer than it goes through a string
/// (which allocates). The view returned is valid until the next call.
class ParamNamer {
 public:
  std::string_view operator()(std::string_view prefix, std::string_view part) {
    const std::size_t size = prefix.size() + part.size();
    if (size <= buffer_.size()) {
      std::copy(prefix.begin(), prefix.end(), buffer_.begin());
      std::copy(part.begin(), part.end(), buffer_.begin() + std::ssize(prefix));
      return {buffer_.data(), size};
    }
    spill_.assign(prefix);
    spill_.append(part);
    return spill_;
  }

 private:
  std::array<char, 128> buffer_{};
  std::string spill_;
};

/// A `visit_parameters` callback for one part of a module: calls `f(prefix + name, value,
/// grad)`, the name composed by `namer` (both must outlive the callback).
template <class S, class F>
auto prefixed_visitor(F& f, ParamNamer& namer, std::string_view prefix) {
  return [&f, &namer, prefix](std::string_view part, ParamMap<S> value, ParamMap<S> grad) {
    f(namer(prefix, part), value, grad);
  };
}

}  // namespace moet::detail
