"""Data statistics some merging rules need, gathered from each expert on a few training samples.

* ``fisher``: the diagonal of the empirical Fisher information of every shared parameter, the mean over
  samples of the squared gradient of the expert's own task loss on that one sample, with the expert in
  evaluation mode (Matena & Raffel, NeurIPS 2022, use the model's own predictive distribution; the
  empirical Fisher with the true label is the variant every vision task here has, detection included);
* ``gram``: for every shared ``nn.Linear`` and ``nn.Conv2d`` (one group, zero padding), the Gram matrix XᵀX / n of the
  inputs it receives (for a convolution, its unfolded input patches, ``in·k·k`` wide), as RegMean needs
  (Jin et al., ICLR 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtlvision.errors import ConfigError
from mtlvision.evaluation.evaluator import move_batch
from mtlvision.models import MultiTaskModel

STATISTICS = ("fisher", "gram")


def _samples(batches: Iterable[dict[str, Any]], count: int) -> Iterable[dict[str, Any]]:
    """Batches cut to at most ``count`` samples in all."""
    seen = 0
    for batch in batches:
        if seen >= count:
            return
        size = len(batch["image"])
        take = min(size, count - seen)
        yield _slice(batch, 0, take) if take < size else batch
        seen += take


def _slice(value: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch (tensors and lists sliced, dicts entered, the rest kept)."""
    if isinstance(value, Tensor | list):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    return value


def fisher_diagonal(
    model: MultiTaskModel, batches: Iterable[dict[str, Any]], names: Sequence[str], samples: int, device: torch.device
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of ``model``'s parameters ``names``: mean over up to ``samples`` samples
    carrying a label of the squared per-sample gradient of the summed task losses."""
    model.to(device).eval()
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"the expert lacks parameter {missing[0]!r} needed for its Fisher information")
    fisher = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    counted = 0
    for batch in _samples(batches, samples):
        batch = move_batch(batch, device)
        for one in (_slice(batch, i, i + 1) for i in range(len(batch["image"]))):
            if not any(bool(one["valid"][task].any()) for task in model.tasks):
                continue
            model.zero_grad(set_to_none=True)
            predictions = model(one["image"])
            loss = torch.stack(
                [
                    task.loss(predictions[name], one["targets"][name], one["valid"][name]).float()
                    for name, task in model.tasks.items()
                ]
            ).sum()
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    fisher[name] += grad.detach().float() ** 2
            counted += 1
    if counted == 0:
        raise ConfigError("no training sample carries a label of the expert's task: no Fisher information")
    return {n: (f / counted).cpu() for n, f in fisher.items()}


def _unfoldable(module: nn.Conv2d) -> bool:
    """A convolution whose output is its weight times its zero-padded unfolded input patches."""
    return module.groups == 1 and isinstance(module.padding, tuple) and module.padding_mode == "zeros"


def _linear_rows(inputs: Tensor) -> Tensor:
    return inputs.reshape(-1, inputs.shape[-1])


def _conv_patches(module: nn.Conv2d, inputs: Tensor) -> Tensor:
    padding = cast(tuple[int, ...], module.padding)  # a string padding ("same") is not hooked
    patches = F.unfold(inputs, module.kernel_size, module.dilation, padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@torch.no_grad()
def input_grams(
    model: MultiTaskModel, batches: Iterable[dict[str, Any]], names: Sequence[str], samples: int, device: torch.device
) -> dict[str, Tensor]:
    """Gram matrices XᵀX / n of the inputs of every ``nn.Linear`` and one-group ``nn.Conv2d`` whose weight is
    in ``names`` (keyed by that weight's name), over up to ``samples`` samples in evaluation mode."""
    model.to(device).eval()
    modules = dict(model.named_modules())
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    hooks = []

    def hook(key: str, flatten: Callable[[Tensor], Tensor]) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Tensor, ...], _output: Any) -> None:
            x = flatten(args[0].detach().float())
            grams[key] = x.T @ x if key not in grams else grams[key] + x.T @ x
            rows[key] = rows.get(key, 0) + x.shape[0]

        return record

    for name in names:
        if not name.endswith(".weight"):
            continue
        module = modules.get(name[: -len(".weight")])
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(hook(name, _linear_rows)))
        elif isinstance(module, nn.Conv2d) and _unfoldable(module):
            hooks.append(module.register_forward_hook(hook(name, partial(_conv_patches, module))))
    try:
        for batch in _samples(batches, samples):
            model(move_batch(batch, device)["image"])
    finally:
        for handle in hooks:
            handle.remove()
    return {k: (g / rows[k]).cpu() for k, g in grams.items()}


def collect_statistics(
    kind: str,
    experts: Mapping[str, tuple[MultiTaskModel, Iterable[dict[str, Any]]]],
    names: Sequence[str],
    samples: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """Statistics ``kind`` of every expert (keyed like the merge, each expert with its own batches), stacked
    ``{name: [T, ...]}`` over the experts in order; a name some expert has no statistic for is left out."""
    gather = {"fisher": fisher_diagonal, "gram": input_grams}.get(kind)
    if gather is None:
        raise ConfigError(f"unknown merging statistics {kind!r}; known: {', '.join(STATISTICS)}")
    per_expert = [gather(model, batches, names, samples, device) for model, batches in experts.values()]
    common = [n for n in names if all(n in s for s in per_expert)]
    # stacked name by name, each expert's copy released as it is used (Gram matrices can be large)
    return {n: torch.stack([s.pop(n) for s in per_expert]) for n in common}
