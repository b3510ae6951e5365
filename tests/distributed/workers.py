"""The multi-rank side of tests/distributed: scenarios run by every rank of one launch.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/workers.py OUT_DIR SCENARIO...

Each scenario runs on all ranks (DeepSpeed over gloo on CPU), compares the
sharded computation against the same computation done in one process on
whole tensors, and writes `OUT_DIR/SCENARIO.rankR.json`: {"ok": bool,
"error": traceback or null, ...numbers}. The pytest side
(`test_distributed.py`) launches once per session and asserts on the files.
A scenario that raises is recorded and the next one runs; one that fails on
a single rank may leave the other waiting inside a collective, for at most
the process-group timeout (FASTBOND_DIST_TIMEOUT seconds, 120 by default).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch

torch.set_num_threads(1)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastbond.anchor import EMAAnchor  # noqa: E402
from fastbond.config import load_config  # noqa: E402
from fastbond.engines.deepspeed.config import build_deepspeed_config  # noqa: E402
from fastbond.engines.deepspeed.zero import (  # noqa: E402
    ZeroOptimizer,
    build_anchor,
    frozen_model,
    gathered_for_generation,
    init_distributed,
)
from fastbond.engines.local import TorchOptimizer  # noqa: E402
from fastbond.logprobs import response_logprobs  # noqa: E402
from fastbond.models import lm_head  # noqa: E402
from fastbond.rollout import Samples  # noqa: E402

SCENARIOS = {}


def scenario(function):
    SCENARIOS[function.__name__] = function
    return function


# --------------------------------------------------------------------------- #
# a tiny model whose tensors do not split evenly over 2 ranks
# --------------------------------------------------------------------------- #


def tiny_model(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    """hidden 21 (odd) so most tensors have an odd number of elements and the last
    shard of each is padded: the EMA and the gathers must get the padding right."""
    config = LlamaConfig(
        vocab_size=97, hidden_size=21, intermediate_size=37, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # norms away from 1 so their EMA is visible
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def fastbond_config(stage: int, dtype: str = "float32", batch: int = 4, **engine):
    overrides = ["engine.kind=deepspeed", f"engine.zero_stage={stage}", f"model.dtype={dtype}",
                 f"rollout.batch_size={batch}", "optim.lr=0.05", "optim.warmup_steps=2", "optim.max_grad_norm=0.5",
                 "optim.weight_decay=0.01"]
    overrides += [f"engine.{k}={v}" for k, v in engine.items()]
    return load_config(None, overrides)


def make_engine(model, stage: int, dtype: str = "float32"):
    config = fastbond_config(stage, dtype)
    ds_config = build_deepspeed_config(config, dist.get_world_size())
    return ZeroOptimizer(model, config, ds_config, torch.device("cpu")), config


def batch_samples(seed: int, rows: int = 4, prompt: int = 5, response: int = 6) -> Samples:
    """Deterministic [prompt | response] rows with left-padded prompts and ragged responses."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 97, (rows, prompt), generator=generator)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompts = torch.where(prompt_mask.bool(), prompts, torch.zeros_like(prompts))
    responses = torch.randint(3, 97, (rows, response), generator=generator)
    response_mask = torch.ones(rows, response, dtype=torch.bool)
    response_mask[1, 4:] = False
    response_mask[2, 2:] = False
    responses = torch.where(response_mask, responses, torch.zeros_like(responses))
    sequences = torch.cat([prompts, responses], 1)
    attention = torch.cat([prompt_mask, response_mask.long()], 1)
    return Samples(sequences, attention, response_mask, prompt, [""] * rows)


def weighted_loss(model, samples: Samples, seed: int) -> torch.Tensor:
    """Per-token weights differ (as J-BOND's per-sequence weights do, SPEC §8)."""
    logps = response_logprobs(model, samples, backend="chunked")
    weights = torch.linspace(-1.0, 2.0, logps.numel(), dtype=torch.float32).view_as(logps)
    weights = weights.roll(seed)
    return -(weights * logps).sum() / samples.response_mask.sum()


