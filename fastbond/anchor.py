"""The anchor policy π_anc: an EMA of the policy (J-BOND) or a hard copy (iterative BOND).

The anchor model that generates runs in the compute dtype, but its EMA state
is kept in fp32 (SPEC §8: a bf16 EMA at η = 0.01 stalls, because η·(θ − θ_anc)
is below half a bf16 ulp for most weights). `fastbond.kernels.ema_` updates
the fp32 state and writes the compute-dtype copy in the same pass. When the
model itself is fp32 the anchor's parameters *are* the state: no second copy.

`EMAAnchor` is the one-process anchor (a deep copy of the policy);
`ShardedEMAAnchor` is the anchor of a DeepSpeed policy, partitioned like it,
updated shard by shard without communication.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from fastbond import atomic
from fastbond.errors import FastbondError
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


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process owns: its ZeRO-3 shard, or the whole tensor.

    Under ZeRO-3 `param.data` is an empty placeholder except while gathered;
    `param.ds_tensor` is the flat local partition [ceil(numel / K)], padded on
    the last rank. Replicated parameters (no ZeRO, ZeRO-1/2) are their own
    local part.
    """
    shard = getattr(param, "ds_tensor", None)
    return shard if shard is not None else param.data


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedEMAAnchor:
    """The J-BOND anchor of a sharded policy: EMA on each rank's local shard, no communication.

    `model` is the anchor network, partitioned exactly like `policy` (ZeRO-3:
    a second DeepSpeed engine over the same ranks, so shard r of every anchor
    tensor covers the same elements as shard r of the policy's), or replicated
    like it (no ZeRO, ZeRO-1/2). The EMA is elementwise, so

        θ_anc[r] ← θ_anc[r] + η (θ[r] − θ_anc[r])

    on every rank r is the full-tensor update (SPEC §8): `fastbond.kernels.ema_`
    runs over the local shards only and no collective is issued. The fp32 EMA
    state is sharded the same way; the compute-dtype anchor shards are its
    shadow, written in the same pass.

    A ZeRO-3 forward keeps some gathered full copies alive between calls
    (persistent small tensors, parameters within the reuse distance). Those
    copies would miss the update, so `release` — a local, communication-free
    call that drops every gathered copy — runs after each update; the next
    forward re-gathers from the fresh shards.

    The anchor starts at the policy: the state is copied from the policy's
    local shards at construction, whatever `model` held.
    """

    def __init__(self, policy: nn.Module, model: nn.Module, dtype: torch.dtype, release=None):
        model.eval().requires_grad_(False)
        self._setup(list(policy.named_parameters()), list(model.named_parameters()), model, dtype, release)

    def _setup(self, policy_named: list, anchor_named: list, model, dtype: torch.dtype, release) -> None:
        """The EMA of the tensors `policy_named` into `anchor_named` ((name, parameter) lists, one per tensor,
        in the same order); `model` is what samples as the anchor. The policy's parameters are fixed here."""
        self.model = model
        self.dtype = dtype
        self._release = release
        self.anchor_parameters = anchor_named  # (name, parameter) of what the EMA writes
        self._names = [name for name, _ in anchor_named]
        self._params = [local_tensor(p) for _, p in anchor_named]
        self._check_alignment(policy_named, anchor_named)
        self._policy = [p for _, p in policy_named]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in anchor_named)
        policy_locals = self._policy_locals()
        with torch.no_grad():
            if all(t.dtype == torch.float32 for t in self._params):
                self.state = self._params  # an fp32 anchor is its own EMA state
                for target, source in zip(self.state, policy_locals):
                    target.copy_(source)
            else:
                self.state = [source.detach().float().clone() for source in policy_locals]
                for target, source in zip(self._params, self.state):
                    target.copy_(source)
        self._invalidate_gathered()

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_alignment(policy_named: list, anchor_named: list) -> None:
        """Same names, shapes, and (ZeRO-3) the same local shard of each tensor, or a one-line error."""
        ours, theirs = anchor_named, policy_named
        if len(ours) != len(theirs):
            raise FastbondError(f"anchor has {len(ours)} parameter tensors but the policy {len(theirs)}")
        for (name, a), (policy_name, p) in zip(ours, theirs):
            if name != policy_name:
                raise FastbondError(f"anchor parameter '{name}' faces policy parameter '{policy_name}'")
            shape_a = tuple(getattr(a, "ds_shape", a.shape))
            shape_p = tuple(getattr(p, "ds_shape", p.shape))
            if shape_a != shape_p:
                raise FastbondError(f"anchor '{name}' has shape {shape_a}, the policy {shape_p}")
            if hasattr(a, "ds_tensor") != hasattr(p, "ds_tensor"):
                raise FastbondError(
                    f"anchor '{name}' and the policy's are not partitioned alike: "
                    f"{'sharded' if hasattr(a, 'ds_tensor') else 'replicated'} anchor, "
                    f"{'sharded' if hasattr(p, 'ds_tensor') else 'replicated'} policy"
                )
            la, lp = local_tensor(a), local_tensor(p)
            if la.shape != lp.shape:
                raise FastbondError(
                    f"anchor '{name}' holds a local shard of {tuple(la.shape)}, the policy {tuple(lp.shape)}: "
                    "the two are partitioned differently (same ZeRO config and world size needed)"
                )
            if la.device != lp.device:
                raise FastbondError(f"anchor '{name}' lives on {la.device}, the policy's on {lp.device}")
            group_a, group_p = getattr(a, "ds_process_group", None), getattr(p, "ds_process_group", None)
            if group_a is not None and group_p is not None:
                import torch.distributed as dist

                ranks = (dist.get_rank(group_a), dist.get_world_size(group_a))
                policy_ranks = (dist.get_rank(group_p), dist.get_world_size(group_p))
                if ranks != policy_ranks:
                    raise FastbondError(
                        f"anchor '{name}' is shard {ranks[0]} of {ranks[1]}, the policy's {policy_ranks[0]} of {policy_ranks[1]}"
                    )

    def _policy_locals(self) -> list[torch.Tensor]:
        # local_tensor each time: DeepSpeed may re-point a shard's storage after construction
        return [local_tensor(p).detach() for p in self._policy]

    def _invalidate_gathered(self) -> None:
        if self._release is not None:
            self._release()

    # ------------------------------------------------------------------ updates

    @property
    def shadow(self) -> list[torch.Tensor] | None:
        """The compute-dtype local shards rewritten from the fp32 state, if separate."""
        return None if self.state is self._params else self._params

    @torch.no_grad()
    def update(self, policy: nn.Module, eta: float) -> None:
        """θ_anc ← θ_anc + η (θ − θ_anc) on the local shards, in place; no collective. `policy`: the
        module given at construction (its parameters were fixed there), kept for `EMAAnchor`'s interface."""
        ema_(self.state, self._policy_locals(), eta, shadow=self.shadow)
        self._invalidate_gathered()

    @torch.no_grad()
    def reset_to(self, policy: nn.Module) -> None:
        """Hard anchor update (iterative BOND): θ_anc ← θ."""
        self.update(policy, 1.0)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 EMA state by parameter name (a shard under ZeRO-3)."""
        return {name: tensor.detach().float().contiguous() for name, tensor in zip(self._names, self.state)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in zip(self._names, self.state):
            if name not in state:
                raise FastbondError(f"anchor state lacks {name}")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise FastbondError(
                    f"anchor state '{name}' has shape {tuple(state[name].shape)}, this rank holds {tuple(tensor.shape)}"
                )
            tensor.copy_(state[name])
        if self.shadow is not None:
            for target, source in zip(self.shadow, self.state):
                target.copy_(source)
        self._invalidate_gathered()

    def shard_file(self, directory: Path) -> Path | None:
        """Where this rank's state goes: one file per rank when sharded, rank 0's alone when replicated."""
        rank, world = _rank_and_world()
        if self.sharded:
            return Path(directory) / f"anchor-rank{rank:05d}-of-{world:05d}.safetensors"
        return Path(directory) / "anchor.safetensors" if rank == 0 else None

    def save(self, directory: str | Path) -> Path | None:
        """Write this rank's EMA state (safetensors); local I/O only, no collective."""
        from safetensors.torch import save_file

        path = self.shard_file(Path(directory))
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        rank, world = _rank_and_world()
        with atomic.written_file(path) as tmp:
            save_file({k: v.cpu() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"world_size": str(world), "rank": str(rank), "sharded": str(self.sharded)})
        return path

    def load(self, directory: str | Path) -> None:
        """Read the state `save` wrote on the same number of ranks (each rank reads its own shard)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        path = self.shard_file(directory) or directory / "anchor.safetensors"
        if not path.is_file():
            _, world = _rank_and_world()
            found = sorted(p.name for p in directory.glob("anchor*.safetensors"))
            raise FastbondError(
                f"no anchor state {path.name} in {directory} (this run has {world} rank(s); found: {', '.join(found) or 'none'})"
            )
        with safe_open(str(path), framework="pt") as handle:
            saved_world = (handle.metadata() or {}).get("world_size")
        _, world = _rank_and_world()
        if self.sharded and saved_world is not None and int(saved_world) != world:
            raise FastbondError(f"anchor state in {directory} was saved on {saved_world} ranks, this run has {world}")
        device = self.state[0].device if self.state else "cpu"
        self.load_state_dict(load_file(str(path), device=str(device)))

    def local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: compute-dtype anchor shards and the separate fp32 state (0 if none)."""
        params = sum(t.numel() * t.element_size() for t in self._params)
        state = 0 if self.state is self._params else sum(t.numel() * t.element_size() for t in self.state)
        return {"params": params, "state": state}
