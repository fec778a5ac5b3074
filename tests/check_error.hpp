#pragma once
// Shared by the bad-input and file-reader tests.
#include <catch2/catch.hpp>

#include "moet/errors.hpp"

// Checks that `expr` throws a `moet::Error` (and nothing else) whose message matches `matcher`.
#define CHECK_MOET_ERROR(expr, matcher) \
  do {                                  \
    CHECK_THROWS_AS(expr, moet::Error); \
    CHECK_THROWS_WITH(expr, matcher);   \
  } while (false)
