#pragma once
/// \file moet.hpp
/// The umbrella header: everything a user of moet needs.

#include "moet/concepts.hpp"
#include "moet/config.hpp"
#include "moet/context.hpp"
#include "moet/errors.hpp"
#include "moet/routing.hpp"
#include "moet/stats.hpp"
#include "moet/tensor.hpp"
#include "moet/version.hpp"
