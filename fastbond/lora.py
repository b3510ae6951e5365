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
By default LoRA targets the attention and MLP projections and the fused
log-prob ops read the plain head; an adapted head (`lm_head` in
target_modules) hands them its merged weight (`head_weight`). One process
or DeepSpeed ZeRO 0-3 (`fastbond.engines`): under ZeRO the adapters are
partitioned like the base, and the anchor's EMA runs on local shards.

`LoraForm` is this module's `PolicyForm` (`fastbond.models.form`): what the
engines, the samplers and the evaluation ask of LoRA, they ask of it.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from fastbond.anchor import ShardedEMAAnchor, local_tensor
from fastbond.errors import FastbondError
from fastbond.models.form import Models, Placer, PolicyForm
from fastbond.models.loading import ADAPTER_FILE, is_adapter_dir, load_policy, model_sources

POLICY, ANCHOR = "policy", "anchor"
# Attention and MLP projections of the Llama / Gemma / Mistral / Qwen families.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Input-embedding names (refused as targets even where get_input_embeddings() says otherwise).
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings")


def _import_peft():
    try:
        import peft
    except ImportError:
        raise FastbondError("model.lora needs the peft package, which is not installed: pip install -e .[lora] "
                            "(or pip install peft), or set model.lora.r=0") from None
    return peft


def _names_of(model: nn.Module, module: nn.Module | None) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if module is not None and m is module}


def target_modules(lora_config, model: nn.Module) -> list[str]:
    """The configured targets, or the default projections this model has; one-line errors for bad ones."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = list(lora_config.target_modules or [t for t in DEFAULT_TARGETS if t in names])
    if not targets:
        raise FastbondError("config key 'model.lora.target_modules': this model has none of the default "
                            f"projections ({', '.join(DEFAULT_TARGETS)}); name its linear layers")
    embeddings = _names_of(model, model.get_input_embeddings()) | {n for n in EMBEDDING_NAMES if n in names}
    heads = _names_of(model, model.get_output_embeddings())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for target in targets:
        if target in embeddings:
            raise FastbondError(f"config key 'model.lora.target_modules': '{target}' (the input embeddings) cannot "
                                "be adapted; adapt the projections, or the LM head of a model with an untied head")
        if target in heads and tied:
            raise FastbondError(f"config key 'model.lora.target_modules': '{target}' is tied to the input "
                                "embeddings (tie_word_embeddings): an adapter on it would leave them apart")
        if target not in names:
            raise FastbondError(f"config key 'model.lora.target_modules': the model has no module named "
                                f"'{target}' (it has e.g. {', '.join(sorted(n for n in names if n)[:8])})")
    return targets


def _active_adapters(head: nn.Module) -> list[str]:
    if head.disable_adapters or head.merged:
        return []
    return [adapter for adapter in head.active_adapters if adapter in head.lora_A]


def head_parts(head: nn.Module) -> list[nn.Module]:
    """The modules whose parameters `head_weight` reads: the head, or an adapted head's base layer and its
    active adapter's two factors (what ZeRO-3 must gather around a fused op; `fastbond.logprobs`)."""
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A")):
        return [head]
    factors = [m for adapter in _active_adapters(head) for m in (head.lora_A[adapter], head.lora_B[adapter])]
    return [head.base_layer, *factors]


def head_weight(head: nn.Module) -> torch.Tensor:
    """The LM head's weight as the model's forward applies it: for a head with a LoRA adapter (`lm_head` in
    model.lora.target_modules), W + scaling·B·A of its active adapter, differentiable in the adapter — what
    the fused log-prob ops read instead of the module (they never call the head's forward). The adapter's
    dropout is not applied there: the fused path sees the merged head. Any other head: its weight."""
    if not (hasattr(head, "base_layer") and hasattr(head, "lora_A")):
        return head.weight
    weight = head.base_layer.weight
    merged = weight
    for adapter in _active_adapters(head):
        merged = merged + head.get_delta_weight(adapter)
    return merged.to(weight.dtype)


def base_source(config) -> str:
    """Where the base comes from (the run's initial policy); π_ref is that base, so no other reference."""
    policy_source, reference_source = model_sources(config)
    if reference_source != policy_source:
        raise FastbondError("model.lora: π_ref is the policy's base with adapters disabled, so model.reference "
                            f"must be unset or the policy's own directory (got {config.model.reference})")
    return policy_source


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


def is_policy_adapter(name: str) -> bool:
    """Whether a parameter name (of the base model with adapters injected) is a tensor of the policy adapter."""
    return "lora_" in name and f".{POLICY}." in name


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