def full_params(model) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters of a (possibly ZeRO-3) model on every rank: the test's own gather."""
    out = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                out[name] = param.data.detach().float().clone()
        else:
            out[name] = param.detach().float().clone()
    return out


def gather_state(anchor) -> dict[str, torch.Tensor]:
    """The anchor's fp32 EMA state made whole (the test's own all-gather of the shards)."""
    out = {}
    world = dist.get_world_size()
    for (name, param), state in zip(anchor.anchor_parameters, anchor.state):
        if anchor.sharded:
            pieces = [torch.empty_like(state) for _ in range(world)]
            dist.all_gather(pieces, state.contiguous())
            out[name] = torch.cat(pieces)[: param.ds_numel].view(param.ds_shape).clone()
        else:
            out[name] = state.detach().float().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# --------------------------------------------------------------------------- #
# sharded EMA == unsharded EMA, and the anchor's forward sees the update
# --------------------------------------------------------------------------- #


def _ema_case(stage: int, dtype_name: str, tied: bool, steps: int = 3, eta: float = 0.3, release: bool = True) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    base = tiny_model(tied)
    engine, _ = make_engine(copy.deepcopy(base), stage, dtype_name)
    anchor = build_anchor(engine, copy.deepcopy(base))
    if not release:  # the trap, for the negative control: stale gathered copies after the EMA
        anchor._release = None
    # the unsharded oracle: EMAAnchor over whole tensors (fp32 state, compute-dtype shadow)
    oracle_model = copy.deepcopy(base)
    for p in oracle_model.parameters():
        p.data = p.data.to(dtype)  # the policy's weights as DeepSpeed holds them
    oracle = EMAAnchor(oracle_model, dtype)
    rank = dist.get_rank()
    state_diffs, forward_diffs = [], []
    ids = batch_samples(7).sequences
    for step in range(steps):
        loss = weighted_loss(engine.model, batch_samples(100 + rank), seed=rank)
        assert engine.step(loss)[0]
        policy_now = full_params(engine.model)
        anchor.update(engine.model, eta)
        with torch.no_grad():
            for p, (name, _) in zip(oracle_model.parameters(), oracle_model.named_parameters()):
                p.copy_(policy_now[name].to(dtype))
        oracle.update(oracle_model, eta)
        whole = gather_state(anchor)
        expected = dict(zip([n for n, _ in oracle.model.named_parameters()], [t.float() for t in oracle.state]))
        state_diffs.append(max_diff(whole, expected))
        # The anchor's own forward (ZeRO hooks, gathered copies) must run on the updated weights.
        # (compared with π_ref's architecture holding the oracle's weights and fp32 buffers:
        # EMAAnchor's `.to(dtype)` also rounds the rotary buffer, DeepSpeed does not)
        view = copy.deepcopy(base)
        for target, source in zip(view.parameters(), oracle.model.parameters()):
            target.data = source.data
        with torch.no_grad():
            got = anchor.model(ids).logits.float()
            want = view(ids).logits.float()
        forward_diffs.append(float((got - want).abs().max()))
    moved = max_diff(gather_state(anchor), {n: p.float() for n, p in base.named_parameters()})
    return {"state_diff": max(state_diffs), "forward_diff": max(forward_diffs), "moved": moved,
            "local_numel": sum(t.numel() for t in anchor.state),
            "full_numel": sum(p.numel() for p in base.parameters())}


@scenario
def ema_zero3_fp32():
    result = _ema_case(3, "float32", tied=False)
    result["forward_diff_without_release"] = _ema_case(3, "float32", tied=False, release=False)["forward_diff"]
    return result


@scenario
def ema_zero3_bf16_tied():
    return _ema_case(3, "bfloat16", tied=True)


@scenario
def ema_zero2_fp32():
    return _ema_case(2, "float32", tied=True)


# --------------------------------------------------------------------------- #
# no collective runs during the EMA
# --------------------------------------------------------------------------- #

