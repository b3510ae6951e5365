"""The training loop of `fastbond train`: read it top to bottom.

    prompts → rollout (samples + rewards) → log-probs + loss → optimizer step
            → anchor move → metrics / checkpoint

`setup_run` builds the run: an engine (`fastbond.engines`: one process, or
DeepSpeed over K ranks), the models it places, the algorithm
(`fastbond.algorithms`), the prompt stream, and the state of a checkpoint
when resuming. `train` then does one step after another. The loop knows
neither the algorithm's details nor how many processes share the work: each
rank runs it on its share of every step's batch, and the engine's methods
are collectives where they need to be.

A step that fails before the optimizer touched the weights (the reward
function raised, a model's forward failed, a reward had the wrong shape)
leaves the run as it was after the previous step; that state is saved as a
checkpoint before the error is shown (`StepFailed`), so
`checkpoint.resume=true` continues from it. The user's scorer failing in the
rollout, on any rank, stops every rank together after the rollout
(`fastbond.failures`), so the ranks save together; anything else that fails
on one rank of several saves nothing more.

Before any model loads, the run directory is claimed and locked
(`fastbond.run_dir`), the checkpoint to resume from is checked for damage
(`fastbond.checkpoint.resume_checkpoint`) and the config compared with the
one it was saved under (`fastbond.resume`). docs/reliability.md says what
survives which fault.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fastbond import atomic
from fastbond.algorithms import make_algorithm
from fastbond.algorithms.base import Algorithm, Context
from fastbond.chat import render_prompts, template_in_use
from fastbond.checkpoint import (
    checkpoint_shared,
    latest_checkpoint,
    model_dir_damage,
    resume_checkpoint,
    rng_state,
    set_rng_state,
)
from fastbond.config import TrainConfig, to_dict
from fastbond.data import PromptStream, check_prompt_lengths, prompts_for
from fastbond.embedded import EMBEDDED
from fastbond.engines import Engine, Models, make_engine
from fastbond.errors import FastbondError, ShownByMainRank, StepFailed
from fastbond.failures import RolloutFailed, held
from fastbond.library_log import LibraryLog, library_log
from fastbond.metrics_log import MetricsLog, read_metrics
from fastbond.models import load_tokenizer, model_sources
from fastbond.process import prepare_process
from fastbond.resume import check_resume, prompts_fingerprint
from fastbond.rollout import Prompts, combine_keys, encode_prompts
from fastbond.rollout.backends import make_sampler
from fastbond.run_dir import RunDirLock, claim, disk_errors


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
    engine: Engine
    models: Models
    algorithm: Algorithm
    ctx: Context
    stream: PromptStream
    eval_prompts: list[str]
    step: int = 0  # the last completed step
    skipped: int = 0
    lock: RunDirLock | None = None  # held by the main rank while the run writes run_dir
    library: LibraryLog | None = None  # the main rank's library warnings, into run_dir/warnings.log
    prompts: dict = field(default_factory=dict)  # fingerprint of the training prompts, saved with checkpoints
    # Set once a step's optimizer update begins: from then on the weights may have moved.
    updating: bool = field(default=False, repr=False)

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        try:
            return latest_checkpoint(self.checkpoints_dir)
        except FastbondError:
            return None

    def writing(self, what: str):
        """A write to the run directory: a full disk (or the like) is one line naming the way back."""
        return disk_errors(what, self.run_dir, self.last_checkpoint)


# --------------------------------------------------------------------------- #
# set-up
# --------------------------------------------------------------------------- #


def _on_main(engine: Engine, action):
    """`action()` on the main rank; if it raised a FastbondError there, every rank raises
    (no rank is left waiting in a collective for one that stopped)."""
    result, error = None, None
    if engine.main:
        try:
            result = action()
        except FastbondError as raised:
            error = raised
    if not engine.all_true(error is None):
        raise error or FastbondError("stopped: the main rank refused the run (its error says why)")
    return result


def _say(engine: Engine):
    return print if engine.main else (lambda message: None)


def _resume_point(config: TrainConfig, engine: Engine, run_dir: Path, prompts: dict) -> Path | None:
    """The checkpoint to continue from, checked for damage and for config changes it cannot carry."""
    if not config.checkpoint.resume:
        return None
    checkpoints_dir = run_dir / "checkpoints"
    # the main rank decides (and may move damaged checkpoints aside); the others then read `latest`
    _on_main(engine, lambda: resume_checkpoint(checkpoints_dir, config.checkpoint.resume, say=print))
    checkpoint = latest_checkpoint(checkpoints_dir)
    shared = checkpoint_shared(checkpoint)
    saved = shared.get("config")
    if saved is None and (run_dir / "config.yaml").is_file():  # checkpoints of older versions
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    check_resume(checkpoint.name, saved, to_dict(config), shared.get("prompts"), prompts,
                 say=_say(engine))
    return checkpoint


def setup_run(config: TrainConfig) -> Run:
    engine = make_engine(config)
    # Each rank its own random stream (rollout.noise=torch draws from it); rank 0 the run's seed.
    prepare_process(config, engine.device, config.seed if engine.main else combine_keys(config.seed, engine.rank))
    run_dir = Path(config.run_dir)
    # everything that can be checked without the models, before they load
    lock = _on_main(engine, lambda: claim(run_dir, bool(config.checkpoint.resume), config.checkpoint.overwrite))
    # from here to the end of the run, library warnings go to run_dir/warnings.log, not around our lines
    library = library_log(run_dir) if lock is not None else None
    try:
        run = _setup(config, engine, run_dir, lock)
    except BaseException:
        if library is not None:
            library.close()
        if lock is not None:
            lock.release()
        raise
    run.library = library
    return run


def _setup(config: TrainConfig, engine: Engine, run_dir: Path, lock: RunDirLock | None) -> Run:
    if config.model.policy != EMBEDDED:
        problem = model_dir_damage(Path(config.model.policy))
        if problem:
            raise FastbondError(f"config key 'model.policy': {problem}")
    # The prompts as the policy sees them (rendered by its chat template, data.chat_template); the engine
    # loads its own copy of this tokenizer. A dataset's stay on disk: sequences, rendered when read.
    tokenizer = load_tokenizer(model_sources(config)[0], config.model.trust_remote_code)
    data = config.data
    raw_train = prompts_for(data, "train")
    train_prompts = render_prompts(raw_train, tokenizer, data.chat_template, f"data.prompts ({data.prompts})")
    eval_prompts = render_prompts(prompts_for(data, "eval")[: config.evaluation.max_prompts], tokenizer,
                                  data.chat_template, f"data.eval_prompts ({data.eval_prompts})")
    # one pass over the prompts as written (a dataset's: from disk), with the template that renders them
    fingerprint = prompts_fingerprint(raw_train, template_in_use(tokenizer, data.chat_template))
    checkpoint = _resume_point(config, engine, run_dir, fingerprint)

    algorithm = make_algorithm(config.algorithm)
    models = engine.build(config, algorithm.needs_anchor, checkpoint)
    limit = config.data.max_prompt_tokens
    check_prompt_lengths(models.tokenizer, train_prompts, limit, f"data.prompts ({config.data.prompts})")
    check_prompt_lengths(models.tokenizer, eval_prompts, limit, f"data.eval_prompts ({config.data.eval_prompts})")

    # built now that the process group exists (a colocated vLLM engine joins this rank's)
    sampler = make_sampler(config, tokenizer=models.tokenizer, policy=models.policy, generation=engine.generation,
                           gathered=engine.gathered, device=engine.device, weights=models.role_weights)
    ctx = Context(
        models.policy, models.reference, models.tokenizer, models.reward_fn, models.anchor,
        max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
        batch_sum=engine.batch_sum, sampler=sampler,
    )
    # The prompt stream is the same on every rank; each takes its share of a batch.
    stream = PromptStream(train_prompts, config.rollout.batch_size, config.seed)
    run = Run(config, run_dir, engine, models, algorithm, ctx, stream, eval_prompts, lock=lock,
              prompts=fingerprint)
    if checkpoint is not None:
        restore(run, checkpoint)
    return run


# --------------------------------------------------------------------------- #
# checkpoints
# --------------------------------------------------------------------------- #


def save(run: Run) -> Path:
    """A checkpoint of `run.step`: the engine's weights, optimizer and anchor, and the loop's state."""
    shared = {"data": run.stream.state_dict(), "skipped": run.skipped,
              "config": to_dict(run.config), "prompts": run.prompts}  # what a resume is checked against
    own = {"rng": rng_state(), "algorithm": run.algorithm.state_dict()}
    with run.writing(f"the checkpoint of step {run.step}"):
        return run.engine.save(run.checkpoints_dir, run.step, shared, own, keep=run.config.checkpoint.keep)


def restore(run: Run, checkpoint: Path) -> None:
    run.step, shared, own = run.engine.restore(checkpoint)
    run.stream.load_state_dict(shared["data"])
    run.skipped = int(shared["skipped"])
    run.algorithm.load_state_dict(own["algorithm"])
    set_rng_state(own["rng"])


@dataclass
class StepStart:
    """The loop's state as a step begins, cheap to keep: with the weights untouched,
    this is the state after the previous step."""

    data: dict
    rng: dict
    skipped: int
    algorithm: dict  # BoNBoN's pairs: those a failed rollout drew must be drawn again on resume

    @staticmethod
    def of(run: Run) -> "StepStart":
        return StepStart(run.stream.state_dict(), rng_state(), run.skipped, run.algorithm.state_dict())

    def restore(self, run: Run) -> None:
        run.stream.load_state_dict(self.data)
        set_rng_state(self.rng)
        run.skipped = self.skipped
        run.algorithm.load_state_dict(self.algorithm)


def rescue(run: Run, failed_step: int, start: StepStart, together: bool = False) -> str:
    """After step `failed_step` raised: save what can be saved; a note on how to resume.

    `together`: every rank is here (they agreed the rollout failed), so a save under DeepSpeed, a
    collective, can be made; otherwise only an engine that `saves_alone` saves."""
    resume = f"fix the cause, then rerun with checkpoint.resume=true (run_dir={run.run_dir})"
    previous = latest_checkpoint(run.checkpoints_dir) if run.checkpoints_dir.is_dir() else None
    fallback = f"the last checkpoint is {previous.name}" if previous else "no checkpoint was written"
    if run.updating:
        return f"the weights may have changed mid-update, so nothing more was saved; {fallback}; {resume}"
    if not (together or run.engine.saves_alone):
        return f"other ranks may be waiting on this one, so nothing more was saved; {fallback}; {resume}"
    if failed_step == 1:
        return "no step had completed, so there is nothing to resume: rerun from the start once fixed"
    if previous is not None and previous.name == f"step-{failed_step - 1:06d}":
        return f"the last completed step is saved as {previous}; {resume}"
    start.restore(run)
    run.step = failed_step - 1
    saved = save(run)
    return f"saved the last completed step as {saved}; {resume}"


# --------------------------------------------------------------------------- #
# one step
# --------------------------------------------------------------------------- #


def train_step(run: Run, timer: PhaseTimer) -> dict:
    """Step `run.step + 1` on this rank's share of the batch; returns its metrics
    (a skipped step says so in `skipped_step`)."""
    config, ctx, engine = run.config, run.ctx, run.engine
    texts = run.stream.next_batch()
    share = len(texts) // engine.world  # this rank's prompts of the batch
    first = engine.rank * share
    texts = texts[first : first + share]
    ctx.sampler.start_step(run.step + 1)
    with timer("generate"):
        ids, mask = encode_prompts(ctx.tokenizer, texts, config.data.max_prompt_tokens, engine.device)
        with held() as hold:  # the user's scorer failing: kept until this rank's rollout is done
            batch = run.algorithm.rollout(ctx, Prompts(texts, ids, mask, list(range(first, first + share))))
    failure = engine.first_failure(hold.failure(engine.rank))  # every rank's word, before the next collective
    if failure is not None:
        raise RolloutFailed(failure, hold.error)
    metrics: dict = dict(batch.metrics)
    if batch.scalar:  # a pairwise judge's batch holds decisions, not rewards
        reward = batch.policy_rewards.float()
        metrics["reward"] = reward.nanmean() if reward.numel() else reward
    ctx.sampler.check(run.step + 1, engine.all_true)
    metrics.update(ctx.sampler.metrics())
    finite = all(bool(torch.isfinite(r.float()).all()) for r in batch.all_rewards())
    if not engine.all_true(finite):  # all ranks skip together, or none does
        return _skip(run, metrics, "the reward function returned NaN or Inf")
    with timer("logprobs"), engine.autocast():
        loss, loss_metrics = run.algorithm.loss(ctx, batch)
    metrics.update(loss_metrics)
    with timer("backward"):
        run.updating = True
        applied, grad_norm = engine.step(loss)
    if not applied:
        run.updating = False
        return _skip(run, metrics, "the loss or its gradient is NaN or Inf")
    with timer("ema"):
        run.algorithm.after_step(ctx, run.step + 1)
    ctx.sampler.after_update()
    run.updating = False
    metrics.update({"grad_norm": grad_norm, "lr": engine.lr, "skipped_steps": run.skipped})
    return metrics


def _skip(run: Run, metrics: dict, why: str) -> dict:
    run.skipped += 1
    if run.config.on_nonfinite == "stop":
        raise FastbondError(f"step {run.step + 1}: {why}; stopping (on_nonfinite=stop)")
    metrics.update({"skipped_step": 1.0, "skipped_steps": run.skipped})
    return metrics


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #


def _fmt(value: float | None, digits: int = 3) -> str:
    """A metric for the progress bar; a skipped step's metrics are None (NaN)."""
    return "nan" if value is None else f"{value:.{digits}f}"


