"""The static sampler (`rollout.backend: static`) draws token for token what `generate` draws.

Under the keyed noise (and, one process on CPU, under the torch generator too),
for every architecture family, with left-padded prompts of several lengths,
rows that end on an EOS mid-batch and rows that reach max_new_tokens; for
each role of a run (policy, anchor, π_ref), from the role's own module or from
a sampling copy the role is loaded into, LoRA roles included; eagerly, with
finished rows dropped or not, in lockstep, and with the decode step compiled.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from fastbond.config import load_config
from fastbond.embedded import build_tokenizer
from fastbond.presets import embedded_preset
from fastbond.rollout import KeyedNoise, Prompts, encode_prompts, sample
from fastbond.rollout.backends import make_sampler
from fastbond.rollout.decode import HeldCaches
from fastbond.rollout.sampler import GenerateSampler
from fastbond.rollout.static_sampler import SamplingCopy, StaticSampler, needs_copy, wider_than
from fastbond.rollout.weights import ModuleWeights
from tests.fastbond.rollout.architectures import ARCHITECTURES, tiny_model

PROMPTS = ["review of the dark river :", "i thought the lost machine was", "the cast was", "good", "the",
           "the ending was really", "a film about"]
NEW = 12


def _silent(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _prompts(tokenizer, texts=PROMPTS) -> Prompts:
    ids, mask = encode_prompts(tokenizer, texts, 32, torch.device("cpu"))
    return Prompts(list(texts), ids, mask)


def _ends_early(model, tokenizer) -> None:
    """Several EOS ids, so that some rows end mid-batch and others run to max_new_tokens."""
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(5, 9)]


def _static(tokenizer, noise=None, **settings) -> StaticSampler:
    return StaticSampler(tokenizer, NEW, noise=noise, max_prompt_tokens=16, say=_silent, **settings)


def _expected(model, tokenizer, prompts: Prompts, seed: int, step: int = 1):
    keys = KeyedNoise(seed)
    keys.start_step(step)
    return sample(model, tokenizer, prompts.ids, prompts.mask, NEW, row_keys=keys.row_keys(prompts.index,
                                                                                           prompts.sample))


def _assert_same(drawn, expected) -> None:
    assert torch.equal(drawn.sequences, expected.sequences)
    assert torch.equal(drawn.attention_mask, expected.attention_mask)
    assert torch.equal(drawn.response_mask, expected.response_mask)
    assert drawn.prompt_length == expected.prompt_length and drawn.texts == expected.texts


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_keyed_draws_equal_generate_token_for_token(architecture, tokenizer):
    model = tiny_model(architecture, tokenizer)
    _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer)
    assert len(set(prompts.mask.sum(-1).tolist())) > 3  # left padding of several lengths
    expected = _expected(model, tokenizer, prompts, seed=3)
    lengths = expected.lengths.tolist()
    assert min(lengths) < NEW and max(lengths) == NEW  # EOS mid-batch, and max_new_tokens reached
    sampler = _static(tokenizer, KeyedNoise(3))
    sampler.start_step(1)
    _assert_same(sampler.draw(model, prompts), expected)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_torch_noise_draws_equal_generate_from_the_same_generator_state(architecture, tokenizer):
    """One process on CPU: the same multinomial draws in the same order as `generate`'s."""
    model = tiny_model(architecture, tokenizer)
    _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer)
    torch.manual_seed(11)
    expected = sample(model, tokenizer, prompts.ids, prompts.mask, NEW)
    torch.manual_seed(11)
    _assert_same(_static(tokenizer).draw(model, prompts), expected)
    assert torch.rand(1).item() == pytest.approx(_after_generate(model, tokenizer, prompts, 11))


def _after_generate(model, tokenizer, prompts, seed) -> float:
    """The generator's next number after `generate`'s draw: both consumed it alike."""
    torch.manual_seed(seed)
    sample(model, tokenizer, prompts.ids, prompts.mask, NEW)
    return torch.rand(1).item()


