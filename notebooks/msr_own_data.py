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
# # Your data, your network: meta-learning the sharing of a small CNN
#
# A few-shot image data set as you may have it: one folder per class, any number of images
# per class. We build it here from a slice of Omniglot (uneven class sizes on purpose); point
# `TRAIN` and `TEST` at your own folders instead. The network is written by hand from
# `MSRConv2d` layers (a Kronecker-factored learned U per layer), meta-trained with `MAML`, and
# its learned U drawn with `msr.viz`. Set `MSR_NOTEBOOK_STEPS` for the number of outer steps
# (the tests use a handful).

# %%
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from msr import MAML, MSRConv2d, TaskBatchNorm, accuracy, viz
from msr.data import ImageClasses, augment_images, find_omniglot, sample_episodes

# Omniglot by msr's data rule ($MSR_DATA, ~/.cache/msr: `python -m msr.data.omniglot download`),
# or the development copy beside this repository
repository = Path(os.environ.get("MSR_REPOSITORY", "..")).resolve()

steps = int(os.environ.get("MSR_NOTEBOOK_STEPS", "300"))
torch.manual_seed(0)

# %% [markdown]
# ## An image folder tree with uneven classes

# %%
omniglot = np.load(find_omniglot([repository.parent / "shared" / "data"]))["images"]
root = Path(tempfile.mkdtemp(prefix="msr-own-data-"))
TRAIN, TEST = root / "train", root / "test"
count = min(90, len(omniglot))  # characters, each (20, 28, 28): 60 to train on, 30 to test
for split, characters in ((TRAIN, range(0, count * 2 // 3)), (TEST, range(count * 2 // 3, count))):
    for character in characters:
        folder = split / f"character{character:04d}"
        folder.mkdir(parents=True)
        for drawing in range(8 + character % 13):  # 8 to 20 drawings per class
            Image.fromarray(omniglot[character, drawing]).save(folder / f"{drawing:02d}.png")

train = ImageClasses.from_folder(TRAIN, image_size=28, mode="L")
test = ImageClasses.from_folder(TEST, image_size=28, mode="L")
print(train, test, sep="\n")

# %% [markdown]
# ## A hand-written network of MSRConv2d layers, meta-trained with MAML

# %%
ways, shots, queries = 5, 1, 5


def block(cin: int, cout: int) -> list[nn.Module]:
    return [MSRConv2d(cin, cout, 3, padding=1), TaskBatchNorm(cout), nn.ReLU(), nn.MaxPool2d(2)]


model = nn.Sequential(*block(1, 16), *block(16, 16), nn.Flatten(), nn.Linear(16 * 7 * 7, ways))
maml = MAML(model, F.cross_entropy, inner_lr=0.4, batching="loop")
optimizer = torch.optim.Adam(maml.parameters(), lr=1e-3)
generator = torch.Generator().manual_seed(0)
for step in range(1, steps + 1):
    tasks = sample_episodes(train, 8, ways, shots, queries, generator, augment_images)
    optimizer.zero_grad()
    loss = maml.meta_backward(tasks).mean()
    optimizer.step()
    if step % 100 == 0 or step == steps:
        print(f"step {step}: query loss {loss.item():.3f}")

held_out = sample_episodes(test, 100, ways, shots, queries, torch.Generator().manual_seed(1))
scores = maml.evaluate(held_out, {"accuracy": accuracy})["accuracy"]
print(f"meta-test accuracy on unseen classes: {100 * scores.mean().item():.1f}% (chance 20%)")

# %% [markdown]
# ## What sharing did the first layer learn?
#
# Its U is U_out ⊗ U_in ⊗ U_kernel (identity at the start: a plain conv). Each direction of
# span(U) is a whole 16-channel kernel; the figure shows the strongest three.

# %%
first = model[0]
U = first.sharing_matrix().detach()  # U_out ⊗ U_in ⊗ U_kernel, built for this look
viz.plot_conv_directions(U, (16, 1, 3, 3), "first layer: strongest directions of span(U)")
kernel_singular = torch.linalg.svdvals(first.U_kernel.detach())
print("singular values of U_kernel:", " ".join(f"{v:.2f}" for v in kernel_singular))
