"""Pooling feature maps into rows, and test-time flips.

One job: the modules that turn a network's feature maps into one row per
image: global pooling (timm's ``"avg"``, ``"max"``, ``"avgmax"``,
``"catavgmax"``, and ``"gem"``, the generalised mean), earlier stages
concatenated (``layers``), a user's module's 4-D output pooled, and the mean
over an image and its mirror (``tta="flip"``).
"""

from __future__ import annotations

import torch
from torch import nn

from .preprocessing import Preprocessing

# The rest (PooledModule, LayerFeatures, FlipAveraged, feature_groups, output_width) is public to the
# package's other modules (backbones, registry) but not documented API.
__all__ = ["POOLINGS", "TIMM_POOLINGS", "TTA_MODES", "pool_map"]

TIMM_POOLINGS = ("avg", "max", "avgmax", "catavgmax")
#: All poolings: timm's, plus ``"gem"`` (generalised mean, p = 3).
POOLINGS = TIMM_POOLINGS + ("gem",)
TTA_MODES = (None, "flip")


def pool_map(x: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool an ``(N, C, H, W)`` map (or ``(N, L, C)`` tokens) to ``(N, C)`` (``2C`` for catavgmax)."""
    if x.ndim == 3:  # tokens: (N, L, C) -> (N, C, L, 1)
        x = x.transpose(1, 2).unsqueeze(-1)
    if pooling == "avg":
        return x.mean((2, 3))
    if pooling == "max":
        return x.amax((2, 3))
    if pooling == "avgmax":
        return 0.5 * (x.mean((2, 3)) + x.amax((2, 3)))
    if pooling == "catavgmax":
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
    if pooling == "gem":  # generalised mean, p = 3 (Radenovic et al. 2018)
        return x.float().clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class PooledModule(nn.Module):
    """Runs a user's module and pools a 4-D output into one row per image."""

    def __init__(self, module: nn.Module, pooling: str):
        super().__init__()
        self.module = module
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            return pool_map(out, self.pooling)
        return out.flatten(1)


class LayerFeatures(nn.Module):
    """Pools and concatenates stage outputs and the final map of a timm model."""

    def __init__(self, model: nn.Module, layers, pooling: str):
        super().__init__()
        self.model = model
        self.layers = layers
        self.pooling = pooling

    def feature_maps(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        final, stages = self.model.forward_intermediates(x, indices=None)
        maps = [(f"stage{i}", m) for i, m in enumerate(stages)]
        if not stages or final is not stages[-1]:
            maps.append(("final", final))
        else:
            maps[-1] = ("final", final)
        if self.layers == "all":
            return maps
        if self.layers == "final":
            return maps[-1:]
        try:
            return [maps[i] for i in self.layers]
        except IndexError:
            raise ValueError(
                f"layers={list(self.layers)} is out of range: this backbone has {len(maps)} "
                f"feature maps ({', '.join(n for n, _ in maps)})"
            ) from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool_map(m, self.pooling) for _, m in self.feature_maps(x)], dim=1)

    def groups(self, x: torch.Tensor) -> tuple[tuple[str, int], ...]:
        return tuple((name, pool_map(m, self.pooling).shape[1]) for name, m in self.feature_maps(x))


class FlipAveraged(nn.Module):
    """Test-time augmentation: the mean of the features of an image and its mirror."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[3])))


def feature_groups(model: nn.Module, preprocessing: Preprocessing) -> tuple:
    inner = model.model if isinstance(model, FlipAveraged) else model
    if not isinstance(inner, LayerFeatures):
        return ()
    height, width = preprocessing.input_size
    with torch.inference_mode():
        return inner.groups(torch.zeros(1, 3, height, width))


def output_width(model: nn.Module, preprocessing: Preprocessing) -> int:
    height, width = preprocessing.input_size
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, height, width))
    if out.ndim != 2:
        raise ValueError(f"backbone output must be (N, features), got shape {tuple(out.shape)}")
    return int(out.shape[1])
