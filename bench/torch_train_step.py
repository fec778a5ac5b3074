#!/usr/bin/python3
"""PyTorch's autograd on bench_train's layer: the baseline of issue 18's training comparison.

The layer of bench_train's BM_TrainStep: a Mixtral router (linear d -> E, softmax, top-2,
renormalised), E SwiGLU experts (gate, up: d x f; down: f x d; no biases), the routed rows of
each expert gathered, run and scattered back with their weights. Each expert holds its own
parameters, as Hugging Face's Mixtral does: slicing one (E, d, f) parameter per expert makes
autograd build a full-size zero gradient per slice, which on this project's VM (about 15 us
per fresh 4 KiB page) cost 10.6-13 s a step. One step is zero_grad,
forward, backward of sum(y * dy) (so dL/dy = dy, as bench_train feeds) and AdamW. Prints the
median step time over --steps timed steps (after two warm-ups) and tokens per second.

Debian's python3-torch (1.13); run it with Debian's interpreter:

    /usr/bin/python3 bench/torch_train_step.py --threads 2
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


class Expert(torch.nn.Module):
    """One SwiGLU expert as Hugging Face's Mixtral writes it: w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)
        for w, fan_in in ((self.w1, d), (self.w3, d), (self.w2, f)):
            torch.nn.init.normal_(w.weight, std=fan_in**-0.5)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(torch.nn.Module):
    def __init__(self, d, f, experts, k):
        super().__init__()
        self.k = k
        self.router = torch.nn.Linear(d, experts, bias=False)
        torch.nn.init.normal_(self.router.weight, std=d**-0.5)
        self.experts = torch.nn.ModuleList(Expert(d, f) for _ in range(experts))

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        top, idx = torch.topk(probs, self.k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero(idx == e, as_tuple=True)
            if token.numel() == 0:
                continue
            out = expert(x.index_select(0, token)) * top[token, slot].unsqueeze(1)
            y = y.index_add(0, token, out)
        return y


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--f", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(1)
    torch.set_num_threads(args.threads)
    layer = MoE(args.d, args.f, args.experts, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(args.tokens, args.d)
    dy = 1e-3 * torch.randn(args.tokens, args.d)

    def step():
        opt.zero_grad(set_to_none=False)
        (layer(x) * dy).sum().backward()
        opt.step()

    def forward():
        with torch.no_grad():
            layer(x)

    timings = {}
    for name, fn in (("forward", forward), ("step", step)):
        for _ in range(2):
            fn()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        timings[name] = statistics.median(times)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, d {args.d}, f {args.f}, "
        f"E {args.experts}, top-2, T {args.tokens}: forward (no_grad) "
        f"{timings['forward'] * 1e3:.1f} ms, training step {timings['step'] * 1e3:.1f} ms "
        f"({args.tokens / timings['step']:.0f} tokens/s), medians of {args.steps}"
    )


if __name__ == "__main__":
    main()
