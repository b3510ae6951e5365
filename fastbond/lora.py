"""LoRA J-BOND (`model.lora.r > 0`): one frozen base; the policy and the anchor are adapters on it.

J-BOND holds three models (policy, EMA anchor, π_ref) plus the anchor's fp32
EMA state and the policy's optimizer state. With LoRA they share one base:

    π_ref    the base with adapters disabled       (`AdapterRole(peft, None)`)
    policy   the base + adapter "policy"           (trained; the active adapter by default)
    anchor   the base + adapter "anchor"           (`AdapterAnchor`: the EMA of "policy", by `ema_`)

The adapters are PEFT's (`get_peft_model`); nothing here writes LoRA
layers. The policy the trainer sees is PEFT's base model with the adapter
layers injected, so every transformers helper (the fused LM-head path,
generate) works on it unchanged; the other two roles are `AdapterRole`s that
switch the adapter around a draw or a forward (`Context` enters them).
The LM head is not adapted (LoRA targets the attention and MLP projections),
so the fused log-prob ops see the plain head.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fastbond.errors import FastbondError
from fastbond.kernels.ema import ema_

POLICY, ANCHOR = "policy", "anchor"
ADAPTER_FILE = "adapter_model.safetensors"
# Attention and MLP projections of the Llama / Gemma / Mistral / Qwen families.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD_NAMES = ("lm_head", "embed_tokens", "wte", "embed_out")


def _import_peft():
    try:
        import peft
    except ImportError:
        raise FastbondError("model.lora needs the peft package, which is not installed: pip install -e .[lora] "
                            "(or pip install peft), or set model.lora.r=0") from None
    return peft


def target_modules(lora_config, model: nn.Module) -> list[str]:
    """The configured targets, or the default projections this model has; one-line errors for bad ones."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(lora_config.target_modules or [t for t in DEFAULT_TARGETS if t in names])
    if not targets:
        raise FastbondError("config key 'model.lora.target_modules': this model has none of the default "
                            f"projections ({', '.join(DEFAULT_TARGETS)}); name its linear layers")
    for target in targets:
        if target in HEAD_NAMES:
            raise FastbondError(f"config key 'model.lora.target_modules': '{target}' (the LM head or embeddings) "
                                "cannot be adapted yet; the fused log-prob ops read the head's weight directly")
        if target not in names:
            raise FastbondError(f"config key 'model.lora.target_modules': the model has no module named "
                                f"'{target}' (it has e.g. {', '.join(sorted(n for n in names if n)[:8])})")
    return targets


def attach_adapters(model: nn.Module, lora_config):
    """`model` wrapped by PEFT with two identical adapters, "policy" (active, trainable) and "anchor"."""
    peft = _import_peft()
    config = peft.LoraConfig(r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                             target_modules=target_modules(lora_config, model), bias="none")
    wrapped = peft.get_peft_model(model, config, adapter_name=POLICY)
    wrapped.add_adapter(ANCHOR, config)
    with torch.no_grad():  # the anchor starts at the policy (LoRA's A is random, its B zero)
        for anchor, policy in zip(adapter_parameters(wrapped, ANCHOR), adapter_parameters(wrapped, POLICY)):
            anchor[1].copy_(policy[1])
    wrapped.set_adapter(POLICY)  # also makes "policy" the trainable adapter, "anchor" frozen
    return wrapped


