"""Judging a policy against Best-of-N sampling from π_ref (SPEC §6-§7).

On held-out prompts: the policy's mean reward at one sample, the mean reward of
Best-of-N sampling from π_ref for N = 1, 2, 4, 8, 16 (with the KL bound
log N − (N−1)/N of each), KL(π ‖ π_ref), and the win rate of π over π_ref.

Best-of-N rewards are estimated without bias from m ≥ N reference samples per
prompt: with rewards sorted ascending r_(1) ≤ … ≤ r_(m), the expected maximum
of N draws without replacement is Σ_i r_(i) · C(i−1, N−1) / C(m, N); since the
samples are i.i.d. this is an unbiased estimate of E[max of N] = E_{BoN_N}[r].

Under a pairwise judge (reward.kind=pairwise, `evaluate_pairwise`) there is no
reward to average: each policy sample is judged against one π_ref sample (the
win rate vs π_ref) and against Best-of-N of π_ref picked by the judge, a
knockout over the prompt's first N' reference samples, N' the largest N that
fits (`fastbond.judges.knockout`). Its rounds hold the Best-of-N of every
N ≤ N' at once: N'/N disjoint brackets, policy sample j meeting the winner of
bracket j mod N'/N. A tie counts half. KL(π ‖ π_ref) needs no reward and is
reported as ever; the reward numbers are left out, and the result says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fastbond import atomic
from fastbond.bon import bon_kl_bound
from fastbond.errors import FastbondError
from fastbond.judges import PairwiseJudge, knockout, wins
from fastbond.logprobs import response_logprobs
from fastbond.rollout import Prompts, encode_prompts
from fastbond.rollout.sampler import GenerateSampler, Sampler

BON_SIZES = (1, 2, 4, 8, 16)
EVAL_FILE = "eval.json"


def expected_max_of_n(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """[B] unbiased estimate of E[max of n draws] from [B, m] i.i.d. rewards, m ≥ n."""
    m = rewards.shape[-1]
    if n > m:
        raise ValueError(f"need at least {n} samples per prompt to estimate Best-of-{n}, got {m}")
    ordered, _ = torch.sort(rewards.double(), dim=-1)
    ranks = torch.arange(1, m + 1, dtype=torch.float64, device=rewards.device)
    # as floats: C(m, n) passes int64 for m ≥ 68 (Best-of-64 from 128 samples), not float64
    weights = torch.tensor([float(math.comb(int(i) - 1, n - 1)) for i in ranks], dtype=torch.float64,
                           device=rewards.device)
    return (ordered * weights).sum(-1) / float(math.comb(m, n))


def _batches(items: list[str], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encoded(tokenizer, prompts: list[str], samples: int, max_prompt_tokens: int, device):
    """Each prompt `samples` times over, encoded: (texts, ids, mask)."""
    ids, mask = encode_prompts(tokenizer, prompts, max_prompt_tokens, device)
    texts = [p for p in prompts for _ in range(samples)]
    return texts, ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)


def _sampler(sampler: Sampler | None, tokenizer, max_new_tokens: int, temperature: float) -> Sampler:
    """The sampler to judge with: the one given, or transformers' `generate` with the global generator."""
    return sampler if sampler is not None else GenerateSampler(tokenizer, max_new_tokens, temperature)


def _draw_policy(policy, reference, tokenizer, chunk: list[str], samples: int, *, max_new_tokens: int,
                 max_prompt_tokens: int, temperature: float, backend: str,
                 sampler: Sampler | None = None) -> tuple[list[str], list[str], torch.Tensor]:
    """`samples` policy responses to each prompt of `chunk`: (their prompts, the responses, [c, samples]
    log π(y) − log π_ref(y) of each)."""
    device = next(policy.parameters()).device
    texts, ids, mask = _encoded(tokenizer, chunk, samples, max_prompt_tokens, device)
    drawn = _sampler(sampler, tokenizer, max_new_tokens, temperature).draw(policy, Prompts(texts, ids, mask))
    response = drawn.response_mask
    ell = (response_logprobs(policy, drawn, temperature, backend) * response).sum(-1)
    ref = (response_logprobs(reference, drawn, temperature, backend) * response).sum(-1)
    return texts, drawn.texts, (ell - ref).view(len(chunk), samples).cpu()


def _draw_reference(reference, tokenizer, chunk: list[str], samples: int, *, max_new_tokens: int,
                    max_prompt_tokens: int, temperature: float,
                    sampler: Sampler | None = None) -> tuple[list[str], list[str]]:
    """`samples` π_ref responses to each prompt of `chunk`: (their prompts, the responses)."""
    device = next(reference.parameters()).device
    texts, ids, mask = _encoded(tokenizer, chunk, samples, max_prompt_tokens, device)
    drawn = _sampler(sampler, tokenizer, max_new_tokens, temperature).draw(reference, Prompts(texts, ids, mask))
    return texts, drawn.texts


