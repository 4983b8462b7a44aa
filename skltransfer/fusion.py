"""Folding BatchNorm into the convolution before it, for inference and for training.

One job: make a model with frozen BatchNorm statistics cheaper to run
without changing what it computes. In eval mode a BatchNorm is an affine
map per channel; when it reads a convolution's output and nothing else
reads that output, the map can be folded into the convolution's weight and
bias and the BatchNorm pass over the activations disappears.

* :func:`fold_batchnorm`, for inference: the folded weights replace the
  convolution's (``torch.nn.utils.fusion.fuse_conv_bn_weights``) and the
  BatchNorm goes. On 2 CPU cores this makes EfficientNet-Lite0 about 25 %
  faster; features move by ~1e-5.
* :func:`batchnorm_folded_for_training`, for fine-tuning with frozen
  statistics: while it is active, each such convolution computes its
  folded weight from the current parameters at every call (a weight-sized
  product, differentiable), so the BatchNorm's scale and shift and the
  convolution's kernel still learn, the parameters and the state dict stay
  as they are, and neither the forward nor the backward pass touches the
  activations twice. torch has no training-time fold
  (``torch.ao.nn.intrinsic``'s ``ConvBn2d`` is for quantisation-aware
  training and keeps a separate normalisation), which is why this exists.

Which pairs qualify is read from the model's data flow (a ``torch.fx``
trace that stops at convolutions and BatchNorms), never guessed from the
order modules were registered in. A model, or part of one, that cannot be
traced is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

__all__ = ["batchnorm_folded_for_training", "fold_batchnorm"]


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a convolution into it, in place.

    The BatchNorm is replaced by what it does after normalising: nothing
    for ``nn.BatchNorm2d``, dropout and activation for timm's
    ``BatchNormAct2d``. BatchNorms of other kinds, in training mode, or
    reading a tensor that something else reads too, are kept.

    Parameters
    ----------
    model : torch.nn.Module
        A model in eval mode whose weights will not be trained any more.

    Returns
    -------
    int
        The number of BatchNorms folded.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> before = net(x)
    >>> fold_batchnorm(net)
    1
    >>> net[1]
    Identity()
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: training updates BatchNorm statistics")
    return _fold_traceable(model)


class _StopAtConvAndNorm(fx.Tracer):
    """Records convolutions and BatchNorms (of any subclass) as single calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _fold_traceable(module: nn.Module) -> int:
    folded = 0
    for parent, norm_name, conv, norm, remainder in list(_conv_norm_pairs(module)):
        weight, bias = fuse_conv_bn_weights(
            conv.weight.double(),
            None if conv.bias is None else conv.bias.double(),
            norm.running_mean.double(),
            norm.running_var.double(),
            norm.eps,
            None if norm.weight is None else norm.weight.double(),
            None if norm.bias is None else norm.bias.double(),
        )
        # empty_like keeps the weight's dtype, device and memory format (channels_last).
        conv.weight = nn.Parameter(torch.empty_like(conv.weight).copy_(weight), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        parent.set_submodule(norm_name, remainder)
        folded += 1
    return folded


def _conv_norm_pairs(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d, nn.Module]]:
    """``(parent, norm's name in parent, conv, norm, what norm does after normalising)`` per foldable pair."""
    try:
        graph = _StopAtConvAndNorm().trace(module)
    except Exception:  # data-dependent control flow, unsupported ops: try the parts
        for child in module.children():
            yield from _conv_norm_pairs(child)
        return
    seen: set[int] = set()  # a module called twice (flip TTA runs the model on both images) is one pair
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm = module.get_submodule(node.target)
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv = module.get_submodule(source.target)
        remainder = _after_normalising(norm)
        if isinstance(conv, nn.Conv2d) and remainder is not None and id(norm) not in seen:
            seen.add(id(norm))
            yield module, node.target, conv, norm, remainder


@contextmanager
def batchnorm_folded_for_training(model: nn.Module) -> Iterator[int]:
    """While active, convolutions compute with the frozen BatchNorm after them folded in, differentiably.

    For each eval-mode BatchNorm that :func:`fold_batchnorm` would fold, the
    convolution before it computes ``conv(x, W * s) + (beta - mean * s)``
    with ``s = gamma / sqrt(var + eps)``, from the current parameters at each
    call, and the BatchNorm only applies what follows its affine map (timm's
    activation). That is the same function of the same parameters, so the
    gradients are the same up to float rounding; the BatchNorm pass over the
    activations, forward and backward, is gone. Parameters, buffers and the
    state dict are untouched; on exit every module computes as before.

    Only plain ``nn.Conv2d`` (zero padding) and timm's ``Conv2dSame`` are
    rewritten: other convolution classes have forward passes of their own.

    Parameters
    ----------
    model : torch.nn.Module
        A model whose BatchNorms to fold are in eval mode (training mode
        BatchNorms normalise with batch statistics and are left alone).

    Yields
    ------
    int
        The number of BatchNorms folded.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).train()
    >>> _ = net[1].eval()  # frozen statistics, learning scale and shift
    >>> x = torch.randn(2, 3, 16, 16)
    >>> before = net(x)
    >>> with batchnorm_folded_for_training(net) as folded:
    ...     after = net(x)
    >>> folded, torch.allclose(after, before, atol=1e-5), after.requires_grad
    (1, True, True)
    """
    rewritten: list[nn.Module] = []
    try:
        for _, _, conv, norm, remainder in list(_conv_norm_pairs(model)):
            convolve = _convolution_with(conv)
            if convolve is None:
                continue
            conv.forward = _folded_forward(conv, norm, convolve)
            norm.forward = remainder.forward  # remainder holds norm's own drop / act modules
            rewritten += [conv, norm]
        yield len(rewritten) // 2
    finally:
        for module in rewritten:
            del module.forward  # the instance attribute: the class's forward again


def _convolution_with(conv: nn.Conv2d) -> Callable | None:
    """``f(x, weight, bias)``: what ``conv`` computes, with other weights; None for unknown classes."""
    if type(conv) is nn.Conv2d and conv.padding_mode == "zeros":
        return conv._conv_forward
    if type(conv).__name__ == "Conv2dSame" and type(conv).__module__.startswith("timm."):
        from timm.layers import conv2d_same

        return lambda x, weight, bias: conv2d_same(x, weight, bias, conv.stride, conv.padding, conv.dilation,
                                                   conv.groups)
    return None


def _folded_forward(conv: nn.Conv2d, norm: nn.BatchNorm2d, convolve: Callable) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return convolve(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift)
    return forward


def _after_normalising(norm: nn.Module) -> nn.Module | None:
    """What ``norm`` does after its affine map, or None if it cannot be folded."""
    if not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_mean is None:
        return None
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d" and type(norm).__module__.startswith("timm."):
        return nn.Sequential(norm.drop, norm.act)
    return None
