"""Pairwise judges (reward.kind=pairwise, docs/judges.md): the judge's outputs read as outcomes, the
knockout that picks Best-of-N, J-BOND trained on 3 comparisons a prompt (step for step the run of the
scalar reward the judge compares), the evaluation's win rates, and every other consumer's refusal."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastbond.algorithms import ALGORITHMS
from fastbond.algorithms.jbond import better_anchor_rows
from fastbond.bon import jbond_reward
from fastbond.config import load_config
from fastbond.errors import FastbondError, UserCodeError
from fastbond.evaluate import evaluate, format_evaluation, write_evaluation
from fastbond.frontier.command import run_frontier
from fastbond.judges import PairwiseJudge, knockout, load_judge
from fastbond.presets import embedded_preset
from fastbond.rollout import Samples
from fastbond.rollout.sampler import Sampler
from fastbond.train import train

_module_names = (f"user_judges_{i}" for i in itertools.count())

# The embedded world's reward as a judge, in both forms; each call is recorded (the count of pairs, and
# every outcome), so a test can say how many comparisons a run made and which decisions it met.
SENTIMENT_JUDGES = """
from fastbond.rewards import sentiment_score

pairs = []

def difference(prompts, responses_a, responses_b):
    out = [sentiment_score(a) - sentiment_score(b) for a, b in zip(responses_a, responses_b)]
    pairs.extend(out)
    return out

def probability(prompts, responses_a, responses_b):
    return [1.0 if d > 0 else 0.0 if d < 0 else 0.5 for d in difference(prompts, responses_a, responses_b)]
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a module into tmp_path and returns its (fresh) import name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = next(_module_names)  # a new name each time: sys.modules caches imports (and their counts)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def judge_of(fn, output: str = "sign") -> PairwiseJudge:
    return PairwiseJudge(fn, "pairwise judge test:fn", output)


def by_length(prompts, responses_a, responses_b):
    """The longer response (in words) wins; equal lengths tie."""
    return [len(a.split()) - len(b.split()) for a, b in zip(responses_a, responses_b)]


# ---------------------------------------------------------------------------
# the judge's outputs


def test_probability_and_sign_outputs_read_as_outcomes():
    probability = judge_of(lambda p, a, b: [0.9, 0.5, 0.1, 1.0, 0.0, 0.5000001], "probability")
    assert probability(["p"] * 6, ["a"] * 6, ["b"] * 6).tolist() == [1.0, 0.0, -1.0, 1.0, -1.0, 1.0]
    sign = judge_of(lambda p, a, b: torch.tensor([3.5, 0.0, -1e-9, -1.0, 1.0, math.inf]), "sign")
    assert sign(["p"] * 6, ["a"] * 6, ["b"] * 6).tolist() == [1.0, 0.0, -1.0, -1.0, 1.0, 1.0]
    assert probability.comparisons == 6 and sign.comparisons == 6


@pytest.mark.parametrize("output, values, message", [
    ("probability", [0.5, math.nan], r"returned NaN for 1 of 2 pairs"),
    ("sign", [math.nan, math.nan], r"returned NaN for 2 of 2 pairs"),
    ("probability", [0.5, -1.0], r"returned -1, not a probability in \[0, 1\] \(reward.judge_output=sign"),
    ("probability", [1.5, 0.0], r"returned 1.5, not a probability"),
    ("sign", [1.0], r"returned shape \(1,\), expected \(2,\)"),
    ("sign", [[1.0], [0.0]], r"returned shape \(2, 1\), expected \(2,\)"),
    ("sign", None, r"returned NoneType, expected 2 numbers"),
    ("sign", ["a", "b"], r"returned list, expected 2 numbers"),
])
def test_a_judge_returning_what_is_not_an_outcome_is_one_line_naming_it(output, values, message):
    judge = judge_of(lambda p, a, b: values, output)
    with pytest.raises(FastbondError, match=message) as error:
        judge(["p", "q"], ["a", "b"], ["c", "d"])
    assert str(error.value).startswith("pairwise judge test:fn ") and "\n" not in str(error.value)


def test_a_raising_judge_and_a_missing_one(user_module):
    name = user_module("def judge(prompts, a, b):\n    raise ValueError('no verdict\\nmore')\n")
    with pytest.raises(UserCodeError, match=f"^pairwise judge {name}:judge raised ValueError: no verdict$"):
        load_judge(f"{name}:judge")(["p"], ["a"], ["b"])
    with pytest.raises(FastbondError, match=f"^pairwise judge {name}:missing: module '{name}' has no attribute"):
        load_judge(f"{name}:missing")
    with pytest.raises(FastbondError, match="lengths|prompts but"):
        load_judge(f"{name}:judge")(["p", "q"], ["a"], ["b"])


