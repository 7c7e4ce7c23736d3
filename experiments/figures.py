"""Heatmaps of a learned sharing matrix U and of the weights it produces."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

MAX_U_PANELS = 4


def plot_sharing(
    path: Path, title: str, U: Tensor | None, adapted_weight: Tensor, true_weight: Tensor
) -> None:
    """Save a figure: the top directions of span(U) shown as weight matrices, then W and W*.

    Only span(U) is identifiable (U v = (U R)(R^-1 v)), so U is shown through its left singular
    vectors, strongest first; each reshaped to the weight's shape shows one sharing pattern.
    """
    shape = tuple(adapted_weight.shape)
    adapted_weight, true_weight = adapted_weight.detach().cpu(), true_weight.detach().cpu()
    U = None if U is None else U.detach().cpu()
    panels: list[tuple[str, Tensor]] = []
    if U is not None:
        left, singular, _ = torch.linalg.svd(U.detach().double(), full_matrices=False)
        for i in range(min(MAX_U_PANELS, left.shape[1])):
            panels.append((f"U direction {i + 1} (s.v. {singular[i]:.2g})", left[:, i].view(shape)))
    panels.append(("adapted W (test task)", adapted_weight.detach()))
    panels.append(("true W (test task)", true_weight.detach()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], panels, strict=True):
        limit = float(matrix.abs().max()) or 1.0
        image = ax.imshow(matrix.float().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("input position")
        ax.set_ylabel("output position")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