# Any name containing one of these is a communication entry point (torch has renamed several
# of them across versions, e.g. all_gather_into_tensor → all_gather_single).
COMMUNICATING = re.compile(r"all_?reduce|gather|scatter|broadcast|barrier|send|recv|to_?all|^reduce|allgather")
NOT_COMMUNICATING = re.compile(r"^(get_|is_|has_|new_|init|destroy|set_|_get|_set|_register|_has|_is|_coalescing)")


def _communicating(owner) -> list[str]:
    names = []
    for name in dir(owner):
        if name.startswith("__") or NOT_COMMUNICATING.search(name) or not COMMUNICATING.search(name):
            continue
        value = getattr(owner, name, None)
        if callable(value) and not isinstance(value, type):
            names.append(name)
    return names


@contextmanager
def collectives_forbidden(calls: list, refuse: bool = True, elements: list | None = None):
    """Every collective entry point (torch.distributed, deepspeed.comm, the process-group
    objects underneath both) records its name in `calls` and raises (or, with
    refuse=False, passes the call through: a counter)."""
    import deepspeed.comm as ds_comm
    import torch.distributed.distributed_c10d as c10d

    saved = []

    def forbid(owner, name):
        if not hasattr(owner, name):
            return
        # The raw attribute, not getattr's: a pybind method read through its class comes back
        # unbound and, set back, would no longer receive `self`.
        own = vars(owner)
        original = own.get(name)

        passthrough = getattr(owner, name)

        def watched(*args, _name=f"{getattr(owner, '__name__', type(owner).__name__)}.{name}", **kwargs):
            calls.append(_name)
            if elements is not None:  # elements moved: the first tensor argument (the output of a gather)
                first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
                elements.append((_name, 0 if first is None else first.numel()))
            if refuse:
                raise RuntimeError(f"collective {_name} called")
            return passthrough(*args, **kwargs)

        try:
            setattr(owner, name, watched)
        except (AttributeError, TypeError):
            return
        saved.append((owner, name, name in own, original))

    owners = [dist, c10d, ds_comm]
    backend = getattr(ds_comm, "cdb", None)  # DeepSpeed's backend object keeps its own references
    if backend is not None:
        owners.append(backend)
    owners += [type(dist.group.WORLD), type(dist.group.WORLD._get_backend(torch.device("cpu")))]
    owners += list(type(dist.group.WORLD._get_backend(torch.device("cpu"))).__mro__[1:2])
    for owner in owners:
        for name in _communicating(owner):
            forbid(owner, name)
    if backend is not None:
        for name in ("all_gather_function", "reduce_scatter_function"):
            if callable(getattr(backend, name, None)):
                forbid(backend, name)
    try:
        yield calls
    finally:
        for owner, name, had_own, original in reversed(saved):
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


@scenario
def ema_without_collectives():
    results = {}
    for stage in (3, 2):
        base = tiny_model(tied=True)
        engine, _ = make_engine(copy.deepcopy(base), stage, "bfloat16")
        anchor = build_anchor(engine, copy.deepcopy(base))
        assert engine.step(weighted_loss(engine.model, batch_samples(3 + dist.get_rank()), 0))[0]
        with torch.no_grad():
            anchor.model(batch_samples(5).sequences)  # leaves ZeRO-3's persistent copies gathered
        before = [t.clone() for t in anchor.state]
        calls: list = []
        with collectives_forbidden(calls):
            anchor.update(engine.model, 0.25)
            anchor.reset_to(engine.model)
            anchor.update(engine.model, 0.1)
        changed = sum(int(not torch.equal(a, b)) for a, b in zip(before, anchor.state))
        # Positive control: the same patch catches the gather a naive full-parameter EMA would do.
        caught: list = []
        try:
            with collectives_forbidden(caught):
                if stage == 3:  # what an EMA over gathered full tensors would start with
                    with deepspeed.zero.GatheredParameters(list(anchor.model.parameters())[:1], modifier_rank=None):
                        pass
                else:
                    dist.all_reduce(torch.zeros(1))
        except RuntimeError:
            pass
        dist.barrier()
        results[f"zero{stage}"] = {"calls": calls, "tensors_changed": changed, "tensors": len(before),
                                   "control_caught": caught}
    return results