# ---------------------------------------------------------------------------
# Best-of-N by the judge


def test_knockout_picks_the_first_best_in_n_minus_1_comparisons():
    scores = [[2, 5, 3, 5], [1, 1, 1, 1], [0, 9, 9, 4, 7, 1, 9, 2]]
    responses = [[f"r{i}-{j}" for j in range(len(row))] for i, row in enumerate(scores)]
    score = {text: s for row, texts in zip(scores, responses) for s, text in zip(row, texts)}
    judge = judge_of(lambda p, a, b: [score[x] - score[y] for x, y in zip(a, b)])
    # the same number of responses a prompt: one knockout per size
    rounds = knockout(judge, ["p0", "p1"], responses[:2])
    assert rounds[0] == [[0, 1, 2, 3], [1, 3], [1]]  # 5 against 5 in the final: the first goes through
    assert rounds[1] == [[0, 1, 2, 3], [0, 2], [0]]  # all tied: the first of each pair, then of all
    assert judge.comparisons == 2 * 3
    rounds = knockout(judge, ["p2"], responses[2:])
    assert rounds[0][1:] == [[1, 2, 4, 6], [1, 6], [1]]
    assert judge.comparisons == 6 + 7
    with pytest.raises(ValueError, match="power-of-two"):
        knockout(judge, ["p"], [["a", "b", "c"]])


# ---------------------------------------------------------------------------
# J-BOND's decisions


def test_the_three_comparisons_decide_as_the_scores_would(reference):
    """For every order of (policy, anchor 1, anchor 2) scores, ties included, a judge comparing those scores
    leads J-BOND to the scalar rewards' decisions: which anchor sample is distilled, and whether the policy
    sample is worse than both (`jbond_reward`, `better_anchor_rows` take them in the fused loss)."""
    from fastbond.algorithms.base import Context
    from fastbond.algorithms.jbond import judged_rewards
    from fastbond.rollout import Prompts, encode_prompts

    model, tokenizer = reference
    cases = list(itertools.product(range(3), repeat=3))  # (r(y), r(y'₁), r(y'₂))
    texts = [f"p{i}" for i in range(len(cases))]
    ids, mask = encode_prompts(tokenizer, texts, 8, torch.device("cpu"))
    prompts = Prompts(texts, ids, mask)
    word = {0: "bad .", 1: "simple .", 2: "great ."}  # sentiment −1, 0, 1

    def samples(responses):
        tokens = [tokenizer.convert_tokens_to_ids(r.split()) for r in responses]
        rows = prompts if len(responses) == len(texts) else prompts.repeated(2)
        return Samples.from_responses(rows.ids, rows.mask, tokens, tokenizer.pad_token_id, texts=responses)

    policy = samples([word[y] for y, _, _ in cases])
    anchor = samples([word[a] for _, a1, a2 in cases for a in (a1, a2)])
    from fastbond.rewards import sentiment_score

    judge = judge_of(lambda p, a, b: [sentiment_score(x) - sentiment_score(y) for x, y in zip(a, b)])
    ctx = Context(model, model, tokenizer, judge)
    rewards, anchor_rewards, metrics = judged_rewards(ctx, prompts, policy, anchor)

    scalar = torch.tensor(cases, dtype=torch.float32)
    assert torch.equal(better_anchor_rows(anchor_rewards), better_anchor_rows(scalar[:, 1:]))
    assert torch.equal(jbond_reward(rewards, anchor_rewards), jbond_reward(scalar[:, 0], scalar[:, 1:]))
    assert judge.comparisons == 3 * len(cases)
    assert metrics["judge_comparisons_per_prompt"].item() == 3.0
    wins = [(y > a) + 0.5 * (y == a) for y, a1, a2 in cases for a in (a1, a2)]
    assert metrics["win_rate_vs_anchor"].item() == pytest.approx(sum(wins) / len(wins))


def tiny(tmp_path, name: str, *overrides: str):
    return load_config(embedded_preset(), [
        "steps=3", "rollout.batch_size=8", "rollout.max_new_tokens=8", "evaluation.at_end=false",
        "logging.progress=false", "cpu_threads=1", f"run_dir={tmp_path / name}", *overrides])