def _judge_policy(policy, reference, tokenizer, reward_fn, chunk: list[str], samples: int, *, max_new_tokens: int,
                  max_prompt_tokens: int, temperature: float, backend: str,
                  sampler: Sampler | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[c, samples] rewards of single policy samples on `chunk`, and log π(y) − log π_ref(y) of each."""
    texts, responses, kl = _draw_policy(policy, reference, tokenizer, chunk, samples, max_new_tokens=max_new_tokens,
                                        max_prompt_tokens=max_prompt_tokens, temperature=temperature,
                                        backend=backend, sampler=sampler)
    return reward_fn(texts, responses).view(len(chunk), samples).cpu(), kl


def _reference_rewards(reference, tokenizer, reward_fn, chunk: list[str], samples: int, *, max_new_tokens: int,
                       max_prompt_tokens: int, temperature: float, sampler: Sampler | None = None) -> torch.Tensor:
    """[c, samples] rewards of π_ref samples on `chunk`, for the Best-of-N estimates."""
    texts, responses = _draw_reference(reference, tokenizer, chunk, samples, max_new_tokens=max_new_tokens,
                                       max_prompt_tokens=max_prompt_tokens, temperature=temperature, sampler=sampler)
    return reward_fn(texts, responses).view(len(chunk), samples).cpu()


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean of [P, s] per-prompt values, and its standard error over the P prompts (the samples
    of one prompt are not independent draws of the mean: the prompt is shared)."""
    values = values.double()
    per_prompt = values.mean(-1)
    stderr = per_prompt.std() / math.sqrt(per_prompt.shape[0]) if per_prompt.shape[0] > 1 else math.nan
    return float(values.mean()), float(stderr)


@torch.no_grad()
def judge_policy(policy, reference, tokenizer, reward_fn, prompts: list[str], *, samples: int, max_new_tokens: int,
                 max_prompt_tokens: int, temperature: float = 1.0, batch_size: int = 64,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """[P, samples] rewards of single policy samples and their log π(y) − log π_ref(y), whose mean
    estimates KL(π ‖ π_ref)."""
    rewards, kls = [], []
    for chunk in _batches(prompts, batch_size):
        r, kl = _judge_policy(policy, reference, tokenizer, reward_fn, chunk, samples, max_new_tokens=max_new_tokens,
                              max_prompt_tokens=max_prompt_tokens, temperature=temperature, backend=backend)
        rewards.append(r)
        kls.append(kl)
    return torch.cat(rewards).double(), torch.cat(kls).double()


@torch.no_grad()
def reference_rewards(reference, tokenizer, reward_fn, prompts: list[str], *, samples: int, max_new_tokens: int,
                      max_prompt_tokens: int, temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """[P, samples] rewards of π_ref samples per prompt."""
    return torch.cat([
        _reference_rewards(reference, tokenizer, reward_fn, chunk, samples, max_new_tokens=max_new_tokens,
                           max_prompt_tokens=max_prompt_tokens, temperature=temperature)
        for chunk in _batches(prompts, batch_size)
    ]).double()


@torch.no_grad()
def evaluate(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    reward_fn,
    prompts: list[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    temperature: float = 1.0,
    policy_samples: int = 4,
    reference_samples: int = 16,
    batch_size: int = 64,
    backend: str = "auto",
    sampler: Sampler | None = None,
) -> dict:
    """Metrics of `policy` against BoN sampling of `reference` on `prompts`, sampled by `sampler`
    (default: transformers' `generate` with the global torch generator). `reward_fn` may be a
    `PairwiseJudge`: then win rates instead of rewards (`evaluate_pairwise`)."""
    sizes = dict(max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, temperature=temperature,
                 sampler=_sampler(sampler, tokenizer, max_new_tokens, temperature))
    if isinstance(reward_fn, PairwiseJudge):
        return evaluate_pairwise(policy, reference, tokenizer, reward_fn, prompts, policy_samples=policy_samples,
                                 reference_samples=reference_samples, batch_size=batch_size, backend=backend, **sizes)
    policy_rewards, ref_rewards, kls = [], [], []
    # Policy and π_ref samples alternate chunk by chunk, so the random stream (and every number of
    # an evaluation) is the same as it always was.
    for chunk in _batches(prompts, batch_size):
        rewards, kl = _judge_policy(policy, reference, tokenizer, reward_fn, chunk, policy_samples, backend=backend,
                                    **sizes)
        policy_rewards.append(rewards)
        kls.append(kl)
        ref_rewards.append(_reference_rewards(reference, tokenizer, reward_fn, chunk, reference_samples, **sizes))

    policy_r = torch.cat(policy_rewards).double()  # [P, s]
    ref_r = torch.cat(ref_rewards).double()  # [P, m]
    # Win rate: every policy sample against every reference sample of its prompt, ties count half.
    diff = policy_r.unsqueeze(-1) - ref_r.unsqueeze(-2)
    win_rate = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    reward, reward_stderr = mean_and_stderr(policy_r)
    result = {
        "prompts": len(prompts),
        "policy_reward": reward,
        "policy_reward_stderr": reward_stderr,
        "kl_policy_ref": float(torch.cat(kls).mean()),
        "win_rate_vs_ref": float(win_rate),
        "bon": {},
    }
    for n in BON_SIZES:
        if n <= reference_samples:
            result["bon"][str(n)] = {
                "reward": float(expected_max_of_n(ref_r, n).mean()),
                "kl_bound": bon_kl_bound(n),
            }
    return result


# What a pairwise judge cannot give, said once in the result and its table.
NO_SCALAR_REWARD = ("policy_reward, policy_reward_stderr and bon.N.reward are not computed: reward.kind=pairwise "
                    "gives no scalar reward")


def _against_best_of_n(judge: PairwiseJudge, chunk: list[str], mine: list[list[str]], theirs: list[list[str]],
                       sizes: list[int]) -> dict[int, torch.Tensor]:
    """N → [c, s] the share of each policy response (mine[i][j]) against Best-of-N of the prompt's π_ref
    responses (theirs[i], a power of two of them) picked by a knockout under the judge."""
    rounds = knockout(judge, chunk, theirs)
    largest = len(theirs[0])
    pairs = [(n, i, j) for n in sizes for i in range(len(chunk)) for j in range(len(mine[i]))]
    # policy response j meets the winner of bracket j mod (largest / N) of round log2(N)
    opponents = [theirs[i][rounds[i][n.bit_length() - 1][j % (largest // n)]] for n, i, j in pairs]
    outcomes = judge([chunk[i] for _, i, _ in pairs], [mine[i][j] for _, i, j in pairs], opponents)
    shares = wins(outcomes).view(len(sizes), len(chunk), -1)
    return {n: shares[k] for k, n in enumerate(sizes)}


@torch.no_grad()
def evaluate_pairwise(policy: nn.Module, reference: nn.Module, tokenizer, judge: PairwiseJudge, prompts: list[str], *,
                      max_new_tokens: int, max_prompt_tokens: int, temperature: float = 1.0, policy_samples: int = 4,
                      reference_samples: int = 16, batch_size: int = 64, backend: str = "auto",
                      sampler: Sampler | None = None) -> dict:
    """`evaluate` under a pairwise judge: the policy's win rates against π_ref and against Best-of-N of
    π_ref picked by the judge, and KL(π ‖ π_ref); the random stream is `evaluate`'s."""
    sizes = [n for n in BON_SIZES if n <= reference_samples]
    largest = sizes[-1]
    draw = dict(max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens, temperature=temperature,
                sampler=_sampler(sampler, tokenizer, max_new_tokens, temperature))
    before = judge.comparisons
    shares: dict[int, list[torch.Tensor]] = {n: [] for n in sizes}
    kls = []
    for chunk in _batches(prompts, batch_size):
        _, mine, kl = _draw_policy(policy, reference, tokenizer, chunk, policy_samples, backend=backend, **draw)
        kls.append(kl)
        _, theirs = _draw_reference(reference, tokenizer, chunk, reference_samples, **draw)
        rows = range(len(chunk))
        mine_by_prompt = [mine[i * policy_samples : (i + 1) * policy_samples] for i in rows]
        theirs_by_prompt = [theirs[i * reference_samples : i * reference_samples + largest] for i in rows]
        by_n = _against_best_of_n(judge, chunk, mine_by_prompt, theirs_by_prompt, sizes)
        for n in sizes:
            shares[n].append(by_n[n])
    rates = {n: mean_and_stderr(torch.cat(shares[n])) for n in sizes}
    return {
        "prompts": len(prompts),
        "judge": judge.label,
        "judge_comparisons": judge.comparisons - before,
        "not_computed": NO_SCALAR_REWARD,
        "kl_policy_ref": float(torch.cat(kls).double().mean()),
        "win_rate_vs_ref": rates[1][0],
        "win_rate_vs_ref_stderr": rates[1][1],
        "bon": {str(n): {"win_rate": rates[n][0], "win_rate_stderr": rates[n][1], "kl_bound": bon_kl_bound(n)}
                for n in sizes},
    }


def _number(value, width: int = 0) -> str:
    """A result for the table; a value that is not a number (null in eval.json) reads "nan"."""
    return f"{value:{width}.3f}" if isinstance(value, (int, float)) else f"{'nan':>{width}}"


def _format_pairwise(result: dict) -> str:
    lines = [
        f"prompts: {result['prompts']}   judged by {result['judge']} ({result['judge_comparisons']} comparisons)",
        f"policy (1 sample):  KL(π‖π_ref) {_number(result['kl_policy_ref'])} nats   "
        f"win rate vs π_ref {_number(result['win_rate_vs_ref'])} ± {_number(result['win_rate_vs_ref_stderr'])}",
        f"({result['not_computed']})",
        "the policy's win rate against Best-of-N of π_ref (a knockout by the judge):",
        "  N    win rate  KL bound (nats)",
    ]
    for n, row in result["bon"].items():
        lines.append(f"  {n:<4} {_number(row['win_rate'], 8)}  {_number(row['kl_bound'], 8)}")
    return "\n".join(lines)


def format_evaluation(result: dict) -> str:
    """A small table for the terminal and the README."""
    if "judge" in result:
        return _format_pairwise(result)
    lines = [
        f"prompts: {result['prompts']}",
        f"policy (1 sample):  reward {_number(result['policy_reward'])} ± {_number(result['policy_reward_stderr'])}   "
        f"KL(π‖π_ref) {_number(result['kl_policy_ref'])} nats   "
        f"win rate vs π_ref {_number(result['win_rate_vs_ref'])}",
        "Best-of-N of π_ref:",
        "  N    reward    KL bound (nats)",
    ]
    for n, row in result["bon"].items():
        lines.append(f"  {n:<4} {_number(row['reward'], 8)}  {_number(row['kl_bound'], 8)}")
    return "\n".join(lines)


def _without_nonfinite(value, key: str, found: list[str]):
    """`value` with every NaN/Inf float replaced by None; their keys go to `found`."""
    if isinstance(value, dict):
        return {k: _without_nonfinite(v, f"{key}.{k}" if key else str(k), found) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        found.append(key)
        return None
    return value


def write_evaluation(path, result: dict, on_nonfinite: str) -> dict:
    """eval.json as strict JSON, written atomically. A result that is not a number (a reward that
    returned NaN or Inf) becomes null and is named; under on_nonfinite=stop it is an error instead."""
    path = Path(path)
    found: list[str] = []
    clean = _without_nonfinite(result, "", found)
    if found:
        what = (f"the evaluation's {', '.join(found)} {'is' if len(found) == 1 else 'are'} not a number "
                "(the reward function returned NaN or Inf)")
        if on_nonfinite == "stop":
            raise FastbondError(f"{what}; {path.name} was not written (on_nonfinite=stop)")
        print(f"warning: {what}; written as null in {path}")
    atomic.write_text(path, json.dumps(clean, indent=2, allow_nan=False))
    return clean


def evaluate_models(models, config, prompts: list[str]) -> dict:
    """`evaluate` of a run's models (`fastbond.engines.Models`) as the run's config says."""
    evaluation = config.evaluation
    return evaluate(
        models.policy, models.reference, models.tokenizer, models.reward_fn, prompts,
        max_new_tokens=config.rollout.max_new_tokens, max_prompt_tokens=config.data.max_prompt_tokens,
        temperature=config.rollout.temperature, policy_samples=evaluation.policy_samples,
        reference_samples=evaluation.reference_samples, batch_size=config.rollout.batch_size,
    )


def evaluate_run(run_dir: str, overrides: list[str], policy_path: str | None = None) -> dict:
    """`fastbond eval RUN_DIR`: judge RUN_DIR/policy (or `policy_path`) as the run was configured."""
    from fastbond.chat import render_prompts
    from fastbond.checkpoint import model_dir_damage
    from fastbond.config import load_config
    from fastbond.data import prompts_for
    from fastbond.models import judged_models, resolve_device
    from fastbond.process import prepare_process

    run_path = Path(run_dir)
    if not (run_path / "config.yaml").is_file():
        raise FastbondError(f"{run_path} is not a run directory (no config.yaml)")
    config = load_config(run_path / "config.yaml", list(overrides) + ["checkpoint.resume=false"])
    policy_dir = Path(policy_path) if policy_path else run_path / "policy"
    if not policy_dir.is_dir():
        raise FastbondError(f"policy directory not found: {policy_dir}")
    problem = model_dir_damage(policy_dir)
    if problem:
        raise FastbondError(f"the policy to evaluate is damaged: {problem}; evaluate a checkpoint's policy instead "
                            f"(fastbond eval {run_path} --policy {run_path}/checkpoints/step-…/policy)")
    device = resolve_device(config.device)
    prepare_process(config, device, config.seed)
    models = judged_models(config, policy_dir, device)
    data = config.data
    prompts = render_prompts(prompts_for(data, "eval")[: config.evaluation.max_prompts], models.tokenizer,
                             data.chat_template, f"data.eval_prompts ({data.eval_prompts})")
    result = write_evaluation(run_path / EVAL_FILE, evaluate_models(models, config, prompts), config.on_nonfinite)
    print(format_evaluation(result))
    return result
