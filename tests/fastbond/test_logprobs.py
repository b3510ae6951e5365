"""The fused LM-head path (`fastbond.logprobs`): response tokens packed from hidden states, read through the
head as its forward, and their log-probs laid back out as [B, T]."""

from __future__ import annotations

import torch

from fastbond.logprobs import LMHead, response_logprobs, response_tokens, through_lm_head
from fastbond.rollout import Samples, encode_prompts


def samples_of(tokenizer, prompts, responses) -> Samples:
    ids, mask = encode_prompts(tokenizer, prompts, 32, torch.device("cpu"))
    tokens = [tokenizer.convert_tokens_to_ids(text.split()) + [tokenizer.eos_token_id] for text in responses]
    return Samples.from_responses(ids, mask, tokens, tokenizer.pad_token_id, texts=list(responses))


def test_packed_tokens_are_the_response_tokens_row_by_row_with_the_states_that_predict_them(reference):
    model, tokenizer = reference
    drawn = samples_of(tokenizer, ["the cast was", "i thought the lost machine was"], ["good .", "not very dull ."])
    tokens = response_tokens(model, drawn)
    assert tokens.rows.tolist() == [0] * 3 + [1] * 5
    assert torch.equal(tokens.targets, drawn.responses[drawn.response_mask])
    # the state that predicts token t is the model's own last hidden state at position t - 1
    positions = (drawn.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(drawn.sequences, attention_mask=drawn.attention_mask, position_ids=positions,
                    output_hidden_states=True)
    start = drawn.prompt_length
    expected = out.hidden_states[-1][:, start - 1 : -1][drawn.response_mask]
    torch.testing.assert_close(tokens.hidden.detach(), expected, rtol=1e-5, atol=1e-5)


def test_log_probs_are_zero_off_the_response_and_entropies_detached(reference):
    model, tokenizer = reference
    drawn = samples_of(tokenizer, ["the cast was", "the cast was"], ["good .", "really boring and the ending was messy ."])
    logps, entropy = response_logprobs(model, drawn, backend="chunked", return_entropy=True)
    assert logps.shape == drawn.response_mask.shape
    assert bool((logps[~drawn.response_mask] == 0).all()) and bool((logps[drawn.response_mask] < 0).all())
    assert not entropy.requires_grad and bool((entropy[drawn.response_mask] > 0).all())


def test_temperature_scales_the_logits_before_the_softmax(reference):
    model, tokenizer = reference
    drawn = samples_of(tokenizer, ["the cast was"], ["good ."])
    positions = (drawn.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(drawn.sequences, attention_mask=drawn.attention_mask, position_ids=positions).logits
        expected = torch.log_softmax(logits[:, drawn.prompt_length - 1 : -1].double() / 0.7, -1)
        expected = expected.gather(-1, drawn.responses.unsqueeze(-1)).squeeze(-1)[drawn.response_mask]
        got = response_logprobs(model, drawn, temperature=0.7, backend="chunked")[drawn.response_mask]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_function_run_through_the_head_sees_its_weight_and_softcap(reference):
    model, _ = reference
    seen = []

    def read(head: LMHead, value):
        seen.append(head)
        return value * 2

    assert through_lm_head(model, read, 3) == 6
    assert seen[0].weight is model.get_output_embeddings().weight and seen[0].softcap is None