def run(config) -> tuple[list[dict], dict[str, torch.Tensor]]:
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(run_dir / "policy" / "model.safetensors"))


def test_a_judge_of_the_reward_trains_the_scalar_run_step_for_step(tmp_path, embedded_reference, user_module):
    """A judge returning sign(r(a) − r(b)) of the embedded reward r (as a score difference, or as P(a ≻ b))
    makes every J-BOND decision the scalar run makes: the same losses, gradients and weights, step for
    step, in exactly 3 comparisons a prompt."""
    module = user_module(SENTIMENT_JUDGES)
    scalar_records, scalar_weights = run(tiny(tmp_path, "scalar"))
    judged = {
        output: run(tiny(tmp_path, output, "reward.kind=pairwise", f"reward.name={module}:{fn}",
                         f"reward.judge_output={output}"))
        for output, fn in (("sign", "difference"), ("probability", "probability"))
    }
    outcomes = importlib.import_module(module).pairs
    assert len(outcomes) == 2 * 3 * 8 * 3  # two runs, 3 steps of 8 prompts, 3 comparisons each
    # the runs met every kind of decision: anchor samples tied and each better, policy samples worse than both
    between_anchors = [outcomes[s * 24 : s * 24 + 8] for s in range(3)]
    assert {math.copysign(1, d) if d else 0 for step in between_anchors for d in step} == {-1, 0, 1}
    assert any(r["frac_worse_than_both"] > 0 for r in scalar_records)

    for output, (records, weights) in judged.items():
        assert [r["judge_comparisons_per_prompt"] for r in records] == [3.0] * 3
        assert all("reward" not in r and "anchor_reward" not in r for r in records)  # no reward to log
        for mine, theirs in zip(records, scalar_records):
            shared = [k for k in theirs if k in mine and not k.startswith("time/") and k != "samples_per_s"]
            assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}, output
            assert {"loss", "grad_norm", "kl_anchor", "frac_worse_than_both"} <= set(shared)
        for key, tensor in scalar_weights.items():
            assert torch.equal(weights[key], tensor), (output, key)


