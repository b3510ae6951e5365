"""Reward functions: built-in scorers, user callables and reward models, behind one interface.

Whatever its source, a reward is loaded by `load_reward(kind, name, ...)` as a
`RewardFunction`: called with `(prompts, responses)`, two equal-length lists of
strings, it returns a float32 CPU tensor [B]. The wrapper turns every way a
user's scorer can fail (it raises, returns the wrong length or shape, returns
something that is not numbers) into a one-line `FastbondError` that names the
scorer; inside a training step's rollout the failure is kept until every rank
has finished it (`fastbond.failures`), and the call returns NaN rewards.
Non-finite rewards are passed through untouched: whether to skip the step or
stop the run is the trainer's decision (`on_nonfinite`), and `nonfinite_mask`
finds them.

Kinds (config `reward.kind` / `reward.name`):
    builtin   a name in `BUILTIN_REWARDS` (e.g. "sentiment", the embedded task's)
    callable  "module:function", imported with importlib; the function takes
              (prompts, responses) and returns B floats or a tensor [B]
    model     a transformers sequence-classification checkpoint directory with
              its tokenizer; the score is logits[:, 0]

A fourth kind, `pairwise`, compares two responses instead of scoring one:
`fastbond.judges` loads it (through `import_function`, as a callable is).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastbond import failures
from fastbond.chat import conversation
from fastbond.errors import FastbondError, UserCodeError

__all__ = [
    "BUILTIN_REWARDS",
    "POSITIVE_WORDS",
    "NEGATIVE_WORDS",
    "NEGATORS",
    "RewardFunction",
    "import_function",
    "load_reward",
    "nonfinite_mask",
    "register",
    "sentiment_score",
]

ScoreFn = Callable[[list[str], list[str]], "Sequence[float] | torch.Tensor"]

BUILTIN_REWARDS: dict[str, ScoreFn] = {}


def register(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding a scorer `(prompts, responses) -> [B] floats` to `BUILTIN_REWARDS`."""

    def add(fn: ScoreFn) -> ScoreFn:
        BUILTIN_REWARDS[name] = fn
        return fn

    return add


# ---------------------------------------------------------------------------
# the built-in lexicon sentiment scorer (the embedded task's reward)

# The embedded grammar (fastbond.embedded) draws its adjectives from these
# lists, so the reference model mixes both signs and Best-of-N has something
# to choose between. The lexicon is the whole reward: nothing is learned.
POSITIVE_WORDS = frozenset(
    "good great superb brilliant charming moving clever wonderful delightful gripping".split()
)
NEGATIVE_WORDS = frozenset("bad dull awful boring clumsy weak tedious messy bland terrible".split())
# A negator flips the sign of the next sentiment word in its clause: "not bad" is +1.
NEGATORS = frozenset({"not", "never", "hardly"})
# Words and marks that end a clause, and with it any pending negation.
_CLAUSE_BREAKS = frozenset({"and", "but", "though", "while", ".", ",", ";", ":", "!", "?"})
_WORD = re.compile(r"[a-z]+|[^\sa-z]")


def sentiment_score(text: str) -> float:
    """+1 per positive word, −1 per negative word, sign flipped after a negator in the same clause.

    >>> sentiment_score("the plot was great but the acting was not very good .")
    0.0
    """
    score, negated = 0, False
    for word in _WORD.findall(text.lower()):
        if word in NEGATORS:
            negated = True
        elif word in POSITIVE_WORDS or word in NEGATIVE_WORDS:
            sign = 1 if word in POSITIVE_WORDS else -1
            score += -sign if negated else sign
            negated = False
        elif word in _CLAUSE_BREAKS:
            negated = False
    return float(score)


@register("sentiment")
def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """Lexicon sentiment of each response; the prompt is not scored."""
    return [sentiment_score(response) for response in responses]


# ---------------------------------------------------------------------------
# the uniform, validating wrapper


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


