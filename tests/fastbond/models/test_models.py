"""The models package: loading with one-line errors, the policy forms and their registry, assembly."""

from __future__ import annotations

import pytest
import torch

from fastbond.config import load_config
from fastbond.errors import FastbondError
from fastbond.models import (
    FORMS,
    build_models,
    judged_models,
    load_causal_lm,
    load_tokenizer,
    make_form,
)
from fastbond.models.full import FullForm
from fastbond.presets import embedded_preset


def test_a_file_or_a_directory_without_config_json_is_one_line(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FastbondError, match="is a file; expected a transformers model directory"):
        load_causal_lm(tmp_path / "weights.bin", torch.float32, torch.device("cpu"))
    with pytest.raises(FastbondError, match=r"is not a transformers model directory \(no config.json\)"):
        load_tokenizer(tmp_path)


def test_the_tokenizer_pads_left_with_eos_when_it_has_no_pad_token(tmp_path, embedded_reference):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_reference)
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((embedded_reference / "config.json").read_text())
    loaded = load_tokenizer(tmp_path)
    assert loaded.padding_side == "left" and loaded.pad_token_id == loaded.eos_token_id


def test_the_form_follows_model_lora_r():
    assert set(FORMS) == {"full", "lora"}
    assert make_form(load_config(None, [])).name == "full"
    assert make_form(load_config(None, ["model.lora.r=4"], check_paths=False)).name == "lora"


class OneDevice:
    """The least a placer does: nothing moves, the trained module is recorded."""

    main = True
    load_device = torch.device("cpu")
    compute_dtype = torch.bfloat16
    trained_dtype = torch.float32
    release_gathered = None

    def train(self, module, anchor=False):
        self.trained = module
        return module, ("anchor" if anchor else None)

    def frozen(self, module):
        self.frozen_module = module
        return module

    def reward(self, reward_fn):
        return reward_fn

    def gathered(self, params):
        from contextlib import nullcontext

        return nullcontext()


def test_the_full_form_trains_the_whole_policy_in_the_placers_dtypes(embedded_reference):
    config = load_config(embedded_preset(), ["model.dtype=bfloat16"])
    placer = OneDevice()
    models = build_models(config, FullForm(), placer, needs_anchor=True)
    assert placer.trained is models.policy and models.anchor == "anchor"
    assert {p.dtype for p in models.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in models.reference.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in models.reference.parameters())
    assert models.tokenizer.padding_side == "left" and models.reward_fn is not None
    assert models.role_weights is None  # a sampler holding its own copy reads the role modules


def test_judging_an_adapter_under_a_full_config_is_one_line(tmp_path, embedded_reference):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FastbondError, match="holds a LoRA adapter, but the run's config has model.lora.r=0"):
        judged_models(load_config(embedded_preset(), []), tmp_path, torch.device("cpu"))


def test_judged_models_read_an_export_in_fp32_beside_the_runs_reference(embedded_reference):
    models = judged_models(load_config(embedded_preset(), []), embedded_reference, torch.device("cpu"))
    assert not models.policy.training and {p.dtype for p in models.policy.parameters()} == {torch.float32}
    assert models.anchor is None


def test_a_full_run_has_nothing_to_merge(tmp_path):
    with pytest.raises(FastbondError, match=r"its policy/ is already a whole model, nothing to merge"):
        FullForm().merge(load_config(None, []), tmp_path, tmp_path / "out", tmp_path)
