#pragma once
/// \file version.hpp
/// moet's version. CMake reads the three numbers below; keep the layout.

#define MOET_VERSION_MAJOR 0
#define MOET_VERSION_MINOR 1
#define MOET_VERSION_PATCH 0

namespace moet {

/// The library version as "major.minor.patch".
inline constexpr const char* kVersion = "0.1.0";

}  // namespace moet
