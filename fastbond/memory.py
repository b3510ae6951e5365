"""Bytes per rank, as rows of a table: the type `fastbond plan` fills from a config, and the rows read
off the live tensors of a running job (`measured_rows`; the DeepSpeed engine prints them at start).

Runtime code reads memory here; the planning arithmetic (`fastbond.plan`) builds on it, never the
other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Row:
    what: str
    device: int = 0  # bytes per rank on the accelerator
    host: int = 0  # bytes per rank in CPU memory
    transient: bool = False


@dataclass
class Plan:
    title: str
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def add(self, what: str, nbytes: int, on_host: bool = False, transient: bool = False) -> None:
        self.rows.append(Row(what, 0 if on_host else nbytes, nbytes if on_host else 0, transient))

    def totals(self) -> tuple[int, int]:
        steady = [r for r in self.rows if not r.transient]
        return sum(r.device for r in steady), sum(r.host for r in steady)

    def row(self, what: str) -> Row:
        return next(r for r in self.rows if r.what.startswith(what))


def _local(param: torch.Tensor) -> torch.Tensor:
    shard = getattr(param, "ds_tensor", None)
    return shard if shard is not None else param.data


def _split(tensors) -> tuple[int, int]:
    device = host = 0
    seen = set()
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if t.device.type == "cpu":
            host += nbytes
        else:
            device += nbytes
    return device, host


def measured_rows(policy: nn.Module, optimizer=None, anchor=None, reference: nn.Module | None = None,
                  reward: nn.Module | None = None, on_accelerator: bool = True, masters=None,
                  held: tuple[dict, dict] | None = None) -> Plan:
    """The plan's rows read off live tensors of this rank (shards under ZeRO-3).

    `optimizer`: the torch optimizer that steps (its state holds the moments).
    `masters`: the fp32 master tensors when the optimizer does not keep them
    in its parameter groups (DeepSpeed hands ZeRO-3's flat partitions to it
    only during a step); by default its parameters, minus the policy's own
    storage. With `on_accelerator=False` (a CPU run) everything counts as
    device memory. `held`: the policy form's rows of the policy and of the
    anchor (`PolicyForm.held_tensors`: under LoRA the base, the policy adapter
    and the anchor adapter); by default a whole policy and a whole anchor.
    """
    plan = Plan("measured on this rank")

    def add(what, tensors):
        device, host = _split(tensors)
        if not on_accelerator:
            device, host = device + host, 0
        plan.rows.append(Row(what, device, host))

    policy_rows, anchor_rows = held or (
        {"policy params": [_local(p) for p in policy.parameters()]},
        {} if anchor is None else {"anchor params": [_local(p) for p in anchor.model.parameters()]})
    for what, tensors in policy_rows.items():
        add(what, tensors)
    if optimizer is not None:
        own = {_local(p).untyped_storage().data_ptr() for p in policy.parameters()}
        if masters is None:
            masters = [p for group in optimizer.param_groups for p in group["params"]]
        add("fp32 master weights", [t for t in masters if t.untyped_storage().data_ptr() not in own])
        add("Adam moments (fp32 m, v)", [v for state in optimizer.state.values() for v in state.values()
                                         if isinstance(v, torch.Tensor) and v.dim() > 0])
    if anchor is not None:
        for what, tensors in anchor_rows.items():
            add(what, tensors)
        add("anchor EMA state (fp32)", [] if anchor.shadow is None else anchor.state)
    if reference is not None:
        add("reference", [_local(p) for p in reference.parameters()])
    if reward is not None:
        add("reward", [_local(p) for p in reward.parameters()])
    return plan


def _human(nbytes: int) -> str:
    return f"{nbytes / 2**30:8.2f} GiB" if nbytes else "       -    "


def format_plan(plan: Plan, header: str = "") -> str:
    width = max(len(r.what) for r in plan.rows) + 2
    lines = [header] if header else []
    lines.append(plan.title)
    lines += [f"  {note}" for note in plan.notes if not note.startswith("not counted")]
    lines.append(f"{'per rank':<{width}}{'device bytes':>17} {'':12}{'host bytes':>17}")
    for row in [r for r in plan.rows if not r.transient]:
        lines.append(f"{row.what:<{width}}{row.device:>17,} {_human(row.device)}{row.host:>17,} {_human(row.host)}")
    device, host = plan.totals()
    lines.append(f"{'total':<{width}}{device:>17,} {_human(device)}{host:>17,} {_human(host)}")
    transient = [r for r in plan.rows if r.transient]
    if transient:
        lines.append("transient (device, on top of the total):")
        for row in transient:
            lines.append(f"  {row.what:<{width - 2}}{row.device:>17,} {_human(row.device)}")
    lines += [f"  {note}" for note in plan.notes if note.startswith("not counted")]
    return "\n".join(lines)
