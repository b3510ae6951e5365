"""Pairwise judges for `reward.kind: pairwise` (docs/judges.md): (prompts, responses_a, responses_b) → one
number a pair, P(a ≻ b) by default (`reward.judge_output: probability`) or a sign (`reward.judge_output: sign`).

    fastbond train examples/embedded-judge.yaml        # J-BOND on the embedded world, judged by `sentiment`
    fastbond train examples/smollm2-judge.yaml         # J-BOND on SmolLM2-135M-Instruct, judged by `concise`

`sentiment` is the embedded world's lexicon reward seen through a Bradley–Terry model,
P(a ≻ b) = σ(s(a) − s(b)): it trains what the scalar reward trains, as J-BOND only asks which of
two responses is better. `reward_model_judge` does the same with any sequence-classification reward
model; a judge that asks a language model which response is better has the same shape. `concise` is
the smallest judge of a real model's answers: the shorter one wins, so J-BOND learns to answer briefly
(and to finish within `rollout.max_new_tokens`), which a run's `length` metric shows as it goes.
"""

from __future__ import annotations

import math

from fastbond.rewards import sentiment_score


def sentiment(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """P(a ≻ b) = σ(s(a) − s(b)) of the lexicon sentiment s: exactly 0.5 (a tie) when the scores are equal."""
    return [1.0 / (1.0 + math.exp(sentiment_score(b) - sentiment_score(a))) for a, b in zip(responses_a, responses_b)]


def concise(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
    """P(a ≻ b): 1 when a is the shorter answer (in characters, outer whitespace aside), 0 when b is, 0.5 on equal
    lengths. A toy preference, deterministic and free, that any answer can be judged by."""
    return [0.5 if len(a.strip()) == len(b.strip()) else float(len(a.strip()) < len(b.strip()))
            for a, b in zip(responses_a, responses_b)]


def reward_model_judge(path: str, batch_size: int = 16):
    """A judge from a reward-model directory: P(a ≻ b) = σ(r(a) − r(b)). Bind it in your own module,
    e.g. `judge = reward_model_judge("/models/my-reward")`, and name that: `reward.name: my_judges:judge`."""
    from fastbond.rewards import load_reward

    score = load_reward("model", path, batch_size=batch_size)

    def judge(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[float]:
        margin = score(prompts, responses_a) - score(prompts, responses_b)
        return margin.sigmoid().tolist()

    return judge
