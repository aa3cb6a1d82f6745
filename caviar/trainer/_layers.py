"""Fused layers and models: K independent members stacked along a leading axis.

Every parameter and buffer has shape ``(K, ...)``; member ``k`` owns slice ``[k]``. Linear layers
run as one batched matmul, conv layers as one grouped convolution (``groups=K``), batch norm
keeps per-member statistics. Layouts:

* MLP activations: ``(K, B, features)`` (a 2-D ``(B, features)`` input is shared by all members).
* CNN activations: ``(B, K * channels, H, W)``, so member ``k`` owns channel block ``k``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._rng import bits16

__all__ = [
    "FusedBatchNorm",
    "FusedCNN",
    "FusedConv2d",
    "FusedLinear",
    "FusedMLP",
    "FusedModel",
    "build_model",
    "fused_dropout",
]


def _init_weight(
    shape: Sequence[int], fan_in: int, fan_out: int, init: str, gen: torch.Generator
) -> torch.Tensor:
    if init == "he":
        return torch.randn(*shape, generator=gen) * math.sqrt(2.0 / fan_in)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape, generator=gen) * 2.0 - 1.0) * bound


class FusedLinear(nn.Module):
    """K independent linear layers: ``y[k] = x[k] @ weight[k] + bias[k]``.

    Args:
        k: Number of members.
        in_features: Input width.
        out_features: Output width.
        bias: Whether to add a bias (off before batch norm, which cancels it).
    """

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(k, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(k, out_features)) if bias else None

    def init_member(self, k: int, init: str, gen: torch.Generator) -> None:
        """Initialise member ``k``'s weights from its own generator; zero its bias."""
        with torch.no_grad():
            w = _init_weight(
                (self.in_features, self.out_features), self.in_features, self.out_features, init, gen
            )
            self.weight[k].copy_(w)
            if self.bias is not None:
                self.bias[k].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(K, B, in)`` (or shared ``(B, in)``) to ``(K, B, out)``."""
        if self.bias is None:
            return torch.matmul(x, self.weight)
        if x.dim() == 2:
            return torch.matmul(x, self.weight) + self.bias.unsqueeze(1)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class FusedConv2d(nn.Module):
    """K independent 3x3 convolutions (padding 1) as one grouped convolution.

    Args:
        k: Number of members.
        in_channels: Input channels per member.
        out_channels: Output channels per member.
        kernel_size: Square kernel size (odd; "same" padding).
        bias: Whether to add a bias (off before batch norm, which cancels it).
    """

    def __init__(
        self, k: int, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(k, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(k, out_channels)) if bias else None

    def init_member(self, k: int, init: str, gen: torch.Generator) -> None:
        """Initialise member ``k``'s kernels from its own generator; zero its bias."""
        area = self.kernel_size**2
        with torch.no_grad():
            shape = self.weight.shape[1:]
            self.weight[k].copy_(
                _init_weight(shape, self.in_channels * area, self.out_channels * area, init, gen)
            )
            if self.bias is not None:
                self.bias[k].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, K * in, H, W)`` to ``(B, K * out, H, W)``."""
        k = self.weight.shape[0]
        weight = self.weight.reshape(
            k * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size
        )
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return F.conv2d(x, weight, bias, padding=self.kernel_size // 2, groups=k)


class FusedBatchNorm(nn.Module):
    """Per-member batch normalisation with per-member running statistics.

    Accepts the MLP layout ``(K, B, C)`` or the CNN layout ``(B, K * C, H, W)``. Training mode
    normalises with the batch statistics (biased variance) and updates the running estimates
    (unbiased variance, momentum 0.1); eval mode uses the running estimates.

    Args:
        k: Number of members.
        num_features: Features (channels) per member.
        eps: Variance epsilon.
        momentum: Running-average momentum.
    """

    def __init__(self, k: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(k, num_features))
        self.bias = nn.Parameter(torch.zeros(k, num_features))
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(k, num_features))
        self.register_buffer("running_var", torch.ones(k, num_features))

    def init_member(self, k: int, init: str, gen: torch.Generator) -> None:
        """Reset member ``k`` to the identity transform with fresh running statistics."""
        with torch.no_grad():
            self.weight[k].fill_(1.0)
            self.bias[k].zero_()
            self.running_mean[k].zero_()
            self.running_var[k].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(K, B, C)`` or ``(B, K * C, H, W)``."""
        if x.dim() == 4:
            return F.batch_norm(
                x,
                self.running_mean.view(-1),
                self.running_var.view(-1),
                self.weight.reshape(-1),
                self.bias.reshape(-1),
                training=self.training,
                momentum=self.momentum,
                eps=self.eps,
            )
        if not self.training:
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)
        else:
            var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
            n = x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean.squeeze(1).to(self.running_mean.dtype), self.momentum)
                unbiased = var.squeeze(1) * (n / (n - 1) if n > 1 else 1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        scale = self.weight.unsqueeze(1) * torch.rsqrt(var + self.eps)
        return (x - mean) * scale + self.bias.unsqueeze(1)


def fused_dropout(x: torch.Tensor, rate: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Inverted dropout with a per-member rate and per-member noise.

    Masks compare 16-bit random integers with the rate, so rates are rounded to multiples of
    ``1 / 65536``; a member with rate 0 is left exactly unchanged.

    Args:
        x: ``(K, ...)`` activations.
        rate: ``(K,)`` drop probabilities in ``[0, 1)``.
        gens: One generator per member (its dropout stream).

    Returns:
        ``x * mask / (1 - rate)`` with ``mask ~ Bernoulli(1 - rate)``; the expectation is ``x``.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    dropped = torch.round(rate.to(torch.float32) * 65536.0).clamp(max=65535.0)
    threshold = (dropped - 32768.0).to(torch.int16).view(shape)
    scale = (65536.0 / (65536.0 - dropped)).to(x.dtype).view(shape)
    keep = bits16(gens, x[0].numel(), x.device).view(x.shape) >= threshold
    return x * (keep.to(x.dtype) * scale)


class FusedModel(nn.Module):
    """Base of the fused models: hidden ``layers``, optional ``norms`` and a linear ``head``."""

    layers: nn.ModuleList
    norms: nn.ModuleList
    head: FusedLinear

    @property
    def k(self) -> int:
        """Current number of members."""
        return int(self.head.weight.shape[0])

    def init_members(self, seeds: Sequence[int], init: str) -> None:
        """Initialise every member from a generator seeded with its own seed only."""
        for k, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(int(seed))
            for module in self.modules():
                if isinstance(module, FusedLinear | FusedConv2d | FusedBatchNorm):
                    module.init_member(k, init, gen)

    @torch.no_grad()
    def select(self, index: torch.Tensor) -> None:
        """Keep only the members at ``index`` (in that order) in every parameter and buffer.

        Parameters are replaced by new ``nn.Parameter`` objects (autograd caches leaf shapes), so
        holders of the old ones (optimizers) must fetch ``parameters()`` again.
        """
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    module._parameters[name] = nn.Parameter(param.index_select(0, index))
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.index_select(0, index)

    @torch.no_grad()
    def extend(self, other: FusedModel) -> None:
        """Append ``other``'s members (a model of the same architecture) after this model's.

        Like :meth:`select`, parameters are replaced, so optimizers must fetch them again.
        """
        for module, new in zip(self.modules(), other.modules(), strict=True):
            for name, param in module._parameters.items():
                joining = new._parameters[name]
                if param is not None and joining is not None:
                    module._parameters[name] = nn.Parameter(torch.cat([param, joining]))
            for name, buffer in module._buffers.items():
                extra = new._buffers[name]
                if buffer is not None and extra is not None:
                    module._buffers[name] = torch.cat([buffer, extra])

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s parameters and buffers without the K axis, cloned to the CPU."""
        return {name: t[k].detach().to("cpu", copy=True) for name, t in self.state_dict().items()}

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[i](x)
        if len(self.norms):
            x = self.norms[i](x)
        return torch.relu(x)


class FusedMLP(FusedModel):
    """K fused MLPs: ``layers`` hidden blocks (linear, optional batch norm, ReLU, dropout) + head.

    Hidden linear layers have no bias when batch norm follows them (its shift replaces it).

    Args:
        k: Number of members.
        n_features: Input width.
        n_classes: Output width.
        layers: Number of hidden layers.
        hidden_units: Width of each hidden layer.
        batch_norm: Batch norm after each hidden linear layer.
    """

    def __init__(
        self, k: int, n_features: int, n_classes: int, layers: int, hidden_units: int, batch_norm: bool
    ) -> None:
        super().__init__()
        widths = [n_features] + [hidden_units] * layers
        self.layers = nn.ModuleList(
            FusedLinear(k, a, b, bias=not batch_norm) for a, b in itertools.pairwise(widths)
        )
        self.norms = nn.ModuleList(FusedBatchNorm(k, hidden_units) for _ in range(layers) if batch_norm)
        self.head = FusedLinear(k, widths[-1], n_classes)

    def forward(
        self,
        x: torch.Tensor,
        dropout: torch.Tensor | None = None,
        gens: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Logits ``(K, B, classes)`` of ``(K, B, features)`` or shared ``(B, features)`` inputs.

        Args:
            x: Inputs.
            dropout: ``(K,)`` rates; applied only in training mode and only when given.
            gens: Per-member dropout generators (required with ``dropout``).
        """
        for i in range(len(self.layers)):
            x = self._block(i, x)
            if dropout is not None and gens is not None and self.training:
                x = fused_dropout(x, dropout, gens)
        return self.head(x)


class FusedCNN(FusedModel):
    """K fused CNNs: ``layers`` conv blocks (3x3 conv with ``hidden_units`` output channels, optional
    batch norm, ReLU, 2x2 max-pool while the feature map is at least 2x2), flatten, dropout, head.

    Args:
        k: Number of members.
        image_shape: ``(channels, height, width)`` of the inputs.
        n_classes: Output width.
        layers: Number of conv blocks.
        hidden_units: Channels of every conv layer.
        batch_norm: Batch norm after each conv layer.
    """

    def __init__(
        self,
        k: int,
        image_shape: tuple[int, int, int],
        n_classes: int,
        layers: int,
        hidden_units: int,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = image_shape
        self.layers = nn.ModuleList()
        self.pools: list[bool] = []
        for i in range(layers):
            self.layers.append(
                FusedConv2d(k, channels if i == 0 else hidden_units, hidden_units, bias=not batch_norm)
            )
            pool = min(height, width) >= 2
            self.pools.append(pool)
            if pool:
                height, width = height // 2, width // 2
        self.norms = nn.ModuleList(FusedBatchNorm(k, hidden_units) for _ in range(layers) if batch_norm)
        self.head = FusedLinear(k, hidden_units * height * width, n_classes)

    def forward(
        self,
        x: torch.Tensor,
        dropout: torch.Tensor | None = None,
        gens: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Logits ``(K, B, classes)`` of flattened images ``(K, B, C*H*W)`` or shared ``(B, C*H*W)``.

        Args:
            x: Inputs.
            dropout: ``(K,)`` rates, applied to the flattened features in training mode.
            gens: Per-member dropout generators (required with ``dropout``).
        """
        k = self.k
        c, h, w = self.image_shape
        if x.dim() == 2:
            x = x.view(-1, 1, c * h * w).expand(-1, k, -1).reshape(-1, k * c, h, w)
        else:
            x = x.view(k, -1, c * h * w).transpose(0, 1).reshape(-1, k * c, h, w)
        for i, pool in enumerate(self.pools):
            x = self._block(i, x)
            if pool:
                x = F.max_pool2d(x, 2)
        x = x.reshape(x.shape[0], k, -1).transpose(0, 1)
        if dropout is not None and gens is not None and self.training:
            x = fused_dropout(x, dropout, gens)
        return self.head(x)


def build_model(
    model: str,
    k: int,
    n_features: int,
    n_classes: int,
    image_shape: tuple[int, int, int] | None,
    layers: int,
    hidden_units: int,
    batch_norm: bool,
) -> FusedModel:
    """Build an (uninitialised) fused model of K members.

    Raises:
        ValueError: ``model="cnn"`` without an image shape, or an unknown model.
    """
    if model == "mlp":
        return FusedMLP(k, n_features, n_classes, layers, hidden_units, batch_norm)
    if model == "cnn":
        if image_shape is None:
            raise ValueError("model 'cnn' needs an image dataset (image_shape is None); use model='mlp'")
        return FusedCNN(k, image_shape, n_classes, layers, hidden_units, batch_norm)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
