"""Fixed sharing matrices U (vec(W) = U v) for the baselines and for scoring learned symmetries.

Every basis is a dense ``(numel(W), latent)`` matrix in the row-major ``vec`` of the weight it
builds: ``(out, in)`` for a linear layer and ``(out, in, k, k)`` for a 2-D conv kernel.
The MAML baselines are ``MSRLinear``/``MSRConv2d`` with one of these frozen as U.
Each is built on the CPU (exactly, in float64 where it matters) and returned on ``device``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from msr.groups import Group, get_group
from msr.validation import check_positive_int

Device = torch.device | str | None


def identity(size: int, device: Device = None) -> Tensor:
    """U = I: every weight is free (MAML-FC)."""
    check_positive_int("size", size)
    return torch.eye(size, device=device)


def conv1d(in_length: int, kernel_size: int, device: Device = None) -> Tensor:
    """Banded Toeplitz basis of a single-channel 'valid' 1-D cross-correlation (MAML-Conv).

    Column j ties every W[p, p + j] together: y[p] = sum_j v[j] x[p + j], as ``nn.Conv1d``.
    Shape ``((in_length - k + 1) * in_length, k)``.
    """
    out_length = _valid_length(in_length, kernel_size)
    basis = torch.zeros(out_length, in_length, kernel_size, device="cpu")
    rows = torch.arange(out_length, device="cpu")
    for j in range(kernel_size):
        basis[rows, rows + j, j] = 1.0
    return basis.reshape(out_length * in_length, kernel_size).to(device)


def locally_connected1d(in_length: int, kernel_size: int, device: Device = None) -> Tensor:
    """Basis of a single-channel 'valid' 1-D locally connected layer (MAML-LC).

    Column ``p * k + j`` is the lone weight W[p, p + j]: each output position has its own filter.
    Shape ``((in_length - k + 1) * in_length, (in_length - k + 1) * k)``.
    """
    out_length = _valid_length(in_length, kernel_size)
    basis = torch.zeros(out_length, in_length, out_length, kernel_size, device="cpu")
    rows = torch.arange(out_length, device="cpu")
    for j in range(kernel_size):
        basis[rows, rows + j, rows, j] = 1.0
    return basis.reshape(out_length * in_length, out_length * kernel_size).to(device)


def group_conv2d(
    group: str, in_channels: int, filters: int, kernel_size: int, device: Device = None
) -> Tensor:
    """Basis of an exact lifting group convolution of free filters for C4, D4 (or C2, D2, D1).

    The free parameters are ``filters`` kernels of shape (in_channels, k, k). Output channel
    ``f * |G| + h`` uses free kernel f transformed by group element h, so the layer maps images
    to regular feature maps and is exactly equivariant (see ``msr.groups.Group.act_regular``).
    Shape ``(filters * |G| * in_channels * k * k, filters * in_channels * k * k)``.
    """
    grp = get_group(group)
    if len(grp.grid_elements) != grp.order:
        raise ValueError(
            f"group_conv2d copies free filters exactly on the pixel grid, which {grp.name} cannot "
            "do; use steerable_lifting2d for its band-limited steerable basis"
        )
    for name, value in (("in_channels", in_channels), ("filters", filters)):
        check_positive_int(name, value)
    check_positive_int("kernel_size", kernel_size)
    latent = filters * in_channels * kernel_size**2
    free = torch.eye(latent, device="cpu").T.reshape(
        latent, filters, 1, in_channels, kernel_size, kernel_size
    )
    copies = torch.cat([grp.transform(free, h) for h in range(grp.order)], dim=2)
    return copies.reshape(latent, -1).T.contiguous().to(device)


def _valid_length(in_length: int, kernel_size: int) -> int:
    check_positive_int("in_length", in_length)
    check_positive_int("kernel_size", kernel_size)
    if kernel_size > in_length:
        raise ValueError(f"kernel_size={kernel_size} is larger than in_length={in_length}")
    return in_length - kernel_size + 1


@dataclass(frozen=True)
class SteerableBasis:
    """A band-limited steerable lifting convolution: its basis and e2cnn's coefficient scale.

    ``basis``: ``(fields * |G| * k * k, fields * dim)``, the vec of the ``(fields * |G|, 1, k, k)``
    kernel; field f owns channels ``f * |G| .. f * |G| + |G| - 1`` and columns ``f * dim ..``.
    ``coefficient_std``: ``(fields * dim,)``, e2cnn's generalized He init, so that
    ``basis @ (coefficient_std * N(0, I))`` is distributed as an initialized ``R2Conv`` kernel.
    ``filter_basis``: ``(k * k, dim)``, each column's filter at the identity channel; its span is
    the band-limited filter space (every channel h is that filter rotated/reflected by h).
    """

    basis: Tensor
    coefficient_std: Tensor
    filter_basis: Tensor


def steerable_lifting2d(
    group: str, fields: int, kernel_size: int, device: Device = None
) -> SteerableBasis:
    """e2cnn's basis of a lifting convolution from one trivial field to ``fields`` regular fields.

    For C_N or D_N (``"c8"``, ``"d8"``, any N) and odd ``kernel_size``, with e2cnn 0.2.3's default
    settings: Gaussian rings at radii 0, 1, .., k // 2 (widths 0.005 at the centre, 0.6, and 0.4
    for the outermost ring), angular frequencies up to its default band limit per ring, each
    element normalized and mapped to the regular representation as e2cnn does. Only the column
    order may differ from e2cnn's. The span is exactly the set of band-limited kernels with
    k_h(x) = k_e(h^-1 x): channel h of a field is the identity channel's filter moved by h, so
    rotations by other than 90 degrees act on the continuous filter, not on pixels.
    """
    grp = get_group(group)
    check_positive_int("fields", fields)
    check_positive_int("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"kernel_size must be odd (the grid needs a centre pixel), got {kernel_size}"
        )
    points = _grid_points(kernel_size)  # (2, k * k)
    elements = _band_limited_elements(grp, kernel_size)
    moved = torch.einsum("hij,jp->hip", grp.matrices[grp.inverse], points)  # h^-1 x_p
    columns, stds, filters = [], [], []
    for element in elements:
        values = element.sample(moved.transpose(0, 1).reshape(2, -1))  # (size, |G| * k * k)
        columns.append(values[element.component] * element.scale)
        filters.append(columns[-1][: kernel_size**2])  # channel 0 is the identity
        stds.append(element.std)
    field = torch.stack(columns, dim=1)  # (|G| * k * k, dim)
    dtype = torch.get_default_dtype()
    return SteerableBasis(
        basis=torch.block_diag(*[field] * fields).to(device, dtype),
        coefficient_std=torch.tensor(stds * fields, dtype=dtype, device=device),
        filter_basis=torch.stack(filters, dim=1).to(device, dtype),
    )


def _grid_points(kernel_size: int) -> Tensor:
    """(x, y-up) coordinates of the kernel's pixels in row-major order, centred (e2cnn's grid)."""
    centre = (kernel_size - 1) / 2
    rows, cols = torch.meshgrid(
        torch.arange(kernel_size, dtype=torch.float64, device="cpu"),
        torch.arange(kernel_size, dtype=torch.float64, device="cpu"),
        indexing="ij",
    )
    return torch.stack([cols.flatten() - centre, centre - rows.flatten()])


@dataclass
class _Harmonic:
    """One basis element: a Gaussian ring times an angular harmonic, valued in an irrep.

    Component c of the element is G(|x|) cos(frequency (angle(x) - axis) + phase - c pi/2) for
    an irrep of ``size`` 2 (c = 0, 1), or its c = 0 component for size 1; frequencies other than
    0 vanish at the origin. In the regular representation, copy ``component`` of the irrep puts
    sqrt(size / |G|) times that component on the identity channel (e2cnn's change of basis).
    """

    radius: float
    sigma: float
    frequency: int
    phase: float
    axis: float
    size: int
    component: int
    copy: tuple[int, int]  # (irrep, copy): the output position that e2cnn's He init counts
    scale: float = 1.0
    std: float = 1.0

    def sample(self, points: Tensor) -> Tensor:
        """The ``(size, P)`` values at ``points`` (2, P), before normalization."""
        radii = points.norm(dim=0)
        origin = radii < 1e-9
        angles = torch.where(origin, 0.0, torch.atan2(points[1], points[0])) - self.axis
        ring = torch.exp(-0.5 * (radii - self.radius) ** 2 / self.sigma**2)
        if self.frequency != 0:
            ring = torch.where(origin, 0.0, ring)
        phases = self.frequency * angles + self.phase
        components = [torch.cos(phases), torch.sin(phases)][: self.size]
        return torch.stack(components) * ring


def _band_limited_elements(group: Group, kernel_size: int) -> list[_Harmonic]:
    """e2cnn's trivial -> regular basis elements of one field, normalized, with their He std."""
    max_radius = kernel_size // 2
    radii = [float(r) for r in range(max_radius + 1)]
    sigmas = [0.005 if r == 0 else 0.4 if r == max_radius else 0.6 for r in radii]

    def cutoff(r: float) -> float:  # e2cnn's default band limit (_manual_fco1)
        return 0 if r == 0 else min(2 * r, 2 if r == max_radius else 2 * r - (r + 1) % 2)

    max_frequency = int(max(cutoff(r) for r in radii))
    points = _grid_points(kernel_size)
    elements = []
    for radius, sigma in zip(radii, sigmas, strict=True):
        for irrep, (size, harmonics, copies) in enumerate(_regular_irreps(group, max_frequency)):
            for copy in range(copies):
                for frequency, phase in harmonics:
                    if abs(frequency) > cutoff(radius):
                        continue
                    element = _Harmonic(
                        radius, sigma, frequency, phase, _axis(group), size, copy, (irrep, copy)
                    )
                    # e2cnn normalizes the irrep-valued samples to a squared norm of ``size``
                    norm = math.sqrt(float(element.sample(points).square().sum()) / size)
                    if norm < 1e-6:  # e2cnn drops elements that vanish on the grid
                        continue
                    element.scale = math.sqrt(size / group.order) / norm
                    elements.append(element)
    for element in elements:
        count = sum(other.copy == element.copy for other in elements)
        element.std = 1.0 / math.sqrt(count)
    return elements


def _axis(group: Group) -> float:
    return group.axis if group.reflections else 0.0


def _regular_irreps(
    group: Group, max_frequency: int
) -> list[tuple[int, list[tuple[int, float]], int]]:
    """(size, trivial -> irrep harmonics as (frequency, phase), multiplicity in the regular
    representation) for each real irrep of ``group``, as in e2cnn's irreps bases."""
    n = group.rotations

    def aliases(base: int, non_negative: bool) -> list[int]:
        """base + t N for every integer t with |frequency| <= max_frequency (and >= 0)."""
        low = 0 if non_negative else -max_frequency
        first, last = math.ceil((low - base) / n), math.floor((max_frequency - base) / n)
        return [base + t * n for t in range(first, last + 1)]

    def one_dimensional(base: int, phases: tuple[float, ...]) -> list[tuple[int, float]]:
        return [
            (mu, phase)
            for phase in phases
            for mu in aliases(base, non_negative=True)
            if mu > 0 or phase == 0.0
        ]

    rotation_frequencies = range(1, (n + 1) // 2)  # the 2-dimensional irreps
    halves = [0, n // 2] if n % 2 == 0 else [0]
    if not group.reflections:
        irreps = [(1, one_dimensional(m, (0.0, math.pi / 2)), 1) for m in halves]
        irreps += [
            (2, [(mu, g) for g in (0.0, math.pi / 2) for mu in aliases(k, False)], 1)
            for k in rotation_frequencies
        ]
    else:
        irreps = [
            (1, one_dimensional(m, (flip * math.pi / 2,)), 1) for m in halves for flip in (0, 1)
        ]
        irreps += [(2, [(mu, 0.0) for mu in aliases(k, False)], 2) for k in rotation_frequencies]
    return [irrep for irrep in irreps if irrep[1]]
