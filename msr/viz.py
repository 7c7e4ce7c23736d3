"""Figures of a learned sharing matrix U and of the weights it makes (needs matplotlib).

Only span(U) is identifiable (U v = (U R)(R^-1 v)), so U is shown through its left singular
vectors, strongest first: each, reshaped to the layer's weight, is one sharing pattern. For a
linear layer a pattern is an (out, in) matrix; for a conv layer it is a kernel, drawn as one
small filter per output channel (a group convolution shows one filter turning across a field).
Every function returns a matplotlib ``Figure``; ``save`` writes one and closes it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from msr._files import write_atomically
from msr.layers import MSRConv2d, MSRLinear, SymmetryLayer

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def sharing_directions(U: Tensor, shape: Sequence[int], count: int) -> list[tuple[float, Tensor]]:
    """The ``count`` strongest directions of span(U) as (singular value, weight of ``shape``)."""
    left, singular, _ = torch.linalg.svd(U.detach().double().cpu(), full_matrices=False)
    return [(float(singular[i]), left[:, i].view(*shape)) for i in range(min(count, U.shape[1]))]


def plot_matrices(
    panels: Sequence[tuple[str, Tensor]],
    title: str,
    xlabel: str = "input position",
    ylabel: str = "output position",
) -> Figure:
    """A row of heatmaps of 2-D matrices, each on a symmetric colour scale around zero."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], panels, strict=True):
        matrix = matrix.detach().cpu().float()
        limit = float(matrix.abs().max()) or 1.0
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sharing(
    U: Tensor | None,
    adapted_weight: Tensor,
    true_weight: Tensor | None = None,
    title: str = "",
    count: int = 4,
) -> Figure:
    """A linear layer: the ``count`` strongest directions of span(U) as weight matrices, then
    the weight adapted to a task and (if given) that task's true weight."""
    shape = tuple(adapted_weight.shape)
    panels = []
    if U is not None:
        panels = [
            (f"U direction {i + 1} (s.v. {value:.2g})", direction)
            for i, (value, direction) in enumerate(sharing_directions(U, shape, count))
        ]
    panels.append(("adapted W (test task)", adapted_weight))
    if true_weight is not None:
        panels.append(("true W (test task)", true_weight))
    return plot_matrices(panels, title)


def layer_directions(layer: SymmetryLayer, count: int) -> list[tuple[float, Tensor]]:
    """``sharing_directions`` of any MSR layer, each shaped as its weight. For a Kronecker
    ``MSRConv2d`` they come from the SVDs of its three factors (the singular vectors of
    U_out (x) U_in (x) U_kernel are the Kronecker products of theirs, the singular values the
    products), so its dense U, (out*in*kh*kw)^2 entries, is never built."""
    shape = tuple(layer.weight.shape)
    if not getattr(layer, "kronecker", False):
        return sharing_directions(layer.sharing_matrix(), shape, count)
    factors = [torch.linalg.svd(f.detach().double().cpu()) for f in layer.kronecker_factors()]
    values = torch.einsum("a,b,c->abc", *(singular for _, singular, _ in factors))
    top = values.flatten().topk(min(count, values.numel())).indices
    directions = []
    for a, b, c in zip(*torch.unravel_index(top, values.shape), strict=True):
        (u_out, _, _), (u_in, _, _), (u_kernel, _, _) = factors
        direction = torch.kron(torch.kron(u_out[:, a], u_in[:, b]), u_kernel[:, c])
        directions.append((float(values[a, b, c]), direction.view(shape)))
    return directions


def plot_layer(layer: SymmetryLayer, title: str | None = None, count: int = 4) -> Figure:
    """The figure of any MSR layer's learned sharing: ``plot_sharing`` of an ``MSRLinear``
    (its current weight beside the directions; an identity U has none worth drawing),
    ``plot_conv_directions`` of an ``MSRConv2d``; titled by the layer unless ``title``."""
    title = repr(layer) if title is None else title
    if isinstance(layer, MSRLinear):
        U = None if layer.U is None else layer.U
        return plot_sharing(U, layer.weight.detach(), title=title, count=count)
    if isinstance(layer, MSRConv2d):
        kernel_shape = tuple(layer.weight.shape)
        return plot_conv_directions(None, kernel_shape, title, count, layer=layer)
    raise TypeError(f"plot_layer draws MSRLinear and MSRConv2d layers, not {type(layer).__name__}")


def plot_conv_directions(
    U: Tensor | None,
    kernel_shape: Sequence[int],
    title: str = "",
    count: int = 3,
    channels: int = 8,
    in_channel: int = 0,
    *,
    layer: MSRConv2d | None = None,
) -> Figure:
    """A conv layer: each of the ``count`` strongest directions of span(U) as a kernel of
    ``kernel_shape`` (out, in, kh, kw), one row per direction with its colour bar, the filters
    of the first ``channels`` output channels (input channel ``in_channel``) along it. Give
    ``layer`` instead of ``U`` to take the directions from it (``layer_directions``)."""
    plt = _pyplot()
    if (U is None) == (layer is None):
        raise ValueError("give the sharing matrix U or the layer, not both or neither")
    if layer is None:
        directions = sharing_directions(U, kernel_shape, count)
    else:
        directions = layer_directions(layer, count)
    shown = min(channels, kernel_shape[0])
    fig, axes = plt.subplots(
        len(directions), shown, figsize=(1.1 * shown + 0.5, 1.2 * len(directions) + 0.6),
        squeeze=False,
    )  # fmt: skip
    for row, (value, kernel) in enumerate(directions):
        limit = float(kernel.abs().max()) or 1.0
        for channel in range(shown):
            ax = axes[row, channel]
            filt = kernel[channel, in_channel].float().numpy()
            image = ax.imshow(filt, cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"channel {channel}", fontsize=7)
        axes[row, 0].set_ylabel(f"dir. {row + 1}\ns.v. {value:.2g}", fontsize=7)
        colorbar = fig.colorbar(image, ax=axes[row, -1], fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=6)
    fig.suptitle("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.supxlabel(f"output channel (input channel {in_channel})", fontsize=8)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (folders created; the format from its suffix) and close it.

    Atomic: the figure goes to a temporary file beside ``path``, synced, then renamed over it,
    so a reader never sees a half-written image and a failed write (e.g. a full disk) leaves any
    earlier ``path`` as it was and no temporary file; the ``OSError`` is raised. The file's mode
    follows the umask, like any file ``open`` creates."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(
            path, lambda stream: fig.savefig(stream, dpi=dpi, format=path.suffix[1:] or None)
        )
    finally:
        _pyplot().close(fig)
    return path


def _pyplot():  # the module, imported only when a figure is drawn
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "msr.viz draws with matplotlib, which msr does not require: "
            "pip install matplotlib (or msr-symmetry[experiments])"
        ) from error
    return plt