def test_a_nan_from_the_judge_stops_the_step_in_one_line(tmp_path, embedded_reference, user_module, capsys):
    from fastbond.cli import main

    module = user_module("def judge(prompts, a, b):\n    return [float('nan')] * len(a)\n")
    status = main(["train", "steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false",
                   "logging.progress=false", "cpu_threads=1", f"run_dir={tmp_path / 'run'}", "reward.kind=pairwise",
                   f"reward.name={module}:judge"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"fastbond train: error: pairwise judge {module}:judge returned NaN for 12 of 12 "
                             "pairs; a judge must decide every pair; no step had completed"), err


# ---------------------------------------------------------------------------
# the configs and commands that need a scalar reward


@pytest.mark.parametrize("algorithm", [name for name in ALGORITHMS if name != "jbond"])
def test_every_other_algorithm_refuses_a_judge_in_one_line(algorithm):
    with pytest.raises(FastbondError) as error:
        load_config(None, [f"algorithm.name={algorithm}", "reward.kind=pairwise", "reward.name=judges:judge"])
    message = str(error.value)
    assert message == (f"config key 'reward.kind': algorithm {algorithm} needs a scalar reward; a pairwise judge "
                       "runs only with algorithm.name=jbond")


def test_the_judge_keys_are_checked():
    config = load_config(None, ["reward.kind=pairwise", "reward.name=judges:judge", "reward.judge_output=sign"])
    assert config.reward.kind == "pairwise" and config.algorithm.name == "jbond"
    for overrides, message in (
        (["reward.kind=pairwise", "reward.name=nocolon"], "'reward.name' must look like module:function"),
        (["reward.kind=pairwise", "reward.name=m:f", "reward.judge_output=odds"], "'reward.judge_output' must be"),
        (["reward.judge_output=sign"], "'reward.judge_output' only applies to reward.kind=pairwise, not builtin"),
    ):
        with pytest.raises(FastbondError, match=message):
            load_config(None, overrides)


def test_the_frontier_refuses_a_judge(tmp_path):
    with pytest.raises(FastbondError, match="^config key 'reward.kind': fastbond frontier .* gives no reward"):
        run_frontier(None, ["reward.kind=pairwise", "reward.name=judges:judge"], tmp_path / "out", say=lambda _: None)


# ---------------------------------------------------------------------------
# the evaluation


class ScriptedSampler(Sampler):
    """Answers each prompt row with the responses a test wrote, by model: responses[model][prompt] is the
    list of that prompt's responses in the order its rows come."""

    def __init__(self, tokenizer, responses: dict):
        self.tokenizer, self.responses = tokenizer, responses

    def draw(self, role, prompts, trainer_logps=None) -> Samples:
        served: dict[str, int] = {}
        texts = []
        for prompt in prompts.texts:
            texts.append(self.responses[id(role)][prompt][served.get(prompt, 0)])
            served[prompt] = served.get(prompt, 0) + 1
        tokens = [self.tokenizer.convert_tokens_to_ids(t.split()) + [self.tokenizer.eos_token_id] for t in texts]
        return Samples.from_responses(prompts.ids, prompts.mask, tokens, self.tokenizer.pad_token_id, texts=texts)


def test_win_rates_against_pi_ref_and_its_best_of_n_by_hand(reference, tmp_path):
    """A judge preferring the longer response, on responses of known lengths (in words):

        prompt A   π_ref 2 5 3 5 → Best-of-2 of brackets (2 5)(3 5): 5, 5; Best-of-4: 5
                   policy 4 5   → vs π_ref (2, 5): 1, ½;   vs Best-of-2 (5, 5): 0, ½;   vs Best-of-4 (5): 0, ½
        prompt B   π_ref 3 1 1 1 → Best-of-2: 3, 1; Best-of-4: 3
                   policy 1 3   → vs π_ref (3, 1): 0, 1;   vs Best-of-2 (3, 1): 0, 1;   vs Best-of-4 (3): 0, ½
    """
    import copy

    model, tokenizer = reference
    policy = copy.deepcopy(model)  # the same weights: KL(π ‖ π_ref) is exactly 0
    words = lambda *lengths: [" ".join(["good"] * n) + " ." for n in lengths]  # noqa: E731  n words and "."
    responses = {id(policy): {"A": words(4, 5), "B": words(1, 3)},
                 id(model): {"A": words(2, 5, 3, 5), "B": words(3, 1, 1, 1)}}
    judge = judge_of(by_length)
    result = evaluate(policy, model, tokenizer, judge, ["A", "B"], max_new_tokens=8, max_prompt_tokens=8,
                      policy_samples=2, reference_samples=4, backend="chunked",
                      sampler=ScriptedSampler(tokenizer, responses))
    assert result["win_rate_vs_ref"] == pytest.approx((0.75 + 0.5) / 2)
    assert {n: row["win_rate"] for n, row in result["bon"].items()} == pytest.approx(
        {"1": (0.75 + 0.5) / 2, "2": (0.25 + 0.5) / 2, "4": (0.25 + 0.25) / 2})
    assert result["bon"]["4"]["kl_bound"] == pytest.approx(math.log(4) - 3 / 4)
    assert result["kl_policy_ref"] == 0.0
    assert result["judge_comparisons"] == judge.comparisons == 2 * (3 + 2 * 3)  # knockout, then 2 samples × 3 N
    assert "policy_reward" not in result and all("reward" not in row for row in result["bon"].values())

    written = write_evaluation(tmp_path / "eval.json", result, "stop")
    assert json.loads((tmp_path / "eval.json").read_text()) == written
    table = format_evaluation(written)
    assert table.count("not computed") == 1 and "reward.kind=pairwise" in table
    assert "win rate vs π_ref 0.625" in table


def test_the_example_trains_and_is_judged_by_win_rates(tmp_path, embedded_reference, monkeypatch):
    """examples/embedded-judge.yaml, shortened: training ends with eval.json's win rates and a report."""
    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)  # the judge is examples.pairwise_judge, imported from the working directory
    monkeypatch.syspath_prepend(str(root))
    config = load_config(root / "examples" / "embedded-judge.yaml", [
        "steps=2", "rollout.batch_size=4", "rollout.max_new_tokens=8", "logging.progress=false",
        "evaluation.max_prompts=3", "evaluation.policy_samples=2", "evaluation.reference_samples=4",
        f"run_dir={tmp_path / 'run'}"])
    run_dir = train(config)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["judge"] == "pairwise judge examples.pairwise_judge:sentiment"
    assert list(result["bon"]) == ["1", "2", "4"] and 0.0 <= result["win_rate_vs_ref"] <= 1.0
    assert result["judge_comparisons"] == 3 * (3 + 2 * 3)
    assert (run_dir / "report.png").is_file()
