# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A 2-D MSR-Conv layer learns C4 group convolution
#
# Every task is a lifting C4 group convolution: 3 free 3x3 filters, each copied at the four
# quarter turns, give 12 output channels (Table 2 data, exact on the pixel grid). The layer is
# an `MSRConv2d` with a dense learned U (108 x 27): MAML adapts the 27 free weights v, the outer
# loop learns U. We score span(U) against the group-convolution basis and the equivariance of
# the adapted layer, beside a plain conv (U frozen at the identity).
# Set `MSR_NOTEBOOK_STEPS` to change the number of outer steps (the tests use a handful).

# %%
import os

import matplotlib.pyplot as plt
import torch

from experiments.rotation import adapted_equivariance_error, build_model
from experiments.training import TrainConfig, build_maml
from msr.symmetry import energy_share, principal_angles
from synthetic.rotation2d import Rotation2D

steps = int(os.environ.get("MSR_NOTEBOOK_STEPS", "600"))
torch.manual_seed(0)
data = Rotation2D(group_name="c4", seed=0)
test, _ = data.tasks(data.test_indices(50))
# The MSE averages over 12 x 30 x 30 outputs, so the useful inner step is large: start it at 6.
config = TrainConfig(steps=steps, eval_every=steps, inner_lr=6.0)
learners = {
    name: build_maml(build_model(name, data), config) for name in ("MSR-Conv-dense", "MAML-Conv")
}

# %%
sampler = torch.Generator().manual_seed(0)
optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in learners.items()}
for _ in range(steps):
    batch = data.sample_train(32, sampler)
    for name, maml in learners.items():
        optimizers[name].zero_grad()
        maml.meta_backward(batch)
        optimizers[name].step()
for name, maml in learners.items():
    mse = maml.evaluate(test)["loss"].mean().item()
    error = adapted_equivariance_error(maml, data, test)
    print(f"{name:15s} meta-test MSE {mse:.4f}, equivariance error of adapted layer {error:.2e}")

# %% [markdown]
# ## Is span(U) the group-convolution basis?

# %%
U = learners["MSR-Conv-dense"].model.U.detach()
angle = principal_angles(U, data.basis).max().item()
share = energy_share(U, data.basis)
print(
    f"largest principal angle {angle:.1f} deg; energy of U inside the basis {share:.3f} "
    f"(chance {1 / data.group.order:.2f})"
)

# %%
# Each column of U is a full 12-channel kernel; a direction of span(U) that is a group
# convolution shows the same 3x3 pattern turned by 90 degrees across each block of 4 channels.
left, _, _ = torch.linalg.svd(U, full_matrices=False)
fig, axes = plt.subplots(3, 12, figsize=(12, 3.3))
for row in range(3):
    kernels = left[:, row].view(12, 3, 3)
    limit = float(kernels.abs().max())
    for channel in range(12):
        axes[row, channel].imshow(kernels[channel], cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[row, channel].axis("off")
fig.suptitle("top 3 directions of span(U): 12 output channels each (filter f, turn h)")
plt.show()
