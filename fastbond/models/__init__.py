"""The models of a run: loading them (transformers), how the policy is held, and assembling them.

    loading.py    from_pretrained with one-line errors; the policy, π_ref and reward loaders; the
                  final hidden states and LM head the fused log-prob path reads
    form.py       `PolicyForm` (how the policy is held), `Placer` (where an engine holds it), `Models`
    full.py       the full form: every weight trained
    registry.py   `FORMS` and `make_form`: full, or LoRA (`fastbond.lora.LoraForm`)
    assembly.py   `build_models` (every engine's, through its placer) and `judged_models` (evaluation)
"""

from fastbond.models.assembly import build_models, judged_models
from fastbond.models.form import Models, Placer, PolicyForm
from fastbond.models.loading import (
    TORCH_DTYPES,
    attention_implementation,
    check_model_directory,
    compute_dtype,
    enable_activation_checkpointing,
    final_hidden_states,
    final_logit_softcap,
    lm_head,
    load_causal_lm,
    load_frozen,
    load_policy,
    load_run_reward,
    load_tokenizer,
    model_sources,
    resolve_device,
    resolve_model_path,
)
from fastbond.models.registry import FORMS, make_form

__all__ = [
    "FORMS",
    "Models",
    "Placer",
    "PolicyForm",
    "TORCH_DTYPES",
    "attention_implementation",
    "build_models",
    "check_model_directory",
    "compute_dtype",
    "enable_activation_checkpointing",
    "final_hidden_states",
    "final_logit_softcap",
    "judged_models",
    "lm_head",
    "load_causal_lm",
    "load_frozen",
    "load_policy",
    "load_run_reward",
    "load_tokenizer",
    "make_form",
    "model_sources",
    "resolve_device",
    "resolve_model_path",
]