# --------------------------------------------------------------------------- #
# fused log-probs under ZeRO-3: gradients equal the unsharded ones
# --------------------------------------------------------------------------- #


@scenario
def fused_logprob_grads_zero3():
    from deepspeed.utils import safe_get_full_grad

    out = {}
    world = dist.get_world_size()
    rank = dist.get_rank()
    for tied in (True, False):
        base = tiny_model(tied)
        engine, _ = make_engine(copy.deepcopy(base), 3)
        head = lm_head(engine.model)
        empty_outside_forward = head.weight.numel() == 0  # the trap: a direct read sees no weight
        loss = weighted_loss(engine.model, batch_samples(200 + rank), seed=rank)
        engine.engine.backward(loss)
        grads = {}
        for name, param in engine.model.named_parameters():
            grads[name] = safe_get_full_grad(param).detach().float().clone().view(param.ds_shape)
        engine.engine.optimizer.zero_grad()
        # ZeRO-0: one process, whole tensors, the mean of every rank's loss (DeepSpeed averages gradients).
        plain = copy.deepcopy(base)
        losses = [weighted_loss(plain, batch_samples(200 + r), seed=r) for r in range(world)]
        reference_loss = torch.stack(losses).mean()
        reference_loss.backward()
        expected = {name: p.grad.detach().float() for name, p in plain.named_parameters()}
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        # A frozen reference as a ZeRO-3 inference engine: same log-probs, no gradient needed.
        reference = frozen_model(copy.deepcopy(base), engine.ds_config, "zero3", torch.float32, torch.device("cpu"))
        with torch.no_grad():
            sharded_ref = response_logprobs(reference, batch_samples(300 + rank), backend="chunked")
            plain_ref = response_logprobs(base, batch_samples(300 + rank), backend="chunked")
        out["tied" if tied else "untied"] = {
            "empty_outside_forward": empty_outside_forward,
            "loss_diff": abs(float(loss) - float(losses[rank])),
            "grad_rel_diff": max(rel_diff(grads[k], expected[k]) for k in expected),
            "head_grad_rel_diff": rel_diff(grads[head_name], expected[head_name]),
            "head_grad_norm": float(expected[head_name].norm()),
            "reference_sharded": all(hasattr(p, "ds_id") for p in reference.parameters()),
            "reference_logp_diff": float((sharded_ref - plain_ref).abs().max()),
        }
    return out


# --------------------------------------------------------------------------- #
# ZeroOptimizer == TorchOptimizer, step by step, including a skipped step
# --------------------------------------------------------------------------- #


