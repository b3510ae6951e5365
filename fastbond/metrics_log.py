"""Where a run's metrics go: `metrics.jsonl` always, TensorBoard and wandb when asked (docs/logging.md).

Each record goes to all three with the same names, steps and values:
TensorBoard gets every finite metric as a scalar (`RUN_DIR/tensorboard/`),
wandb the record as it is (`RUN_DIR/wandb/`).

`metrics.jsonl` is appended one line per record. A crash or a full disk can
leave its last line torn: readers skip it, and a resume drops it together
with the records past the checkpoint, rewriting the file atomically (a kill
during the rewrite leaves the old file whole).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastbond import atomic
from fastbond.errors import FastbondError


INSTALL = "pip install 'fastbond[logging]'"


def to_float(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean())
    return float(value)


class MetricsLog:
    def __init__(self, run_dir: Path, config_dict: dict, tensorboard: bool, wandb: bool, wandb_project: str,
                 resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise FastbondError(f"logging.tensorboard=true needs the tensorboard package ({INSTALL})") from None
            # On resume, TensorBoard drops the earlier events from the checkpoint's next step on, as
            # metrics.jsonl drops those records: they are logged again, and would show twice.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise FastbondError(f"logging.wandb=true needs the wandb package ({INSTALL})") from None
            self._wandb = wandb_module.init(project=wandb_project, config=config_dict, dir=str(run_dir),
                                            name=run_dir.name)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint (they will be written again) and a torn last line."""
        if not self.path.exists():
            return
        kept = [record for record in read_metrics(self.path) if record["step"] <= step]
        atomic.write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, step: int, metrics: dict) -> dict:
        record = {"step": step}
        for key, value in metrics.items():
            number = to_float(value)
            record[key] = number if math.isfinite(number) else None
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a crash mid-write) is skipped, a damaged
    line before it is an error naming the file and line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):
                break  # torn by a crash: the step it held will be logged again on resume
            raise FastbondError(f"{path} line {number} is not a metrics record; fix or delete that line") from None
        records.append(record)
    return records