def test_dropping_finished_rows_changes_no_token(tokenizer, monkeypatch):
    model = tiny_model("llama", tokenizer)
    _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer, PROMPTS * 3)
    drops = []
    original = HeldCaches.keep_rows
    monkeypatch.setattr(HeldCaches, "keep_rows", lambda self, *args: drops.append(args) or original(self, *args))
    draws = {}
    for compact in (True, False):
        sampler = _static(tokenizer, KeyedNoise(5))
        sampler.decoder.compact = compact
        sampler.start_step(2)
        draws[compact] = sampler.draw(model, prompts)
    assert len(drops) >= 2  # rows left the batch more than once
    _assert_same(draws[True], draws[False])
    _assert_same(draws[True], _expected(model, tokenizer, prompts, seed=5, step=2))


def test_every_rank_stepping_to_the_end_draws_the_same_tokens(tokenizer):
    """Under ZeRO-3 each forward is a collective: every rank takes all max_new_tokens steps."""
    model = tiny_model("gemma2", tokenizer)
    _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer)
    sampler = _static(tokenizer, KeyedNoise(3), generation=_lockstep)
    sampler.start_step(1)
    _assert_same(sampler.draw(model, prompts), _expected(model, tokenizer, prompts, seed=3))


def _lockstep(module):
    from contextlib import nullcontext

    return nullcontext(True)


def test_draws_reuse_one_cache_per_batch_size(tokenizer):
    model = tiny_model("mistral", tokenizer)
    prompts = _prompts(tokenizer)
    sampler = _static(tokenizer, KeyedNoise(1))
    sampler.start_step(1)
    first = sampler.draw(model, prompts)
    second = sampler.draw(model, prompts)  # the next draw of the step: other keys, the same cache
    (held,) = sampler.decoder.caches.values()
    assert len(held.caches) == 1
    keys = KeyedNoise(1)
    keys.start_step(1)
    for drawn in (first, second):
        expected = sample(model, tokenizer, prompts.ids, prompts.mask, NEW,
                          row_keys=keys.row_keys(prompts.index, prompts.sample))
        _assert_same(drawn, expected)


def test_roles_loaded_into_a_sampling_copy_draw_what_each_role_draws(tokenizer):
    """Policy, anchor and π_ref through one copy: refilled when the role changes or the weights moved."""
    roles = {name: tiny_model("qwen2", tokenizer, seed=seed) for seed, name in enumerate(("policy", "anchor", "ref"))}
    for model in roles.values():
        _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer)
    copy = SamplingCopy(roles["policy"], torch.float32, torch.device("cpu"), ModuleWeights())
    sampler = _static(tokenizer, KeyedNoise(9), copy=copy)
    sampler.start_step(4)
    keys = KeyedNoise(9)
    keys.start_step(4)
    for name in ("policy", "anchor", "anchor", "ref"):
        expected = sample(roles[name], tokenizer, prompts.ids, prompts.mask, NEW,
                          row_keys=keys.row_keys(prompts.index, prompts.sample))
        _assert_same(sampler.draw(roles[name], prompts), expected)
    assert copy.fills == 3  # the anchor's second draw found its weights in place
    for moved in (False, True):
        if moved:
            with torch.no_grad():
                roles["policy"].lm_head.weight.mul_(-1.0)  # an update moves the policy
            sampler.after_update()
        expected = sample(roles["policy"], tokenizer, prompts.ids, prompts.mask, NEW,
                          row_keys=keys.row_keys(prompts.index, prompts.sample))
        _assert_same(sampler.draw(roles["policy"], prompts), expected)
    assert copy.fills == 5  # the policy again, then the moved policy
    assert sampler.metrics()["rollout/weight_copies"] == 5.0 and sampler.metrics()["rollout/weight_copies"] == 0.0


def test_a_copy_missing_a_weight_is_refused(tokenizer):
    policy = tiny_model("llama", tokenizer)

    class Partial:
        def stream(self, role):
            return [(name, p) for name, p in role.named_parameters() if "lm_head" not in name]

    copy = SamplingCopy(policy, torch.float32, torch.device("cpu"), Partial())
    with pytest.raises(ValueError, match="lm_head.weight"):
        copy.holding(policy)


