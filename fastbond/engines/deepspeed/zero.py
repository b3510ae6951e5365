"""DeepSpeed ZeRO machinery: the policy's optimizer, frozen and anchor models partitioned like it,
sampling and export under ZeRO-3.

What lives here:

  init_distributed()          the process group (nccl on CUDA, gloo on CPU) and this rank's device
  ZeroOptimizer               the policy under `deepspeed.initialize`: TorchOptimizer's methods (autocast,
                              step, lr) plus sharded checkpoints and a consolidated transformers export
  shard_for_inference()       a frozen model (reference, reward, anchor) as a ZeRO-3 inference engine
  build_anchor()              the J-BOND anchor, partitioned exactly like the policy
  gathered_for_generation()   sampling under ZeRO-3: all weights gathered once per rollout phase,
                              or ZeRO's own per-layer gathering when a full copy does not fit
  consolidated_state_dict()   the full fp32 weights on rank 0 (zero_to_fp32, in memory)

The ZeRO-3 traps of SPEC §8 and where each is handled:

* A fused kernel reading `lm_head.weight` sees an empty shard. The fused
  log-prob path (`fastbond.logprobs`) runs the kernel *as the LM head's
  forward*, so ZeRO's hooks gather the weight for the forward, gather it
  again before the backward, and reduce-scatter the gradient into the
  partitioned parameter — the path every ZeRO-3 `nn.Linear` takes. A
  `GatheredParameters` block around the kernel would not do: it re-partitions
  on exit, before the backward needs the weight, and the gradient would land
  in a full-size `.grad` that ZeRO never reduces.
* An EMA that gathers full parameters costs two all-gathers per tensor and
  drops its update unless written back. The anchor here is a second ZeRO-3
  engine over the same ranks, so its shard r covers the same elements as the
  policy's shard r; the EMA runs on `param.ds_tensor` alone
  (`fastbond.anchor.ShardedEMAAnchor`), with no collective.
* A ZeRO-3 inference engine keeps some gathered full copies between forwards
  (persistent small tensors); after an EMA those would be stale, so the
  anchor drops them (locally) after each update.
* Quantized or hierarchical (hpZ) secondary copies of frozen weights never
  expire in DeepSpeed; the anchor's would go stale, so inference engines are
  built without them.
* Generation under ZeRO-3 gathers each layer for each token unless told
  otherwise, and ranks that stop early deadlock the others. Gathering the
  whole model once per rollout phase makes sampling local; the per-layer
  fallback needs `generate(..., synced_gpus=True)`, which
  `gathered_for_generation` tells the caller.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from fastbond import atomic
from fastbond.anchor import ShardedEMAAnchor
from fastbond.config import TrainConfig
from fastbond.engines.deepspeed.config import inference_config, zero_stage_of
from fastbond.engines.local import warmup_lambda
from fastbond.errors import FastbondError
from fastbond.models import compute_dtype

# DeepSpeed logs its whole config and every engine's set-up at INFO on each rank.
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
deepspeed.utils.logger.setLevel(logging.WARNING)

# module → (DeepSpeed engine, the object that owns its ZeRO-3 hooks), for the engines built here.
_ENGINES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- #
# process group
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the process group.

    Under `deepspeed` or `torchrun` the launcher set RANK, WORLD_SIZE and
    LOCAL_RANK; a plain `python -m fastbond train` with engine.kind=deepspeed
    runs as a group of one.
    """
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group() -> None:
    """At the end of a completed run, on every rank: shut this rank's side of the process group down
    while the interpreter is whole, rather than leaving its threads to the interpreter's exit (a rank
    that exits first must not abort in a half-destroyed group). Local: no rank waits for another."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_together() -> None:
    """At exit, after a failure every rank agreed on: wait for the other ranks (bounded by the process
    group's timeout, DEEPSPEED_TIMEOUT minutes)."""
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- #
# engines
# --------------------------------------------------------------------------- #


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`, buffers untouched (rotary inv_freq stays fp32, as DeepSpeed does)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _partition(model: nn.Module, ds_config: dict, dtype: torch.dtype) -> None:
    """Partition an already built model over the ranks (ZeRO-3), before `deepspeed.initialize`.

    Doing it here, rather than letting `initialize` do it, keeps DeepSpeed from
    first moving the whole model onto the device.
    """
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, dtype=dtype)


def _hook_owner(engine):
    """The DeepSpeedZeRoOffload holding the ZeRO-3 forward/backward hooks of an engine."""
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", None) or optimizer


def _register(module: nn.Module, engine) -> None:
    _ENGINES[module] = (engine, _hook_owner(engine) if zero_stage_of(engine.config) == 3 else None)


def shard_for_inference(model: nn.Module, ds_config: dict, dtype: torch.dtype) -> nn.Module:
    """A frozen model as a ZeRO-3 inference engine, partitioned like a policy under `ds_config`.

    Returns the module (hooks installed): call it, or its submodules, as usual.
    """
    ds = inference_config(ds_config)
    model.requires_grad_(False).eval()
    _cast_parameters(model, dtype)
    _partition(model, ds, dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    engine.module.eval()
    _register(engine.module, engine)
    return engine.module


def place_replicated(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen model, whole on every rank."""
    model.requires_grad_(False).eval()
    _cast_parameters(model, dtype)
    return model.to(device)


def release_gathered(module: nn.Module) -> None:
    """Drop every gathered full copy of a ZeRO-3 module's parameters; local, no communication.

    The next forward re-gathers from the shards. Parameters gathered by
    DeepSpeed's coordinator (persistent ones, those within the reuse distance)
    are released through it, so its bookkeeping stays right.
    """
    entry = _ENGINES.get(module)
    if entry is None or entry[1] is None:
        return
    owner = entry[1]
    owner.get_param_coordinator().release_and_reset_all(owner.module)


class ZeroOptimizer:
    """The policy's optimizer under DeepSpeed ZeRO: the methods of `TorchOptimizer`, and more.

    `step(loss)` → (applied, grad_norm): backward, gradient averaging over
    ranks, clipping, AdamW, warm-up. As in TorchOptimizer a non-finite loss is
    never back-propagated and a non-finite gradient leaves weights, moments
    and schedule untouched; both decisions are taken by all ranks together
    (a rank that alone skipped its backward would hang the others).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, ds_config: dict, device: torch.device):
        self.config = config
        self.ds_config = ds_config
        self.device = device
        self.zero_stage = zero_stage_of(ds_config)
        self.compute_dtype = compute_dtype(config)
        _cast_parameters(model, self.compute_dtype)
        if self.zero_stage == 3:
            _partition(model, ds_config, self.compute_dtype)
        warmup = config.optim.warmup_steps
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(warmup)),
        )
        self.model = self.engine.module
        _register(self.model, self.engine)
        self._guard_gradients()
        # A frozen base (LoRA) is reloaded from its source on resume: checkpoints hold the trained tensors only.
        self.has_frozen = any(not p.requires_grad for p in model.parameters())

    # ------------------------------------------------------------------ the seam

    def autocast(self):
        """DeepSpeed keeps the weights in the compute dtype itself; nothing to autocast."""
        return nullcontext()

    def _guard_gradients(self) -> None:
        """Make DeepSpeed skip the step on inf/NaN gradients in every precision.

        DeepSpeed checks only fp16 (and bf16 when asked) gradients for
        overflow: ZeRO-1/2 in fp32 and ZeRO-3 outside fp16 would apply a NaN
        step. Both get the check (one all-reduce of a flag, as fp16 pays).
        ZeRO-0 in fp32 has no wrapper to ask; `step` checks its gradients,
        which are whole on every rank after the all-reduce.
        """
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "check_grad_overflow"):  # ZeRO-1/2
            optimizer.check_grad_overflow = True
        if self.zero_stage == 3 and self.compute_dtype != torch.float16:
            needed = ("check_overflow", "_loss_scale_update_and_overflow_cleanup", "_overflow_check_and_loss_scale_update")
            if not all(hasattr(optimizer, name) for name in needed):
                raise FastbondError(
                    f"this DeepSpeed ({deepspeed.__version__}) lacks the ZeRO-3 overflow check fastbond relies on"
                )

            def overflow_check_and_loss_scale_update(update_scale=True):
                optimizer.overflow = False
                optimizer.check_overflow()
                if not update_scale:
                    return optimizer.overflow
                return optimizer._loss_scale_update_and_overflow_cleanup()

            optimizer._overflow_check_and_loss_scale_update = overflow_check_and_loss_scale_update

    def _plain_fp32(self) -> bool:
        return self.zero_stage == 0 and not (self.engine.fp16_enabled() or self.engine.bfloat16_enabled())

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.isfinite(value.detach()).all().to(self.device, torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def step(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Backward, average over ranks, clip, update. Returns (applied, pre-clip grad norm)."""
        if not self._all_finite(loss):
            self._drop_forward_state()
            return False, math.nan
        self.engine.backward(loss)
        if self._plain_fp32():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0
            if not math.isfinite(norm):
                self.engine.zero_grad()
                return False, norm
            self.engine.step()
            return True, norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        if not self.engine.was_step_applied():
            return False, norm if not math.isfinite(norm) else math.nan
        return True, norm

    def _drop_forward_state(self) -> None:
        """After a forward whose loss is not back-propagated, release what ZeRO-3 gathered for it."""
        if self.zero_stage == 3:
            release_gathered(self.model)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def state_dict(self) -> dict:
        """Counters only: the sharded optimizer lives in `save_checkpoint`'s directory."""
        return {"global_steps": self.global_steps, "skipped_steps": int(self.engine.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        """Counters come back with `load_checkpoint`; this checks they agree."""
        if state and int(state.get("global_steps", self.global_steps)) != self.global_steps:
            raise FastbondError(
                f"engine state says step {state['global_steps']} but the DeepSpeed checkpoint {self.global_steps}"
            )

    # ------------------------------------------------------------------ checkpoints

    TAG = "zero"

    def save_checkpoint(self, directory: str | Path) -> Path:
        """DeepSpeed's own sharded checkpoint (weights, fp32 master, Adam moments, scheduler); collective."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False,
                                    exclude_frozen_parameters=self.has_frozen)
        return directory / self.TAG

    def load_checkpoint(self, directory: str | Path) -> None:
        """Resume from `save_checkpoint`'s directory, on the same number of ranks; collective."""
        directory = Path(directory)
        if not (directory / self.TAG).is_dir():
            raise FastbondError(f"no DeepSpeed checkpoint in {directory / self.TAG}")
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=self.TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=not self.has_frozen,
        )
        if path is None:
            raise FastbondError(f"DeepSpeed could not load the checkpoint in {directory / self.TAG}")

    def master_partitions(self) -> list[torch.Tensor] | None:
        """This rank's fp32 master tensors (ZeRO-1/2/3), or None where the optimizer's parameters are they."""
        optimizer = self.engine.optimizer
        for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
            if hasattr(optimizer, name):
                return list(getattr(optimizer, name))
        return None

    def memory_report(self, held=None, anchor=None, reference: nn.Module | None = None,
                      reward: nn.Module | None = None) -> str:
        """This rank's bytes per row of `fastbond plan`, read off the live tensors (no collective); `held`:
        the policy form's rows (`PolicyForm.held_tensors`)."""
        from fastbond.memory import format_plan, measured_rows

        on_gpu = self.device.type == "cuda"
        plan = measured_rows(self.model, self.engine.basic_optimizer, anchor, reference, reward,
                             on_accelerator=on_gpu, masters=self.master_partitions(), held=held)
        rank = dist.get_rank() if dist.is_initialized() else 0
        text = format_plan(plan, header=f"memory at start, rank {rank} (ZeRO-{self.zero_stage})")
        if on_gpu:
            text += f"\n  device memory allocated: {torch.cuda.memory_allocated(self.device):,} bytes"
        return text

    def consolidated_state_dict(self, dtype: torch.dtype | None = None, select=None) -> dict[str, torch.Tensor] | None:
        return consolidated_state_dict(self.model, dtype, select)

    def export_pretrained(self, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path | None:
        return export_pretrained(self.model, path, tokenizer, dtype)


def build_anchor(engine: ZeroOptimizer, anchor_model: nn.Module) -> ShardedEMAAnchor:
    """The anchor of a DeepSpeed policy: `anchor_model` (same architecture) partitioned like it.

    ZeRO-3: a ZeRO-3 inference engine under the policy's config, so the
    shards align; ZeRO-0/1/2: replicated like the policy's weights. Either
    way the EMA state starts from the policy's local shards.
    """
    if engine.zero_stage == 3:
        module = shard_for_inference(anchor_model, engine.ds_config, engine.compute_dtype)
        release = partial(release_gathered, module)
    else:
        module = place_replicated(anchor_model, engine.compute_dtype, engine.device)
        release = None
    return ShardedEMAAnchor(engine.model, module, engine.compute_dtype, release=release)


def frozen_model(model: nn.Module, ds_config: dict, sharding: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A reference or reward model as configured by engine.reference_sharding (auto, zero3, replicated)."""
    if sharding == "auto":
        sharding = "zero3" if zero_stage_of(ds_config) == 3 else "replicated"
    if sharding == "zero3":
        return shard_for_inference(model, ds_config, dtype)
    return place_replicated(model, dtype, device)


# --------------------------------------------------------------------------- #
# generation under ZeRO-3
# --------------------------------------------------------------------------- #


def _partitioned(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def full_copy_fits(model: nn.Module, headroom: float = 0.8) -> bool:
    """Whether every rank can hold the whole model gathered (one all-reduce, so all ranks agree).

    `headroom`: the share of free memory the copy may take; the rest is left
    to the KV cache and activations of generation.
    """
    params = _partitioned(model)
    need = sum(p.ds_numel * p.element_size() for p in params)
    device = params[0].ds_tensor.device if params else torch.device("cpu")
    free = torch.tensor([_available_bytes(device if device.type == "cuda" else torch.device("cpu"))],
                        dtype=torch.float64, device=_comm_device())
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return need <= headroom * float(free.item())


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _remove_hooks(owner):
    """Lift every ZeRO-3 hook of a module; returns the root's start-of-forward hook to put back.

    That root hook matters too: its step reset checks, by a broadcast, that
    all ranks traced the same modules — a collective per forward, i.e. per
    generated token, which hangs as soon as one rank stops generating first.
    """
    for param in _partitioned(owner.module):
        param.ds_active_sub_modules.clear()
    for hook in owner.forward_hooks + owner.backward_hooks:
        hook.remove()
    owner.forward_hooks, owner.backward_hooks = [], []
    start_hook = owner.module._forward_pre_hooks.get(owner.fwd_pre_hook.id)
    owner.fwd_pre_hook.remove()
    return start_hook


def _restore_hooks(owner, start_hook) -> None:
    # In DeepSpeed's order: the step reset first, then the per-module hooks.
    if start_hook is not None:
        owner.fwd_pre_hook = owner.module.register_forward_pre_hook(start_hook)
    owner._register_deepspeed_module(owner.module)


def gathered_parameters(params: list) -> AbstractContextManager:
    """Whole copies of ZeRO-3 `params` for the block, read-only, released after it; others pass as they are."""
    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


@contextmanager
def gathered_for_generation(model: nn.Module, mode: str = "auto"):
    """Sample from a ZeRO-3 model; yields whether `generate` needs `synced_gpus=True`.

    mode "full": all weights gathered once for the whole block and ZeRO's
    hooks lifted, so each token is a local forward (one all-gather per
    rollout phase instead of one per layer per token). "per_layer": ZeRO's
    own gathering, for models whose full copy does not fit; ranks then must
    keep stepping together until all are done, hence `synced_gpus`. "auto":
    full when it fits on every rank. Not ZeRO-3: nothing to do.
    """
    params = _partitioned(model)
    entry = _ENGINES.get(model)
    if not params or entry is None or entry[1] is None:
        yield False
        return
    full = mode == "full" or (mode == "auto" and full_copy_fits(model))
    if not full:
        yield True
        return
    owner = entry[1]
    release_gathered(model)  # nothing half-gathered under the block
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        start_hook = _remove_hooks(owner)
        try:
            yield False
        finally:
            _restore_hooks(owner, start_hook)


# --------------------------------------------------------------------------- #
# consolidated weights
# --------------------------------------------------------------------------- #


def _full_fp32(param: nn.Parameter) -> torch.Tensor | None:
    from deepspeed.utils import safe_get_full_fp32_param

    try:
        return safe_get_full_fp32_param(param)
    except AttributeError:  # a ZeRO-3 parameter of an inference engine: no optimizer, no fp32 copy
        return None


@torch.no_grad()
def consolidated_state_dict(model: nn.Module, dtype: torch.dtype | None = None,
                            select=None) -> dict[str, torch.Tensor] | None:
    """Every parameter whole, on rank 0's CPU (None on other ranks); collective, one tensor at a time.

    The optimizer's fp32 master weights when there are any (what
    zero_to_fp32 rebuilds from a checkpoint), else the module's own weights
    gathered. `dtype`: cast on the way out (default: keep fp32 / the
    module's dtype). `select(name)`: only the parameters it accepts, and no
    buffers (e.g. a LoRA adapter). Peak extra device memory: one gathered tensor.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if select is not None and not select(name):
            continue
        full = _full_fp32(param)
        if full is None:
            if hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.data.clone() if rank == 0 else None
            else:
                full = param.data
        if rank == 0:
            state[name] = full.detach().to("cpu", dtype or full.dtype).clone().reshape(tuple(getattr(param, "ds_shape", param.shape)))
    if rank != 0:
        return None
    if select is not None:
        return state
    # Persistent buffers (never partitioned), but not the second name of a tied parameter.
    every_parameter_name = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        if name in persistent and name not in every_parameter_name:
            state[name] = buffer.detach().cpu().clone()
    return state


def export_pretrained(model: nn.Module, path: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path | None:
    """The model in transformers format (safetensors), written by rank 0; collective."""
    return write_pretrained(model, consolidated_state_dict(model, dtype), path, tokenizer)


def write_pretrained(model: nn.Module, state: dict[str, torch.Tensor] | None, path: str | Path,
                     tokenizer=None) -> Path | None:
    """`state` (whole tensors, on rank 0; None elsewhere) in transformers format as `model`'s; collective.

    Written into a temporary sibling and renamed into place, so a reader sees
    the old export or the new one. `config.json` records the dtype of the
    tensors written (fp32 by default), so `from_pretrained` loads them as they are.
    """
    path = Path(path)
    if state is not None:
        with atomic.replaced_directory(path) as tmp:
            written_dtype = next(iter(state.values())).dtype
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)  # may empty `state`
            _record_dtype(tmp / "config.json", written_dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    if dist.is_initialized():
        dist.barrier()
    return path if state is not None else None


def _record_dtype(config_path: Path, dtype: torch.dtype) -> None:
    # save_pretrained records the dtype of the module's parameters (bf16 under DeepSpeed),
    # not of the tensors handed to it.
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    config.setdefault("dtype", name)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
