"""The one-process engine (`fastbond.engines.local`): its placer, its optimizer's schedule, its files."""

from __future__ import annotations

import torch
from torch import nn

from fastbond.config import load_config
from fastbond.engines.local import LocalEngine, LocalPlacer, warmup_lambda
from fastbond.presets import embedded_preset


def test_warm_up_rises_linearly_then_stays():
    schedule = warmup_lambda(4)
    assert [schedule(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0


def test_the_placer_trains_only_what_requires_grad_and_keeps_an_fp32_anchor_state():
    config = load_config(None, ["model.dtype=bfloat16"])
    placer = LocalPlacer(config, torch.device("cpu"))
    module = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    module[0].requires_grad_(False)
    placed, anchor = placer.train(module, anchor=True)
    trained = {id(p) for group in placer.optimizer.optimizer.param_groups for p in group["params"]}
    assert placed is module and trained == {id(p) for p in module[1].parameters()}
    assert anchor is not None and {t.dtype for t in anchor.state} == {torch.float32}
    assert placer.trained_state() is None  # one process: the live tensors are whole


def test_write_pretrained_replaces_the_directory_in_one_rename(tmp_path, reference):
    model, tokenizer = reference
    placer = LocalPlacer(load_config(None, []), torch.device("cpu"))
    target = tmp_path / "policy"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier export")
    placer.write_pretrained(model, target, tokenizer)
    assert (target / "model.safetensors").is_file() and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temporary left beside it


def test_a_full_run_is_judged_on_its_live_models_a_lora_run_on_its_export(embedded_reference):
    engine = LocalEngine(load_config(embedded_preset(), []))
    assert engine.form.judges_live_policy
    lora = LocalEngine(load_config(embedded_preset(), ["model.lora.r=4"]))
    assert not lora.form.judges_live_policy
