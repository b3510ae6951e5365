"""Loading the models of a run (transformers), and the two facts the fused
log-prob path needs from a causal LM: its final hidden states and its LM head
(with the model's soft-cap).

The run-level loaders (`model_sources`, `load_policy`, `load_frozen`,
`load_run_reward`) are what every engine composes: one process places the
models on its device, DeepSpeed partitions them after loading.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from fastbond.errors import FastbondError

# config `model.dtype` → torch dtype
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a PEFT adapter directory (a LoRA checkpoint's policy/) holds instead of a model's weights.
ADAPTER_FILE = "adapter_model.safetensors"


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


def is_adapter_dir(path: str | Path) -> bool:
    """Whether `path` holds a policy adapter (a LoRA checkpoint's policy/) rather than a whole model."""
    return (Path(path) / ADAPTER_FILE).is_file()


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


def compute_dtype(config) -> torch.dtype:
    """The torch dtype of config `model.dtype`: anchor, reference and (under DeepSpeed) policy weights."""
    return TORCH_DTYPES[config.model.dtype]


def resolve_model_path(path: str) -> str:
    """A model directory as written in the config; "embedded" builds (or reuses) the embedded π_ref."""
    from fastbond.embedded import EMBEDDED

    if path != EMBEDDED:
        return path
    from fastbond.embedded import build_embedded_reference

    return str(build_embedded_reference())


def model_sources(config) -> tuple[str, str]:
    """(initial policy, π_ref) directories of a run; π_ref defaults to the initial policy."""
    policy = resolve_model_path(config.model.policy)
    reference = resolve_model_path(config.model.reference) if config.model.reference else policy
    return policy, reference


def load_policy(config, path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The trained policy, in train mode, with activation checkpointing if configured."""
    model = load_causal_lm(path, dtype, device, attention_implementation(config.model.attn_implementation, device),
                           config.model.trust_remote_code)
    if config.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def load_frozen(config, path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A model that is only evaluated (π_ref): eval mode, no gradients."""
    model = load_causal_lm(path, dtype, device, attention_implementation(config.model.attn_implementation, device),
                           config.model.trust_remote_code)
    return model.eval().requires_grad_(False)


def load_run_reward(config, tokenizer, device: torch.device, dtype: torch.dtype):
    """The run's `RewardFunction` (reward.kind / reward.name), a reward model placed on `device`; under
    reward.kind=pairwise its `PairwiseJudge` (`fastbond.judges`) instead."""
    from fastbond.judges import load_judge
    from fastbond.rewards import load_reward

    if config.reward.kind == "pairwise":
        return load_judge(config.reward.name, config.reward.judge_output)
    return load_reward(config.reward.kind, config.reward.name, device=device, dtype=dtype,
                       batch_size=config.reward.batch_size, trust_remote_code=config.model.trust_remote_code,
                       policy_tokenizer=tokenizer)


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
