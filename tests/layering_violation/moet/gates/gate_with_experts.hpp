#pragma once
// A layering violation for the check's own test: a gate that includes an expert bank (same
// layer, but gates and expert banks do not include each other).
#include "moet/experts/bank.hpp"
