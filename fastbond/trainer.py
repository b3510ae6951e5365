"""The training loop of `fastbond train`: read it top to bottom.

    prompts → rollout (samples + rewards) → log-probs + loss → optimizer step
            → anchor move → metrics / checkpoint

Setting up (models, reward, prompts, resume) is in `setup_run`; the loop in
`train` does one step after another and knows nothing of any algorithm's
details, which live in `fastbond.algorithms`.

Under DeepSpeed (engine.kind deepspeed, or auto under `deepspeed --num_gpus K`)
every rank runs this same loop on its share of each step's batch; what is
set up, saved and exported differently lives in `fastbond.distributed_run`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fastbond.algorithms import Context, Prompts, make_algorithm
from fastbond.anchor import EMAAnchor
from fastbond.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastbond.config import EMBEDDED, TrainConfig, to_dict
from fastbond.data import PromptStream, read_prompts
from fastbond.engine import TorchEngine, resolve_engine_kind
from fastbond.errors import FastbondError
from fastbond.metrics_log import MetricsLog, read_metrics, to_float
from fastbond.models import (
    DTYPES,
    attention_implementation,
    enable_activation_checkpointing,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)
from fastbond.rollout import KeyedNoise, combine_keys, encode_prompts


class PhaseTimer:
    """Wall time per phase of a step (generate / logprobs / backward / ema)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return {f"time/{phase}": value for phase, value in seconds.items()}


@dataclass
class Run:
    config: TrainConfig
    run_dir: Path
    device: torch.device
    ctx: Context
    algorithm: object
    engine: TorchEngine
    stream: PromptStream
    eval_prompts: list[str]
    policy_source: str  # where the initial policy came from
    step: int = 0
    skipped: int = 0
    extra: dict = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    distributed: bool = False  # DeepSpeed: ranks share each batch (fastbond.distributed_run)

    @property
    def main(self) -> bool:
        """The rank that logs, draws progress, evaluates and reports."""
        return self.rank == 0


def quiet_transformers() -> None:
    """No per-load progress bars from transformers; fastbond draws its own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def set_cpu_threads(config: TrainConfig, device: torch.device) -> None:
    # Tiny models on a few cores lose more to thread hand-offs than they gain.
    if device.type == "cpu" and config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare_process(config: TrainConfig, device: torch.device, seed: int) -> None:
    """What every process does before loading models: quiet loaders, threads, seed."""
    quiet_transformers()
    set_cpu_threads(config, device)
    seed_everything(seed)


def resolve_model_path(path: str) -> str:
    if path != EMBEDDED:
        return path
    from fastbond.embedded import build_embedded_reference

    return str(build_embedded_reference())


def resolve_prompts(path: str, split: str) -> list[str]:
    if path != EMBEDDED:
        return read_prompts(path)
    from fastbond.embedded import prompt_splits

    train_prompts, eval_prompts = prompt_splits()
    return train_prompts if split == "train" else eval_prompts


def check_prompt_lengths(tokenizer, prompts: list[str], limit: int, source: str) -> None:
    """Every prompt within data.max_prompt_tokens, checked before the first step."""
    for start in range(0, len(prompts), 512):
        chunk = prompts[start : start + 512]
        lengths = [len(ids) for ids in tokenizer(chunk, add_special_tokens=True)["input_ids"]]
        for offset, length in enumerate(lengths):
            if length > limit:
                raise FastbondError(
                    f"{source}: prompt {start + offset + 1} has {length} tokens, over data.max_prompt_tokens={limit}"
                )


def load_models(config: TrainConfig, device: torch.device, policy_path: str | Path):
    """(tokenizer, policy, reference, reward_fn) of a config; the policy from `policy_path`."""
    from fastbond.rewards import load_reward

    initial_policy = resolve_model_path(config.model.policy)
    reference_source = resolve_model_path(config.model.reference) if config.model.reference else initial_policy
    dtype = DTYPES[config.model.dtype]
    attn = attention_implementation(config.model.attn_implementation, device)
    remote = config.model.trust_remote_code
    tokenizer = load_tokenizer(initial_policy, remote)
    # The policy keeps fp32 master weights; low precision is used through autocast.
    policy = load_causal_lm(policy_path, torch.float32, device, attn, remote)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    reference = load_causal_lm(reference_source, dtype, device, attn, remote).eval().requires_grad_(False)
    reward_fn = load_reward(config.reward.kind, config.reward.name, device=device, dtype=dtype,
                            batch_size=config.reward.batch_size, trust_remote_code=remote,
                            policy_tokenizer=tokenizer)
    return tokenizer, policy, reference, reward_fn


def _distributed():
    """`fastbond.distributed_run`, imported by DeepSpeed runs only (it imports deepspeed)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise FastbondError("engine.kind=deepspeed needs the deepspeed package: pip install 'fastbond[deepspeed]'")
    from fastbond import distributed_run

    return distributed_run


