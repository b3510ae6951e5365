"""TensorBoard and wandb get what metrics.jsonl gets (fastbond/metrics_log.py): the same names, steps and
values, read back through each tool's own reader; a resumed run shows no step twice."""

import json
import math
import struct

import numpy as np
import pytest

from fastbond.config import load_config
from fastbond.errors import FastbondError
from fastbond.metrics_log import MetricsLog, read_metrics
from fastbond.presets import embedded_preset
from fastbond.train import train

TINY = ["steps=3", "rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false",
        "logging.progress=false", "cpu_threads=1"]


def tiny_run(tmp_path, *overrides):
    return train(load_config(embedded_preset(), TINY + [f"run_dir={tmp_path / 'run'}", *overrides]))


def jsonl_series(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard stores it: a (step, float32 value) series per finite metric."""
    series = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in record.items():
            if key != "step" and value is not None:
                series.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return series


def tensorboard_series(folder) -> dict[str, list[tuple[int, float]]]:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="the tensorboard package is not installed")
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_series_of_metrics_jsonl(tmp_path, embedded_reference):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install -e .[logging])")
    run_dir = tiny_run(tmp_path, "logging.tensorboard=true")
    expected = jsonl_series(run_dir)
    assert {"loss", "reward", "kl_ref", "time/generate"} <= expected.keys()
    assert all([step for step, _ in points] == [1, 2, 3] for points in expected.values())
    assert tensorboard_series(run_dir / "tensorboard") == expected


def test_a_resume_leaves_no_step_twice_in_tensorboard(tmp_path):
    """The records past the checkpoint are logged again after a resume: TensorBoard drops the first ones,
    as metrics.jsonl does. A NaN is null in metrics.jsonl and absent from TensorBoard."""
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install -e .[logging])")
    log = MetricsLog(tmp_path, {}, tensorboard=True, wandb=False, wandb_project="unused")
    for step in range(1, 5):
        log.write(step, {"loss": step / 3, "kl_ref": step / 7})
    log.close()
    # a crash after step 4, the last checkpoint at step 2: steps 3 and 4 run again
    log = MetricsLog(tmp_path, {}, tensorboard=True, wandb=False, wandb_project="unused", resume_step=2)
    for step in range(3, 6):
        log.write(step, {"loss": 10 * step, "reward": math.nan if step == 4 else step})
    log.close()
    expected = jsonl_series(tmp_path)
    assert expected == {"loss": [(1, np.float32(1 / 3)), (2, np.float32(2 / 3)), (3, 30.0), (4, 40.0), (5, 50.0)],
                        "kl_ref": [(1, np.float32(1 / 7)), (2, np.float32(2 / 7))], "reward": [(3, 3.0), (5, 5.0)]}
    assert tensorboard_series(tmp_path / "tensorboard") == expected


def wandb_records(path) -> list:
    """The protobuf records of a .wandb file, W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks
    of chunks `crc32 (4) | length (2) | type (1) | data`, a record being one FULL (1) chunk or FIRST (2),
    MIDDLE (3)…, LAST (4). Read here because wandb ships no reader of its own in every version."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    block, position, pieces, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left for a chunk header: the block is padded
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def items(updates) -> dict:
    """A history row or summary update as {key: value}, without wandb's own keys (_step, _runtime, …)."""
    row = {}
    for item in updates:
        key = item.key or "/".join(item.nested_key)
        if not key.startswith("_"):
            row[key] = json.loads(item.value_json)
    return row


def test_wandb_offline_logs_every_record_under_the_run_directory(tmp_path, embedded_reference, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install -e .[logging])")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path / "not-here"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(name, value)
    run_dir = tiny_run(tmp_path, "logging.wandb=true", "logging.wandb_project=fastbond-test")
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    records = wandb_records(offline[0])
    history = [items(record.history.item) for record in records if record.WhichOneof("record_type") == "history"]
    expected = read_metrics(run_dir / "metrics.jsonl")
    assert history == expected
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update(items(record.summary.update))
    assert summary == expected[-1]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "fastbond-test" and run.display_name == run_dir.name
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algorithm"]["name"] == "jbond" and config["steps"] == 3


def test_a_missing_logging_package_is_one_line_naming_the_extra(monkeypatch):
    import sys

    for package in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, package, None)
        with pytest.raises(FastbondError) as raised:
            load_config(embedded_preset(), [f"logging.{package}=true"]).check(environment=True)
        assert str(raised.value) == f"logging.{package}=true needs the {package} package " \
                                    "(pip install 'fastbond[logging]')"


def test_starting_over_deletes_the_earlier_runs_logs_and_nothing_of_the_users(tmp_path):
    from fastbond.run_dir import MARKER, claim

    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "wandb" / "offline-run-1").mkdir(parents=True)
    (run_dir / MARKER).write_text("{}\n")
    (run_dir / "notes.txt").write_text("mine")
    said = []
    claim(run_dir, resume=False, overwrite=True, say=said.append).release()
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "wandb").exists()
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert "tensorboard/, wandb/" in said[0]