class AdapterAnchor(ShardedEMAAnchor):
    """The anchor adapter, following the policy adapter by an EMA: `ShardedEMAAnchor` over adapter tensors only.

    r·(d_in + d_out) per adapted layer is read and written, nothing of the
    base. In one process the adapters are fp32 (the policy's master weights),
    so the anchor adapter is its own EMA state; under DeepSpeed the adapters
    are held in the compute dtype like the base, partitioned like it (ZeRO-3),
    and the fp32 state is a separate local shard. Both adapters have the same
    shapes and are partitioned tensor by tensor, so shard r of the anchor's
    covers the same elements as shard r of the policy's: the EMA is local, no
    collective. `release`: under ZeRO-3, drops the gathered copies of the
    shared model after each update (their anchor adapter would be stale).
    """

    def __init__(self, wrapped, dtype: torch.dtype = torch.float32, release=None):
        self._setup(adapter_parameters(wrapped, POLICY), adapter_parameters(wrapped, ANCHOR),
                    AdapterRole(wrapped, ANCHOR), dtype, release)


def save_policy_adapter(wrapped, path: Path, tokenizer=None, state: dict | None = None) -> None:
    """The policy adapter in PEFT's format, with the base's config.json beside it (what a checkpoint holds).

    `state`: the adapter's whole tensors by the base model's parameter names (under DeepSpeed, consolidated
    on the writing rank: the live tensors are shards); by default the live tensors.
    """
    extra = {} if state is None else {"state_dict": {f"base_model.model.{k}": v for k, v in state.items()}}
    wrapped.save_pretrained(str(path), selected_adapters=[POLICY], safe_serialization=True, **extra)
    nested = path / POLICY  # PEFT puts a non-default adapter in a sub-directory: bring it up
    if nested.is_dir():
        for item in nested.iterdir():
            item.replace(path / item.name)
        nested.rmdir()
    wrapped.get_base_model().config.to_json_file(str(path / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


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


def merged_adapter(base: nn.Module, lora_config, path: Path) -> nn.Module:
    """`base` (in place) with the policy adapter saved in `path` merged in: a plain transformers model.
    The generators are left as they were (LoRA's initialisation, overwritten here, would draw from them)."""
    cuda = sorted({p.device.index or 0 for p in base.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        wrapped = attach_adapters(base, lora_config)
    load_policy_adapter(wrapped, path)
    wrapped.delete_adapter(ANCHOR)
    return wrapped.merge_and_unload()


def adapter_of(wrapped, model) -> str | None:
    """The adapter a role samples with: an `AdapterRole`'s own (None for π_ref), else the policy's."""
    return model.adapter if isinstance(model, AdapterRole) else POLICY


def merged_shapes(wrapped) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every weight of the base, as a plain transformers model names them."""
    return {_checkpoint_name(name): tuple(getattr(p, "ds_shape", p.shape))
            for name, p in wrapped.get_base_model().named_parameters() if "lora_" not in name}


def _checkpoint_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _whole(param: torch.Tensor) -> torch.Tensor:
    return param.detach().reshape(tuple(getattr(param, "ds_shape", param.shape)))


@torch.no_grad()
def merged_weights(wrapped, adapter: str | None, gathered=None):
    """(checkpoint name, tensor) of the base with `adapter` merged in (None: the base alone), one weight at a
    time: what an inference engine without this model's adapters loads (`rollout.backend=vllm`), and the
    merged export. W + ΔW is summed in fp32 and rounded once to W's dtype.

    `gathered(params)`: the engine's context that makes ZeRO-3 parameters whole (`Engine.gathered`); each
    adapted weight is gathered with its adapter's two factors. Every rank must consume the stream to the end,
    in step (each gather is a collective). Yielded tensors may be the model's own storage or a gathered copy
    released at the next step: copy before asking for the next one.
    """
    from peft.tuners.lora import LoraLayer

    base = wrapped.get_base_model()
    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    gather = gathered or (lambda params: nullcontext())
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        module_name, _, leaf = name.rpartition(".base_layer.")
        layer = layers.get(module_name) if adapter is not None and leaf == "weight" else None
        if layer is None:
            with gather([param]):
                yield _checkpoint_name(name), _whole(param)
            continue
        factors = [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        with gather([param, *factors]):
            merged = _whole(param).float() + layer.get_delta_weight(adapter).float()
            yield _checkpoint_name(name), merged.to(param.dtype)


class AdapterWeights:
    """Each role's weights for a sampler that holds its own copy (`rollout.backend=vllm`): the base with the
    role's adapter merged in (π_ref: the base alone), one weight at a time (`merged_weights`)."""

    def __init__(self, wrapped, gathered=None):
        self.wrapped = wrapped
        self.gathered = gathered

    def stream(self, role):
        return merged_weights(self.wrapped, adapter_of(self.wrapped, role), self.gathered)

    def shapes(self, role) -> dict[str, tuple[int, ...]]:
        return merged_shapes(self.wrapped)


def merged_state_dict(wrapped, gathered=None, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The base with the policy adapter merged in, whole, on the CPU: a plain transformers model's state dict.
    Under ZeRO-3 every rank must call it (the gathers are collectives); `keep=False` ranks get None."""
    state = {}
    for name, tensor in merged_weights(wrapped, POLICY, gathered):
        if keep:
            state[name] = tensor.to("cpu", copy=True)
    return state if keep else None


class LoraForm(PolicyForm):
    """`model.lora.r > 0`: the policy and the anchor are adapters on one frozen base; π_ref is the base.

    The base is frozen: it needs no fp32 master copy and is held in the compute dtype; PEFT keeps the
    adapters (the only trained tensors) in fp32 in one process, and DeepSpeed casts them like the base.
    Checkpoints hold the policy adapter (PEFT's format), never the base; the export merges it in.
    """

    name = "lora"

    def __init__(self):
        self.wrapped = None  # the PEFT model holding both adapters, once built

    def build(self, config, placer: Placer, needs_anchor: bool, resume: Path | None) -> Models:
        wrapped = attach_adapters(load_policy(config, base_source(config), placer.compute_dtype, placer.load_device),
                                  config.model.lora)
        if resume is not None:  # the anchor adapter comes back with the checkpoint's anchor state
            load_policy_adapter(wrapped, resume)
        policy, _ = placer.train(wrapped.get_base_model())  # the optimizer trains the policy adapter alone
        anchor = None
        if needs_anchor:
            held_dtype = adapter_parameters(wrapped, POLICY)[0][1].dtype  # fp32, or the compute dtype under ZeRO
            anchor = AdapterAnchor(wrapped, held_dtype, release=placer.release_gathered)
        self.wrapped = wrapped
        return Models(tokenizer=None, policy=policy, reference=AdapterRole(wrapped, None), reward_fn=None,
                      anchor=anchor, role_weights=AdapterWeights(wrapped, placer.gathered))

    def save_policy(self, models: Models, placer: Placer, path: Path) -> None:
        """The policy adapter alone, PEFT's format (under ZeRO consolidated from the fp32 master tensors)."""
        state = placer.trained_state(select=is_policy_adapter)
        if placer.main:
            save_policy_adapter(self.wrapped, Path(path), models.tokenizer, state=state)
        placer.barrier()

    def export(self, models: Models, placer: Placer, path: Path) -> None:
        """The base with the policy adapter merged in, a plain transformers model in the compute dtype."""
        merged = merged_state_dict(self.wrapped, placer.gathered, keep=placer.main)
        placer.write_pretrained(models.policy, Path(path), models.tokenizer, state=merged)

    def judged_policy(self, config, policy_dir: Path, device: torch.device) -> nn.Module:
        """A LoRA run is judged as a plain one: its export is the merged model, and a checkpoint's
        adapter is merged into the base here."""
        if not is_adapter_dir(policy_dir):
            return load_policy(config, policy_dir, torch.float32, device).eval()
        base = load_policy(config, base_source(config), torch.float32, device)
        return merged_adapter(base, config.model.lora, policy_dir).eval()

    def merge(self, config, policy_dir: Path, out: Path, run_dir: Path) -> Path:
        """The policy adapter in `policy_dir` merged into the run's base, in the compute dtype."""
        from fastbond import atomic
        from fastbond.models.loading import compute_dtype, load_tokenizer

        if not is_adapter_dir(policy_dir):
            raise FastbondError(f"{policy_dir} holds no policy adapter ({ADAPTER_FILE})")
        source = base_source(config)
        base = load_policy(config, source, compute_dtype(config), torch.device("cpu"))
        merged = merged_adapter(base, config.model.lora, policy_dir)
        return atomic.save_pretrained(merged, load_tokenizer(source, config.model.trust_remote_code), out)

    def held_tensors(self, models: Models) -> tuple[dict[str, list], dict[str, list]]:
        policy = {
            "base params": [local_tensor(p) for name, p in models.policy.named_parameters() if "lora_" not in name],
            "policy adapter": [local_tensor(p) for _, p in adapter_parameters(self.wrapped, POLICY)],
        }
        anchor = {} if models.anchor is None else {
            "anchor adapter": [local_tensor(p) for _, p in models.anchor.anchor_parameters]}
        return policy, anchor

    @property
    def reference_is_a_model(self) -> bool:
        return False  # π_ref is the base with adapters off

