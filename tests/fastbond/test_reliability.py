"""A run is never lost: damaged files, torn logs, used or shared run directories, resumes that
change the job, full disks, results that are not numbers. docs/reliability.md is the summary.

Faults are real where the machine allows: files are truncated on disk, a second process holds
the lock, a training process is killed with SIGKILL, and a small tmpfs really fills (skipped
where mounting is not permitted). Each user-facing failure is checked to be one line on stderr
with exit status 2 and to leave what was saved before it intact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fastbond.checkpoint import (
    damage,
    list_checkpoints,
    publish,
    safetensors_damage,
)
from fastbond.cli import main
from fastbond.errors import FastbondError
from fastbond.evaluate import write_evaluation
from fastbond.metrics_log import MetricsLog, read_metrics
from fastbond.run_dir import claim

TINY = ["rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false", "logging.progress=false",
        "cpu_threads=1"]


def train_cli(capsys, run_dir: Path, *overrides: str) -> tuple[int, str, str]:
    """(status, stdout, stderr) of `fastbond train` on the embedded world in `run_dir`."""
    capsys.readouterr()
    status = main(["train", *TINY, f"run_dir={run_dir}", *overrides])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(status: int, err: str, *fragments: str) -> str:
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if ": note: " not in line]  # notes are not errors
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def truncate(path: Path, keep: int | None = None) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2 if keep is None else keep)


@pytest.fixture
def run_of_4(tmp_path, capsys, embedded_reference):
    """A finished 4-step J-BOND run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path / "run"
    status, _, err = train_cli(capsys, run_dir, "steps=4", "checkpoint.every=2")
    assert status == 0, err
    return run_dir


# --------------------------------------------------------------------------- #
# damaged files
# --------------------------------------------------------------------------- #


def test_safetensors_damage_finds_empty_truncated_and_garbled_files(tmp_path):
    import torch

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(3, 4)}, str(good))
    assert safetensors_damage(good) is None
    cases = {"empty": 0, "no-header": 5, "header-cut": 20, "data-cut": good.stat().st_size - 1}
    for name, keep in cases.items():
        broken = tmp_path / f"{name}.safetensors"
        broken.write_bytes(good.read_bytes()[:keep])
        assert safetensors_damage(broken), name
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    assert "cannot be read" in safetensors_damage(garbled)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(good.read_bytes() + b"\0")
    assert safetensors_damage(longer)


