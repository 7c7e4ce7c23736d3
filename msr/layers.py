"""Layers whose weight is reparameterized by a sharing matrix: vec(W) = U v.

U (the symmetry) is an outer-loop-only *meta* parameter; v and the bias are *fast* parameters
that a MAML inner loop adapts per task (their initial values are meta-learned too). A frozen U
(a buffer, not a parameter) turns the same layer into a fixed architecture: the MAML baselines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msr.validation import check_positive_int, check_shape


class SymmetryLayer(nn.Module):
    """Base class: names which of a layer's own parameters are meta (outer-loop only)."""

    meta_names: tuple[str, ...] = ()

    def meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The learnable symmetry parameters (never adapted by the inner loop)."""
        for name, param in self.named_parameters(recurse=False):
            if name in self.meta_names:
                yield name, param

    def fast_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters the inner loop adapts (v and the bias)."""
        for name, param in self.named_parameters(recurse=False):
            if name not in self.meta_names:
                yield name, param

    def sharing_matrix(self) -> Tensor:
        """The layer's U as one dense ``(numel(W), latent)`` matrix, vec(W) = U v with W
        flattened in its own (row-major) order; built on demand where U is stored implicitly,
        differentiable in the stored parameters (``.detach()`` it to inspect)."""
        raise NotImplementedError(f"{type(self).__name__} does not say its sharing matrix")

    def _register_symmetry(self, name: str, value: Tensor | None, learn: bool) -> None:
        if learn and value is not None:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)


def _column_major(U: Tensor) -> Tensor:
    """A copy of a dense (numel, latent) U stored column-major (U^T contiguous).

    With this layout the small latent dimension is the row count of every product in W = U v
    and its gradients, shapes on which BLAS is 3-6x faster than on row-major (numel, latent)
    (measured: latent 3, 32 vmapped tasks; see benchmarks/meta_step.py).
    """
    return U.t().clone(memory_format=torch.contiguous_format).t()


def _expand(U: Tensor, v: Tensor) -> Tensor:
    """vec(W) = U v, written as v U^T so that the products suit ``_column_major`` storage."""
    return F.linear(v, U)


def kronecker_sharing(U_out: Tensor, U_in: Tensor, U_kernel: Tensor) -> Tensor:
    """U = U_out (x) U_in (x) U_kernel: the dense sharing matrix of a Kronecker-factored conv
    layer, rows in vec(kernel) order (out, in, pixel). It has (out * in * kh * kw)^2 entries,
    so it is for inspecting small layers; ``MSRConv2d.weight`` never builds it."""
    return torch.kron(torch.kron(U_out, U_in), U_kernel)


def _init_bias(out_features: int, fan_in: int, bias: bool) -> nn.Parameter | None:
    if not bias:
        return None
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))


class MSRLinear(SymmetryLayer):
    """Linear layer with W = reshape(U v, (out_features, in_features)).

    U has shape ``(out_features * in_features, latent)``; by default it is learned and starts as
    N(0, 0.01^2), with v ~ N(0, (1/out_features)^2) (the paper's init). Pass ``U`` to start from
    a given sharing pattern and ``learn_U=False`` to freeze it (e.g. ``msr.bases.conv1d``).
    ``U="identity"`` (frozen) is MAML-FC without materializing the identity: v is vec(W).
    """

    meta_names = ("U",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        latent: int,
        bias: bool = True,
        *,
        U: Tensor | Literal["identity"] | None = None,
        learn_U: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.latent = check_positive_int("latent", latent)
        numel = in_features * out_features
        if isinstance(U, str):
            if U != "identity" or learn_U or latent != numel:
                raise ValueError(
                    f"U={U!r} needs U='identity', learn_U=False and latent={numel} "
                    f"(got learn_U={learn_U}, latent={latent})"
                )
            U = None
        elif U is None:
            U = torch.randn(numel, latent) * 0.01
        else:
            check_shape("U (out_features * in_features, latent)", U, (numel, latent))
            U = U.detach().float()
        # None (a frozen identity) stays None
        self._register_symmetry("U", None if U is None else _column_major(U), learn_U)
        self.v = nn.Parameter(torch.randn(latent) / out_features)
        self.bias = _init_bias(out_features, in_features, bias)

    @classmethod
    def from_basis(
        cls,
        basis: Tensor,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        learn_U: bool = False,
    ) -> MSRLinear:
        """Layer whose U is ``basis`` (frozen unless ``learn_U``), e.g. MAML-Conv or MAML-LC."""
        if basis.dim() != 2:
            raise ValueError(f"basis must be 2-D (numel, latent), got shape {tuple(basis.shape)}")
        return cls(in_features, out_features, basis.shape[1], bias, U=basis, learn_U=learn_U)

    @classmethod
    def fully_connected(cls, in_features: int, out_features: int, bias: bool = False) -> MSRLinear:
        """MAML-FC: U frozen at the (never materialized) identity, so v = vec(W)."""
        return cls(
            in_features,
            out_features,
            in_features * out_features,
            bias,
            U="identity",
            learn_U=False,
        )

    @property
    def weight(self) -> Tensor:
        """The effective weight W = reshape(U v)."""
        return self.weight_from({"U": self.U, "v": self.v})

    def weight_from(self, tensors: Mapping[str, Tensor | None]) -> Tensor:
        """The weight that ``tensors`` ("v", and "U" unless it is the identity) make; a v with
        leading task dimensions gives one weight per task (``msr.grouped``)."""
        v, U = tensors["v"], tensors.get("U")
        flat = v if U is None else _expand(U, v)
        return flat.view(*v.shape[:-1], self.out_features, self.in_features)

    def sharing_matrix(self) -> Tensor:
        """U, ``(out_features * in_features, latent)``; MAML-FC's identity is built here (a
        ``numel x numel`` matrix), never in the forward pass."""
        if self.U is None:
            numel = self.out_features * self.in_features
            return torch.eye(numel, dtype=self.v.dtype, device=self.v.device)
        return self.U

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        sharing = "identity" if self.U is None else f"latent={self.latent}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {sharing}, "
            f"bias={self.bias is not None}, learn_U={isinstance(self.U, nn.Parameter)}"
        )


