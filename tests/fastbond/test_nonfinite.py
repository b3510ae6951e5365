"""The NaN/Inf guard: a non-finite reward, loss or gradient never reaches the weights.

`on_nonfinite=skip` (the default) skips the step and counts it in metrics.jsonl
(`skipped_step` on the step, `skipped_steps` the running total);
`on_nonfinite=stop` ends the run with one line naming the step. Under the
trainer, `TorchOptimizer.step` refuses a non-finite loss or gradient norm and
leaves parameters, optimizer moments and the LR schedule as they were.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastbond.checkpoint import latest_checkpoint, load_checkpoint
from fastbond.cli import main
from fastbond.config import OptimConfig
from fastbond.engines.local import TorchOptimizer

_module_names = (f"fastbond_nonfinite_rewards_{i}" for i in itertools.count())

# NaN on every call, or only on the first call of the run (so only step 1 sees it).
ALWAYS_NAN = """
def score(prompts, responses):
    return [float("nan")] * len(responses)
"""
FIRST_CALL_NAN = """
calls = 0

def score(prompts, responses):
    global calls
    calls += 1
    rewards = [float(len(r.split())) for r in responses]
    if calls == 1:
        rewards[0] = float("nan")
    return rewards
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = next(_module_names)  # fresh each time: the module keeps a call count
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def train_cli(tmp_path, module: str, *extra: str) -> tuple[int, list[str]]:
    run_dir = tmp_path / "run"
    args = [
        "train", "steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false",
        "logging.progress=false", "cpu_threads=1", f"run_dir={run_dir}",
        "reward.kind=callable", f"reward.name={module}:score", *extra,
    ]  # fmt: skip
    return main(args), run_dir


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_every_reward_nan_skips_every_step_and_leaves_the_weights(tmp_path, embedded_reference, reward_module):
    status, run_dir = train_cli(tmp_path, reward_module(ALWAYS_NAN), "on_nonfinite=skip")
    assert status == 0

    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert [r["skipped_step"] for r in records] == [1.0, 1.0]
    assert [r["skipped_steps"] for r in records] == [1.0, 2.0]
    assert all(r["reward"] is None for r in records)  # NaN is written as null, never as NaN

    reference, policy = weights(embedded_reference), weights(run_dir / "policy")
    assert policy.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(policy[name], tensor), name

    step, state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert step == 2 and state["shared"]["skipped"] == 2
    assert state["engine"]["optimizer"]["state"] == {}  # no AdamW moment was ever written
    assert state["engine"]["scheduler"]["last_epoch"] == 0  # the warm-up did not advance
    for name, tensor in state["anchor"].items():  # nor did the EMA anchor move
        assert torch.equal(tensor, reference[name].float()), name


def test_nan_on_some_calls_skips_only_those_steps(tmp_path, embedded_reference, reward_module):
    status, run_dir = train_cli(tmp_path, reward_module(FIRST_CALL_NAN))  # on_nonfinite defaults to skip
    assert status == 0

    first, second = metrics(run_dir)
    assert first["skipped_step"] == 1.0 and first["skipped_steps"] == 1.0
    assert "skipped_step" not in second and second["skipped_steps"] == 1.0
    assert math.isfinite(second["grad_norm"]) and math.isfinite(second["reward"])

    reference, policy = weights(embedded_reference), weights(run_dir / "policy")
    assert any(not torch.equal(policy[name], tensor) for name, tensor in reference.items())  # step 2 trained
    _, state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert state["shared"]["skipped"] == 1 and state["engine"]["scheduler"]["last_epoch"] == 1


def test_on_nonfinite_stop_exits_2_naming_the_step(tmp_path, capsys, embedded_reference, reward_module):
    module = reward_module(FIRST_CALL_NAN)
    capsys.readouterr()
    status, run_dir = train_cli(tmp_path, module, "on_nonfinite=stop")
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fastbond train: error: step 1: ")
    assert "NaN" in lines[0] and "on_nonfinite=stop" in lines[0]
    assert not (run_dir / "policy").exists()


def test_all_nan_step_with_the_progress_bar_on(tmp_path, embedded_reference, reward_module):
    status, _ = train_cli(tmp_path, reward_module(ALWAYS_NAN), "steps=1", "logging.progress=true")
    assert status == 0


# ---------------------------------------------------------------------------
# TorchOptimizer.step on its own


def _engine() -> TorchOptimizer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    return TorchOptimizer(model, OptimConfig(lr=0.1, warmup_steps=10), torch.float32, torch.device("cpu"))


def _loss(engine: TorchOptimizer) -> torch.Tensor:
    return engine.model(torch.linspace(-1, 1, 12).view(3, 4)).pow(2).mean()


def _nan_loss(engine, hooks):
    return _loss(engine) * float("nan")


def _inf_loss(engine, hooks):
    return _loss(engine) + float("inf")


def _gradient_hook(value: float):
    def make(engine, hooks):
        # A finite loss whose gradient on one weight is non-finite.
        weight = engine.model[0].weight
        hooks.append(weight.register_hook(lambda grad: torch.full_like(grad, value)))
        return _loss(engine)

    return make


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            _assert_same_state(value, after[key])
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.mark.parametrize(
    "make_loss, finite_loss",
    [
        (_nan_loss, False),
        (_inf_loss, False),
        (_gradient_hook(float("inf")), True),
        (_gradient_hook(float("nan")), True),
    ],
    ids=["nan-loss", "inf-loss", "inf-gradient", "nan-gradient"],
)
def test_engine_step_refuses_nonfinite_loss_or_gradient(make_loss, finite_loss):
    engine = _engine()
    assert engine.step(_loss(engine))[0]  # one real step: AdamW moments and the schedule exist
    params = [p.detach().clone() for p in engine.parameters]
    optimizer = copy.deepcopy(engine.optimizer.state_dict())
    scheduler = copy.deepcopy(engine.scheduler.state_dict())
    lr = engine.lr

    hooks = []
    loss = make_loss(engine, hooks)
    assert math.isfinite(loss.item()) == finite_loss
    applied, grad_norm = engine.step(loss)

    assert not applied and not math.isfinite(grad_norm)
    for before, after in zip(params, engine.parameters):
        assert torch.equal(before, after)
    _assert_same_state(optimizer, engine.optimizer.state_dict())
    _assert_same_state(scheduler, engine.scheduler.state_dict())
    assert engine.lr == lr
    assert all(p.grad is None for p in engine.parameters)  # nothing left to leak into the next step

    for handle in hooks:
        handle.remove()
    assert engine.step(_loss(engine))[0]  # and the next finite step is taken as usual
    assert engine.scheduler.state_dict()["last_epoch"] == scheduler["last_epoch"] + 1