class RewardFunction:
    """A scorer `(prompts, responses) -> float32 CPU tensor [B]`, validated on every call.

    `label` names the scorer in error messages ("reward function mod:fn").
    """

    def __init__(self, fn: ScoreFn, label: str):
        self.fn = fn
        self.label = label

    def __repr__(self) -> str:
        return f"RewardFunction({self.label})"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        prompts, responses = list(prompts), list(responses)
        try:
            return self._score(prompts, responses)
        except (FastbondError, UserCodeError) as error:
            hold = failures.keeper()
            if hold is None:
                raise
            hold.keep(error)  # inside a step's rollout: every rank stops after it (fastbond.failures)
            return torch.full((len(responses),), float("nan"))

    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise FastbondError(f"{self.label}: got {len(prompts)} prompts but {len(responses)} responses")
        try:
            raw = self.fn(prompts, responses)
        except FastbondError:
            raise
        except Exception as error:  # a bug in the user's scorer: its traceback is theirs to read
            raise UserCodeError(f"{self.label} raised {type(error).__name__}: {_first_line(error)}") from error
        return self._as_tensor(raw, len(responses))

    def _as_tensor(self, raw: object, batch: int) -> torch.Tensor:
        try:
            if isinstance(raw, torch.Tensor):
                rewards = raw.detach().to(device="cpu", dtype=torch.float32)
            else:
                rewards = torch.as_tensor(raw, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise FastbondError(
                f"{self.label} returned {type(raw).__name__}, expected {batch} floats (a list or a tensor [{batch}])"
            ) from None
        if rewards.shape != (batch,):
            raise FastbondError(f"{self.label} returned shape {tuple(rewards.shape)}, expected ({batch},)")
        return rewards


def nonfinite_mask(rewards: torch.Tensor) -> torch.Tensor:
    """Bool [B]: True where a reward is NaN or ±Inf."""
    return ~torch.isfinite(rewards)


# ---------------------------------------------------------------------------
# loaders, one per kind


def _load_builtin(name: str) -> RewardFunction:
    if name not in BUILTIN_REWARDS:
        close = difflib.get_close_matches(name, list(BUILTIN_REWARDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        choices = ", ".join(sorted(BUILTIN_REWARDS))
        raise FastbondError(f"unknown builtin reward '{name}'{hint}; choose from: {choices}")
    return RewardFunction(BUILTIN_REWARDS[name], f"builtin reward {name}")


def import_function(spec: str, what: str = "reward function") -> Callable:
    """The function a "module:function" spec names, imported with importlib; every way that fails is a
    one-line `FastbondError` starting with `what` and the spec (a reward function, a pairwise judge)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise FastbondError(f"{what} must look like module:function, got '{spec}'")
    # A console script does not put the working directory on sys.path; users
    # expect `my_rewards:score` beside their config to import. Appended, not
    # prepended, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
            raise FastbondError(f"{what} {spec}: module '{module_name}' not found") from None
        raise FastbondError(f"{what} {spec}: importing '{module_name}' failed: {_first_line(error)}") from None
    except Exception as error:  # a syntax or runtime error inside the user's module
        raise FastbondError(
            f"{what} {spec}: importing '{module_name}' raised {type(error).__name__}: {_first_line(error)}"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise FastbondError(f"{what} {spec}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise FastbondError(f"{what} {spec}: '{attr}' is a {type(fn).__name__}, not a function")
    return fn


def _load_callable(spec: str) -> RewardFunction:
    return RewardFunction(import_function(spec), f"reward function {spec}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def _check_vocabulary(path: str, tokenizer, model, borrowed: bool) -> None:
    """Every id the tokenizer can emit must have an embedding row in the reward
    model; otherwise scores are garbage (or an index error deep inside)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        whose = "the policy's tokenizer (the reward model has none of its own)" if borrowed else "its tokenizer"
        raise FastbondError(
            f"policy/reward tokenizer mismatch: reward model {path} embeds {rows} tokens but {whose} has {len(tokenizer)}"
        )


class _ModelScorer:
    """Scores with a sequence-classification reward model: logits[:, 0], batched, no grad.

    With a chat template, the text is the chat the prompt came from (a
    rendered chat prompt's messages, or a plain prompt as the user's turn)
    followed by the response as the assistant's turn, in the reward model's
    own template; without one, it is prompt + response as the policy saw them.
    """

    def __init__(
        self,
        path: str,
        batch_size: int,
        device: str | torch.device,
        dtype: torch.dtype | None,
        trust_remote_code: bool,
        policy_tokenizer=None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = {"trust_remote_code": trust_remote_code}
        try:
            if _has_tokenizer(path) or policy_tokenizer is None:
                self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            else:  # a reward head trained on the policy's own tokenizer
                self.tokenizer = copy.deepcopy(policy_tokenizer)
            if dtype is not None:
                kwargs["dtype"] = dtype
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise FastbondError(f"reward model {path} could not be loaded: {_first_line(error)}") from None
        _check_vocabulary(path, self.tokenizer, self.model, borrowed=not _has_tokenizer(path))
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise FastbondError(f"reward model {path}: its tokenizer has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Batched sequence classifiers locate each row's last token through
        # pad_token_id; without it they refuse batches larger than one.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))

    def _text(self, prompt: str, response: str) -> str:
        if self.templated:
            chat = conversation(prompt) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return prompt + response

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            # A chat template already holds the special tokens (BOS); adding them again would double BOS.
            encoded = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                return_tensors="pt",
                add_special_tokens=not self.templated,
            )
            logits = self.model(
                input_ids=encoded["input_ids"].to(self.device),
                attention_mask=encoded["attention_mask"].to(self.device),
            ).logits  # [b, num_labels]
            scores.append(logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def _load_model(
    path: str, batch_size: int, device: str | torch.device, dtype: torch.dtype | None, trust_remote_code: bool,
    policy_tokenizer=None,
) -> RewardFunction:
    if not Path(path).is_dir():
        raise FastbondError(f"reward model directory not found: {path}")
    scorer = _ModelScorer(path, batch_size, device, dtype, trust_remote_code, policy_tokenizer)
    return RewardFunction(scorer, f"reward model {path}")


def load_reward(
    kind: str,
    name: str,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    policy_tokenizer=None,
) -> RewardFunction:
    """The reward of config `reward.kind` / `reward.name` as a `RewardFunction`.

    `batch_size`, `device`, `dtype`, `trust_remote_code` and `policy_tokenizer`
    only matter for kind "model"; remote code stays off unless the user turns
    it on. A reward model directory without a tokenizer borrows the policy's,
    if every policy token id has an embedding row in the reward model.
    """
    if kind == "builtin":
        return _load_builtin(name)
    if kind == "callable":
        return _load_callable(name)
    if kind == "model":
        return _load_model(name, batch_size, device, dtype, trust_remote_code, policy_tokenizer)
    raise FastbondError(f"reward kind must be one of builtin, callable, model; got '{kind}'")