def adapter_parameters(wrapped, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name with the adapter's name taken out, parameter) of one adapter, in a fixed order."""
    marker = f".{adapter}."
    return [(name.replace(marker, "."), param) for name, param in wrapped.named_parameters()
            if "lora_" in name and marker in name]


class AdapterRole:
    """π_ref (adapter None: adapters disabled) or the anchor, on the policy's base.

    Not a module of its own (its parameters are the policy's): `active()`
    switches the shared model to this role, in eval mode, and back.
    """

    def __init__(self, wrapped, adapter: str | None):
        self.wrapped = wrapped
        self.adapter = adapter

    @property
    def module(self) -> nn.Module:
        return self.wrapped.get_base_model()

    @contextmanager
    def active(self):
        module = self.module
        was_training = module.training
        module.eval()  # no LoRA dropout for a frozen role
        try:
            if self.adapter is None:
                with self.wrapped.disable_adapter():
                    yield module
            else:
                self.wrapped.set_adapter(self.adapter)
                yield module
        finally:
            if self.adapter is not None:
                self.wrapped.set_adapter(POLICY)  # and the policy's trainable flags with it
            module.train(was_training)

    def parameters(self):
        return self.module.parameters()


class AdapterAnchor:
    """The anchor adapter, following the policy adapter by an EMA: `EMAAnchor`'s interface, adapters only.

    The adapters live in the policy's fp32 model, so the anchor's tensors are
    their own fp32 state (no shadow copy) and the EMA reads and writes
    adapter tensors alone: r·(d_in + d_out) per adapted layer.
    """

    def __init__(self, wrapped):
        self.model = AdapterRole(wrapped, ANCHOR)
        named = adapter_parameters(wrapped, ANCHOR)
        self.names = [name for name, _ in named]
        self.state = [param for _, param in named]
        policy = dict(adapter_parameters(wrapped, POLICY))
        self._policy = [policy[name] for name in self.names]
        if any(t.dtype != torch.float32 for t in self.state):
            raise FastbondError("LoRA anchor: adapters must be fp32 (the policy's master weights are)")

    shadow = None

    @torch.no_grad()
    def update(self, policy: nn.Module, eta: float) -> None:
        """θ_anc ← θ_anc + η (θ − θ_anc) over the adapter tensors, in place, fused."""
        ema_(self.state, [p.detach() for p in self._policy], eta)

    @torch.no_grad()
    def reset_to(self, policy: nn.Module) -> None:
        """Hard anchor update (iterative BOND): the anchor adapter ← the policy adapter."""
        self.update(policy, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().float().contiguous() for name, tensor in zip(self.names, self.state)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"anchor state lacks {missing[0]}")
        for name, tensor in zip(self.names, self.state):
            tensor.copy_(state[name])


def save_policy_adapter(wrapped, path: Path, tokenizer=None) -> None:
    """The policy adapter in PEFT's format, with the base's config.json beside it (what a checkpoint holds)."""
    wrapped.save_pretrained(str(path), selected_adapters=[POLICY], safe_serialization=True)
    nested = path / POLICY  # PEFT puts a non-default adapter in a sub-directory: bring it up
    if nested.is_dir():
        for item in nested.iterdir():
            item.replace(path / item.name)
        nested.rmdir()
    wrapped.get_base_model().config.to_json_file(str(path / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


class AdapterSaver:
    """What `save_checkpoint` calls `save_pretrained` on under LoRA: the policy adapter, not the base."""

    def __init__(self, wrapped):
        self.wrapped = wrapped

    def save_pretrained(self, path, safe_serialization: bool = True) -> None:
        save_policy_adapter(self.wrapped, Path(path))


@torch.no_grad()
def load_policy_adapter(wrapped, path: Path) -> None:
    """The policy adapter's tensors from a directory `save_policy_adapter` wrote."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / ADAPTER_FILE))
    # PEFT saves "…lora_A.weight" without the adapter name; ours carry none either
    ours = dict(adapter_parameters(wrapped, POLICY))
    by_suffix = {name.split("base_model.model.", 1)[-1]: tensor for name, tensor in saved.items()}
    for name, param in ours.items():
        key = name.split("base_model.model.", 1)[-1]
        if key not in by_suffix:
            raise FastbondError(f"the policy adapter in {path} lacks '{key}': written with other model.lora keys?")
        if tuple(by_suffix[key].shape) != tuple(param.shape):
            raise FastbondError(f"the policy adapter in {path} has '{key}' of shape {list(by_suffix[key].shape)}, "
                                f"this run's is {list(param.shape)}: written with another model.lora.r?")
        param.copy_(by_suffix[key])


def adapter_of(wrapped, model) -> str | None:
    """The adapter a role samples with: an `AdapterRole`'s own (None for π_ref), else the policy's."""
    return model.adapter if isinstance(model, AdapterRole) else POLICY


def merged_shapes(wrapped) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every weight of the base, as a plain transformers model names them."""
    return {_checkpoint_name(name): tuple(p.shape) for name, p in wrapped.get_base_model().named_parameters()
            if "lora_" not in name}


def _checkpoint_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_weights(wrapped, adapter: str | None):
    """(checkpoint name, tensor) of the base with `adapter` merged in (None: the base alone), one weight at a
    time: what an inference engine without this model's adapters loads (`rollout.engine=vllm`)."""
    from peft.tuners.lora import LoraLayer

    base = wrapped.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        module_name, _, leaf = name.rpartition(".base_layer.")
        if adapter is not None and module_name in layers and leaf == "weight":
            delta = layers[module_name].get_delta_weight(adapter)
            yield _checkpoint_name(name), param.detach() + delta.to(param.dtype)
        else:
            yield _checkpoint_name(name), param.detach()


def merged_policy(wrapped) -> nn.Module:
    """A plain transformers model: the base with the policy adapter merged in (a copy; the run goes on)."""
    import copy

    clone = copy.deepcopy(wrapped)
    clone.delete_adapter(ANCHOR)
    return clone.merge_and_unload()

