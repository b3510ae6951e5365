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


# --------------------------------------------------------------------------- #
# every file checked: DeepSpeed's shards by structure, every file by its checksum
# --------------------------------------------------------------------------- #

SHARDS = ("zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", "zero_pp_rank_{rank}_mp_rank_00_model_states.pt")


def write_shard(path, numel=64, value=0.0):
    """A file shaped like DeepSpeed's: torch.save's zip archive named after the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"partition": torch.full((numel,), value), "step": torch.tensor(3.0)}, path)


def zero_checkpoint(checkpoints_dir, step=2, world=2):
    """A checkpoint laid out as the DeepSpeed engine writes one on `world` ranks, published with its manifest."""
    from safetensors.torch import save_file

    tmp = checkpoints_dir / f".tmp-step-{step:06d}"
    for rank in range(world):
        for shard in SHARDS:
            write_shard(tmp / "zero" / shard.format(rank=rank), numel=64 // world)
        save_file({"rng": torch.arange(4)}, str(tmp / f"rank{rank:05d}-of-{world:05d}.safetensors"))
    tiny_model().save_pretrained(tmp / "policy", safe_serialization=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "state": {"world_size": world, "shared": {}}}))
    return ckpt.publish(tmp, checkpoints_dir / ckpt.checkpoint_name(step), keep=2)


def test_zero_shards_are_checked_by_structure_and_checksum(tmp_path):
    """A truncated, renamed, foreign, surplus or missing shard is one line naming the file."""
    checkpoint = zero_checkpoint(tmp_path)
    assert (checkpoint / ckpt.MANIFEST).is_file()
    assert ckpt.damage(checkpoint) is None
    shard = checkpoint / "zero" / SHARDS[0].format(rank=1)
    original = shard.read_bytes()

    def broken(change) -> str:
        change()
        try:
            problem = ckpt.damage(checkpoint)
        finally:
            for extra in (checkpoint / "zero").glob("*rank_2_*"):
                extra.unlink()
            shard.write_bytes(original)
        assert problem is not None and "\n" not in problem
        return problem

    truncated = broken(lambda: shard.write_bytes(original[: len(original) // 2]))
    assert truncated.startswith(f"zero/{shard.name} is truncated"), truncated
    assert broken(lambda: shard.write_bytes(b"")) == f"zero/{shard.name} is empty"
    other_rank = broken(lambda: shard.write_bytes((shard.parent / SHARDS[0].format(rank=0)).read_bytes()))
    assert other_rank.startswith(f"zero/{shard.name} holds zero_pp_rank_0_") and "another rank" in other_rank
    other_world = broken(lambda: write_shard(shard, numel=64 // 4))  # a 4-rank run's partition, same name
    assert other_world.startswith(f"zero/{shard.name} does not match rank 0's shard"), other_world
    more_ranks = broken(lambda: write_shard(shard.parent / SHARDS[0].format(rank=2), numel=32))
    assert more_ranks == "zero/zero_pp_rank_2_mp_rank_00_optim_states.pt is from a run on more ranks " \
                         "(this checkpoint was saved on 2)"
    missing = broken(lambda: shard.unlink())
    assert missing.startswith(f"zero/{shard.name} is missing"), missing
    # another run's shard of the same shapes: only its checksum tells
    other_run = broken(lambda: write_shard(shard, numel=32, value=1.0))
    assert other_run.startswith(f"zero/{shard.name} does not match its sha256 in manifest.json"), other_run
    assert ckpt.damage(checkpoint) is None


def test_a_flipped_bit_is_found_by_the_checksum_alone(tmp_path):
    model = tiny_model()
    checkpoint = ckpt.save_checkpoint(tmp_path, 1, model, None, {"x": torch.ones(1000)})
    target = checkpoint / "tensors.safetensors"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0x04  # inside the tensor data: the header still parses and the size is right
    target.write_bytes(bytes(data))
    assert ckpt.damage(checkpoint, checksums=False) is None
    problem = ckpt.damage(checkpoint)
    assert problem.startswith("tensors.safetensors does not match its sha256 in manifest.json"), problem


def test_a_file_added_after_the_checkpoint_was_written_is_named(tmp_path):
    checkpoint = ckpt.save_checkpoint(tmp_path, 1, tiny_model(), None, {"x": torch.ones(2)})
    (checkpoint / "stray.safetensors").write_bytes((checkpoint / "tensors.safetensors").read_bytes())
    assert ckpt.damage(checkpoint).startswith("stray.safetensors is not in manifest.json")


def test_a_damaged_manifest_is_named(tmp_path):
    checkpoint = ckpt.save_checkpoint(tmp_path, 1, tiny_model(), None, {"x": torch.ones(2)})
    (checkpoint / ckpt.MANIFEST).write_text('{"files": ')
    assert ckpt.damage(checkpoint) == "manifest.json is not a readable manifest"


def test_a_checkpoint_without_a_manifest_resumes_checked_by_structure(tmp_path):
    checkpoint = ckpt.save_checkpoint(tmp_path, 1, tiny_model(), None, {"x": torch.ones(2)})
    (checkpoint / ckpt.MANIFEST).unlink()  # as written before manifests existed
    said = []
    assert ckpt.resume_checkpoint(tmp_path, True, say=said.append) == checkpoint
    assert said == ["step-000001 has no manifest.json (written by an earlier fastbond): checked by its structure "
                    "only, not by checksums"]
    truncated = checkpoint / "tensors.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-1])
    with pytest.raises(FastbondError, match="tensors.safetensors is truncated"):
        ckpt.resume_checkpoint(tmp_path, True, say=said.append)


@pytest.mark.parametrize("pointer", [None, b"", b"\xff\xfe\x00garbage", b"step-000099\n", b"../step-000004\n",
                                     b"not a checkpoint"])
def test_a_missing_or_damaged_pointer_resumes_from_the_newest_complete_checkpoint(tmp_path, pointer):
    model = tiny_model()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, None, {"x": torch.ones(2)}, keep=3)
    newest = tmp_path / "step-000006"
    (newest / "tensors.safetensors").write_bytes(b"")  # the newest is damaged as well
    if pointer is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_bytes(pointer)
    said = []
    assert ckpt.resume_checkpoint(tmp_path, True, say=said.append) == tmp_path / "step-000004"
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"checkpoint pointer {tmp_path / 'latest'} ")
    assert "resuming from the newest complete checkpoint step-000004; moved step-000006 aside" in said[0]
    assert (tmp_path / "latest").read_text() == "step-000004\n"  # repaired: the other ranks read it
    assert (tmp_path / "damaged" / "step-000006").is_dir()


def test_a_damaged_pointer_with_nothing_complete_is_one_line(tmp_path):
    checkpoint = ckpt.save_checkpoint(tmp_path, 2, tiny_model(), None, {"x": torch.ones(2)})
    (checkpoint / "state.json").write_text("{}")
    (tmp_path / "latest").write_bytes(b"\x00\x01")
    with pytest.raises(FastbondError) as raised:
        ckpt.resume_checkpoint(tmp_path, True)
    message = str(raised.value)
    assert "\n" not in message and "is damaged" in message and "no checkpoint in" in message
    assert "step-000002: state.json lacks its step or state" in message and "--force" in message
    with pytest.raises(FastbondError, match="checkpoint pointer .* is damaged"):
        ckpt.latest_checkpoint(tmp_path)  # `fastbond merge` and the rest: one line too


def test_a_manifest_naming_files_outside_the_checkpoint_is_refused(tmp_path):
    checkpoint = ckpt.save_checkpoint(tmp_path, 1, tiny_model(), None, {"x": torch.ones(2)})
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"]["../latest"] = {"bytes": 12, "sha256": "0" * 64}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.damage(checkpoint) == "manifest.json names a file outside the checkpoint"
