"""Faults on 2 CPU ranks at ZeRO-3 (gloo), through the `deepspeed` launcher: one fate for every rank.

BoNBoN, whose rollout samples from π_ref, scores, then samples from the policy (a ZeRO-3 gather,
a collective) and whose pairs are state carried across steps. Its reward function raises on rank 1
only, in step 3 (the scoring of that step's π_ref samples): rank 1 finishes the rollout on NaN
rewards, the ranks agree the step failed, both save step 2 and exit with status 1, and the
main rank alone shows rank 1's traceback. Resumed with a working reward function, the run ends
with the weights and metrics of a run that never failed, bit for bit.

A rank killed with SIGKILL mid-run: the launcher stops the other rank (measured: about 1 s; the
bound asserted is the launcher's: its 1 s poll, then SIGTERM, and SIGKILL 30 s later), and the run
resumes from its last checkpoint to the same end. Five launches, about 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_train_cli import TINY, _free_port, weights

pytest.importorskip("deepspeed")
psutil = pytest.importorskip("psutil")  # DeepSpeed's launcher needs it too

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).parents[2]
RANKS = 2
TIMEOUT_S = 900
RUN = [*(o for o in TINY if not o.startswith(("steps=", "algorithm.", "checkpoint."))), "steps=4",
       "checkpoint.every=0", "algorithm.name=bonbon", "engine.zero_stage=3", "reward.kind=callable"]
STOP_BOUND_S = 35  # the launcher's 1 s poll, SIGTERM, and its SIGKILL 30 s later


@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_weights):
    from fastbond.embedded import build_embedded_reference

    root = tmp_path_factory.mktemp("fastbond-cache")
    build_embedded_reference(root, weights=reference_weights)
    return root


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> Path:
    """A directory (put on the ranks' PYTHONPATH) of reward modules: `good`, and `flaky`, which raises on
    rank 1 at its 5th call: BoNBoN scores its fresh π_ref samples, then the policy's, so call 5 is the
    first scoring of step 3."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "good.py").write_text("from fastbond.rewards import sentiment as score\n")
    (root / "flaky.py").write_text(textwrap.dedent("""\
        import os
        from fastbond.rewards import sentiment
        calls = 0

        def score(prompts, responses):
            global calls
            calls += 1
            if calls == 5 and os.environ["RANK"] == "1":
                raise RuntimeError("kaboom on rank 1")
            return sentiment(prompts, responses)
        """))
    return root


class Launch:
    """`deepspeed --num_gpus 2 … fastbond train` (through status_of_ranks.py) in the background; its output
    goes to `log`, each rank's exit status into `statuses`."""

    def __init__(self, cache: Path, rewards: Path, run_dir: Path, *overrides: str):
        tag = f"{run_dir.name}-{len(list(run_dir.parent.glob('*.log')))}"
        self.log, self.statuses = run_dir.parent / f"{tag}.log", run_dir.parent / f"{tag}-status"
        self.statuses.mkdir()
        env = dict(os.environ, FASTBOND_CACHE=str(cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(rewards)]), FASTBOND_TEST_STATUS=str(self.statuses))
        env.pop("TRITON_INTERPRET", None)
        command = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={RANKS}",
                   f"--master_port={_free_port()}", str(Path(__file__).with_name("status_of_ranks.py")), "train",
                   *RUN, f"run_dir={run_dir}", *overrides]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self) -> int:
        try:
            return self.process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the launch took over {TIMEOUT_S} s:\n{self.output[-6000:]}")

    @property
    def output(self) -> str:
        return self.log.read_text()

    def rank_statuses(self) -> dict[int, int]:
        return {int(p.name.removeprefix("rank")): int(p.read_text()) for p in self.statuses.glob("rank*")}


def metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/") and k != "samples_per_s"}
            for r in records}


def assert_same_end(run_dir: Path, straight: Path) -> None:
    import torch

    resumed, expected = weights(run_dir / "policy"), weights(straight / "policy")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert metrics(run_dir) == metrics(straight)


@pytest.fixture(scope="module")
def straight(cache, rewards, tmp_path_factory) -> Path:
    """The run that never failed."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run = Launch(cache, rewards, run_dir, "reward.name=good:score")
    assert run.wait() == 0, run.output[-6000:]
    return run_dir


def test_a_reward_raising_on_one_rank_stops_every_rank_saves_and_resumes_exactly(cache, rewards, tmp_path,
                                                                                 straight):
    run_dir = tmp_path / "run"
    failing = Launch(cache, rewards, run_dir, "reward.name=flaky:score")
    status, output = failing.wait(), failing.output
    assert status == 1, output[-6000:]
    assert failing.rank_statuses() == {0: 1, 1: 1}, output[-6000:]
    # one message, from the main rank: rank 1's traceback, then one line naming the rank and what was saved
    errors = [line for line in output.splitlines() if "fastbond train: error:" in line]
    assert len(errors) == 1, output[-6000:]
    assert errors[0].startswith("fastbond train: error: step 3 failed on rank 1 (traceback above); saved the last "
                                "completed step as"), errors[0]
    assert [line for line in output.splitlines() if line.startswith("RuntimeError: kaboom on rank 1")] != []
    assert output.count("Traceback (most recent call last)") == 2  # rank 1's error and its cause, once
    assert "flaky.py" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-000002"]

    resumed = Launch(cache, rewards, run_dir, "reward.name=good:score", "checkpoint.resume=true")
    assert resumed.wait() == 0, resumed.output[-6000:]
    assert resumed.rank_statuses() == {0: 0, 1: 0}
    assert_same_end(run_dir, straight)


def _rank_process(launcher: subprocess.Popen, rank: int, timeout_s: float = 120):
    """The process of `rank` among the launcher's descendants (its command line ends in --local_rank=N)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    pytest.fail(f"no process of rank {rank} under the launcher")


def test_a_rank_killed_stops_the_others_in_bounded_time_and_the_run_resumes(cache, rewards, tmp_path, straight):
    run_dir = tmp_path / "run"
    run = Launch(cache, rewards, run_dir, "reward.name=good:score", "checkpoint.every=1")
    victim, survivor = _rank_process(run.process, 1), _rank_process(run.process, 0)
    checkpoint = run_dir / "checkpoints" / "step-000002"
    deadline = time.monotonic() + TIMEOUT_S
    while not checkpoint.is_dir():
        assert run.process.poll() is None and time.monotonic() < deadline, run.output[-6000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor.wait(STOP_BOUND_S)  # psutil.TimeoutExpired: rank 0 outlived the bound
    stopped_s = time.monotonic() - killed
    assert run.wait() != 0
    print(f"rank 0 stopped {stopped_s:.1f} s after rank 1 was killed")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() in ("step-000002", "step-000003")

    resumed = Launch(cache, rewards, run_dir, "reward.name=good:score", "checkpoint.every=1", "checkpoint.resume=true")
    assert resumed.wait() == 0, resumed.output[-6000:]
    assert_same_end(run_dir, straight)