def setup_run(config: TrainConfig) -> Run:
    distributed = resolve_engine_kind(config.engine) == "deepspeed"
    if distributed:
        rank, world, device, ds_config = _distributed().init(config)
    else:
        rank, world, device = 0, 1, resolve_device(config.device)
    # Each rank its own random stream (rollout.sampler=torch draws from it); rank 0 the run's seed.
    prepare_process(config, device, config.seed if rank == 0 else combine_keys(config.seed, rank))
    run_dir = Path(config.run_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if config.checkpoint.resume else None
    if config.checkpoint.resume and checkpoint is None:
        raise FastbondError(f"checkpoint.resume=true but {run_dir / 'checkpoints'} holds no checkpoint")

    policy_source = resolve_model_path(config.model.policy)
    algorithm = make_algorithm(config.algorithm.name)
    dtype = DTYPES[config.model.dtype]
    if distributed:  # policy and anchor sharded over the ranks, the policy loaded from its source
        tokenizer, engine, anchor, reference, reward_fn = _distributed().build_models(
            config, ds_config, device, algorithm.needs_anchor, resolve_model_path
        )
        policy = engine.model
    else:
        tokenizer, policy, reference, reward_fn = load_models(
            config, device, checkpoint / "policy" if checkpoint else policy_source
        )
        policy.train()
        anchor = EMAAnchor(policy, dtype) if algorithm.needs_anchor else None
        engine = TorchEngine(policy, config.optim, dtype, device)

    train_prompts = resolve_prompts(config.data.prompts, "train")
    eval_prompts = resolve_prompts(config.data.eval_prompts, "eval")[: config.evaluation.max_prompts]
    check_prompt_lengths(tokenizer, train_prompts, config.data.max_prompt_tokens, f"data.prompts ({config.data.prompts})")
    check_prompt_lengths(tokenizer, eval_prompts, config.data.max_prompt_tokens, f"data.eval_prompts ({config.data.eval_prompts})")

    ctx = Context(config, policy, reference, tokenizer, reward_fn, anchor)
    if distributed:
        _distributed().attach(ctx, config)
    if config.rollout.sampler == "keyed":
        ctx.noise = KeyedNoise(config.seed)
    # The prompt stream is the same on every rank; each takes its share of a batch.
    stream = PromptStream(train_prompts, config.rollout.batch_size, config.seed)
    run = Run(config, run_dir, device, ctx, algorithm, engine, stream, eval_prompts, policy_source,
              rank=rank, world=world, distributed=distributed)
    if checkpoint is not None:
        (_distributed().restore if distributed else restore)(run, checkpoint)
    return run


def checkpoint_state(run: Run) -> dict:
    state = {
        "engine": run.engine.state_dict(),
        "data": run.stream.state_dict(),
        "rng": rng_state(),
        "skipped": run.skipped,
        "algorithm": run.algorithm.state_dict(),
    }
    if run.ctx.anchor is not None:
        state["anchor"] = run.ctx.anchor.state_dict()
    return state


def restore(run: Run, checkpoint: Path) -> None:
    if (checkpoint / "zero").is_dir():
        raise FastbondError(f"checkpoint {checkpoint} was written by a DeepSpeed run; resume it under DeepSpeed")
    step, state = load_checkpoint(checkpoint)
    run.step = step
    run.engine.load_state_dict(state["engine"])
    run.stream.load_state_dict(state["data"])
    run.skipped = int(state["skipped"])
    run.algorithm.load_state_dict(state["algorithm"])
    if run.ctx.anchor is not None:
        run.ctx.anchor.load_state_dict(state["anchor"])
    set_rng_state(state["rng"])


def save_policy(run: Run, path: Path) -> Path:
    """The policy in transformers format (safetensors), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    run.ctx.policy.save_pretrained(tmp, safe_serialization=True)
    run.ctx.tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _finite(run: Run, batch) -> bool:
    finite = all(bool(torch.isfinite(r.float()).all()) for r in batch.all_rewards())
    if run.distributed:  # all ranks skip together, or none does
        finite = _distributed().all_true(finite, run.device)
    return finite


def train_step(run: Run, timer: PhaseTimer) -> dict:
    """One step; returns its metrics (a skipped step says so in `skipped_step`)."""
    config, ctx = run.config, run.ctx
    texts = run.stream.next_batch()
    share = len(texts) // run.world  # this rank's prompts of the batch
    first = run.rank * share
    texts = texts[first : first + share]
    if ctx.noise is not None:
        ctx.noise.start_step(run.step)
    with timer("generate"):
        ids, mask = encode_prompts(ctx.tokenizer, texts, config.data.max_prompt_tokens, run.device)
        batch = run.algorithm.rollout(ctx, Prompts(texts, ids, mask, list(range(first, first + share))))
    reward = batch.policy_rewards.float()
    metrics: dict = {"reward": reward.nanmean() if reward.numel() else reward}
    if not _finite(run, batch):
        return _skip(run, metrics, "the reward function returned NaN or Inf")
    with timer("logprobs"), run.engine.autocast():
        loss, loss_metrics = run.algorithm.loss(ctx, batch)
    metrics.update(loss_metrics)
    with timer("backward"):
        applied, grad_norm = run.engine.step(loss)
    if not applied:
        return _skip(run, metrics, "the loss or its gradient is NaN or Inf")
    with timer("ema"):
        run.algorithm.after_step(ctx, run.step)
    metrics.update({"grad_norm": grad_norm, "lr": run.engine.lr, "skipped_steps": run.skipped})
    return metrics


def _skip(run: Run, metrics: dict, why: str) -> dict:
    run.skipped += 1
    if run.config.on_nonfinite == "stop":
        raise FastbondError(f"step {run.step}: {why}; stopping (on_nonfinite=stop)")
    metrics.update({"skipped_step": 1.0, "skipped_steps": run.skipped})
    return metrics


def _fmt(value: float | None, digits: int = 3) -> str:
    """A metric for the progress bar; a skipped step's metrics are None (NaN)."""
    return "nan" if value is None else f"{value:.{digits}f}"


def _progress(run: Run, total: int):
    if not run.config.logging.progress or not run.main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=run.step, desc=f"{run.config.algorithm.name}", unit="step", dynamic_ncols=True)


