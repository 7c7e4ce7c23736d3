# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MSR-FC learns convolution from translation-equivariant tasks
#
# Every task is a 1-D convolution y = w * x with its own random 3-tap filter w (k=1 data of
# Table 1). MSR-FC is a fully connected 70 -> 68 layer whose weight is vec(W) = U v with a
# learned U (4760 x 3). MAML adapts only v on each task's one support example; the outer loop
# learns U. If U recovers convolution, span(U) equals the span of the banded Toeplitz basis.
# Set `MSR_NOTEBOOK_STEPS` to change the number of outer steps (the tests use a handful).

# %%
import os
import sys
from pathlib import Path

# synthetic/ (the data generators) is not installed with msr: import it from the repository root
sys.path.insert(0, str(Path(os.environ.get("MSR_REPOSITORY", "..")).resolve()))

import matplotlib.pyplot as plt
import torch

from msr import MAML, MSRLinear, bases, viz
from msr.equivariance import translation_equivariance_error
from msr.recovery import principal_angles, subspace_recall
from synthetic.translation1d import Translation1D

steps = int(os.environ.get("MSR_NOTEBOOK_STEPS", "2000"))
torch.manual_seed(0)
data = Translation1D(k=1, seed=0)
test, test_filters = data.tasks(data.test_indices(100))
maml = MAML(MSRLinear(70, 68, latent=3, bias=False))
optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
sampler = torch.Generator().manual_seed(0)

# %%
for step in range(1, steps + 1):
    optimizer.zero_grad()
    maml.meta_backward(data.sample_train(32, sampler))
    optimizer.step()
    if step % max(1, steps // 4) == 0:
        print(f"step {step}: meta-test MSE {maml.evaluate(test)['loss'].mean():.3f}")

# %% [markdown]
# ## How close is span(U) to convolution?
# Only the span of U is identifiable (U v = (U R)(R^-1 v)), so we compare subspaces: the
# largest principal angle (0 degrees = identical spans) and the recall of the conv basis
# (1 = fully contained; chance is 3/4760).

# %%
U = maml.model.U.detach()
conv_basis = bases.conv1d(70, 3)
angle = principal_angles(U, conv_basis).max().item()
recall = subspace_recall(U, conv_basis)
adapted = maml.adapted_model(test.x_support[0], test.y_support[0])
print(f"largest principal angle {angle:.1f} deg, recall {recall:.3f}")
print(
    f"translation-equivariance error of the adapted W: "
    f"{translation_equivariance_error(adapted.weight):.2e}"
)

# %%
corner = (slice(0, 20), slice(0, 22))  # the top-left 20x22 corner of each 68x70 matrix
panels = [
    (f"U direction {i + 1}", direction[corner])
    for i, (_, direction) in enumerate(viz.sharing_directions(U, (68, 70), 3))
]
panels += [
    ("conv basis (tap 1)", conv_basis[:, 1].view(68, 70)[corner]),
    ("adapted W", adapted.weight[corner]),
    ("true W", data.weights(test_filters[0])[corner]),
]
viz.plot_matrices(panels, f"top-left corner; angle {angle:.1f} deg, recall {recall:.3f}")
plt.show()
