"""A model's weights as a stream of (checkpoint name, tensor): what an inference engine reloads.

Under ZeRO-3 each rank holds a shard of every parameter. The stream gathers
a group of consecutive parameters (about `group_bytes` of them: a decoder
layer or so) at a time, yields them, and lets them go before the next
group: the rank never holds a second full copy of the model. Every rank
must consume the stream to the end, in step, since each gather is a
collective; each rank feeds its own colocated engine, so they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

GROUP_BYTES = 256 * 2**20


def _partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _groups(named: list[tuple[str, nn.Parameter]], group_bytes: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    group, size = [], 0
    for name, param in named:
        numel = int(getattr(param, "ds_numel", param.numel()))
        group.append((name, param))
        size += numel * param.element_size()
        if size >= group_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def streamed_weights(model: nn.Module, gathered: Callable[[list], AbstractContextManager] | None = None,
                     group_bytes: int = GROUP_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and persistent buffer of `model`, in checkpoint names.

    Tensors are the model's own storage (no copy) outside ZeRO-3; the consumer
    copies them into its weights before asking for the next one. Tied
    parameters appear once, under their first name, as in a checkpoint.
    `gathered(params)`: the engine's context that makes partitioned
    parameters whole (`Engine.gathered`); needed only under ZeRO-3.
    """
    named = list(model.named_parameters())
    if not any(_partitioned(p) for _, p in named):
        for name, param in named:
            yield name, param.detach()
    else:
        if gathered is None:
            raise ValueError("streamed_weights: a ZeRO-3 model needs its engine's `gathered`")
        for group in _groups(named, group_bytes):
            with gathered([p for _, p in group]):
                for name, param in group:
                    yield name, param.detach().reshape(tuple(getattr(param, "ds_shape", param.shape)))
    every_parameter_name = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name in persistent and name not in every_parameter_name:
            yield name, buffer.detach()


class ModuleWeights:
    """Each role's weights for a sampler that holds its own copy (vLLM): the role module's own parameters.

    The other form, LoRA's, merges each role's adapter into the shared base (`fastbond.lora.AdapterWeights`).
    """

    def __init__(self, gathered: Callable[[list], AbstractContextManager] | None = None):
        self.gathered = gathered

    def stream(self, role: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        return streamed_weights(role, self.gathered)

    def shapes(self, role: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in role.named_parameters()}