def test_a_failed_capture_falls_back_to_the_eager_loop_and_says_so_once(tokenizer, monkeypatch):
    model = tiny_model("phi3", tokenizer)
    prompts = _prompts(tokenizer)

    def broken(function, **_):
        def raises(*args, **kwargs):
            raise RuntimeError("cannot capture this\nsecond line")

        return raises

    monkeypatch.setattr(torch, "compile", broken)
    said = []
    sampler = StaticSampler(tokenizer, NEW, noise=KeyedNoise(2), max_prompt_tokens=16, capture=True, say=said.append)
    sampler.start_step(1)
    first = sampler.draw(model, prompts)
    sampler.draw(model, prompts)
    assert len(said) == 1 and "cannot capture this" in said[0] and "second line" not in said[0]
    _assert_same(first, _expected(model, tokenizer, prompts, seed=2))


@pytest.mark.slow
def test_the_compiled_decode_step_draws_what_generate_draws(tokenizer):
    """`capture=True` on CPU: the step through torch.compile (no CUDA graphs here), cache sized by max_prompt_tokens."""
    model = tiny_model("llama", tokenizer)
    _ends_early(model, tokenizer)
    prompts = _prompts(tokenizer)
    said = []
    sampler = StaticSampler(tokenizer, NEW, noise=KeyedNoise(3), max_prompt_tokens=16, capture=True, say=said.append)
    sampler.start_step(1)
    _assert_same(sampler.draw(model, prompts), _expected(model, tokenizer, prompts, seed=3))
    assert sampler.decoder.capture and not said  # it stayed compiled


def test_lora_roles_draw_base_plus_their_own_adapter(tmp_path, embedded_reference):
    pytest.importorskip("peft")
    from fastbond.lora import adapter_parameters
    from fastbond.train import setup_run

    config = load_config(embedded_preset(), ["steps=1", "rollout.batch_size=4", "rollout.max_new_tokens=12",
                                             "evaluation.at_end=false", "logging.progress=false",
                                             "model.lora.r=4", "rollout.backend=static", "rollout.noise=keyed",
                                             f"run_dir={tmp_path / 'run'}"])
    run = setup_run(config)
    try:
        wrapped = run.engine.form.wrapped
        torch.manual_seed(0)
        with torch.no_grad():  # B starts at zero: give each adapter weights of its own
            for adapter, scale in (("policy", 0.5), ("anchor", -0.5)):
                for _, p in adapter_parameters(wrapped, adapter):
                    p.copy_(torch.randn_like(p) * scale)
        sampler = run.ctx.sampler
        assert isinstance(sampler, StaticSampler) and sampler.copy is None  # fp32 everywhere: the roles' own
        tokenizer = run.models.tokenizer
        prompts = _prompts(tokenizer)
        roles = {"policy": run.ctx.policy, "anchor": run.ctx.anchor.model, "reference": run.ctx.reference}
        copy = SamplingCopy(wrapped, torch.float32, torch.device("cpu"), run.models.role_weights)
        through_copy = _static(tokenizer, KeyedNoise(4), copy=copy)
        drawn = {}
        for name, role in roles.items():
            reference = GenerateSampler(tokenizer, NEW, noise=KeyedNoise(4))
            for each in (reference, sampler, through_copy):
                each.noise = KeyedNoise(4)
                each.start_step(1)
            expected = reference.draw(role, prompts)
            _assert_same(sampler.draw(role, prompts), expected)
            _assert_same(through_copy.draw(role, prompts), expected)
            drawn[name] = expected.sequences
        assert not torch.equal(drawn["policy"], drawn["anchor"]) and not torch.equal(drawn["policy"],
                                                                                       drawn["reference"])
    finally:
        if run.lock is not None:
            run.lock.release()


def test_the_run_picks_the_static_sampler_and_says_how_it_decodes(capsys, reference):
    model, tokenizer = reference
    config = load_config(embedded_preset(), ["rollout.backend=static"])
    sampler = make_sampler(config, tokenizer=tokenizer, policy=model, generation=None, gathered=None,
                           device=torch.device("cpu"), weights=None)
    assert isinstance(sampler, StaticSampler) and sampler.copy is None and not sampler.decoder.capture
    assert "rollout.backend=static: eager decoding on cpu (CUDA graphs need a GPU), from each role's own weights" \
        in capsys.readouterr().out


