"""Conversational prompts (`fastbond.chat`, data.chat_template): what the policy is sampled from and scored on
is, token for token, `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.

The tokenizer is the embedded one given a small chat template and saved and loaded like any checkpoint's.
Each test checks the ids where they are used: the ids `encode_prompts` hands the samplers, the ids the
`generate` and static samplers feed the model (and keep in their samples), the ids vLLM is handed, the
sequences the log-prob pass runs on in a training run, and the length `data.max_prompt_tokens` counts.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil

import pytest
import torch

import fastbond.logprobs
from fastbond.chat import RenderedPrompt, conversation, prompt_token_ids, render_prompts
from fastbond.config import load_config
from fastbond.data import check_prompt_lengths, read_prompts
from fastbond.errors import FastbondError
from fastbond.evaluate import evaluate_run
from fastbond.models import load_tokenizer
from fastbond.presets import embedded_preset
from fastbond.resume import prompts_fingerprint
from fastbond.rollout import Prompts, encode_prompts
from fastbond.rollout.sampler import GenerateSampler
from fastbond.rollout.static_sampler import StaticSampler
from fastbond.rollout.vllm_sampler import request_token_ids
from fastbond.train import train

# Words of the embedded vocabulary, so that every turn marker is a real token of the word-level tokenizer.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} . "
    "{% elif message['role'] == 'user' %}review of : {{ message['content'] }}"
    "{% else %} {{ message['content'] }} {{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} i thought{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "the plot was"}],
    [{"role": "system", "content": "the music was quiet"},
     {"role": "user", "content": "the lost empire : the cast felt"}],
    [{"role": "user", "content": "the cast was"}, {"role": "assistant", "content": "good ."},
     {"role": "user", "content": "the ending in the dark river was"}],
]
PLAIN = "the acting was"  # a plain prompt: one user turn under a template
NEW = 6


@pytest.fixture(scope="module")
def chat_model(embedded_reference, tmp_path_factory):
    """The embedded π_ref with a chat template on its tokenizer, saved as a checkpoint directory."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat") / "policy"
    shutil.copytree(embedded_reference, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    """The chat tokenizer as a run loads it (left padding, a pad token)."""
    return load_tokenizer(chat_model)


def template_ids(tokenizer, messages) -> list[int]:
    """The oracle: the chat template's own ids, with the generation prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def expected_ids(tokenizer) -> list[list[int]]:
    return [template_ids(tokenizer, messages) for messages in CHATS + [[{"role": "user", "content": PLAIN}]]]


def rendered(tokenizer) -> list[str]:
    return render_prompts(CHATS + [PLAIN], tokenizer, "auto", "data.prompts (test)")


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


# --------------------------------------------------------------------------- rendering and encoding


def test_a_rendered_prompt_is_the_templates_text_and_ids(tokenizer):
    prompts = rendered(tokenizer)
    for prompt, messages in zip(prompts, CHATS + [[{"role": "user", "content": PLAIN}]]):
        assert isinstance(prompt, RenderedPrompt) and list(prompt.messages) == messages
        assert str(prompt) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert conversation(prompt) == messages
    ids, mask = encode_prompts(tokenizer, prompts, 64, torch.device("cpu"))
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all(), "rows of several lengths, padded on the left"
    assert unpadded(ids, mask) == expected_ids(tokenizer) == prompt_token_ids(tokenizer, prompts)
    assert all(row.count(tokenizer.bos_token_id) == 1 for row in unpadded(ids, mask)), "BOS once, from the template"


def test_plain_prompts_stay_as_written_without_a_template(reference, tokenizer):
    plain_tokenizer = reference[1]
    prompts = ["the plot was", "review of the dark storm :"]
    for kept in (render_prompts(prompts, plain_tokenizer, "auto", "x"), render_prompts(prompts, tokenizer, False, "x")):
        assert kept == prompts and all(type(p) is str for p in kept)
        # so the fingerprint a checkpoint of a plain run was saved with still matches
        assert prompts_fingerprint(kept) == prompts_fingerprint(prompts)
        ids, mask = encode_prompts(plain_tokenizer, kept, 64, torch.device("cpu"))
        assert unpadded(ids, mask) == plain_tokenizer(prompts)["input_ids"]  # with the tokenizer's BOS, as before
    assert prompts_fingerprint(render_prompts(prompts, tokenizer, True, "x")) != prompts_fingerprint(prompts)


def test_a_rendered_prompt_keeps_its_messages_through_copies_and_batches(tokenizer):
    prompt = rendered(tokenizer)[1]
    for copied in (copy.deepcopy(prompt), pickle.loads(pickle.dumps(prompt))):
        assert copied == prompt and isinstance(copied, RenderedPrompt) and copied.messages == prompt.messages
    ids, mask = encode_prompts(tokenizer, [prompt], 64, torch.device("cpu"))
    batch = Prompts([prompt], ids, mask).repeated(3).rows([2, 0])
    assert all(text is prompt for text in batch.texts)


# --------------------------------------------------------------------------- the ids each consumer sees


class Prefill:
    """Records the ids of the model's first forward in a draw: the prompt the sampler fed it."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    def rows(self) -> list[list[int]]:
        ids, mask = self.calls[0]
        return unpadded(ids, mask[:, : ids.shape[1]])


@pytest.mark.parametrize("backend", ["generate", "static"])
def test_the_samplers_feed_the_model_the_rendered_ids(reference, tokenizer, backend):
    model = reference[0]
    prompts = rendered(tokenizer)
    ids, mask = encode_prompts(tokenizer, prompts, 64, torch.device("cpu"))
    sampler = (GenerateSampler(tokenizer, NEW) if backend == "generate" else
               StaticSampler(tokenizer, NEW, max_prompt_tokens=32, say=lambda message: None))
    spy = Prefill(model)
    try:
        drawn = sampler.draw(model, Prompts(prompts, ids, mask))
    finally:
        spy.handle.remove()
    assert spy.rows() == expected_ids(tokenizer)
    prompt_part = drawn.sequences[:, : drawn.prompt_length]
    assert unpadded(prompt_part, drawn.attention_mask[:, : drawn.prompt_length]) == expected_ids(tokenizer)


def test_vllm_is_handed_the_rendered_ids(tokenizer):
    """The ids each vLLM request is built from (`TokensPrompt(prompt_token_ids=…)`): vLLM never tokenizes."""
    prompts = rendered(tokenizer)
    ids, mask = encode_prompts(tokenizer, prompts, 64, torch.device("cpu"))
    assert request_token_ids(Prompts(prompts, ids, mask)) == expected_ids(tokenizer)


def test_max_prompt_tokens_counts_the_rendered_prompt(tokenizer):
    prompts = rendered(tokenizer)
    longest = max(len(ids) for ids in expected_ids(tokenizer))
    assert longest > max(len(tokenizer(m[-1]["content"])["input_ids"]) for m in CHATS) + 2  # the template adds tokens
    check_prompt_lengths(tokenizer, prompts, longest, "data.prompts (test)")
    with pytest.raises(FastbondError, match=rf"^data.prompts \(test\): prompt 3 has {longest} tokens, over "
                                            rf"data.max_prompt_tokens={longest - 1}$"):
        check_prompt_lengths(tokenizer, prompts, longest - 1, "data.prompts (test)")
    with pytest.raises(FastbondError, match=f"prompt 2 has {longest} tokens"):
        encode_prompts(tokenizer, prompts, longest - 1, torch.device("cpu"))


# --------------------------------------------------------------------------- one-line errors


def test_messages_without_a_template_name_the_key(reference, tokenizer):
    plain_tokenizer = reference[1]
    prompts = ["the plot was", CHATS[0]]
    cases = [
        (plain_tokenizer, "auto", prompts, "data.prompts (p.jsonl): prompt 2 is a list of chat messages, but the "
                                           "policy's tokenizer has no chat template (data.chat_template=auto)"),
        (tokenizer, False, prompts, "data.prompts (p.jsonl): prompt 2 is a list of chat messages, but "
                                    "data.chat_template=false"),
        (plain_tokenizer, True, ["the plot was"], "data.chat_template=true, but the policy's tokenizer has no chat "
                                                  "template (to render data.prompts (p.jsonl))"),
    ]
    for used, setting, given, message in cases:
        with pytest.raises(FastbondError) as error:
            render_prompts(given, used, setting, "data.prompts (p.jsonl)")
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_template_that_refuses_the_messages_is_one_line(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}" + TEMPLATE)
    with pytest.raises(FastbondError) as error:
        render_prompts(CHATS, strict, "auto", "data.eval_prompts (e.jsonl)")
    assert str(error.value).startswith("data.eval_prompts (e.jsonl): the policy's chat template refused prompt 2 "
                                       "(TemplateError: System role not supported)")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- the reward model's own template


def test_a_reward_model_reads_the_messages_in_its_own_template(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from fastbond.embedded import build_tokenizer
    from fastbond.rewards import load_reward

    policy_tokenizer = build_tokenizer()
    policy_tokenizer.chat_template = TEMPLATE
    reward_tokenizer = build_tokenizer()
    reward_tokenizer.chat_template = "<bos>{% for m in messages %} {{ m['role'] }} : {{ m['content'] }}{% endfor %}"
    config = LlamaConfig(vocab_size=len(reward_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=reward_tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    reward_tokenizer.save_pretrained(tmp_path)

    prompt = render_prompts([CHATS[1]], policy_tokenizer, "auto", "x")[0]
    scores = load_reward("model", str(tmp_path))([prompt], ["good ."])
    # the reward model sees the conversation, not the policy's rendering of it
    text = "<bos> system : the music was quiet user : the lost empire : the cast felt assistant : good ."
    assert reward_tokenizer.apply_chat_template(CHATS[1] + [{"role": "assistant", "content": "good ."}],
                                                tokenize=False) == text
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    ids = reward_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(scores, model(input_ids=ids).logits[:, 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- a training run


def write_chat_prompts(path, count: int) -> list:
    """`count` prompts of the embedded world, every other one as chat messages (some with a system turn)."""
    from fastbond.data import resolve_prompts

    lines, prompts = [], resolve_prompts("embedded", "train")[:count]
    for i, text in enumerate(prompts):
        if i % 2:
            lines.append({"prompt": text})
        else:
            system = [{"role": "system", "content": "the music was quiet"}] if i % 4 == 0 else []
            lines.append({"messages": system + [{"role": "user", "content": text}]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_prompts(path)


def chat_run_config(run_dir, model, prompts, *overrides):
    return load_config(embedded_preset(), [
        "steps=2", "rollout.batch_size=4", f"rollout.max_new_tokens={NEW}", "logging.progress=false",
        "cpu_threads=1", f"model.policy={model}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
        "evaluation.max_prompts=4", "evaluation.policy_samples=2", "evaluation.reference_samples=2",
        f"run_dir={run_dir}", *overrides])


def test_a_run_on_chat_prompts_trains_on_the_rendered_ids(tmp_path, chat_model, tokenizer, monkeypatch):
    raw = write_chat_prompts(tmp_path / "chat.jsonl", 12)
    expected = [template_ids(tokenizer, p if isinstance(p, list) else [{"role": "user", "content": p}]) for p in raw]
    seen = []  # every sequence the log-prob pass runs on: the policy's, the anchor's, π_ref's, the evaluation's
    real = fastbond.logprobs.final_hidden_states

    def spy(model, sequences, attention_mask):
        seen.extend(unpadded(sequences, attention_mask))
        return real(model, sequences, attention_mask)

    monkeypatch.setattr(fastbond.logprobs, "final_hidden_states", spy)
    run_dir = train(chat_run_config(tmp_path / "run", chat_model, tmp_path / "chat.jsonl"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] is not None and r.get("skipped_step") is None for r in records)
    assert json.loads((run_dir / "eval.json").read_text())["prompts"] == 4

    def starts_with_a_rendered_prompt(row: list[int]) -> bool:
        return any(row[: len(ids)] == ids for ids in expected)

    assert seen and all(starts_with_a_rendered_prompt(row) for row in seen)
    trained = len(seen)
    evaluate_run(str(run_dir), ["evaluation.max_prompts=2", "evaluation.policy_samples=2",
                                "evaluation.reference_samples=2"])
    assert len(seen) > trained and all(starts_with_a_rendered_prompt(row) for row in seen[trained:])


def test_a_resume_that_renders_the_prompts_otherwise_is_refused(tmp_path, chat_model):
    prompts = tmp_path / "plain.txt"
    prompts.write_text("the plot was\nthe cast was\nthe lost empire : the dialogue felt\nthe ending was\n")
    train(chat_run_config(tmp_path / "run", chat_model, prompts, "steps=1", "evaluation.at_end=false"))
    with pytest.raises(FastbondError, match="holds other prompts than when it was saved .*compared as rendered by "
                                            "data.chat_template"):
        train(chat_run_config(tmp_path / "run", chat_model, prompts, "steps=2", "evaluation.at_end=false",
                              "checkpoint.resume=true", "data.chat_template=false"))


def test_the_frontier_judges_the_rendered_prompts(tmp_path, chat_model, tokenizer):
    from fastbond.frontier.points import load_judge

    raw = write_chat_prompts(tmp_path / "chat.jsonl", 6)
    judge = load_judge(chat_run_config(tmp_path / "run", chat_model, tmp_path / "chat.jsonl"))
    assert judge.prompts == render_prompts(raw[:4], tokenizer, "auto", "x")
    assert all(isinstance(prompt, RenderedPrompt) for prompt in judge.prompts)


def test_a_datasets_chat_prompts_render_when_read(tmp_path, tokenizer):
    """A dataset column of messages stays lazy: each row rendered through the template when read."""
    pytest.importorskip("datasets")
    import datasets

    from fastbond.chat import RenderedView
    from fastbond.data import resolve_prompts

    path = tmp_path / "chats.parquet"
    datasets.Dataset.from_dict({"messages": CHATS}).to_parquet(str(path))
    raw = resolve_prompts(str(path), "train", "messages")
    view = render_prompts(raw, tokenizer, "auto", "data.prompts (chats.parquet)")
    assert isinstance(view, RenderedView) and len(view) == len(CHATS)
    for row, messages in enumerate(CHATS):
        assert str(view[row]) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert [list(p.messages) for p in view[1:3]] == CHATS[1:3]
    assert prompt_token_ids(tokenizer, view[0:3]) == [template_ids(tokenizer, m) for m in CHATS]
    with pytest.raises(FastbondError, match="data.chat_template=false"):
        render_prompts(raw, tokenizer, False, "data.prompts (chats.parquet)")


def test_the_fingerprint_covers_the_template_the_prompts_are_rendered_with(tokenizer):
    from fastbond.chat import template_in_use

    prompts = CHATS + [PLAIN]
    plain = prompts_fingerprint(prompts, template_in_use(tokenizer, False))
    assert plain == prompts_fingerprint(prompts)  # not rendered: the digest checkpoints always recorded
    templated = prompts_fingerprint(prompts, template_in_use(tokenizer, "auto"))
    assert templated["sha256"] == plain["sha256"] and templated != plain
    other = prompts_fingerprint(prompts, TEMPLATE.replace("i thought", "i felt"))
    assert other != templated