def train(config: TrainConfig) -> Path:
    """Run training as configured; returns the run directory."""
    run = setup_run(config)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = None
    if run.main:
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        log = MetricsLog(run.run_dir, to_dict(config), config.logging.tensorboard, config.logging.wandb,
                         config.logging.wandb_project, resume_step=run.step if config.checkpoint.resume else None)
    timer = PhaseTimer(run.device)
    bar = _progress(run, config.steps)
    samples_per_step = config.rollout.batch_size
    try:
        while run.step < config.steps:
            run.step += 1
            started = time.perf_counter()
            metrics = train_step(run, timer)
            metrics.update(timer.pop())
            metrics["samples_per_s"] = samples_per_step / (time.perf_counter() - started)
            if run.step % config.logging.every == 0 or run.step == config.steps:
                if run.distributed:
                    metrics = _distributed().mean_metrics(metrics, run.device)
                record = log.write(run.step, metrics) if log is not None else {}
                if bar is not None:
                    bar.set_postfix(reward=_fmt(record["reward"]), kl=_fmt(record.get("kl_ref")),
                                    samples_s=_fmt(record["samples_per_s"], 1))
            if bar is not None:
                bar.update(1)
            every = config.checkpoint.every
            if (every and run.step % every == 0) or run.step == config.steps:
                save(run)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if run.distributed:
        _distributed().export(run, run.run_dir / "policy")
        if run.main:
            finish(run)
        return run.run_dir
    save_policy(run, run.run_dir / "policy")
    finish(run)
    return run.run_dir