def flip_a_bit(path: Path, from_end: int = 64) -> None:
    """One bit inside the tensor data near the file's end: headers and sizes stay as they were."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("broken", ["policy/model.safetensors", "tensors.safetensors", "state.json",
                                    "flipped:tensors.safetensors", "flipped:policy/model.safetensors"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_offered(capsys, run_of_4, broken):
    latest = run_of_4 / "checkpoints" / "step-000004"
    flipped = broken.startswith("flipped:")
    broken = broken.removeprefix("flipped:")
    target = latest / broken
    if flipped:
        flip_a_bit(target)
        assert safetensors_damage(target) is None  # only its checksum tells
    elif broken == "state.json":
        target.write_text(json.dumps({"step": 4}))  # parses, lacks its state
    elif broken == "tensors.safetensors":
        target.write_bytes(b"")
    else:
        truncate(target)
    assert damage(latest).startswith(broken)
    status, _, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.every=2", "checkpoint.resume=true")
    line = one_line_error(status, err, "step-000004 is damaged", broken, "checkpoint.resume=previous", "step-000002")
    assert ("does not match its sha256 in manifest.json" in line) == flipped

    # resume from the previous one: the damaged checkpoint is moved aside, not deleted
    status, out, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.every=2", "checkpoint.resume=previous")
    assert status == 0, err
    assert "resuming from step-000002" in out
    assert (run_of_4 / "checkpoints" / "damaged" / "step-000004" / broken).exists()
    assert [p.name for p in list_checkpoints(run_of_4 / "checkpoints")] == ["step-000004", "step-000006"]
    assert [r["step"] for r in read_metrics(run_of_4 / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_latest_pointer_resumes_from_the_newest_complete_checkpoint(capsys, run_of_4):
    (run_of_4 / "checkpoints" / "latest").write_bytes(b"\xff\xfe garbage")
    status, out, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.every=2", "checkpoint.resume=true")
    assert status == 0, err
    said = [line for line in out.splitlines() if "checkpoint pointer" in line]
    assert len(said) == 1 and "is damaged" in said[0], out
    assert said[0].endswith("resuming from the newest complete checkpoint step-000004")
    assert [r["step"] for r in read_metrics(run_of_4 / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (run_of_4 / "checkpoints" / "latest").read_text() == "step-000006\n"


def test_no_complete_checkpoint_to_fall_back_to_says_so(capsys, run_of_4):
    for checkpoint in list_checkpoints(run_of_4 / "checkpoints"):
        truncate(checkpoint / "policy" / "model.safetensors")
    status, _, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.resume=true")
    one_line_error(status, err, "is damaged", "no earlier complete checkpoint", "--force")
    status, _, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.resume=previous")
    one_line_error(status, err, "no complete checkpoint older than step-000004")


def test_eval_of_a_truncated_policy_names_the_file(capsys, run_of_4):
    truncate(run_of_4 / "policy" / "model.safetensors")
    capsys.readouterr()
    status = main(["eval", str(run_of_4)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "model.safetensors is truncated" in err and "--policy" in err


# --------------------------------------------------------------------------- #
# metrics.jsonl
# --------------------------------------------------------------------------- #


def test_a_torn_last_metrics_line_is_skipped_and_dropped_on_resume(capsys, run_of_4):
    log = run_of_4 / "metrics.jsonl"
    with open(log, "a") as handle:
        handle.write('{"step": 5, "rew')  # a crash mid-write
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3, 4]
    status, _, err = train_cli(capsys, run_of_4, "steps=5", "checkpoint.every=2", "checkpoint.resume=true")
    assert status == 0, err
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3, 4, 5]


def test_a_damaged_line_before_the_end_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(FastbondError, match="line 2 is not a metrics record"):
        read_metrics(log)


def test_the_resume_rewrite_of_metrics_is_atomic(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in range(1, 7))
    log.write_text(text)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-rewrite")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, {}, False, False, "x", resume_step=3)
    monkeypatch.undo()
    assert log.read_text() == text  # the history is whole
    MetricsLog(tmp_path, {}, False, False, "x", resume_step=3)
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3]


# --------------------------------------------------------------------------- #
# run directories
# --------------------------------------------------------------------------- #


def test_a_fresh_run_in_a_used_directory_is_refused_then_force_starts_over(capsys, run_of_4):
    before = (run_of_4 / "metrics.jsonl").read_text()
    status, _, err = train_cli(capsys, run_of_4, "steps=2")
    one_line_error(status, err, "already holds a run", "checkpoints up to step-000004", "checkpoint.resume=true",
                   "--force")
    assert (run_of_4 / "metrics.jsonl").read_text() == before
    assert (run_of_4 / "checkpoints" / "step-000004").is_dir()

    (run_of_4 / "notes.txt").write_text("mine")
    capsys.readouterr()
    status = main(["train", "--force", *TINY, f"run_dir={run_of_4}", "steps=2"])
    out = capsys.readouterr().out
    assert status == 0
    assert "starting over" in out
    assert [p.name for p in list_checkpoints(run_of_4 / "checkpoints")] == ["step-000002"]
    assert [r["step"] for r in read_metrics(run_of_4 / "metrics.jsonl")] == [1, 2]
    assert (run_of_4 / "notes.txt").read_text() == "mine"  # not the run's: kept


def test_a_directory_of_the_users_own_files_is_never_written(capsys, tmp_path, embedded_reference):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own\n")
    for force in ([], ["--force"]):
        capsys.readouterr()
        status = main(["train", *force, *TINY, f"run_dir={mine}", "steps=1"])
        one_line_error(status, capsys.readouterr().err, "holds no fastbond run", "config.yaml")
        assert (mine / "config.yaml").read_text() == "my: own\n"


def test_a_second_process_on_the_same_run_directory_is_refused(capsys, tmp_path, embedded_reference):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fastbond.run_dir import claim; "
         "lock = claim(Path(sys.argv[1]), False, False); print('held', flush=True); time.sleep(60)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status, _, err = train_cli(capsys, run_dir, "steps=1")
        one_line_error(status, err, "is in use by fastbond pid", str(holder.pid))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim(run_dir, True, False).release()  # the kernel dropped the dead holder's lock


def test_run_dir_that_is_a_file_or_unwritable_is_one_line(capsys, tmp_path, embedded_reference):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for run_dir in (a_file, a_file / "run"):
        status, _, err = train_cli(capsys, run_dir, "steps=1")
        one_line_error(status, err, str(a_file))


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (999_998, 999_999):
        (checkpoints / f"step-{step:06d}").mkdir(parents=True)
    tmp = checkpoints / ".tmp-new"
    tmp.mkdir()
    publish(tmp, checkpoints / f"step-{1_000_000:06d}", keep=2)
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-999999", "step-1000000"]
    assert (checkpoints / "latest").read_text().strip() == "step-1000000"


# --------------------------------------------------------------------------- #
# resumes that change the job
# --------------------------------------------------------------------------- #


def test_resume_refuses_another_algorithm_and_other_prompts(capsys, run_of_4, tmp_path):
    status, _, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.resume=true", "algorithm.name=rloo")
    one_line_error(status, err, "algorithm.name changed from 'jbond' to 'rloo'", "set it back")
    prompts = tmp_path / "fewer.txt"
    prompts.write_text("the film was\n")
    status, _, err = train_cli(capsys, run_of_4, "steps=6", "checkpoint.resume=true", f"data.prompts={prompts}")
    one_line_error(status, err, "data.prompts holds other prompts", "1 now")


def test_resume_prints_every_allowed_change(capsys, run_of_4):
    status, out, err = train_cli(capsys, run_of_4, "steps=5", "checkpoint.every=2", "checkpoint.resume=true",
                                 "optim.lr=1e-5", "algorithm.beta=0.25")
    assert status == 0, err
    line = next(x for x in out.splitlines() if "changed settings" in x)
    assert "steps: 4 → 5" in line and "optim.lr: 0.002 → 1e-05" in line and "algorithm.beta: 0.5 → 0.25" in line


# --------------------------------------------------------------------------- #
# processes killed, disks full
# --------------------------------------------------------------------------- #


def test_a_run_killed_with_sigkill_resumes_and_its_directory_is_free_again(capsys, tmp_path, embedded_reference):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fastbond", "train", *TINY, f"run_dir={run_dir}", "steps=200",
               "checkpoint.every=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            checkpoints = list_checkpoints(run_dir / "checkpoints")
            if checkpoints and int(checkpoints[-1].name.split("-")[1]) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints"))
    status, _, err = train_cli(capsys, run_dir, f"steps={killed_at + 2}", "checkpoint.every=1",
                               "checkpoint.resume=true")
    assert status == 0, err
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, killed_at + 3))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs, or a skip where this machine does not let the tests mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): the full-disk test is skipped")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_read_only_file_system_is_refused_before_the_models_load(capsys, small_disk, embedded_reference,
                                                                    monkeypatch):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    from fastbond.engines import local

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(local, "build_models", no_models)
    status, _, err = train_cli(capsys, small_disk / "run", "steps=1")
    one_line_error(status, err, "cannot be written", "Read-only file system")


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(capsys, small_disk, embedded_reference):
    run_dir = small_disk / "run"
    status, _, err = train_cli(capsys, run_dir, "steps=40", "checkpoint.every=1", "checkpoint.keep=40")
    line = one_line_error(status, err, "no space left on the device while writing", "checkpoint.resume=true")
    assert "MiB free" in line
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert checkpoints, "some checkpoints fit before the disk filled"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the failed save left its partial copy"
    last = checkpoints[-1]
    assert damage(last) is None
    assert load_file(str(last / "tensors.safetensors"))
    # make room (a larger disk), resume: it continues from the last complete checkpoint
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    steps = int(last.name.split("-")[1]) + 1
    status, _, err = train_cli(capsys, run_dir, f"steps={steps}", "checkpoint.resume=true")
    assert status == 0, err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))


# --------------------------------------------------------------------------- #
# results that are not numbers
# --------------------------------------------------------------------------- #


def test_eval_json_holds_null_not_nan_and_stop_refuses(tmp_path, capsys):
    result = {"prompts": 2, "policy_reward": float("nan"), "bon": {"1": {"reward": float("inf"), "kl_bound": 0.0}}}
    path = tmp_path / "eval.json"
    written = write_evaluation(path, result, "skip")
    assert "policy_reward, bon.1.reward are not a number" in capsys.readouterr().out

    def no_constants(name):
        raise AssertionError(f"{name} in strict JSON")

    assert json.loads(path.read_text(), parse_constant=no_constants) == written
    assert written["policy_reward"] is None and written["bon"]["1"]["reward"] is None
    path.unlink()
    with pytest.raises(FastbondError, match="on_nonfinite=stop"):
        write_evaluation(path, result, "stop")
    assert not path.exists()
