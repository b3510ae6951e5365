"""A step's failure in the user's scorer (`fastbond.failures`), in one process.

Inside a rollout the scorer's failure is kept and the call returns a placeholder, so that every rank
finishes the rollout's collectives; outside one (the evaluation) it raises at once. A run whose scorer
fails on the last call of step 3 saves step 2 and resumes to the very weights and metrics of a run that
never failed, for every algorithm: BoNBoN's pairs drawn in the failed rollout are drawn again. The same
on 2 ranks: tests/distributed/test_faults.py.
"""

from __future__ import annotations

import itertools
import json
import textwrap

import pytest
import torch

from fastbond import failures
from fastbond.cli import main
from fastbond.errors import FastbondError, UserCodeError
from fastbond.judges import PairwiseJudge
from fastbond.rewards import RewardFunction

_module_names = (f"fastbond_failure_rewards_{i}" for i in itertools.count())


def _raises(*args):
    raise RuntimeError("kaboom")


def test_a_scorer_failing_inside_a_rollout_is_kept_and_answers_a_placeholder():
    reward = RewardFunction(_raises, "reward function m:f")
    judge = PairwiseJudge(_raises, "pairwise judge m:g")
    wrong_shape = RewardFunction(lambda prompts, responses: [0.0], "reward function m:h")
    with failures.held() as hold:
        assert torch.isnan(reward(["p", "q"], ["a", "b"])).all()
        assert torch.equal(judge(["p"], ["a"], ["b"]), torch.zeros(1))  # a tie
        assert wrong_shape(["p", "q"], ["a", "b"]).shape == (2,)
    assert isinstance(hold.error, UserCodeError)  # the first failure is the one shown
    assert judge.comparisons == 0
    failure = hold.failure(rank=1)
    assert (failure.rank, failure.mistake, failure.status) == (1, False, 1)
    assert "RuntimeError: kaboom" in failure.trace and "UserCodeError" in failure.trace

    with failures.held() as hold:
        wrong_shape(["p", "q"], ["a", "b"])
    failure = hold.failure(rank=0)
    assert (failure.mistake, failure.status, failure.trace) == (True, 2, "")
    assert failure.message == "reward function m:h returned shape (1,), expected (2,)"


def test_outside_a_rollout_the_scorer_failing_raises_at_once():
    with pytest.raises(UserCodeError):
        RewardFunction(_raises, "reward function m:f")(["p"], ["a"])
    with pytest.raises(UserCodeError):
        PairwiseJudge(_raises, "pairwise judge m:g")(["p"], ["a"], ["b"])
    with failures.held():
        pass
    with pytest.raises(FastbondError):  # the hold ended with its block
        RewardFunction(lambda prompts, responses: [0.0], "reward function m:h")(["p", "q"], ["a", "b"])
    assert failures.keeper() is None


# ---------------------------------------------------------------------------
# a run that fails at step 3, resumed, against one that never failed

# Scorer calls per step: J-BOND, BOND-N and vBoN score their reference/anchor samples, then the
# policy's; BoNBoN scores the π_ref samples of the prompts it has not seen, then the policy's;
# REINFORCE scores its samples once. The failing call is the last of step 3: its rollout is done.
CALLS_PER_STEP = {"jbond": 2, "bond": 2, "iterative_bond": 2, "vbon": 2, "bonbon": 2, "rloo": 1}
def _base(tmp_path, algorithm: str) -> list[str]:
    return ["steps=3", "rollout.batch_size=4", "rollout.max_new_tokens=6", "evaluation.at_end=false",
            "logging.progress=false", "cpu_threads=1", "checkpoint.every=0", f"algorithm.name={algorithm}",
            "reward.kind=callable"]


def _metrics(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/") and k != "samples_per_s"}
            for r in records}


@pytest.mark.parametrize("algorithm", list(CALLS_PER_STEP))
def test_resume_after_a_rescued_failure_is_bit_identical(capsys, tmp_path, monkeypatch, embedded_reference,
                                                          algorithm):
    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(tmp_path))
    good, flaky = next(_module_names), next(_module_names)
    (tmp_path / f"{good}.py").write_text("from fastbond.rewards import sentiment as score\n")
    (tmp_path / f"{flaky}.py").write_text(textwrap.dedent(f"""\
        from fastbond.rewards import sentiment
        calls = 0

        def score(prompts, responses):
            global calls
            calls += 1
            if calls == {3 * CALLS_PER_STEP[algorithm]}:
                raise RuntimeError("kaboom")
            return sentiment(prompts, responses)
        """))
    base = _base(tmp_path, algorithm)
    run_dir, straight = tmp_path / "run", tmp_path / "straight"

    assert main(["train", *base, f"run_dir={run_dir}", f"reward.name={flaky}:score"]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: kaboom" in err and f"{flaky}.py" in err  # the user's own frame
    errors = [line for line in err.splitlines() if line.startswith("fastbond train: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("fastbond train: error: step 3 failed (traceback above); saved the last completed step")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"

    assert main(["train", *base, f"run_dir={run_dir}", f"reward.name={good}:score", "checkpoint.resume=true"]) == 0
    assert main(["train", *base, f"run_dir={straight}", f"reward.name={good}:score"]) == 0
    resumed = load_file(str(run_dir / "policy" / "model.safetensors"))
    expected = load_file(str(straight / "policy" / "model.safetensors"))
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert _metrics(run_dir) == _metrics(straight)
