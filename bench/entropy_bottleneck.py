"""Entropy bottleneck step cost: ours against the two-pass formulation and a broadcast one.

The per-channel cumulative density (Ballé et al.) chains tiny (out × in ≤ 3 × 3) maps per
channel. CompressAI evaluates it as a batched matmul over C channels on a (C, 1, N) layout,
once per bin edge (two passes); ours does the same matmul once on both edges concatenated.
A broadcast multiply-and-sum on an (N, C) layout is the other obvious alternative. Same
math (checked here), one run, same inputs; forward + backward of the rate of an
RDM-bank-sized latent.

    uv run python bench/entropy_bottleneck.py   # → bench/results/entropy_bottleneck.json
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from bench._common import RESULTS, machine_info, median, write_result
from pipeline.rd import EntropyBottleneck


def matmul_bits(eb: EntropyBottleneck, v: torch.Tensor) -> torch.Tensor:
    """Reference: CompressAI-style (C, 1, N) batched matmul, two passes."""

    def cumulative(x: torch.Tensor) -> torch.Tensor:
        logits = x
        for k, (matrix, bias) in enumerate(zip(eb.matrices, eb.biases, strict=True)):
            logits = torch.matmul(F.softplus(matrix), logits) + bias
            if k < len(eb.factors):
                logits = logits + torch.tanh(eb.factors[k]) * torch.tanh(logits)
        return logits

    x = v.t().unsqueeze(1)
    lower, upper = cumulative(x - 0.5), cumulative(x + 0.5)
    sign = -torch.sign(lower + upper).detach()
    lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).clamp_min(eb.likelihood_bound)
    return -torch.log2(lik).sum((0, 1))


def broadcast_bits(eb: EntropyBottleneck, v: torch.Tensor) -> torch.Tensor:
    """Alternative: (N, C) layout, multiply-and-sum over the input width, one pass."""
    logits = torch.cat([v - 0.5, v + 0.5]).unsqueeze(-1)
    for k, (matrix, bias) in enumerate(zip(eb.matrices, eb.biases, strict=True)):
        logits = (F.softplus(matrix) * logits.unsqueeze(-2)).sum(-1) + bias.squeeze(-1)
        if k < len(eb.factors):
            logits = logits + torch.tanh(eb.factors[k]).squeeze(-1) * torch.tanh(logits)
    lower, upper = logits.squeeze(-1).chunk(2)
    sign = -torch.sign(lower + upper).detach()
    lik = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).clamp_min(eb.likelihood_bound)
    return -torch.log2(lik).sum(-1)


def ours_bits(eb: EntropyBottleneck, v: torch.Tensor) -> torch.Tensor:
    return -torch.log2(eb.likelihood(v)).sum(-1)


def time_step(fn, eb: EntropyBottleneck, v: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        eb.zero_grad(set_to_none=True)
        fn(eb, v).mean().backward()
        times.append(time.perf_counter() - began)
    return median(times[1:])


@click.command()
@click.option("--channels", default=3 * 512, show_default=True, help="Latent channels (M RDMs × h).")
@click.option("--batch", default=512, show_default=True)
@click.option("--repeats", default=11, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "entropy_bottleneck.json",
              show_default=True, help="Result JSON (e.g. a temporary file for a quick check).")
def main(channels: int, batch: int, repeats: int, threads: int, out: Path) -> None:
    torch.set_num_threads(threads)
    eb = EntropyBottleneck(channels, init_scale=1.0, generator=torch.Generator().manual_seed(0))
    v = torch.randn(batch, channels, generator=torch.Generator().manual_seed(1)) * 2 + torch.rand(batch, channels)
    with torch.no_grad():
        diff = max(float((matmul_bits(eb, v) - ours_bits(eb, v)).abs().max()),
                   float((broadcast_bits(eb, v) - ours_bits(eb, v)).abs().max()))
    matmul_s = time_step(matmul_bits, eb, v, repeats)
    broadcast_s = time_step(broadcast_bits, eb, v, repeats)
    ours_s = time_step(ours_bits, eb, v, repeats)
    result = {
        "benchmark": "entropy_bottleneck",
        "machine": machine_info(threads),
        "params": {"channels": channels, "batch": batch, "repeats": repeats, "filters": list(eb.filters)},
        "max_abs_bits_difference": diff,
        "seconds_per_step": {"two_pass_matmul": matmul_s, "broadcast": broadcast_s, "ours_one_pass_matmul": ours_s},
        "speedup_ours_over_two_pass": matmul_s / ours_s,
        "speedup_ours_over_broadcast": broadcast_s / ours_s,
    }
    path = write_result(out, result)
    click.echo(f"per fwd+bwd step: two-pass matmul {matmul_s * 1e3:.1f} ms, broadcast {broadcast_s * 1e3:.1f} ms, "
               f"ours {ours_s * 1e3:.1f} ms (max bits diff {diff:.2e}) → {path}")


if __name__ == "__main__":
    main()
