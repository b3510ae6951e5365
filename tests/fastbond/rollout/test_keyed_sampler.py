"""rollout.noise=keyed: Gumbel-max sampling with counter-based noise.

A row's draw is a function of (seed, step, draw, prompt index, sample index,
position, token) alone, so splitting a batch over ranks does not change what
any row samples; and it samples from softmax(logits / T), as `generate` does.
"""

import torch

from fastbond.rollout import (
    KeyedGumbel,
    KeyedNoise,
    Prompts,
    combine_keys,
    encode_prompts,
    hash32,
    keyed_uniform,
    sample,
)


def test_uniforms_are_a_function_of_their_keys():
    keys = torch.tensor([combine_keys(0, 1, 2), combine_keys(0, 1, 3)])
    u = keyed_uniform(keys, 5, 50_000)
    assert torch.equal(u, keyed_uniform(keys, 5, 50_000))
    assert torch.equal(u[1:], keyed_uniform(keys[1:], 5, 50_000))  # a row alone: the same noise
    assert not torch.equal(u[0], u[1]) and not torch.equal(u, keyed_uniform(keys, 6, 50_000))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12 ** -0.5) < 0.01


def test_gumbel_max_draws_from_the_tempered_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    rows = 40_000
    keys = hash32(torch.arange(rows) + combine_keys(7))
    scores = KeyedGumbel(keys, 0, temperature=0.7)(torch.zeros(rows, 0, dtype=torch.long), logits.expand(rows, 4))
    frequency = torch.bincount(scores.argmax(-1), minlength=4).float() / rows
    torch.testing.assert_close(frequency, torch.softmax(logits / 0.7, 0), atol=0.01, rtol=0)


def test_a_row_samples_the_same_whatever_else_is_in_its_batch(reference):
    model, tokenizer = reference
    texts = ["review of the dark river :", "i thought the lost machine was", "the cast was", "a film that"]

    def draw(rows):
        noise = KeyedNoise(seed=3)
        noise.start_step(5)
        prompts = Prompts([texts[i] for i in rows], *encode_prompts(tokenizer, [texts[i] for i in rows], 32,
                                                                    torch.device("cpu")), index=list(rows))
        keys = noise.row_keys(prompts.index, prompts.sample)
        return sample(model, tokenizer, prompts.ids, prompts.mask, 8, row_keys=keys).texts

    whole = draw(range(4))
    assert draw(range(2)) + draw(range(2, 4)) == whole
    assert len(set(whole)) > 1


def _hash32_exact(x: int) -> int:
    """lowbias32 on Python's unbounded integers: what the tensor version must compute bit for bit."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_hash_equals_exact_integer_arithmetic_where_int64_products_overflow():
    values = [0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 0x9E3779B9, 123456789]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_hash32_exact(v) for v in values]


def test_row_keys_are_the_keys_of_seed_step_draw_prompt_and_sample():
    noise = KeyedNoise(5)
    noise.start_step(3)
    noise.row_keys([0], [0])  # the step's first draw
    index, sample_index = [0, 1, 2, 7, 2**33 + 4], [0, 1, 0, 3, 2]
    base = combine_keys(5, 3, 2)
    expected = [combine_keys(base, p, s) for p, s in zip(index, sample_index)]
    assert noise.row_keys(index, sample_index).tolist() == expected
