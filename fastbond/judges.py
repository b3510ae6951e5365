"""Pairwise judges: a user's function that says which of two responses is better, behind one interface.

`reward.kind: pairwise` names a "module:function" (imported as a callable
reward is) that takes `(prompts, responses_a, responses_b)`, three
equal-length lists of strings, and returns one number per pair, read as
`reward.judge_output` says:

    probability   P(a ≻ b) in [0, 1]: above 0.5 a wins, below 0.5 b wins, exactly 0.5 a tie
    sign          any real number: above 0 a wins, below 0 b wins, exactly 0 a tie
                  (−1 / 0 / 1, or a difference of two scores r(a) − r(b))

`PairwiseJudge` turns them into outcomes, +1 (a wins), −1 (b wins) or 0 (a
tie), and counts the pairs it was asked about (`comparisons`). Every way a
judge can fail is one line naming it: it raised (`UserCodeError`), or it
returned the wrong length or shape, something that is not numbers, a
probability outside [0, 1], or NaN (`FastbondError`); inside a training
step's rollout the failure is kept until every rank has finished it
(`fastbond.failures`), and the call returns ties. Unlike a NaN reward,
which `on_nonfinite` may skip, a NaN outcome is always an error: it leaves a
pair undecided, and neither a J-BOND decision nor a knockout goes on without
its winner.

J-BOND (`fastbond.algorithms.jbond`) is the one algorithm that runs on a
judge alone; `knockout` picks Best-of-N by the judge for the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastbond import failures
from fastbond.config.schema import JUDGE_OUTPUTS
from fastbond.errors import FastbondError, UserCodeError
from fastbond.rewards import import_function

__all__ = ["PairwiseJudge", "knockout", "load_judge", "wins"]

JudgeFn = Callable[[list[str], list[str], list[str]], "Sequence[float] | torch.Tensor"]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


class PairwiseJudge:
    """A judge `(prompts, responses_a, responses_b) -> outcomes [B]` (+1 a wins, −1 b wins, 0 a tie),
    validated on every call. `label` names it in error messages ("pairwise judge mod:fn")."""

    def __init__(self, fn: JudgeFn, label: str, output: str = "probability"):
        if output not in JUDGE_OUTPUTS:
            raise FastbondError(f"config key 'reward.judge_output' must be one of {', '.join(JUDGE_OUTPUTS)}; "
                                f"got '{output}'")
        self.fn = fn
        self.label = label
        self.output = output
        self.comparisons = 0  # pairs judged so far

    def __repr__(self) -> str:
        return f"PairwiseJudge({self.label}, {self.output})"

    def __call__(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> torch.Tensor:
        prompts, responses_a, responses_b = list(prompts), list(responses_a), list(responses_b)
        try:
            return self._judge(prompts, responses_a, responses_b)
        except (FastbondError, UserCodeError) as error:
            hold = failures.keeper()
            if hold is None:
                raise
            hold.keep(error)  # inside a step's rollout: every rank stops after it (fastbond.failures)
            return torch.zeros(len(prompts))  # ties

    def _judge(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> torch.Tensor:
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise FastbondError(f"{self.label}: got {len(prompts)} prompts but {len(responses_a)} and "
                                f"{len(responses_b)} responses")
        try:
            raw = self.fn(prompts, responses_a, responses_b)
        except FastbondError:
            raise
        except Exception as error:  # a bug in the user's judge: its traceback is theirs to read
            raise UserCodeError(f"{self.label} raised {type(error).__name__}: {_first_line(error)}") from error
        self.comparisons += len(prompts)
        return self._outcomes(raw, len(prompts))

    def _outcomes(self, raw: object, batch: int) -> torch.Tensor:
        try:
            # float64: a probability a hair above 0.5 must not round to a tie
            if isinstance(raw, torch.Tensor):
                values = raw.detach().to(device="cpu", dtype=torch.float64)
            else:
                values = torch.as_tensor(raw, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise FastbondError(f"{self.label} returned {type(raw).__name__}, expected {batch} numbers "
                                f"(a list or a tensor [{batch}])") from None
        if values.shape != (batch,):
            raise FastbondError(f"{self.label} returned shape {tuple(values.shape)}, expected ({batch},)")
        undecided = int(values.isnan().sum())
        if undecided:
            raise FastbondError(f"{self.label} returned NaN for {undecided} of {batch} pairs; a judge must decide "
                                "every pair")
        if self.output == "probability":
            outside = values[(values < 0) | (values > 1)]
            if outside.numel():
                raise FastbondError(f"{self.label} returned {float(outside[0]):g}, not a probability in [0, 1] "
                                    "(reward.judge_output=sign reads a judge that returns signs or score differences)")
            values = values - 0.5
        return torch.sign(values).to(torch.float32)


def wins(outcomes: torch.Tensor) -> torch.Tensor:
    """a's share of each pair: 1 for a win, 0.5 for a tie, 0 for a loss."""
    return (outcomes > 0).double() + 0.5 * (outcomes == 0).double()


def knockout(judge: PairwiseJudge, prompts: list[str], responses: list[list[str]]) -> list[list[list[int]]]:
    """Best-of-N by the judge: a knockout over each prompt's N responses (N a power of two).

    Round k pairs the winners of round k−1 in order, (0, 1), (2, 3), …, and the left one goes through
    on a tie, so a judge that compares scores picks the *first* best response, as Best-of-N does
    (`fastbond.bon.best_of_n_index`). One judge call per round, over every prompt's pairs.

    Returns winners[prompt][k]: the indices of the round-k winners, round 0 being the N responses
    themselves; winners[p][k][j] is the judge's Best-of-2^k of responses j·2^k … (j+1)·2^k − 1.
    """
    n = len(responses[0]) if responses else 0
    if n < 1 or n & (n - 1) or any(len(row) != n for row in responses):
        raise ValueError(f"a knockout needs the same power-of-two number of responses per prompt, got "
                         f"{[len(row) for row in responses]}")
    rounds = [[list(range(n))] for _ in responses]
    while len(rounds[0][-1]) > 1:
        pairs = [(p, rounds[p][-1][i], rounds[p][-1][i + 1])
                 for p in range(len(responses)) for i in range(0, len(rounds[p][-1]), 2)]
        outcomes = judge([prompts[p] for p, _, _ in pairs], [responses[p][left] for p, left, _ in pairs],
                         [responses[p][right] for p, _, right in pairs])
        for row in rounds:
            row.append([])
        for (p, left, right), outcome in zip(pairs, outcomes.tolist()):
            rounds[p][-1].append(right if outcome < 0 else left)  # a tie keeps the first
    return rounds


def load_judge(spec: str, output: str = "probability") -> PairwiseJudge:
    """The pairwise judge of config `reward.name` ("module:function"), read as `reward.judge_output` says."""
    return PairwiseJudge(import_function(spec, "pairwise judge"), f"pairwise judge {spec}", output)
