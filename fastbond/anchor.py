"""The anchor policy π_anc: an EMA of the policy (J-BOND) or a hard copy (iterative BOND).

The anchor model that generates runs in the compute dtype, but its EMA state
is kept in fp32 (SPEC §8: a bf16 EMA at η = 0.01 stalls, because η·(θ − θ_anc)
is below half a bf16 ulp for most weights). `fastbond.kernels.ema_` updates
the fp32 state and writes the compute-dtype copy in the same pass. When the
model itself is fp32 the anchor's parameters *are* the state: no second copy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastbond.kernels.ema import ema_


class EMAAnchor:
    def __init__(self, policy: nn.Module, dtype: torch.dtype):
        self.model = copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
        self._params = list(self.model.parameters())
        if dtype == torch.float32:
            self.state = self._params
        else:
            self.state = [p.detach().float().clone() for p in policy.parameters()]

    @property
    def shadow(self) -> list[torch.Tensor] | None:
        """The compute-dtype parameters rewritten from the fp32 state, if separate."""
        return None if self.state is self._params else self._params

    @torch.no_grad()
    def update(self, policy: nn.Module, eta: float) -> None:
        """θ_anc ← θ_anc + η (θ − θ_anc), in place, fused over all tensors."""
        ema_(self.state, [p.detach() for p in policy.parameters()], eta, shadow=self.shadow)

    @torch.no_grad()
    def reset_to(self, policy: nn.Module) -> None:
        """Hard anchor update (iterative BOND): θ_anc ← θ."""
        self.update(policy, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = [name for name, _ in self.model.named_parameters()]
        return {name: tensor.detach().float().contiguous() for name, tensor in zip(names, self.state)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"anchor state lacks {missing[0]}")
        for name, tensor in zip(names, self.state):
            tensor.copy_(state[name])
        if self.shadow is not None:
            for target, source in zip(self.shadow, self.state):
                target.copy_(source)