class InfGrad(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _engine_case(stage: int, steps: int = 4, bad_step: int = 2) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    base = tiny_model(tied=True)
    engine, config = make_engine(copy.deepcopy(base), stage)
    plain = copy.deepcopy(base)
    torch_engine = TorchOptimizer(plain, config.optim, torch.float32, torch.device("cpu"))

    def loss_of(model, r, step, bad):
        samples = batch_samples(1000 * step + r)
        if bad:
            hidden_hook = model.model.norm.register_forward_hook(lambda m, i, o: InfGrad.apply(o))
            try:
                return weighted_loss(model, samples, seed=r)
            finally:
                hidden_hook.remove()
        return weighted_loss(model, samples, seed=r)

    records = []
    for step in range(steps):
        bad = step == bad_step
        applied, norm = engine.step(loss_of(engine.model, rank, step, bad))
        reference_loss = torch.stack([loss_of(plain, r, step, bad) for r in range(world)]).mean()
        ref_applied, ref_norm = torch_engine.step(reference_loss)
        weights = full_params(engine.model)
        records.append({
            "applied": applied, "ref_applied": ref_applied,
            "norm": norm, "ref_norm": ref_norm,
            "lr": engine.lr, "ref_lr": torch_engine.lr,
            "weight_diff": max_diff(weights, {n: p.detach().float() for n, p in plain.named_parameters()}),
        })
    nonfinite_loss = engine.step(loss_of(engine.model, rank, 0, False) * float("nan"))
    after_nan = max_diff(full_params(engine.model), {n: p.detach().float() for n, p in plain.named_parameters()})
    # and the next ordinary step still matches (nothing of the skipped forward lingers)
    engine.step(loss_of(engine.model, rank, steps, False))
    torch_engine.step(torch.stack([loss_of(plain, r, steps, False) for r in range(world)]).mean())
    after_next = max_diff(full_params(engine.model), {n: p.detach().float() for n, p in plain.named_parameters()})
    return {"steps": records, "nan_loss_step": list(nonfinite_loss), "weight_diff_after_nan_loss": after_nan,
            "weight_diff_after_next_step": after_next}


@scenario
def engine_matches_torch_zero3():
    return _engine_case(3)


@scenario
def engine_matches_torch_zero2():
    return _engine_case(2)


@scenario
def engine_matches_torch_zero1():
    return _engine_case(1)


@scenario
def engine_matches_torch_zero0():
    return _engine_case(0)


# --------------------------------------------------------------------------- #
# save on 2 ranks, resume on 2 ranks → the same continuation
# --------------------------------------------------------------------------- #


@scenario
def checkpoint_resume_zero3():
    rank = dist.get_rank()
    directory = Path(os.environ["FASTBOND_TEST_OUT"]) / "checkpoint-zero3"
    base = tiny_model(tied=True)

    def fresh():
        engine, _ = make_engine(copy.deepcopy(base), 3, "bfloat16")
        return engine, build_anchor(engine, copy.deepcopy(base))

    def run(engine, anchor, steps):
        for step in steps:
            engine.step(weighted_loss(engine.model, batch_samples(50 * step + rank), seed=rank))
            anchor.update(engine.model, 0.2)

    engine, anchor = fresh()
    run(engine, anchor, range(2))
    engine.save_checkpoint(directory)
    anchor.save(directory / "anchor")
    dist.barrier()
    run(engine, anchor, range(2, 4))
    first = (full_params(engine.model), gather_state(anchor), engine.lr, engine.global_steps)

    engine, anchor = fresh()
    engine.load_checkpoint(directory)
    anchor.load(directory / "anchor")
    resumed_steps = engine.global_steps
    run(engine, anchor, range(2, 4))
    second = (full_params(engine.model), gather_state(anchor), engine.lr, engine.global_steps)
    files = sorted(p.name for p in (directory / "anchor").iterdir())
    return {"policy_diff": max_diff(first[0], second[0]), "anchor_diff": max_diff(first[1], second[1]),
            "lr": [first[2], second[2]], "steps": [first[3], second[3]], "resumed_at": resumed_steps,
            "anchor_files": files}


# --------------------------------------------------------------------------- #
# consolidated export loads with from_pretrained
# --------------------------------------------------------------------------- #


@scenario
def export_zero3():
    """The pytest side loads the export with from_pretrained in a process without DeepSpeed
    and compares it with the fp32 master weights and the bf16 weights gathered here."""
    from safetensors.torch import save_file

    rank = dist.get_rank()
    out = Path(os.environ["FASTBOND_TEST_OUT"])
    base = tiny_model(tied=True)
    engine, _ = make_engine(copy.deepcopy(base), 3, "bfloat16")
    engine.step(weighted_loss(engine.model, batch_samples(9 + rank), seed=rank))
    master = engine.consolidated_state_dict()
    engine.export_pretrained(out / "export-zero3")
    gathered = full_params(engine.model)  # the bf16 weights the ranks compute with, gathered by the test
    if rank == 0:
        save_file(master, str(out / "export-zero3-master.safetensors"))
        save_file(gathered, str(out / "export-zero3-gathered.safetensors"))
    dist.barrier()
    return {"master_dtypes": sorted({str(t.dtype) for t in master.values()}) if master else None,
            "master_is_none_off_rank0": master is None if rank else None}


# --------------------------------------------------------------------------- #
# LoRA: one frozen base, the policy adapter trained, the anchor adapter its shard-local EMA
# --------------------------------------------------------------------------- #


LORA_HEAD = ["q_proj", "v_proj", "down_proj", "lm_head"]


def tiny_lora(tied: bool = True, targets: list[str] | None = None):
    """The tiny model with PEFT's two adapters (r 3: odd-sized A and B, padded shards), B made non-zero
    so that every adapter tensor gets a gradient from the first step."""
    from fastbond import lora
    from fastbond.config import LoraConfig

    wrapped = lora.attach_adapters(tiny_model(tied), LoraConfig(r=3, alpha=6.0, target_modules=targets))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn_like(param))
    for (_, anchor), (_, policy) in zip(lora.adapter_parameters(wrapped, lora.ANCHOR),
                                        lora.adapter_parameters(wrapped, lora.POLICY)):
        anchor.data.copy_(policy.data)
    return wrapped


