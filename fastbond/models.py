"""Loading the policy, the reference and their tokenizer (transformers), and the
two facts the fused log-prob path needs from a causal LM: its final hidden
states and its LM head (with the model's soft-cap).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fastbond.errors import FastbondError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FastbondError(f"device '{name}' asked for, but CUDA is not available")
    return torch.device(name)


def attention_implementation(requested: str, device: torch.device) -> str:
    """flash-attn on CUDA when installed, SDPA otherwise (or what the user asked for)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_model_directory(path: str | Path) -> None:
    """A local path must be a transformers checkpoint directory (one with a config.json)."""
    local = Path(path)
    if local.is_file():
        raise FastbondError(f"{path} is a file; expected a transformers model directory (with config.json)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise FastbondError(f"{path} is not a transformers model directory (no config.json)")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The policy's tokenizer, left-padded for batched generation, with a pad token."""
    from transformers import AutoTokenizer

    check_model_directory(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FastbondError(f"cannot load a tokenizer from {path}: {str(error).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise FastbondError(f"tokenizer at {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` with one-line errors for a bad path."""
    from transformers import AutoModelForCausalLM

    check_model_directory(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise FastbondError(f"cannot load a causal LM from {path}: {str(error).splitlines()[0]}") from None
    return model.to(device)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward instead of storing them.

    transformers ≥ 5.2x renamed `gradient_checkpointing_enable` (still there,
    deprecated); older 5.x only has the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma 2/3 cap their logits (cap · tanh(z / cap)); the fused path must do the same."""
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    return float(cap) if cap else None


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise FastbondError(f"{type(model).__name__} has no output embedding (LM head) to compute log-probs with")
    return head


def final_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, L, H] hidden states after the final norm, i.e. what the LM head reads.

    Runs the decoder without the LM head so no [B, L, V] logits exist. With
    left padding the position ids must follow the attention mask (as
    `generate` does), or every prompt shorter than the batch's longest would
    see shifted positions and its log-probs would differ from the sampler's.
    """
    decoder = getattr(model, model.base_model_prefix)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return output.last_hidden_state