def _progress(run: Run, total: int):
    if not run.config.logging.progress or not run.engine.main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=run.step, desc=f"{run.config.algorithm.name}", unit="step", dynamic_ncols=True)


def train(config: TrainConfig) -> Path:
    """Run training as configured; returns the run directory."""
    run = setup_run(config)
    completed = False
    try:
        run_dir = _train(run)
        completed = True
        return run_dir
    finally:
        run.ctx.sampler.close()
        if completed:  # a failed run keeps its ranks' group: they may still wait for each other at exit
            run.engine.close()
        if run.library is not None:
            run.library.close()
        if run.lock is not None:
            run.lock.release()


def _write_config(run: Run) -> None:
    """RUN_DIR/config.yaml: the run's job, read by `fastbond eval` and to resume. How this start
    began (resume, overwrite) is not part of the job: written as off, so the file resumes as is."""
    tree = to_dict(run.config)
    tree["checkpoint"].update(resume=False, overwrite=False)
    atomic.write_text(run.run_dir / "config.yaml", yaml.safe_dump(tree, sort_keys=False))


def _train(run: Run) -> Path:
    config = run.config
    log = None
    if run.engine.main:
        with run.writing("config.yaml and metrics.jsonl"):
            _write_config(run)
            log = MetricsLog(run.run_dir, to_dict(config), config.logging.tensorboard, config.logging.wandb,
                             config.logging.wandb_project,
                             resume_step=run.step if config.checkpoint.resume else None)
    timer = PhaseTimer(run.engine.device)
    bar = _progress(run, config.steps)
    try:
        while run.step < config.steps:
            started, start = time.perf_counter(), StepStart.of(run)
            try:
                metrics = train_step(run, timer)
            except RolloutFailed as stop:  # on every rank: they save together, the main rank tells why
                raise _stopped(run, stop, rescue(run, run.step + 1, start, together=True)) from stop.error
            except FastbondError as error:  # still one line, now with what was saved
                raise FastbondError(f"{error}; {rescue(run, run.step + 1, start)}") from None
            except Exception as error:  # user code (or a bug): its traceback is shown, then the note
                raise StepFailed(run.step + 1, rescue(run, run.step + 1, start)) from error
            run.step += 1
            metrics.update(timer.pop())
            metrics["samples_per_s"] = config.rollout.batch_size / (time.perf_counter() - started)
            if run.step % config.logging.every == 0 or run.step == config.steps:
                record = run.engine.reduce_metrics(metrics)
                if log is not None:
                    with run.writing("metrics.jsonl"):
                        record = log.write(run.step, record)
                if bar is not None:
                    bar.set_postfix(reward=_fmt(record.get("reward")), kl=_fmt(record.get("kl_ref")),
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
    with run.writing("the trained policy (policy/)"):
        run.engine.export(run.run_dir / "policy")
    if run.engine.main:
        finish(run)
    return run.run_dir


def _stopped(run: Run, stop: RolloutFailed, note: str) -> Exception:
    """What this rank raises after a failed rollout: on the main rank the failure, shown as if it had
    been its own (the traceback of the rank it came from, named if not this one); elsewhere silence."""
    failure, step = stop.failure, run.step + 1
    if not run.engine.main:
        return ShownByMainRank(failure.status)
    elsewhere = failure.rank != run.engine.rank
    if failure.mistake:
        where = f"on rank {failure.rank}: " if elsewhere else ""
        return FastbondError(f"{where}{failure.message}; {note}")
    return StepFailed(step, note, trace=failure.trace, rank=failure.rank if elsewhere else None)


def finish(run: Run) -> None:
    """Evaluate against Best-of-N of π_ref and draw the report."""
    from fastbond.evaluate import EVAL_FILE, evaluate_models, format_evaluation, write_evaluation
    from fastbond.report import write_report

    evaluation = None
    if run.config.evaluation.at_end:
        models = run.engine.evaluation_models(run.run_dir / "policy")
        with run.writing("eval.json"):
            result = evaluate_models(models, run.config, run.eval_prompts)
            evaluation = write_evaluation(run.run_dir / EVAL_FILE, result, run.config.on_nonfinite)
        print(format_evaluation(evaluation))
    with run.writing("report.png"):
        write_report(read_metrics(run.run_dir / "metrics.jsonl"), evaluation, run.run_dir / "report.png",
                     title=f"{run.config.algorithm.name} on {run.config.model.policy}")
    print(f"run directory: {run.run_dir} (policy/, metrics.jsonl, report.png{', eval.json' if evaluation else ''})")
