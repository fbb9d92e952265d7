"""Fold inference-mode BatchNorm into the convolution before it: one pass over memory instead of two.

At inference a BatchNorm2d is a fixed per-channel affine map, so ``BN(conv(x))`` equals a convolution with
rescaled weights and a bias. The conv -> BN pairs are found by running the model once and watching which
convolution's output tensor each BatchNorm receives, so no architecture needs to describe itself; a pair is folded
only when both modules ran exactly once. The folded model is checked against the original on the probe input and
the original is restored on any mismatch, so folding can never change what a model computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _find_pairs(model: nn.Module, probe: Callable[[], object]) -> tuple[list[tuple[str, str]], object]:
    """(conv name, BN name) pairs where the BN's input is the conv's output, each module called once; and what
    the probe returned."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    producer: dict[int, tuple[torch.Tensor, nn.Module]] = {}   # id(output) -> (output kept alive, conv)
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        calls[module] = calls.get(module, 0) + 1
        producer[id(output)] = (output, module)

    def before_bn(module: nn.Module, inputs: tuple) -> None:
        calls[module] = calls.get(module, 0) + 1
        found = producer.get(id(inputs[0]))
        if found is not None and found[0] is inputs[0]:
            pairs.append((found[1], module))

    handles = []
    for module in model.modules():
        if isinstance(module, _CONVS):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            output = probe()
    finally:
        for handle in handles:
            handle.remove()
    foldable = [(names[conv], names[bn]) for conv, bn in pairs
                if calls[conv] == 1 and calls[bn] == 1 and bn.track_running_stats and bn.running_var is not None]
    return foldable, output


def _fold_pair(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    # Conv2d weights are (out, in/groups, kh, kw); ConvTranspose2d weights are (in, out/groups, kh, kw).
    out_dim = 1 if isinstance(conv, nn.ConvTranspose2d) else 0
    if isinstance(conv, nn.ConvTranspose2d) and conv.groups != 1:
        raise ValueError("grouped transposed convolutions are not folded")
    shape = [1] * conv.weight.dim()
    shape[out_dim] = -1
    conv.weight = nn.Parameter(conv.weight.detach() * scale.reshape(shape), requires_grad=False)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach(), requires_grad=False)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_batchnorm(model: nn.Module, run: Callable[[nn.Module], torch.Tensor | tuple[torch.Tensor, ...]],
                   *, rtol: float = 1e-3, atol: float = 1e-4) -> int:
    """Fold every eval-mode conv -> BN pair of `model` in place; returns how many were folded (0 if none or if
    the folded model disagreed with the original on `run(model)`, in which case `model` is left unchanged).

    `run(model)` must call the model on a fixed probe input and return its output tensor(s).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (BatchNorm folds its running statistics)")
    pairs, before = _find_pairs(model, lambda: run(model))
    if not pairs:
        return 0
    with torch.no_grad():
        saved_modules = {bn_name: model.get_submodule(bn_name) for _, bn_name in pairs}
        saved_convs = {conv_name: (model.get_submodule(conv_name).weight, model.get_submodule(conv_name).bias)
                       for conv_name, _ in pairs}
        try:
            for conv_name, bn_name in pairs:
                _fold_pair(model.get_submodule(conv_name), model.get_submodule(bn_name))
                _replace(model, bn_name, nn.Identity())
            after = run(model)
            before_t = before if isinstance(before, tuple) else (before,)
            after_t = after if isinstance(after, tuple) else (after,)
            same = all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(after_t, before_t))
        except ValueError:
            same = False
        if not same:
            for bn_name, module in saved_modules.items():
                _replace(model, bn_name, module)
            for conv_name, (weight, bias) in saved_convs.items():   # _fold_pair made new Parameters
                conv = model.get_submodule(conv_name)
                conv.weight, conv.bias = weight, bias
            return 0
    return len(pairs)
