#pragma once
/// \file gates/spec_keys.hpp
/// The router grammar's machinery, without any gate: `GateSpec` (a parsed
/// `name[:key=value[,key=value...]]`), `split_gate_specs` (a list of specs separated by spaces or
/// commas), and `GateSpecKey` (one row of a gate's key table: a key bound to an `Options`
/// field, its type, its default read from a default-constructed `Options`, one line of
/// documentation). gates/spec.hpp holds the shipped gates' tables and builds gates from specs;
/// a new gate's table can live next to the gate, including only this header.

#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "moet/errors.hpp"

namespace moet {

/// A router spec, parsed: `name[:key=value[,key=value...]]`, e.g. `"top_k:k=2,renorm=1"`.
/// Only the syntax is checked here; which names and keys exist is the gate tables' business
/// (gates/spec.hpp).
struct GateSpec {
  /// The spec as written (trimmed), for messages and labels.
  std::string text;
  /// The gate's name, before the `:`.
  std::string name;
  /// The `key=value` pairs in the order written.
  std::vector<std::pair<std::string, std::string>> values;

  /// The value given for `key` (exactly as written, no alias resolution), or null.
  const std::string* find(std::string_view key) const {
    for (const auto& [k, v] : values) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

/// Parses `name[:key=value[,key=value...]]` (spaces around the whole spec are ignored; none are
/// allowed inside). Throws `moet::Error` naming the spec for an empty name, a pair without
/// `=`, an empty key or value, or a key given twice.
///
/// ```cpp
/// const moet::GateSpec spec = moet::parse_gate_spec("top_p:p=0.5,max_k=3");
/// ```
inline GateSpec parse_gate_spec(std::string_view text) {
  constexpr const char* op = "parse_gate_spec";
  const auto first = text.find_first_not_of(" \t\n");
  const auto last = text.find_last_not_of(" \t\n");
  text =
      first == std::string_view::npos ? std::string_view() : text.substr(first, last - first + 1);
  GateSpec spec;
  spec.text = std::string(text);
  detail::require(text.find_first_of(" \t\n") == std::string_view::npos, op, "router spec '", text,
                  "' contains a space; write name:key=value,key=value");
  const auto colon = text.find(':');
  spec.name = std::string(text.substr(0, colon));
  detail::require(!spec.name.empty(), op, "router spec '", text,
                  "' has no gate name (expected name[:key=value[,key=value...]])");
  if (colon == std::string_view::npos) return spec;
  std::string_view rest = text.substr(colon + 1);
  detail::require(!rest.empty(), op, "router spec '", text, "' has nothing after ':'");
  while (true) {
    const auto comma = rest.find(',');
    const std::string_view pair = rest.substr(0, comma);
    const auto eq = pair.find('=');
    detail::require(eq != std::string_view::npos, op, "router spec '", text, "': '", pair,
                    "' is not key=value");
    const std::string key(pair.substr(0, eq));
    const std::string value(pair.substr(eq + 1));
    detail::require(!key.empty() && !value.empty(), op, "router spec '", text, "': '", pair,
                    "' needs a key and a value");
    detail::require(spec.find(key) == nullptr, op, "router spec '", text, "' gives key '", key,
                    "' twice");
    spec.values.emplace_back(key, value);
    if (comma == std::string_view::npos) break;
    rest = rest.substr(comma + 1);
  }
  return spec;
}

/// Splits a list of router specs separated by spaces or commas: a comma starts a new spec when
/// the piece after it has a `:` or no `=` (so `"top_k:k=2,renorm=1,top_p"` is two specs, and
/// `"top_k:k=1 top_p:p=0.4"` too). Empty pieces are skipped. Nothing is validated.
inline std::vector<std::string> split_gate_specs(std::string_view list) {
  std::vector<std::string> specs;
  std::string current;
  std::size_t begin = 0;
  while (begin <= list.size()) {
    auto end = list.find_first_of(" \t\n,", begin);
    if (end == std::string_view::npos) end = list.size();
    const bool space_before = begin > 0 && list[begin - 1] != ',';
    const std::string_view piece = list.substr(begin, end - begin);
    if (!piece.empty()) {
      const bool starts = space_before || piece.find(':') != std::string_view::npos ||
                          piece.find('=') == std::string_view::npos;
      if (starts && !current.empty()) specs.push_back(std::move(current)), current.clear();
      if (!current.empty()) current += ',';
      current += piece;
    }
    begin = end + 1;
  }
  if (!current.empty()) specs.push_back(std::move(current));
  return specs;
}

/// One key of a gate's spec table, for that gate's `Options`: `name` (and an optional `alias`)
/// bound to a field; `type` says what values it takes (`"integer"`, `"0|1"`, `"number"`,
/// `"max|minmax|budget"`); `doc` is one line; `set` parses a value into the field (throwing
/// `moet::Error` with the key and the value when it is not of the type); `get` prints the
/// field (so the printed default is that of `Options{}`). Build rows with `spec_field` and
/// `spec_choice`.
template <class Options>
struct GateSpecKey {
  std::string name;
  std::string alias;
  std::string type;
  std::string doc;
  std::function<void(Options&, const std::string&)> set;
  std::function<std::string(const Options&)> get;
};

namespace detail {

/// The field type of a pointer to data member.
template <class M>
struct MemberOf;
template <class O, class T>
struct MemberOf<T O::*> {
  using Owner = O;
  using Type = T;
};

/// Prints a number exactly: integers in full, floating point in the shortest form that reads
/// back to the same value (`0.4`, `1`, `1e-05`).
template <class T>
std::string spec_number(T value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

/// Parses `text` (the whole of it) as a `T`; throws naming `key` and the value.
template <class T>
T parse_spec_value(const std::string& key, const std::string& text) {
  constexpr const char* op = "gate spec";
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "1" || text == "true") return true;
    if (text == "0" || text == "false") return false;
    fail(op, "key '", key, "' takes 0 or 1 (true or false), got '", text, "'");
  } else if constexpr (std::is_integral_v<T>) {
    T value{};
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    require(ptr == text.data() + text.size() && ec != std::errc::invalid_argument, op, "key '", key,
            "' takes ", std::is_signed_v<T> ? "an integer" : "an integer >= 0", ", got '", text,
            "'");
    require(ec != std::errc::result_out_of_range, op, "key '", key, "': '", text,
            "' is out of range for ", std::is_signed_v<T> ? "a signed" : "an unsigned", " ",
            8 * sizeof(T), "-bit integer");
    return value;
  } else {
    static_assert(std::is_floating_point_v<T>, "a spec field is a bool, an integer or a number");
    double value = 0.0;
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
    require(ptr == text.data() + text.size() && ec == std::errc(), op, "key '", key,
            "' takes a number, got '", text, "'");
    require(std::isfinite(value) && std::abs(value) <= double(std::numeric_limits<T>::max()), op,
            "key '", key, "' takes a finite number, got '", text, "'");
    return static_cast<T>(value);
  }
}

}  // namespace detail

/// A key bound to the bool, integer or floating-point field `Member` of an `Options`.
///
/// ```cpp
/// moet::spec_field<&TopKGate<S>::Options::k>("k", "experts per token, 1..num_experts")
/// ```
template <auto Member>
GateSpecKey<typename detail::MemberOf<decltype(Member)>::Owner> spec_field(std::string name,
                                                                           std::string doc,
                                                                           std::string alias = {}) {
  using Options = typename detail::MemberOf<decltype(Member)>::Owner;
  using T = typename detail::MemberOf<decltype(Member)>::Type;
  static_assert(std::is_arithmetic_v<T>, "spec_field binds a bool, integer or number field");
  std::string type = std::is_same_v<T, bool> ? "0|1"
                     : std::is_integral_v<T> ? (std::is_signed_v<T> ? "integer" : "integer >= 0")
                                             : "number";
  std::string key = name;
  return {
      std::move(name),
      std::move(alias),
      std::move(type),
      std::move(doc),
      [key](Options& o, const std::string& v) { o.*Member = detail::parse_spec_value<T>(key, v); },
      [](const Options& o) -> std::string {
        if constexpr (std::is_same_v<T, bool>) {
          return o.*Member ? "1" : "0";
        } else {
          return detail::spec_number(o.*Member);
        }
      }};
}

/// A key bound to the enum field `Member`, whose values are spelled by `choices` (`{"max",
/// ImportanceNorm::kMax}, ...`).
template <auto Member>
GateSpecKey<typename detail::MemberOf<decltype(Member)>::Owner> spec_choice(
    std::string name, std::string doc,
    std::vector<std::pair<std::string, typename detail::MemberOf<decltype(Member)>::Type>> choices,
    std::string alias = {}) {
  using Options = typename detail::MemberOf<decltype(Member)>::Owner;
  std::string type;
  for (const auto& [spelling, value] : choices) type += (type.empty() ? "" : "|") + spelling;
  std::string key = name;
  return {std::move(name),
          std::move(alias),
          type,
          std::move(doc),
          [key, type, choices](Options& o, const std::string& v) {
            for (const auto& [spelling, value] : choices) {
              if (spelling == v) {
                o.*Member = value;
                return;
              }
            }
            detail::fail("gate spec", "key '", key, "' takes ", type, ", got '", v, "'");
          },
          [choices](const Options& o) -> std::string {
            for (const auto& [spelling, value] : choices) {
              if (o.*Member == value) return spelling;
            }
            return "?";
          }};
}

/// The spec table of gate `G`; specialise it for every gate the grammar builds (gates/spec.hpp
/// does for the shipped ones). A specialisation provides:
/// ```cpp
/// template <class S> struct GateSpecTraits<MyGate<S>> {
///   static constexpr const char* name = "my_gate";        // the spec's name
///   static constexpr const char* summary = "one line";    // for gate_spec_help()
///   static std::vector<GateSpecKey<typename MyGate<S>::Options>> keys() { return {...}; }
/// };
/// ```
template <class G>
struct GateSpecTraits;

}  // namespace moet