def test_a_policy_wider_than_the_compute_dtype_is_sampled_from_a_copy_on_cuda(reference):
    """One process keeps fp32 master weights; on CUDA (autocast) the sampler decodes from a bf16 copy of them."""
    model, _ = reference
    assert wider_than(model, torch.bfloat16) and not wider_than(model, torch.float32)
    assert not wider_than(deepcopy(model).to(torch.bfloat16), torch.bfloat16)  # the session's model stays fp32
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert needs_copy(cuda, capture=False, wide=True) and not needs_copy(cuda, capture=False, wide=False)
    assert needs_copy(cuda, capture=True, wide=False) and needs_copy(cpu, capture=True, wide=False)
    assert not needs_copy(cpu, capture=False, wide=True)  # the CPU trainer itself computes in fp32


def test_a_bf16_sampling_copy_decodes_the_policy(reference):
    model, tokenizer = reference
    config = load_config(embedded_preset(), ["rollout.backend=static", "model.dtype=bfloat16",
                                             "rollout.static.capture=true"])
    sampler = make_sampler(config, tokenizer=tokenizer, policy=model, generation=None, gathered=None,
                           device=torch.device("cpu"), weights=None)
    assert sampler.copy is not None and next(sampler.copy.model.parameters()).dtype == torch.bfloat16
    sampler.decoder.capture = False  # the copy, eagerly: compiling is the slow test's
    prompts = _prompts(tokenizer)
    sampler.start_step(1)
    drawn = sampler.draw(model, prompts)
    assert drawn.sequences.shape[0] == len(PROMPTS) and sampler.copy.held is model
    copied = dict(sampler.copy.model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(copied[name], param.detach().to(torch.bfloat16))


def test_static_sampler_keys_are_checked():
    from fastbond.errors import FastbondError

    with pytest.raises(FastbondError, match="rollout.static.capture"):
        load_config(embedded_preset(), ["rollout.static.capture=sometimes"]).check(environment=False)
    with pytest.raises(FastbondError, match="rollout.static.eos_check_every"):
        load_config(embedded_preset(), ["rollout.static.eos_check_every=-1"]).check(environment=False)


def test_a_transformers_too_old_for_the_static_cache_is_one_line(monkeypatch):
    from fastbond.config import schema
    from fastbond.errors import FastbondError

    monkeypatch.setattr(schema, "_transformers_version", lambda: (4, 57))
    with pytest.raises(FastbondError, match=r"static needs transformers >= 5.17, installed 4.57"):
        load_config(embedded_preset(), ["rollout.backend=static"]).check(environment=True)


# every family eagerly; compiling costs tens of seconds each, so two families captured (Gemma-2: soft-caps, windows)
ON_CUDA = [(name, False) for name in ARCHITECTURES] + [("llama", True), ("gemma2", True)]


@pytest.mark.cuda
@pytest.mark.parametrize(("architecture", "capture"), ON_CUDA, ids=[f"{a}-{'captured' if c else 'eager'}"
                                                                     for a, c in ON_CUDA])
def test_on_cuda_the_static_sampler_draws_what_generate_draws(architecture, capture, tokenizer):
    """fp32 on the GPU, TF32 off: eager, and compiled with CUDA graphs (`capture`), token for token."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model(architecture, tokenizer).cuda()
    _ends_early(model, tokenizer)
    ids, mask = encode_prompts(tokenizer, PROMPTS, 32, torch.device("cuda"))
    prompts = Prompts(list(PROMPTS), ids, mask)
    expected = _expected(model, tokenizer, prompts, seed=3)
    said = []
    sampler = StaticSampler(tokenizer, NEW, noise=KeyedNoise(3), max_prompt_tokens=16, capture=capture,
                            say=said.append)
    sampler.start_step(1)
    drawn = sampler.draw(model, prompts)
    differ = (drawn.sequences != expected.sequences).sum().item() if drawn.sequences.shape == \
        expected.sequences.shape else "shapes differ"
    assert differ == 0, f"{differ} tokens differ from generate's ({said})"
    _assert_same(drawn, expected)
    assert sampler.decoder.capture == capture and not said, said  # a captured step stayed captured
