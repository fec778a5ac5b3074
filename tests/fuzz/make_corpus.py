#!/usr/bin/env python3
"""Writes the small seed corpora in tests/fuzz/corpus/<target>/ (committed; re-run only to
regenerate them). Every target decodes any byte string, so seeds are a few fixed-seed random
strings of different lengths plus all-zero and all-0xff inputs; libFuzzer mutates from there."""
import os
import random

TARGETS = ["top_k", "top_p", "top_any", "importance", "stochastic", "dispatch", "expert_choice",
           "relu", "null_experts", "grouped_top_k"]
here = os.path.dirname(os.path.abspath(__file__))
for index, target in enumerate(TARGETS):
    out = os.path.join(here, "corpus", target)
    os.makedirs(out, exist_ok=True)
    rng = random.Random(1000 + index)
    seeds = {"zeros": bytes(64), "ones": b"\xff" * 64}
    for n, length in enumerate([24, 64, 160, 400, 1200]):
        seeds[f"random{n}"] = bytes(rng.randrange(256) for _ in range(length))
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
