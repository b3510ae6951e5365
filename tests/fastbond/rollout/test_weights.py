"""A role's weights as a stream (`fastbond.rollout.weights`): what a sampler holding its own copy loads."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastbond.rollout.weights import ModuleWeights, streamed_weights


def tiny(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied))


def test_the_stream_is_the_checkpoint_tied_tensors_once_persistent_buffers_only():
    for tied in (True, False):
        model = tiny(tied)
        streamed = dict(streamed_weights(model))
        assert set(streamed) == {name for name, _ in model.named_parameters()}  # rotary buffers are not persistent
        assert ("lm_head.weight" in streamed) == (not tied)
        for name, param in model.named_parameters():
            assert streamed[name].data_ptr() == param.data_ptr()  # the model's own storage, no copy


def test_a_persistent_buffer_is_streamed_after_the_parameters():
    model = tiny(True)
    model.register_buffer("scale", torch.ones(3))  # persistent by default
    names = [name for name, _ in streamed_weights(model)]
    assert names[-1] == "scale" and names.count("scale") == 1


def test_module_weights_stream_and_shape_each_role():
    model = tiny(False)
    weights = ModuleWeights()
    assert dict(weights.shapes(model)) == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert [name for name, _ in weights.stream(model)] == [name for name, _ in model.named_parameters()]


def test_a_partitioned_model_needs_its_engines_gathering():
    model = tiny(False)
    first = next(model.parameters())
    first.ds_id = 0  # what DeepSpeed marks a ZeRO-3 parameter with
    try:
        try:
            list(streamed_weights(model))
        except ValueError as error:
            assert "needs its engine's `gathered`" in str(error)
        else:
            raise AssertionError("a ZeRO-3 model streamed without gathering")
    finally:
        del first.ds_id
