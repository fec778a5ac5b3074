#pragma once
/// \file examples/support/cli.hpp
/// Command-line flags of the examples (`--name value` pairs) and comma-separated lists.
///
/// ```cpp
/// examples::Flags flags;
/// flags.add("--epochs", cfg.epochs).add("--out", cfg.out);
/// if (!flags.parse(argc, argv)) return 2;  // the message is printed
/// for (const std::string& spec : moet::split_gate_specs(cfg.routers)) ...  // router lists
/// ```

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace examples {

/// A table of `--name value` flags, each bound to a variable (long, unsigned 64-bit, double or
/// string).
class Flags {
 public:
  Flags& add(const std::string& name, long& target) {
    setters_[name] = [&target](const std::string& v) { return parse_number(v, target); };
    return *this;
  }
  Flags& add(const std::string& name, std::uint64_t& target) {
    setters_[name] = [&target](const std::string& v) { return parse_number(v, target); };
    return *this;
  }
  /// A non-negative finite decimal (`1e-3`, `0.5`, `0`).
  Flags& add(const std::string& name, double& target) {
    setters_[name] = [&target](const std::string& v) {
      std::size_t used = 0;
      double value = 0;
      try {
        value = std::stod(v, &used);
      } catch (const std::exception&) {  // not a number, or out of range
        return false;
      }
      if (used != v.size() || !std::isfinite(value) || value < 0) return false;
      target = value;
      return true;
    };
    return *this;
  }
  Flags& add(const std::string& name, std::string& target) {
    setters_[name] = [&target](const std::string& v) {
      target = v;
      return true;
    };
    return *this;
  }

  /// Sets the bound variables from `argv`; false (after a message on stderr) on an unknown
  /// flag, a flag without a value, or a value that is not a number of the bound kind.
  bool parse(int argc, char** argv) const {
    for (int i = 1; i < argc; i += 2) {
      const std::string flag = argv[i];
      const auto it = setters_.find(flag);
      if (it == setters_.end()) return fail("unknown option " + flag);
      if (i + 1 >= argc) return fail(flag + " needs a value");
      if (!it->second(argv[i + 1])) return fail(flag + ": not a valid number: " + argv[i + 1]);
    }
    return true;
  }

 private:
  template <class T>
  static bool parse_number(const std::string& v, T& target) {
    if (v.empty() || v[0] == '-' || v.find_first_not_of("0123456789") != std::string::npos) {
      return false;
    }
    try {
      target = static_cast<T>(std::stoull(v));
    } catch (const std::exception&) {  // out of range
      return false;
    }
    return true;
  }
  static bool fail(const std::string& why) {
    std::fprintf(stderr, "%s\n", why.c_str());
    return false;
  }
  std::map<std::string, std::function<bool(const std::string&)>> setters_;
};

/// The non-empty items of a comma-separated list.
inline std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  for (std::size_t b = 0, e; b <= list.size(); b = e + 1) {
    e = list.find(',', b);
    if (e == std::string::npos) e = list.size();
    if (e > b) items.push_back(list.substr(b, e - b));
  }
  return items;
}

}  // namespace examples
