"""Reward loading and validation: builtin scorers, user callables, reward models."""

import itertools
import math
import textwrap

import pytest
import torch

from fastbond import embedded
from fastbond.errors import FastbondError, UserCodeError
from fastbond.rewards import BUILTIN_REWARDS, load_reward, nonfinite_mask, sentiment_score

_module_names = (f"user_rewards_{i}" for i in itertools.count())


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module of reward functions into tmp_path and returns its (fresh) import name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = next(_module_names)  # a new name each time: sys.modules caches imports
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# ---------------------------------------------------------------------------
# builtin


@pytest.mark.parametrize(
    "text, score",
    [
        ("great .", 1.0),
        ("bad and the plot was dull .", -2.0),
        ("not bad .", 1.0),
        ("not very good but the cast was charming .", 0.0),
        ("the plot was not quiet and the music was superb .", 1.0),
        ("not . good", 1.0),  # a clause break ends the negation
        ("Great!", 1.0),
        ("the acting was loud .", 0.0),
        ("", 0.0),
    ],
)
def test_sentiment_score_on_hand_examples(text, score):
    assert sentiment_score(text) == score


def test_builtin_reward_returns_float32_vector():
    reward = load_reward("builtin", "sentiment")
    rewards = reward(["i thought the lost river was"] * 3, ["superb .", "awful .", "long ."])
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, -1.0, 0.0]
    assert reward([], []).shape == (0,)


def test_the_embedded_reward_is_a_builtin():
    assert embedded.REWARD_NAME in BUILTIN_REWARDS


def test_unknown_builtin_names_the_choices():
    with pytest.raises(FastbondError, match="unknown builtin reward 'sentimnt'.*did you mean 'sentiment'"):
        load_reward("builtin", "sentimnt")


def test_unknown_kind():
    with pytest.raises(FastbondError, match="reward kind"):
        load_reward("lambda", "x")


def test_prompt_and_response_counts_must_match():
    with pytest.raises(FastbondError, match="2 prompts but 1 responses"):
        load_reward("builtin", "sentiment")(["a", "b"], ["good"])


# ---------------------------------------------------------------------------
# callable


def test_callable_is_imported_and_wrapped(user_module):
    name = user_module(
        """
        import torch

        def length(prompts, responses):
            return [len(r) for r in responses]

        def as_tensor(prompts, responses):
            return torch.arange(len(responses), dtype=torch.float64)
        """
    )
    assert load_reward("callable", f"{name}:length")(["p", "q"], ["ab", "abcd"]).tolist() == [2.0, 4.0]
    rewards = load_reward("callable", f"{name}:as_tensor")(["p"] * 3, ["r"] * 3)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [0.0, 1.0, 2.0]


def test_missing_module_and_function_are_one_line_errors(user_module):
    name = user_module("def score(prompts, responses):\n    return [0.0] * len(responses)\nNOT_A_FUNCTION = 3\n")
    cases = {
        "no_such_module_xyz:score": "module 'no_such_module_xyz' not found",
        f"{name}:missing": f"module '{name}' has no attribute 'missing'",
        f"{name}:NOT_A_FUNCTION": "not a function",
        "nocolon": "module:function",
    }
    for spec, message in cases.items():
        with pytest.raises(FastbondError, match=message) as error:
            load_reward("callable", spec)
        assert "\n" not in str(error.value)


def test_a_module_that_fails_to_import(user_module):
    name = user_module("import no_such_dependency_xyz\n")
    with pytest.raises(FastbondError, match="importing .* failed: No module named 'no_such_dependency_xyz'"):
        load_reward("callable", f"{name}:score")
    broken = user_module("raise RuntimeError('bad config\\nsecond line')\n")
    with pytest.raises(FastbondError, match="raised RuntimeError: bad config$"):
        load_reward("callable", f"{broken}:score")


def test_a_raising_reward_function(user_module):
    name = user_module(
        """
        def score(prompts, responses):
            raise ValueError("cannot parse 'x'\\ntraceback detail")
        """
    )
    with pytest.raises(UserCodeError) as error:
        load_reward("callable", f"{name}:score")(["p"], ["r"])
    assert str(error.value) == f"reward function {name}:score raised ValueError: cannot parse 'x'"
    # the user's own exception, with its traceback, is the cause
    assert isinstance(error.value.__cause__, ValueError) and error.value.__cause__.__traceback__ is not None


@pytest.mark.parametrize(
    "body, message",
    [
        ("return [1.0]", r"returned shape \(1,\), expected \(2,\)"),
        ("return torch.zeros(len(responses), 1)", r"returned shape \(2, 1\), expected \(2,\)"),
        ("return 1.0", r"returned shape \(\), expected \(2,\)"),
        ("return None", "returned NoneType, expected 2 floats"),
        ("return ['a', 'b']", "returned list, expected 2 floats"),
    ],
)
def test_wrong_shapes_and_types_are_errors(user_module, body, message):
    name = user_module(f"import torch\n\ndef score(prompts, responses):\n    {body}\n")
    with pytest.raises(FastbondError, match=message):
        load_reward("callable", f"{name}:score")(["p", "q"], ["r", "s"])


def test_nonfinite_rewards_pass_through(user_module):
    name = user_module("def score(prompts, responses):\n    return [1.0, float('nan'), float('inf')]\n")
    rewards = load_reward("callable", f"{name}:score")(["p"] * 3, ["r"] * 3)
    assert rewards[0] == 1.0 and math.isnan(rewards[1]) and math.isinf(rewards[2])
    assert nonfinite_mask(rewards).tolist() == [False, True, True]


# ---------------------------------------------------------------------------
# reward model


@pytest.fixture
def reward_model_dir(tmp_path):
    """A tiny LlamaForSequenceClassification with the embedded tokenizer, saved like a real checkpoint."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = embedded.build_tokenizer(padding_side="left")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_reward_model_scores_each_row_as_if_alone(reward_model_dir):
    reward = load_reward("model", str(reward_model_dir), batch_size=2)
    prompts = ["i thought the lost river was", "review of the dark storm :", "the plot in the wild letter was"]
    responses = [" good .", " the cast was not dull and the plot was great .", " long ."]
    scores = reward(prompts, responses)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    alone = torch.cat([reward([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_reward_model_applies_its_chat_template(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    tokenizer.chat_template = "<bos>{% for m in messages %} {{ m['content'] }}{% endfor %} <eos>"
    tokenizer.save_pretrained(reward_model_dir)
    scores = load_reward("model", str(reward_model_dir))(["the plot was"], ["good ."])

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    ids = tokenizer("<bos> the plot was good . <eos>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(scores, model(input_ids=ids).logits[:, 0], atol=1e-5, rtol=1e-5)


def test_missing_reward_model_directory(tmp_path):
    with pytest.raises(FastbondError, match="reward model directory not found"):
        load_reward("model", str(tmp_path / "nope"))
    with pytest.raises(FastbondError, match="could not be loaded"):
        load_reward("model", str(tmp_path))
