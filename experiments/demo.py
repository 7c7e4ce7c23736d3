"""Toy demo: meta-train MSRLinear on 1-D convolution tasks and watch the meta-test loss fall."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from msr import MAML, MSRLinear, TaskBatch


def sample_tasks(num_tasks: int, generator: torch.Generator) -> TaskBatch:
    """Tasks y = conv1d(x, w_task) with a random 3-tap filter; 1 support, 19 query examples."""
    x = torch.randn(num_tasks, 20, 1, 30, generator=generator)
    w = torch.randn(num_tasks, 1, 1, 3, generator=generator)
    y = torch.stack([F.conv1d(x[t], w[t]) for t in range(num_tasks)]).squeeze(2)
    x = x.squeeze(2)
    return TaskBatch(x[:, :1], y[:, :1], x[:, 1:], y[:, 1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    test_tasks = sample_tasks(100, generator)
    maml = MAML(MSRLinear(30, 28, latent=3, bias=False))
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    for step in range(args.steps + 1):
        if step % 100 == 0:
            print(f"step {step:4d}  meta-test MSE {maml.evaluate(test_tasks)['loss'].mean():.4f}")
        optimizer.zero_grad()
        maml.meta_backward(sample_tasks(32, generator))
        optimizer.step()


if __name__ == "__main__":
    main()
