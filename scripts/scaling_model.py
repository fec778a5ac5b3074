#!/usr/bin/env python3
"""The scaling model of docs/scaling.md: expert parallelism's time per MoE layer forward on N
machines against one machine holding every expert, for a given machine and link.

    python3 scripts/scaling_model.py            # prints the tables of docs/scaling.md

Model (uniform routing; per machine: P FLOP/s for the expert products, M bytes/s of memory
bandwidth; per link: latency alpha per message, B bytes/s each way per machine):
  rows per machine            R   = T k                  (N T k assignments over N machines)
  experts a machine streams   U   = (E/N) (1 - (1 - 1/E)^(N T k))
  expert time                 t_c = max(R 6 d f / P, U 3 d f w / M)          (SwiGLU: 3 matrices)
  exchange time               t_x = (3 (N - 1) + 2 ceil(log2 N)) alpha + 2 T k d s (N - 1) / (N B)
  one machine, batch N T      t_1 = max(N T k 6 d f / P, U_1 3 d f w / M),
                                    U_1 = E (1 - (1 - 1/E)^(N T k))
  speed-up                    t_1 / (t_c + t_x);  exchange share  t_x / (t_c + t_x)
s: bytes per activation scalar (4, float), w: bytes per weight (4 f32, 2 bf16). The latency
term counts the count exchange, the rows and the outputs (N - 1 messages each) and the status
agreement (an all-reduce, 2 log2 N steps). Routing, gather and combine cost the same on both
sides and are left out; so is load imbalance between machines.
"""
import math

# Calibration, measured on this project's VM with moet-ep-bench (docs/scaling.md, 2026-12-04):
P_CORE = 104.6e9     # FLOP/s per core, S2 SwiGLU expert products (f32), 4096 rows per rank
M_CORE = 15.0e9      # bytes/s one core streams expert weights at (T = 8 per rank)
M_VM = 48.0e9        # bytes/s both cores stream them at (single process, T = 16)
ALPHA_LOOP = 3.5e-6  # s per exchange step on shared memory (the count exchange's median)
B_LOOP = 4.7e9       # bytes/s of the row exchange on shared memory (rows phase, T = 2048)

S2 = dict(d=1024, f=3584, E=8, k=2)
LINKS = {  # (alpha s, B bytes/s); only the first is measured, the others are typical values
    "shared memory (measured)": (ALPHA_LOOP, B_LOOP),
    "10 GbE, TCP (assumed 30 us, 1.1 GB/s)": (30e-6, 1.1e9),
    "100 Gb/s InfiniBand (assumed 2 us, 11 GB/s)": (2e-6, 11e9),
}
MACHINES = {  # (P FLOP/s, M bytes/s, weight bytes)
    "this VM (2 cores), f32": (2 * P_CORE, M_VM, 4),
    "a 64-core server (assumed 32x this VM's FLOP/s, 200 GB/s), f32": (64 * P_CORE, 200e9, 4),
}


def times(N, T, P, M, alpha, B, d, f, E, k, s=4, w=4):
    R = T * k
    U = (E / N) * (1 - (1 - 1 / E) ** (N * T * k))
    t_c = max(R * 6 * d * f / P, U * 3 * d * f * w / M)
    t_x = (3 * (N - 1) + 2 * math.ceil(math.log2(N))) * alpha + \
        2 * T * k * d * s * (N - 1) / (N * B)
    U1 = E * (1 - (1 - 1 / E) ** (N * T * k))
    t_1 = max(N * T * k * 6 * d * f / P, U1 * 3 * d * f * w / M)
    return t_c, t_x, t_1


def check():
    """The model with two 1-core 'machines' against moet-ep-bench's measured expert and layer
    times (2 ranks x 1 thread, S2 f32, medians, 2026-12-04)."""
    measured = {8: (11.58, 11.70), 32: (21.62, 21.83), 128: (61.93, 62.47),
                512: (224.55, 225.95), 2048: (861.92, 867.49)}
    print("### The model against the measurement (2 ranks x 1 core, shared memory, S2 f32)\n")
    print("| tokens per rank | model: experts + exchange ms | measured: experts / layer ms |")
    print("|---|---|---|")
    for T, (experts, layer) in measured.items():
        t_c, t_x, _ = times(2, T, P_CORE, M_CORE, ALPHA_LOOP, B_LOOP, **S2)
        print(f"| {T} | {1e3 * t_c:.2f} + {1e3 * t_x:.3f} | {experts:.2f} / {layer:.2f} |")
    print()


def table(machine, links):
    P, M, w = MACHINES[machine]
    print(f"### {machine}: S2, N machines against one machine with every expert\n")
    print("| link | N | tokens per machine | experts ms | exchange ms | exchange share | "
          "one machine ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in links:
        alpha, B = LINKS[name]
        for N in (2, 8):
            for T in (1, 32, 512):
                t_c, t_x, t_1 = times(N, T, P, M, alpha, B, w=w, **S2)
                print(f"| {name} | {N} | {T} | {1e3 * t_c:.3f} | {1e3 * t_x:.3f} | "
                      f"{100 * t_x / (t_c + t_x):.1f}% | {1e3 * t_1:.3f} | "
                      f"{t_1 / (t_c + t_x):.2f} |")
    print()


if __name__ == "__main__":
    check()
    names = list(LINKS)
    machines = list(MACHINES)
    table(machines[0], names)
    table(machines[1], names[1:])  # between servers: network links only
