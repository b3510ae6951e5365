"""Tiny causal LMs of every architecture family fastbond is tested on, built from configs (no download).

Each has the embedded tokenizer's vocabulary, random fp32 weights and what makes
its family differ: Gemma's scaled embeddings and (Gemma-2) attention and final
logit soft-caps with sliding-window layers, Gemma-3's q/k norms and local/global
layers, Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's sliding window, Phi-3's
fused projections, GPT-2's learned absolute positions. Windows are shorter than
a prompt plus its response, so the sliding layers' caches wrap.
"""

from __future__ import annotations

import torch
import transformers

# weights this wide make logits spread over several nats, so the model, not the noise, picks most tokens
INIT = 0.35
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT)
WINDOW = 6


def _configs(vocab: int, ids: dict) -> dict:
    head = dict(head_dim=8)
    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(SMALL, **ids)),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(SMALL, **head, **ids)),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   dict(SMALL, **head, **ids, sliding_window=WINDOW, final_logit_softcapping=5.0,
                        attn_logit_softcapping=10.0)),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                   dict(SMALL, **head, **ids, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"])),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(SMALL, **ids)),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(SMALL, **head, **ids)),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                    dict(SMALL, **ids, sliding_window=WINDOW)),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(SMALL, **ids)),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
                 dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT, **ids)),
    }


ARCHITECTURES = tuple(_configs(0, {}))


def tiny_model(name: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config_class, model_class, settings = _configs(len(tokenizer), ids)[name]
    torch.manual_seed(seed)
    config = config_class(**settings)
    return model_class(config).eval()