def save(run: Run) -> None:
    if run.distributed:
        _distributed().save(run, keep=run.config.checkpoint.keep)
        return
    save_checkpoint(run.run_dir / "checkpoints", run.step, run.ctx.policy, run.ctx.tokenizer,
                    checkpoint_state(run), keep=run.config.checkpoint.keep)


def finish(run: Run) -> None:
    """Evaluate against Best-of-N of π_ref and draw the report."""
    from fastbond.evaluate import format_evaluation
    from fastbond.report import write_report

    evaluation = None
    if run.config.evaluation.at_end:
        evaluation = run_evaluation(evaluation_context(run), run.config, run.eval_prompts)
        (run.run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2))
        print(format_evaluation(evaluation))
    write_report(read_metrics(run.run_dir / "metrics.jsonl"), evaluation, run.run_dir / "report.png",
                 title=f"{run.config.algorithm.name} on {run.config.model.policy}")
    print(f"run directory: {run.run_dir} (policy/, metrics.jsonl, report.png{', eval.json' if evaluation else ''})")


def evaluation_context(run: Run) -> Context:
    """The models evaluation samples from: the run's own in one process; under DeepSpeed,
    plain one-process models loaded from the exported policy (rank 0 alone evaluates)."""
    if not run.distributed:
        return run.ctx
    tokenizer, policy, reference, reward_fn = load_models(run.config, run.device, run.run_dir / "policy")
    return Context(run.config, policy.eval(), reference, tokenizer, reward_fn)


def evaluate_run(run_dir: str, overrides: list[str], policy_path: str | None = None) -> dict:
    """`fastbond eval RUN_DIR`: judge RUN_DIR/policy (or `policy_path`) as the run was configured."""
    from fastbond.config import load_config
    from fastbond.evaluate import format_evaluation

    run_path = Path(run_dir)
    if not (run_path / "config.yaml").is_file():
        raise FastbondError(f"{run_path} is not a run directory (no config.yaml)")
    config = load_config(run_path / "config.yaml", list(overrides) + ["checkpoint.resume=false"])
    policy_path = Path(policy_path) if policy_path else run_path / "policy"
    if not policy_path.is_dir():
        raise FastbondError(f"policy directory not found: {policy_path}")
    device = resolve_device(config.device)
    prepare_process(config, device, config.seed)
    tokenizer, policy, reference, reward_fn = load_models(config, device, policy_path)
    prompts = resolve_prompts(config.data.eval_prompts, "eval")[: config.evaluation.max_prompts]
    ctx = Context(config, policy.eval(), reference, tokenizer, reward_fn)
    evaluation = run_evaluation(ctx, config, prompts)
    (run_path / "eval.json").write_text(json.dumps(evaluation, indent=2))
    print(format_evaluation(evaluation))
    return evaluation


def run_evaluation(ctx: Context, config: TrainConfig, prompts: list[str]) -> dict:
    from fastbond.evaluate import evaluate

    evaluation = config.evaluation
    return evaluate(
        ctx.policy, ctx.reference, ctx.tokenizer, ctx.reward_fn, prompts,
        max_new_tokens=config.rollout.max_new_tokens, max_prompt_tokens=config.data.max_prompt_tokens,
        temperature=config.rollout.temperature, policy_samples=evaluation.policy_samples,
        reference_samples=evaluation.reference_samples, batch_size=config.rollout.batch_size,
    )