def _lora_case(stage: int, steps: int = 3, eta: float = 0.3, head: bool = False) -> dict:
    """ZeRO-`stage` LoRA against one process: the policy adapter after each step, the anchor adapter's fp32
    state (made whole by the test), its forward and π_ref's; the EMA issues no collective; the base is frozen.
    `head`: the (untied) LM head adapted too, so the fused log-prob op reads its merged weight."""
    from functools import partial

    from fastbond import lora
    from fastbond.engines.deepspeed.zero import release_gathered

    world, rank = dist.get_world_size(), dist.get_rank()
    plain = tiny_lora(tied=not head, targets=LORA_HEAD if head else None)
    sharded = copy.deepcopy(plain)
    config = fastbond_config(stage)
    engine = ZeroOptimizer(sharded.get_base_model(), config, build_deepspeed_config(config, world), torch.device("cpu"))
    release = partial(release_gathered, engine.model) if stage == 3 else None
    anchor = lora.AdapterAnchor(sharded, torch.float32, release=release)
    torch_engine = TorchOptimizer(plain.get_base_model(), config.optim, torch.float32, torch.device("cpu"))
    oracle = lora.AdapterAnchor(plain)
    base_before = {n: p.detach().clone() for n, p in plain.get_base_model().named_parameters() if "lora_" not in n}
    probe = batch_samples(77)
    records, calls = [], []
    for step in range(steps):
        applied, norm = engine.step(weighted_loss(engine.model, batch_samples(100 * step + rank), seed=rank))
        with collectives_forbidden(calls):
            anchor.update(engine.model, eta)
        torch_engine.step(torch.stack([weighted_loss(plain.get_base_model(), batch_samples(100 * step + r), seed=r)
                                       for r in range(world)]).mean())
        oracle.update(plain.get_base_model(), eta)
        whole = full_params(engine.model)
        want = {n: p.detach().float() for n, p in plain.get_base_model().named_parameters()}
        policy_adapter = [n for n in want if lora.is_policy_adapter(n)]
        forward = {}
        for role, oracle_role in ((anchor.model, oracle.model), (lora.AdapterRole(sharded, None),
                                                                 lora.AdapterRole(plain, None))):
            with torch.no_grad(), role.active() as module, oracle_role.active() as oracle_module:
                got = response_logprobs(module, probe, backend="chunked")
                expected = response_logprobs(oracle_module, probe, backend="chunked")
            forward[role.adapter or "reference"] = float((got - expected).abs().max())
        records.append({
            "applied": applied, "norm": norm,
            "policy_adapter_diff": max(float((whole[n] - want[n]).abs().max()) for n in policy_adapter),
            "anchor_state_diff": max_diff(gather_state(anchor), oracle.state_dict()),
            "forward_diff": forward,
        })
    moved = max(float((a.float() - b.float()).abs().max())
                for a, b in zip(oracle.state, [p for _, p in lora.adapter_parameters(plain, lora.POLICY)]))
    base_now = {n: p for n, p in full_params(engine.model).items() if n in base_before}
    trainable = sorted(n for n, p in engine.model.named_parameters() if p.requires_grad)
    head_tensors = [n for n in whole if "lm_head" in n and lora.is_policy_adapter(n)]
    return {"steps": records, "ema_collectives": calls, "anchor_trails_policy": moved, "head_tensors": head_tensors,
            "base_diff": max_diff(base_now, {n: t.float() for n, t in base_before.items()}),
            "trainable_all_policy_adapter": bool(trainable) and all(lora.is_policy_adapter(n) for n in trainable),
            "sharded": anchor.sharded}


