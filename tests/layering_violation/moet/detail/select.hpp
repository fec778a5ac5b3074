#pragma once
// A layering violation for the check's own test (tests/CMakeLists.txt,
// moet_layering_check_catches): a foundation header that includes an optimiser.
#include "moet/train/optim.hpp"
