"""A reference meta-gradient computed the straightforward way, with ``higher`` (an oracle).

``higher`` (unmaintained, a test dependency of this package) runs a per-task loop through a
differentiable SGD; our ``MAML`` must match it. Used by the tests and the speed benchmark.
"""

from __future__ import annotations

import torch

from msr.episodic import TaskBatch
from msr.maml import MAML


def higher_meta_backward(maml: MAML, tasks: TaskBatch) -> torch.Tensor:
    """Accumulate the meta-gradient of ``maml`` on ``tasks`` via ``higher``; return task losses."""
    import higher  # imported here: only the tests and benchmarks need it

    model = maml.model
    fast = [model.get_parameter(n) for n in maml.fast_names]
    inner_opt = torch.optim.SGD([{"params": [p]} for p in fast], lr=0.1)  # lr overridden below
    losses = []
    for xs, ys, xq, yq in zip(*tasks, strict=True):
        lrs = [maml.inner_lrs[n.replace(".", "__")] for n in maml.fast_names]
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, opt):
            for step in range(maml.inner_steps):
                lr = [lr[step] for lr in lrs] if maml.per_step_inner_lr else lrs
                opt.step(maml.inner_loss_fn(fmodel(xs), ys), override={"lr": lr})
            loss = maml.loss_fn(fmodel(xq), yq)
            (loss / tasks.num_tasks).backward()
            losses.append(loss.detach())
    return torch.stack(losses)