@scenario
def lora_zero3():
    return _lora_case(3)


@scenario
def lora_head_zero3():
    return _lora_case(3, head=True)


@scenario
def lora_zero2():
    return _lora_case(2)


@scenario
def lora_zero1():
    return _lora_case(1)


@scenario
def lora_zero0():
    return _lora_case(0)


# --------------------------------------------------------------------------- #
# the memory report at start agrees with `fastbond plan`
# --------------------------------------------------------------------------- #


@scenario
def memory_matches_plan():
    from fastbond.memory import measured_rows
    from fastbond.plan import plan_memory, shape_of

    out = {}
    for stage, dtype in ((3, "bfloat16"), (3, "float32"), (2, "bfloat16"), (1, "float32")):
        base = tiny_model(tied=True)
        engine, config = make_engine(copy.deepcopy(base), stage, dtype)
        anchor = build_anchor(engine, copy.deepcopy(base))
        shape = shape_of(base, "tiny")
        config.rollout.backend = "generate"  # no sampler here: the plan's rows of the engine alone
        planned = plan_memory(config, dist.get_world_size(), shape, None, None)
        # The optimizer's moments appear at its first step.
        engine.step(weighted_loss(engine.model, batch_samples(3 + dist.get_rank()), seed=0))
        measured = measured_rows(engine.model, engine.engine.basic_optimizer, anchor, on_accelerator=False,
                                 masters=engine.master_partitions())
        report = engine.memory_report(anchor=anchor)
        key = f"zero{stage}_{dtype}"
        out[key] = {
            "planned": {r.what.split(" (")[0]: r.device + r.host for r in planned.rows if not r.transient},
            "measured": {r.what.split(" (")[0]: r.device + r.host for r in measured.rows},
            "report_lines": len(report.splitlines()),
        }
    out.update(_lora_memory())
    return out


def _lora_memory() -> dict:
    """The same comparison for LoRA: the frozen base, both adapters, the policy adapter's optimizer."""
    from functools import partial

    from fastbond import lora
    from fastbond.engines.deepspeed.zero import release_gathered
    from fastbond.memory import measured_rows
    from fastbond.models import Models
    from fastbond.plan import plan_memory, shape_of

    out = {}
    for stage, dtype in ((3, "bfloat16"), (3, "float32"), (2, "bfloat16"), (0, "float32")):
        wrapped = tiny_lora()
        config = load_config(None, ["engine.kind=deepspeed", f"engine.zero_stage={stage}", f"model.dtype={dtype}",
                                    "model.lora.r=3", "model.lora.alpha=6", "optim.lr=0.05",
                                    "rollout.backend=generate"])  # no sampler here: the engine's rows alone
        engine = ZeroOptimizer(wrapped.get_base_model(), config, build_deepspeed_config(config, dist.get_world_size()),
                               torch.device("cpu"))
        release = partial(release_gathered, engine.model) if stage == 3 else None
        anchor = lora.AdapterAnchor(wrapped, engine.compute_dtype, release=release)
        planned = plan_memory(config, dist.get_world_size(), shape_of(tiny_model(tied=True), "tiny"), None, None)
        engine.step(weighted_loss(engine.model, batch_samples(3 + dist.get_rank()), seed=0))
        form = lora.LoraForm()
        form.wrapped = wrapped
        held = form.held_tensors(Models(None, engine.model, None, None, anchor))
        measured = measured_rows(engine.model, engine.engine.basic_optimizer, anchor, on_accelerator=False,
                                 masters=engine.master_partitions(), held=held)
        report = engine.memory_report(held, anchor)
        out[f"lora_zero{stage}_{dtype}"] = {
            "planned": {r.what.split(" (")[0]: r.device + r.host for r in planned.rows if not r.transient},
            "measured": {r.what.split(" (")[0]: r.device + r.host for r in measured.rows},
            "report_lines": len(report.splitlines()),
        }
    return out


