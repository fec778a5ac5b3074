#pragma once
// Example 03's gate, exactly as users read it (without its main), for the tests that check it.
// Included through this header so that two test files can share one translation unit.
#define MOET_EXAMPLE_03_NO_MAIN
#include "../examples/03_custom_gate.cpp"
