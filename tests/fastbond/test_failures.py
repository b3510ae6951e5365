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


def test_a_mistake_in_a_later_step_is_one_line_and_saves_the_last_completed_step(capsys, tmp_path, monkeypatch,
                                                                                 embedded_reference):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = next(_module_names)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""\
        from fastbond.rewards import sentiment
        calls = 0

        def score(prompts, responses):
            global calls
            calls += 1
            return sentiment(prompts, responses)[: 1 if calls == 3 else None]
        """))
    from fastbond.engines.base import Engine

    closed = []  # a completed run releases the engine (under DeepSpeed: leaves the process group); a failed one not
    monkeypatch.setattr(Engine, "close", lambda engine: closed.append(engine))
    run_dir = tmp_path / "run"
    status = main(["train", *_base(tmp_path, "jbond"), f"run_dir={run_dir}", f"reward.name={name}:score"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and closed == []
    assert err.splitlines()[-1].startswith(f"fastbond train: error: reward function {name}:score returned shape (1,), "
                                           "expected (8,); saved the last completed step as")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"
    assert main(["train", *_base(tmp_path, "jbond"), "steps=1", f"run_dir={tmp_path / 'done'}",
                 "reward.name=fastbond.rewards:sentiment"]) == 0
    assert len(closed) == 1


# ---------------------------------------------------------------------------
# what each rank shows of a failure agreed on (fastbond.train._stopped), and how the CLI shows it


def _rank(rank: int):
    from types import SimpleNamespace

    return SimpleNamespace(step=2, engine=SimpleNamespace(rank=rank, main=rank == 0))


def _agreed(error: Exception, failed_rank: int):
    try:
        raise error
    except Exception as raised:
        return failures.RolloutFailed(failures.Failure.of(raised, failed_rank), None)


def test_only_the_main_rank_shows_a_failure_agreed_on_and_every_rank_has_its_status():
    from fastbond.errors import ShownByMainRank, StepFailed
    from fastbond.train import _stopped

    user_code = _agreed(UserCodeError("reward function m:f raised RuntimeError: kaboom"), failed_rank=1)
    shown = _stopped(_rank(0), user_code, "saved the last completed step as X")
    assert isinstance(shown, StepFailed) and shown.where == " on rank 1"
    assert "UserCodeError: reward function m:f raised RuntimeError: kaboom" in shown.trace
    silent = _stopped(_rank(1), user_code, "saved")
    assert isinstance(silent, ShownByMainRank) and silent.status == 1

    mistake = _agreed(FastbondError("reward function m:f returned shape (1,), expected (2,)"), failed_rank=1)
    shown = _stopped(_rank(0), mistake, "saved the last completed step as X")
    assert isinstance(shown, FastbondError)
    assert str(shown) == "on rank 1: reward function m:f returned shape (1,), expected (2,); saved the last " \
                         "completed step as X"
    assert _stopped(_rank(1), mistake, "saved").status == 2
    own = _stopped(_rank(0), _agreed(FastbondError("bad"), failed_rank=0), "saved")
    assert str(own) == "bad; saved"  # one process, or the main rank's own: as before


def test_the_cli_shows_another_ranks_traceback_and_stays_silent_on_the_others(capsys, monkeypatch):
    from fastbond import cli
    from fastbond.errors import ShownByMainRank, StepFailed

    def raising(error):
        def run(argv):
            raise error
        return run

    trace = "Traceback (most recent call last):\n  File \"rank1.py\", line 1\nRuntimeError: kaboom\n"
    monkeypatch.setitem(cli.COMMANDS, "train", ("", raising(StepFailed(3, "saved X", trace=trace, rank=1))))
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert err == trace + "fastbond train: error: step 3 failed on rank 1 (traceback above); saved X\n"
    monkeypatch.setitem(cli.COMMANDS, "train", ("", raising(ShownByMainRank(2))))
    assert cli.main(["train"]) == 2
    assert capsys.readouterr() == ("", "")