def _pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    for item in pair:
        check_positive_int(name, item)
    return pair  # type: ignore[return-value]


class MSRConv2d(SymmetryLayer):
    """Conv2d with kernel W' = W x1 U_out x2 U_in x3 U_kernel, i.e. U = U_out (x) U_in (x) U_kernel.

    v (``self.v``, shape ``(out, in, kh, kw)``) is the conv kernel; the three square factors are
    identity-initialized, so the layer starts as a plain convolution, and the full
    ``(out*in*kh*kw)^2`` U is never built in the forward pass (``layer.U`` and
    ``sharing_matrix()`` build it on demand, for inspecting small layers). ``learn_U=False``
    freezes the factors (MAML-Conv).
    ``MSRConv2d.from_basis`` instead takes a dense U, e.g. a C4/D4 group-convolution basis.
    """

    meta_names = ("U_out", "U_in", "U_kernel", "U")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        learn_U: bool = True,
        basis: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.dilation = _pair("dilation", dilation)
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        if len(pad) != 2 or any(not isinstance(p, int) or p < 0 for p in pad):
            raise ValueError(f"padding must be a non-negative int or pair, got {padding!r}")
        self.padding = pad
        kernel_numel = self.kernel_size[0] * self.kernel_size[1]
        fan_in = in_channels * kernel_numel
        bound = 1.0 / math.sqrt(fan_in)
        self.kronecker = basis is None
        if self.kronecker:
            self._register_symmetry("U_out", torch.eye(out_channels), learn_U)
            self._register_symmetry("U_in", torch.eye(in_channels), learn_U)
            self._register_symmetry("U_kernel", torch.eye(kernel_numel), learn_U)
            shape: tuple[int, ...] = (out_channels, in_channels, *self.kernel_size)
        else:
            numel = out_channels * fan_in
            if basis.dim() != 2 or basis.shape[0] != numel:
                raise ValueError(
                    f"basis must have shape ({numel}, latent) for a "
                    f"{out_channels}x{in_channels}x{self.kernel_size} kernel, "
                    f"got {tuple(basis.shape)}"
                )
            self._register_symmetry("U", _column_major(basis.detach().float()), learn_U)
            shape = (basis.shape[1],)
        self.v = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = _init_bias(out_channels, fan_in, bias)

    @classmethod
    def from_basis(
        cls,
        basis: Tensor,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        learn_U: bool = False,
        **conv_kwargs: object,
    ) -> MSRConv2d:
        """Conv layer with a dense U = ``basis`` (frozen unless ``learn_U``)."""
        return cls(
            in_channels, out_channels, kernel_size, basis=basis, learn_U=learn_U, **conv_kwargs
        )

    @property
    def weight(self) -> Tensor:
        """The effective conv kernel, shape ``(out, in, kh, kw)``."""
        names = ("U_out", "U_in", "U_kernel") if self.kronecker else ("U",)
        return self.weight_from({name: getattr(self, name) for name in (*names, "v")})

    def weight_from(self, tensors: Mapping[str, Tensor | None]) -> Tensor:
        """The kernel that ``tensors`` (v and the U factors, or the dense U) make; a v with
        leading task dimensions gives one kernel per task (``msr.grouped``)."""
        v = tensors["v"]
        lead = v.shape[: v.dim() - (4 if self.kronecker else 1)]
        shape = (*lead, self.out_channels, self.in_channels, *self.kernel_size)
        if not self.kronecker:
            return _expand(tensors["U"], v).view(shape)
        kernel = v.flatten(-2)  # (..., out, in, kh*kw); contract one factor at a time
        kernel = torch.einsum("ao,...oik->...aik", tensors["U_out"], kernel)
        kernel = torch.einsum("bi,...aik->...abk", tensors["U_in"], kernel)
        kernel = torch.einsum("ck,...abk->...abc", tensors["U_kernel"], kernel)
        return kernel.reshape(shape)

    def kronecker_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U_out, U_in, U_kernel) of a Kronecker layer: U is their Kronecker product."""
        if not self.kronecker:
            raise AttributeError("a dense-U MSRConv2d has no Kronecker factors")
        return self.U_out, self.U_in, self.U_kernel

    def sharing_matrix(self) -> Tensor:
        """U, ``(out * in * kh * kw, latent)``: the dense basis, or ``kronecker_sharing`` of
        the three factors (latent = numel; built on demand, small layers only)."""
        if not self.kronecker:
            return self.U
        return kronecker_sharing(self.U_out, self.U_in, self.U_kernel)

    def __getattr__(self, name: str) -> object:
        """``U`` of a Kronecker layer: ``sharing_matrix()``, built on each access (read-only;
        the stored tensors are ``U_out``, ``U_in`` and ``U_kernel``), so that ``layer.U`` means
        the same on every layer."""
        if name == "U" and self.__dict__.get("kronecker"):
            return self.sharing_matrix()
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "U" and self.__dict__.get("kronecker"):
            raise AttributeError(
                "U of a Kronecker MSRConv2d is read-only (built from U_out, U_in, U_kernel)"
            )
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"U={'kronecker' if self.kronecker else 'dense'}, "
            f"learn_U={any(True for _ in self.meta_parameters())}"
        )
