"""The embedded default world: grammar, tokenizer, π_ref, prompts and the cached build."""

import json
import math
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastbond import embedded
from fastbond.embedded import reference as reference_build
from fastbond.rewards import load_reward

# The response grammar of fastbond.embedded, as a regular expression.
_VERDICT = (
    rf"(not )?(({'|'.join(embedded.INTENSIFIERS)}) )?"
    rf"({'|'.join(embedded.POSITIVE + embedded.NEGATIVE + embedded.NEUTRAL)})"
)
_CLAUSE = rf"the ({'|'.join(embedded.ASPECTS)}) was {_VERDICT}"
RESPONSE = re.compile(rf"({_VERDICT}|{_CLAUSE})( (and|but) {_CLAUSE})? \.")


def _best_of_n(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased E[max of n draws] per row from m ≥ n samples [P, m] (a U-statistic)."""
    m = rewards.shape[1]
    ordered, _ = rewards.double().sort(1)
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(m, n) for i in range(m)], dtype=torch.float64)
    return (ordered * weights).sum(1)


# ---------------------------------------------------------------------------
# grammar and prompts


def test_corpus_is_seeded_and_matches_the_grammar():
    assert embedded.corpus(50, seed=3) == embedded.corpus(50, seed=3)
    assert embedded.corpus(50, seed=3) != embedded.corpus(50, seed=4)
    for prompt, response, logp in embedded.sample_documents(200, seed=0):
        assert prompt in set(embedded.all_prompts())
        assert RESPONSE.fullmatch(response), response
        assert logp < 0
        assert len(response.split()) + 1 <= embedded.MAX_NEW_TOKENS  # + EOS


def test_corpus_entropy_is_well_below_uniform():
    entropy = embedded.corpus_entropy(2000, seed=0)
    assert 0.5 < entropy < 0.5 * math.log(len(embedded.vocabulary()))


def test_prompt_splits_are_disjoint_and_cover_every_prompt(tmp_path):
    train, evaluation = embedded.prompt_splits(seed=0)
    assert len(evaluation) == 200 and len(train) == len(embedded.all_prompts()) - 200
    assert not set(train) & set(evaluation)
    assert sorted(train + evaluation) == sorted(embedded.all_prompts())
    assert embedded.prompt_splits(seed=0) == (train, evaluation)
    path = embedded.write_prompts_jsonl(evaluation, tmp_path / "eval.jsonl")
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == evaluation


# ---------------------------------------------------------------------------
# tokenizer


def test_tokenizer_encodes_decodes_and_round_trips(tmp_path):
    tokenizer = embedded.build_tokenizer()
    text = "review of the lost river : the plot was not very good ."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("the zebra was good")["input_ids"][2] == tokenizer.unk_token_id

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.padding_side == "left"


def test_tokenizer_padding_side_is_configurable():
    left = embedded.build_tokenizer()(["the plot was good", "i"], padding=True)["input_ids"]
    right = embedded.build_tokenizer(padding_side="right")(["the plot was good", "i"], padding=True)["input_ids"]
    assert left[1][0] == 0 and left[1][-1] != 0
    assert right[1][0] != 0 and right[1][-1] == 0


# ---------------------------------------------------------------------------
# π_ref


def test_reference_is_a_safetensors_checkpoint(embedded_reference):
    files = {p.name for p in embedded_reference.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    assert {"config.json", "tokenizer.json", embedded.TRAIN_PROMPTS_FILE, embedded.EVAL_PROMPTS_FILE} <= files
    model = AutoModelForCausalLM.from_pretrained(embedded_reference)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    train, evaluation = embedded.prompt_splits(seed=0)
    lines = (embedded_reference / embedded.EVAL_PROMPTS_FILE).read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == evaluation


def test_reference_learned_the_grammar(reference, embedded_reference):
    model, tokenizer = reference
    texts = embedded.corpus(512, seed=777)
    loss = embedded.heldout_loss(model, tokenizer, texts)
    entropy = embedded.corpus_entropy(512, seed=777)  # the same 512 documents
    assert loss < 0.5 * math.log(len(tokenizer))
    assert loss < entropy + 0.05
    meta = json.loads((embedded_reference / embedded.META_FILE).read_text())
    assert meta["heldout_loss"] < meta["entropy"] + 0.05 < meta["uniform_loss"]


def test_pretraining_on_this_machine_reaches_the_stored_weights(tmp_path, embedded_reference):
    """The tests run on stored weights; `fastbond train` pretrains on the user's machine. Both reach
    the grammar's entropy, and they differ by the CPU's float order only (measured: identical bytes
    on the machine that wrote them)."""
    fresh = json.loads((embedded.build_embedded_reference(tmp_path) / embedded.META_FILE).read_text())
    stored = json.loads((embedded_reference / embedded.META_FILE).read_text())
    assert fresh["weights"] == "pretrained here" and stored["weights"].startswith("loaded from embedded-")
    assert fresh["heldout_loss"] < fresh["entropy"] + 0.05
    assert abs(fresh["heldout_loss"] - stored["heldout_loss"]) < 0.01


def test_reference_generates_grammatical_responses_that_end_with_eos(reference):
    model, tokenizer = reference
    _, evaluation = embedded.prompt_splits(seed=0)
    prompts = evaluation[:64]
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    assert (encoded["input_ids"][:, -1] != tokenizer.pad_token_id).all()  # left padding
    with embedded.cpu_threads(1):
        output = model.generate(**encoded, do_sample=True, top_k=0, max_new_tokens=embedded.MAX_NEW_TOKENS,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = output[:, encoded["input_ids"].shape[1]:]
    ended = (new == tokenizer.eos_token_id).any(1)
    assert ended.float().mean() >= 0.95
    responses = tokenizer.batch_decode(new, skip_special_tokens=True)
    grammatical = sum(bool(RESPONSE.fullmatch(r)) for r in responses)
    assert grammatical >= 0.9 * len(responses), responses


def test_best_of_n_of_the_reference_beats_a_single_sample(reference):
    """BoN must matter: π_ref's samples spread in reward, so the best of 4 is clearly better."""
    model, tokenizer = reference
    _, evaluation = embedded.prompt_splits(seed=0)
    prompts = evaluation[:100]
    reward = load_reward("builtin", embedded.REWARD_NAME)
    with embedded.cpu_threads(1):
        draws = [embedded.sample_responses(model, tokenizer, prompts) for _ in range(8)]
    samples = torch.stack([reward(prompts, responses) for responses in draws], 1)  # [100, 8]
    best_of_1, best_of_4 = _best_of_n(samples, 1).mean(), _best_of_n(samples, 4).mean()
    assert samples.std(1).mean() > 0.5  # rewards vary within a prompt
    assert best_of_4 > best_of_1 + 0.6, (best_of_1, best_of_4)


# ---------------------------------------------------------------------------
# the cache


def test_cache_is_reused_without_rebuilding(embedded_reference, monkeypatch):
    meta = embedded_reference / embedded.META_FILE
    before = meta.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached reference")

    monkeypatch.setattr(reference_build, "_build_into", fail)
    assert embedded.build_embedded_reference() == embedded_reference
    assert meta.stat().st_mtime_ns == before


def test_a_failed_build_leaves_no_directory(tmp_path, monkeypatch):
    def crash(directory, *args):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(reference_build, "_build_into", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded.build_embedded_reference(tmp_path, seed=5)
    assert [p.name for p in tmp_path.iterdir()] == [f".embedded-{embedded.VERSION}-seed5.lock"]  # the lock's file


def test_a_concurrent_build_that_finished_first_wins(tmp_path, monkeypatch):
    real_build = reference_build._build_into

    def build_while_another_finishes(directory, seed, steps, batch_size, weights=None):
        meta = real_build(directory, seed, steps, batch_size, weights)
        _fake_build(tmp_path / f"embedded-{embedded.VERSION}-seed{seed}")  # e.g. another node, on a shared cache
        return meta

    monkeypatch.setattr(reference_build, "_build_into", build_while_another_finishes)
    path = embedded.build_embedded_reference(tmp_path, seed=5, steps=2, batch_size=4)
    assert path == tmp_path / f"embedded-{embedded.VERSION}-seed5"
    assert (path / embedded.META_FILE).read_text() == "{}"  # the other build's copy was kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{path.name}.lock", path.name]  # our scratch removed


def _fake_build(directory, *args, **kwargs):
    """What a complete build leaves, in no time: the model's files, then the metadata."""
    directory.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_text("{}")
    (directory / embedded.META_FILE).write_text("{}")


def test_processes_sharing_a_cache_build_it_once(tmp_path, monkeypatch):
    """The ranks of one node share its cache: the first builds, the other waits on the lock and reads
    that build. (flock excludes two open files of one process as it does two processes'.)"""
    import threading

    builds, started, second_waits = [], threading.Event(), threading.Event()

    def slow_build(directory, *args):
        builds.append(directory)
        started.set()
        second_waits.wait(10)
        time.sleep(0.5)  # the second caller is at the lock by now
        _fake_build(directory)

    monkeypatch.setattr(reference_build, "_build_into", slow_build)
    found = []
    first = threading.Thread(target=lambda: found.append(embedded.build_embedded_reference(tmp_path, seed=5)))
    first.start()
    assert started.wait(10)
    second_waits.set()
    found.append(embedded.build_embedded_reference(tmp_path, seed=5))
    first.join(10)
    target = tmp_path / f"embedded-{embedded.VERSION}-seed5"
    assert found == [target, target]
    assert len(builds) == 1


def test_an_incomplete_cache_is_rebuilt(tmp_path, monkeypatch):
    """A build whose model files are missing (as a rank other than global rank 0 left it when
    transformers' save_pretrained wrote nothing there) is built again, not loaded."""
    target = tmp_path / f"embedded-{embedded.VERSION}-seed5"
    target.mkdir()
    (target / embedded.META_FILE).write_text("{}")
    monkeypatch.setattr(reference_build, "_build_into", _fake_build)
    assert embedded.build_embedded_reference(tmp_path, seed=5) == target
    assert (target / "model.safetensors").is_file()


def test_cpu_threads_restores_the_previous_count():
    before = torch.get_num_threads()
    with embedded.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cache_root_follows_fastbond_cache(fastbond_cache, embedded_reference):
    assert embedded.default_cache_root() == fastbond_cache
    assert embedded_reference.parent == fastbond_cache
