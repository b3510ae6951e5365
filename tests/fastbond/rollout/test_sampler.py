"""The Sampler seam (`fastbond.rollout.sampler`, `rollout.backend`): what the loop and the evaluation call.

GenerateSampler draws what `sample` draws (keyed noise included, one row key per draw of a step),
enters a role through `as_module`, and the run picks its sampler by rollout.backend alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastbond.algorithms.base import Context
from fastbond.config import load_config
from fastbond.rollout import KeyedNoise, Prompts, encode_prompts, sample
from fastbond.rollout.backends import SAMPLERS, make_sampler
from fastbond.rollout.sampler import GenerateSampler, Sampler

PROMPTS = ["review of the dark river :", "i thought the lost machine was", "the cast was"]


def prompts(tokenizer) -> Prompts:
    ids, mask = encode_prompts(tokenizer, PROMPTS, 32, torch.device("cpu"))
    return Prompts(list(PROMPTS), ids, mask)


def test_generate_sampler_with_keyed_noise_draws_what_sample_draws_with_the_row_keys(reference):
    model, tokenizer = reference
    drawn_prompts = prompts(tokenizer)
    sampler = GenerateSampler(tokenizer, 8, noise=KeyedNoise(7))
    sampler.start_step(3)
    first, second = sampler.draw(model, drawn_prompts), sampler.draw(model, drawn_prompts)
    keys = KeyedNoise(7)
    keys.start_step(3)
    for drawn in (first, second):  # each draw of a step has keys of its own
        expected = sample(model, tokenizer, drawn_prompts.ids, drawn_prompts.mask, 8,
                          row_keys=keys.row_keys(drawn_prompts.index, drawn_prompts.sample))
        assert torch.equal(drawn.sequences, expected.sequences)
    assert not torch.equal(first.sequences, second.sequences)


def test_generate_sampler_with_torch_noise_follows_the_global_generator(reference):
    model, tokenizer = reference
    drawn_prompts = prompts(tokenizer)
    torch.manual_seed(5)
    drawn = GenerateSampler(tokenizer, 8).draw(model, drawn_prompts)
    torch.manual_seed(5)
    expected = sample(model, tokenizer, drawn_prompts.ids, drawn_prompts.mask, 8)
    assert torch.equal(drawn.sequences, expected.sequences)


def test_a_role_is_entered_around_the_draw(reference):
    """A role that is a view of a shared module (LoRA's π_ref, anchor) is switched on for the draw only."""
    model, tokenizer = reference
    entered = []

    class Role:
        def active(self):
            from contextlib import contextmanager

            @contextmanager
            def switched():
                entered.append("in")
                yield model
                entered.append("out")

            return switched()

    GenerateSampler(tokenizer, 4).draw(Role(), prompts(tokenizer))
    assert entered == ["in", "out"]


def test_the_generation_context_wraps_every_draw(reference):
    model, tokenizer = reference
    seen = []

    def generation(module):
        from contextlib import nullcontext

        seen.append(module)
        return nullcontext(False)

    GenerateSampler(tokenizer, 4, generation=generation).draw(model, prompts(tokenizer))
    assert seen == [model]


def test_the_context_draws_through_its_sampler_and_hands_it_the_trainers_log_probs(reference):
    model, tokenizer = reference
    calls = []

    class Recording(Sampler):
        def draw(self, role, drawn_prompts, trainer_logps=None):
            calls.append((role, trainer_logps))
            return GenerateSampler(tokenizer, 4).draw(role, drawn_prompts)

    ctx = Context(model, model, tokenizer, lambda p, t: torch.zeros(len(t)), sampler=Recording())
    ctx.draw(model, prompts(tokenizer))
    assert calls[0][0] is model and calls[0][1] == ctx.frozen_logps
    assert isinstance(Context(model, model, tokenizer, None).sampler, GenerateSampler)


def test_a_sampler_without_checks_passes_them_and_reports_nothing():
    class Plain(Sampler):
        def draw(self, role, drawn_prompts, trainer_logps=None):
            raise AssertionError

    plain = Plain()
    plain.start_step(1)
    plain.check(1, lambda flag: flag)
    plain.after_update()
    assert plain.metrics() == {}
    plain.close()


@pytest.mark.parametrize("noise, keyed", [("torch", False), ("keyed", True)])
def test_make_sampler_builds_the_backend_of_the_config(reference, noise, keyed):
    model, tokenizer = reference
    config = load_config(None, [f"rollout.noise={noise}", "rollout.max_new_tokens=5"])
    sampler = make_sampler(config, tokenizer=tokenizer, policy=model, generation=None, gathered=None,
                           device=torch.device("cpu"))
    assert isinstance(sampler, GenerateSampler) and sampler.max_new_tokens == 5
    assert (sampler.noise is not None) == keyed
    assert set(SAMPLERS) == {"generate", "vllm", "static"}


def test_an_unknown_backend_is_one_line(reference):
    model, tokenizer = reference
    config = copy.deepcopy(load_config(None, []))
    config.rollout.backend = "sglang"
    with pytest.raises(Exception, match=r"config key 'rollout.backend': unknown backend 'sglang'"):
        make_sampler(config, tokenizer=tokenizer, policy=model, generation=None, gathered=None,
                     device=torch.device("cpu"))


def test_auto_picks_the_static_sampler_on_cuda_and_generate_elsewhere(monkeypatch):
    from fastbond.config import schema
    from fastbond.rollout.backends import resolved_backend

    rollout = load_config(None, []).rollout
    assert rollout.backend == "auto"
    assert resolved_backend(rollout, torch.device("cpu")) == "generate"
    assert resolved_backend(rollout, "cuda:0") == "static"
    monkeypatch.setattr(schema, "_transformers_version", lambda: (5, 16))  # too old for its static cache
    assert resolved_backend(rollout, "cuda") == "generate"
    for named in ("generate", "static", "vllm"):  # a named backend is taken as named
        assert resolved_backend(load_config(None, [f"rollout.backend={named}"], check_paths=False).rollout,
                                "cuda") == named
