"""The grammar of the embedded world: movie-review documents, their exact log-probabilities, its prompts.

A template grammar ("the music in the golden river was not very good and the
cast was charming .") shipped as code. Every choice shows in the text, so the
grammar is unambiguous and its entropy is known exactly (`corpus_entropy`):
the reference model's loss can be compared with it. Prompts end where a
review's verdict starts ("i thought the silent river was"); the response is
the continuation up to EOS.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastbond.rewards import NEGATIVE_WORDS, POSITIVE_WORDS

# ---------------------------------------------------------------------------
# the grammar

ASPECTS = ("plot", "acting", "music", "ending", "dialogue", "pacing", "cast", "script")
TITLE_ADJECTIVES = ("silent", "last", "broken", "golden", "hidden", "lost", "final", "dark", "little", "wild")
# Hidden quality q of a film, by its noun: the odds that a verdict is positive
# rather than negative. It makes prompts differ in how hard a high reward is.
NOUN_QUALITY = {
    "river": 0.8, "garden": 0.8, "voyage": 0.8,
    "detective": 0.5, "island": 0.5, "letter": 0.5, "mirror": 0.5,
    "machine": 0.2, "empire": 0.2, "storm": 0.2,
}  # fmt: skip
POSITIVE = tuple(sorted(POSITIVE_WORDS))  # sorted: sets have no stable order across runs
NEGATIVE = tuple(sorted(NEGATIVE_WORDS))
NEUTRAL = ("long", "short", "loud", "quiet", "simple", "ordinary", "familiar", "unusual")
INTENSIFIERS = ("very", "really", "quite", "rather", "so")
CONJUNCTIONS = ("and", "but")

# (prompt template, whether the response opens with a full clause rather than a bare verdict)
TEMPLATES = (
    ("the {aspect} in the {title} was", False),
    ("i thought the {title} was", False),
    ("the {title} : the {aspect} felt", False),
    ("review of the {title} :", True),
)

P_NEUTRAL = 0.3  # of a verdict's adjective being neutral; the rest splits q : 1 − q
P_NOT = 0.15
P_INTENSIFIER = 0.3
P_SECOND_CLAUSE = 0.45


class _Draw:
    """Seeded choices that also sum their log-probability, giving each document's exact log p."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.logp = 0.0

    def choice(self, options: Sequence, weights: Sequence[float] | None = None):
        weights = list(weights) if weights is not None else [1.0] * len(options)
        total = sum(weights)
        index = self.rng.choices(range(len(options)), weights=weights)[0]
        self.logp += math.log(weights[index] / total)
        return options[index]

    def flip(self, p: float) -> bool:
        outcome = self.rng.random() < p
        self.logp += math.log(p if outcome else 1.0 - p)
        return outcome


def _verdict(draw: _Draw, quality: float) -> list[str]:
    """[not] [intensifier] adjective — e.g. "not very good"."""
    words = ["not"] if draw.flip(P_NOT) else []
    if draw.flip(P_INTENSIFIER):
        words.append(draw.choice(INTENSIFIERS))
    weights = ((1 - P_NEUTRAL) * quality, (1 - P_NEUTRAL) * (1 - quality), P_NEUTRAL)
    pool = draw.choice((POSITIVE, NEGATIVE, NEUTRAL), weights)
    return words + [draw.choice(pool)]


def _clause(draw: _Draw, quality: float) -> list[str]:
    return ["the", draw.choice(ASPECTS), "was"] + _verdict(draw, quality)


def _response(draw: _Draw, opens_clause: bool, quality: float) -> list[str]:
    words = _clause(draw, quality) if opens_clause else _verdict(draw, quality)
    if draw.flip(P_SECOND_CLAUSE):
        conjunction = draw.choice(CONJUNCTIONS)
        # "but" announces a contrast: the second verdict leans the other way.
        words += [conjunction] + _clause(draw, 1 - quality if conjunction == "but" else quality)
    return words + ["."]


def _prompt(template: str, aspect: str, adjective: str, noun: str) -> str:
    return template.format(aspect=aspect, title=f"{adjective} {noun}")


def sample_documents(num_docs: int, seed: int) -> list[tuple[str, str, float]]:
    """`num_docs` grammar draws as (prompt, response, exact log-probability of the document)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        draw = _Draw(rng)
        template, opens_clause = draw.choice(TEMPLATES)
        aspect = draw.choice(ASPECTS) if "{aspect}" in template else ""
        adjective, noun = draw.choice(TITLE_ADJECTIVES), draw.choice(tuple(NOUN_QUALITY))
        response = _response(draw, opens_clause, NOUN_QUALITY[noun])
        # EOS is part of the document: its probability is 1 once "." ends the response.
        docs.append((_prompt(template, aspect, adjective, noun), " ".join(response), draw.logp))
    return docs


def full_text(prompt: str, response: str) -> str:
    """The document a prompt and its response make (word-level text: one space between)."""
    return f"{prompt} {response}" if response else prompt


def corpus(num_docs: int, seed: int) -> list[str]:
    """Pretraining texts: prompt and response joined."""
    return [full_text(p, r) for p, r, _ in sample_documents(num_docs, seed)]


def corpus_entropy(num_docs: int = 20000, seed: int = 12345) -> float:
    """Entropy of the grammar in nats per predicted token (words + EOS), by exact log-probs of draws.

    The ratio of sums matches how a language model's mean token loss weighs
    documents of different lengths.
    """
    return entropy_per_token(sample_documents(num_docs, seed))


def entropy_per_token(docs: list[tuple[str, str, float]]) -> float:
    nats = -sum(logp for _, _, logp in docs)
    tokens = sum(len(full_text(p, r).split()) + 1 for p, r, _ in docs)  # + EOS
    return nats / tokens


def _word_classes() -> list[tuple[str, ...]]:
    function_words = ("the", "in", "was", "i", "thought", "felt", "review", "of", ":", ".", "not")
    return [function_words, ASPECTS, TITLE_ADJECTIVES, tuple(NOUN_QUALITY), POSITIVE, NEGATIVE, NEUTRAL,
            INTENSIFIERS, CONJUNCTIONS]  # fmt: skip


def vocabulary() -> list[str]:
    """Special tokens first (pad 0, bos 1, eos 2, unk 3), then every grammar word, in a fixed order."""
    words = [w for group in _word_classes() for w in group]
    # Disjoint word classes keep the grammar unambiguous, so `corpus_entropy` is exact.
    assert len(words) == len(set(words)), "a word appears in two classes of the grammar"
    return ["<pad>", "<bos>", "<eos>", "<unk>"] + words


# ---------------------------------------------------------------------------
# prompts


def all_prompts() -> list[str]:
    """Every prompt the grammar can open with (1,800), in a fixed order."""
    prompts = []
    for template, _ in TEMPLATES:
        aspects = ASPECTS if "{aspect}" in template else ("",)
        for aspect in aspects:
            for adjective in TITLE_ADJECTIVES:
                for noun in NOUN_QUALITY:
                    prompts.append(_prompt(template, aspect, adjective, noun))
    return prompts


def prompt_splits(seed: int = 0, num_eval: int = 200) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) prompt lists: a seeded shuffle of `all_prompts`, eval first."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[num_eval:], prompts[:num_eval]


def write_prompts_jsonl(prompts: Iterable[str], path: str | Path) -> Path:
    """One `{"prompt": ...}` object a line, the format `data.prompts` reads."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return path
