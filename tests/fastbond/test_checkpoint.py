"""Checkpoints: tensors through safetensors, the rest through JSON, written atomically."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastbond import checkpoint as ckpt
from fastbond.errors import FastbondError


def tiny_model():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def test_split_join_round_trip_keeps_ints_tuples_and_tensors():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(), "pos": {"epoch": 1, "offset": 3}}
    tensors = {}
    skeleton = ckpt.split_tensors(state, tensors)
    json.dumps(skeleton)  # must be JSON-able
    back = ckpt.join_tensors(json.loads(json.dumps(skeleton)), tensors)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.1
    assert fresh.param_groups[0]["betas"] == (0.9, 0.999)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fresh.state_dict()["state"][0][key], optimizer.state_dict()["state"][0][key])
    assert back["pos"] == {"epoch": 1, "offset": 3}


def test_rng_state_round_trip():
    import random

    state = ckpt.rng_state()
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_save_load_and_latest_pointer(tmp_path):
    model = tiny_model()
    state = {"anchor": {"w": torch.arange(6.0).view(2, 3)}, "skipped": 2}
    first = ckpt.save_checkpoint(tmp_path, 5, model, None, state, keep=2)
    assert (first / "policy" / "model.safetensors").is_file()
    assert not list((first / "policy").glob("*.bin"))
    assert ckpt.latest_checkpoint(tmp_path) == first
    step, loaded = ckpt.load_checkpoint(first)
    assert step == 5 and loaded["skipped"] == 2
    assert torch.equal(loaded["anchor"]["w"], state["anchor"]["w"])
    ckpt.save_checkpoint(tmp_path, 10, model, None, state, keep=2)
    third = ckpt.save_checkpoint(tmp_path, 15, model, None, state, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == third
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000010", "step-000015"]


def test_save_killed_midway_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    good = ckpt.save_checkpoint(tmp_path, 1, model, None, {"x": torch.ones(2)})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ckpt, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, None, {"x": torch.zeros(2)})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    step, state = ckpt.load_checkpoint(good)
    assert step == 1 and torch.equal(state["x"], torch.ones(2))
    # the next successful save clears the half-written directory
    ckpt.save_checkpoint(tmp_path, 3, model, None, {"x": torch.zeros(2)})
    assert not list(tmp_path.glob(".tmp-*"))


def test_dangling_pointer_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("step-000099\n")
    with pytest.raises(FastbondError, match="missing or incomplete"):
        ckpt.latest_checkpoint(tmp_path)