# --------------------------------------------------------------------------- #
# generation under ZeRO-3: one gather per rollout, or per layer with synced ranks
# --------------------------------------------------------------------------- #


@scenario
def generation_zero3():
    """Full gather: the weights move once per rollout; per layer: every module, every token."""
    base = tiny_model(tied=True)
    override = Path(os.environ["FASTBOND_TEST_OUT"]) / "no-persistence.json"
    if dist.get_rank() == 0:  # small tensors would otherwise stay gathered and hide per-layer traffic
        override.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    dist.barrier()
    config = fastbond_config(3, deepspeed_config=str(override))
    ds_config = build_deepspeed_config(config, dist.get_world_size())
    engine = ZeroOptimizer(copy.deepcopy(base), config, ds_config, torch.device("cpu"))
    prompts = batch_samples(11)
    ids, mask = prompts.sequences[:, :5], prompts.attention_mask[:, :5]
    new_tokens = 6

    def draw(model, synced):
        torch.manual_seed(1234)
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=new_tokens, pad_token_id=0, synced_gpus=synced)

    counts, outputs = {}, {}
    engine.model.eval()
    for mode in ("full", "per_layer", "auto"):
        calls, elements = [], []
        with collectives_forbidden(calls, refuse=False, elements=elements):
            with gathered_for_generation(engine.model, mode) as synced:
                before = len(elements)
                outputs[mode] = draw(engine.model, synced)
                during = elements[before:]
        gathered = sum(n for name, n in elements if name.startswith("ProcessGroup.all_gather"))
        counts[mode] = {"synced": synced, "gathered_elements": gathered,
                        "gathers_while_generating": sum(1 for name, _ in during if "gather" in name)}
    expected = draw(copy.deepcopy(base).eval(), False)
    # The anchor, a ZeRO-3 inference engine, samples the same way (it starts at the policy = base).
    anchor = build_anchor(engine, copy.deepcopy(base))
    with gathered_for_generation(anchor.model, "full") as synced:
        outputs["anchor_full"] = draw(anchor.model, synced)
    engine.model.train()  # training goes on once the hooks are back
    applied, _ = engine.step(weighted_loss(engine.model, batch_samples(1), seed=0))
    padded = sum(math.ceil(p.numel() / dist.get_world_size()) * dist.get_world_size() for p in base.parameters())
    return {"counts": counts, "new_tokens": new_tokens, "model_elements": padded,
            "equal": {mode: torch.equal(out, expected) for mode, out in outputs.items()},
            "step_after": applied, "ds_threshold": ds_config["zero_optimization"]["stage3_param_persistence_threshold"]}


# --------------------------------------------------------------------------- #
# the trainer's agreements between ranks
# --------------------------------------------------------------------------- #


@scenario
def ranks_agree():
    """A step is skipped on every rank when one rank's rewards are not finite (a rank that
    stepped alone would hang the others in the gradient all-reduce); metrics are averaged, maxima maxed."""
    from fastbond.engines.deepspeed.engine import DeepSpeedEngine

    rank = dist.get_rank()
    engine = DeepSpeedEngine(fastbond_config(0))  # joins the existing process group
    return {
        "one_rank_false": engine.all_true(rank == 0),
        "all_true": engine.all_true(True),
        "metrics": engine.reduce_metrics({"loss": torch.tensor([1.0, 3.0]) * (rank + 1), "lr": 0.5,
                                          "rollout/logp_gap_max": 1e-6 * (rank + 1)}),
    }


# --------------------------------------------------------------------------- #


def main() -> int:
    out_dir = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    os.environ["FASTBOND_TEST_OUT"] = str(out_dir)
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=int(os.environ.get("FASTBOND_DIST_TIMEOUT", "120"))))
    rank, world, _ = init_distributed()
    for name in names:
        started = time.perf_counter()
        try:
            result = {"ok": True, "error": None, **(SCENARIOS[name]() or {})}
        except Exception:  # noqa: BLE001 - reported to the pytest side
            result = {"ok": False, "error": traceback.format_exc()}
        result["seconds"] = time.perf_counter() - started
        (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
