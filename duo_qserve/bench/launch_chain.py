"""What one kernel boundary costs inside a CUDA graph, by the bytes the kernel moves (needs a CUDA GPU).

A batch-1 decode step of a small model is a chain of a few hundred dependent kernels, most of them moving well
under a megabyte. This replays a graph of ``--chain`` dependent copies (each reads the buffer the previous one
wrote; ``common.bench_graph``) for each size and reports microseconds per kernel and the bandwidth reached,
against the copy ceiling.
``us_per_kernel`` at the smallest size is the fixed cost of a boundary (launch, ramp-up, drain); with it, a step
of ``n`` kernels moving ``B`` bytes cannot run faster than about ``n * fixed + B / bandwidth``.

    python -m duo_qserve.bench.launch_chain --out DIR [--sizes-kb 4,64,256,1024,4096,16384] [--chain 200]
"""

from __future__ import annotations

import argparse

import torch

from duo_qserve.bench.common import bench_graph, gpu_header, write_result


def chain_calls(n_bytes: int, chain: int) -> list:
    """``chain`` dependent copies of ``n_bytes`` each: every copy reads the buffer the previous one wrote."""
    a = torch.zeros(max(n_bytes // 2, 1), dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    return [lambda s=src, d=dst: d.copy_(s) for src, dst in [(a, b), (b, a)] * (chain // 2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sizes-kb", default="4,64,256,1024,4096,16384")
    p.add_argument("--chain", type=int, default=200)
    a = p.parse_args(argv)
    device, date, copy = gpu_header()
    rows = []
    for kb in [int(s) for s in a.sizes_kb.split(",")]:
        n = kb * 1024
        us = bench_graph(chain_calls(n, a.chain)) * 1000
        gbps = 2 * n / (us * 1e-6) / 1e9  # read + write
        rows.append({"kb": kb, "us_per_kernel": us, "GBps": gbps, "of_copy_ceiling": gbps / copy})
        print(
            f"{kb:>7} KB: {us:7.2f} us per kernel, {gbps:7.0f} GB/s ({gbps / copy:.2f} of copy)", flush=True
        )
    write_result(a.out, "launch-chain", device, date, copy, None, {"chain": a.chain, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
