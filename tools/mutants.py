"""Deliberate bugs in the algorithms, the anchor, the objectives, LoRA, the static sampler, the fault handling,
the prompt datasets, chat prompts, pairwise judges, the metrics logs and runs over several processes, and the
tests that catch them.

    python tools/mutants.py            # every mutant (the last three, on 2 ranks, took 11.5 min on 2 cores)
    python tools/mutants.py 3 7        # mutants 3 and 7

Each mutant edits one line of the source, runs the algorithm and loss tests
(stopping at the first failure), then restores the file. A mutant no test
kills is a hole in the suite: the script exits non-zero and names it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/fastbond/algorithms", "tests/fastbond/test_losses.py", "tests/fastbond/test_train.py"]
RELIABILITY = ["tests/fastbond/test_reliability.py"]
LORA = ["tests/fastbond/test_lora.py", "-k", "not reaches_the_reward"]  # the 40-step reward run aside
ROLLOUT = ["tests/fastbond/rollout", "-m", "not slow and not vllm"]
DATA = ["tests/fastbond/test_prompt_datasets.py", "tests/fastbond/test_data.py"]
LOGGING = ["tests/fastbond/test_logging.py"]
CHAT = ["tests/fastbond/test_chat.py"]
JUDGES = ["tests/fastbond/test_judges.py", "tests/fastbond/algorithms/test_jbond.py"]
NODES = ["tests/distributed/test_two_nodes.py"]
CACHE = ["tests/fastbond/embedded/test_embedded.py", "-k", "processes_sharing"]
FAULTS = ["tests/distributed/test_faults.py", "-k", "reward_raising"]

# (file, the exact text, its replacement, what the bug means[, the tests to run: TESTS by default])
MUTANTS = [
    ("fastbond/algorithms/jbond.py", "best = best_of_n_index(anchor_rewards)",
     "best = 1 - best_of_n_index(anchor_rewards)", "J-BOND distils the worse anchor sample"),
    ("fastbond/algorithms/jbond.py", "ctx.anchor.update(ctx.policy, self.config.eta)", "pass",
     "J-BOND's anchor is frozen"),
    ("fastbond/algorithms/jbond.py", "ctx.draw_k(ctx.anchor.model, prompts, 2)", "ctx.draw_k(ctx.policy, prompts, 2)",
     "J-BOND's anchor samples come from the policy"),
    ("fastbond/algorithms/jbond.py", "ctx.frozen_logps(ctx.anchor.model, policy_samples)",
     "ctx.frozen_logps(ctx.reference, policy_samples)", "J-BOND's log-ratio is taken to π_ref, not the anchor"),
    ("fastbond/algorithms/bond.py", "best_of_n_index(base_rewards[:, :n])", "best_of_n_index(base_rewards)",
     "BOND-N's forward term takes the best of all k base samples, not of the first N"),
    ("fastbond/algorithms/bond.py", "base_rewards[:, : self.config.mc_samples]", "base_rewards",
     "BOND-N's quantiles use every base sample, not the first mc_samples"),
    ("fastbond/algorithms/bond.py", "step % self.config.anchor_period == 0", "step % self.config.anchor_period == 1",
     "iterative BOND's anchor period is off by one"),
    ("fastbond/algorithms/bonbon.py", "best_of_n_index(-rewards)", "best_of_n_index(rewards)",
     "BoNBoN's rejected sample is the best, not the worst"),
    ("fastbond/algorithms/vbon.py", "ctx.draw_k(ctx.reference, prompts, self.config.mc_samples)",
     "ctx.draw_k(ctx.policy, prompts, self.config.mc_samples)", "vBoN's CDF is the policy's, not π_ref's"),
    ("fastbond/algorithms/rloo.py", "ctx.frozen_logps(ctx.reference, drawn)", "ctx.frozen_logps(ctx.policy, drawn)",
     "REINFORCE's KL penalty is taken against the policy itself"),
    ("fastbond/anchor.py", "ema_(self.state, [p.detach() for p in policy.parameters()], eta, shadow=self.shadow)",
     "ema_(self.state, [p.detach() for p in policy.parameters()], 1 - eta, shadow=self.shadow)",
     "the anchor moves by 1 − η instead of η"),
    ("fastbond/anchor.py", "        self.update(policy, 1.0)\n\n    def state_dict(",
     "        self.update(policy, 0.5)\n\n    def state_dict(", "a hard anchor update copies only half way"),
    ("fastbond/losses.py", "* log_quantiles.detach().to(log_ratio.dtype) - log_ratio",
     "* log_quantiles.detach().to(log_ratio.dtype) + log_ratio", "BOND-N's return adds the KL instead of subtracting it"),
    ("fastbond/losses.py", "advantages = returns - leave_one_out_baseline(returns, dim=1)",
     "advantages = returns - returns.mean(dim=1, keepdim=True)", "REINFORCE's baseline includes the sample itself"),
    ("fastbond/losses.py", "target = 1.0 / (2.0 * bonbon_beta(n))", "target = 1.0 / bonbon_beta(n)",
     "BoNBoN's margin target is twice the paper's"),
    ("fastbond/losses.py", "returns = bond_returns(policy_seq, ref_seq, bond_rewards, n)\n    advantages = returns - _baseline(returns, batch_sum)",
     "returns = bond_returns(policy_seq, ref_seq, bond_rewards, n)\n    advantages = returns",
     "BOND-N has no baseline"),
    ("fastbond/kernels/jbond_loss.py", "    anchor_kl_term = log_ratio * policy_seq\n", "    anchor_kl_term = -log_ratio * policy_seq\n",
     "J-BOND's γ term has the sign printed in Algorithm 2 (pushes away from the anchor)"),
    ("fastbond/kernels/jbond_loss.py", "    forward_term = -best_anchor_seq\n", "    forward_term = -best_anchor_seq.detach()\n",
     "J-BOND's forward term carries no gradient"),
    # LoRA (docs/lora.md): each runs the LoRA tests
    ("fastbond/lora.py", "self._setup(adapter_parameters(wrapped, POLICY), adapter_parameters(wrapped, ANCHOR),",
     "self._setup(adapter_parameters(wrapped, ANCHOR), adapter_parameters(wrapped, POLICY),",
     "LoRA's EMA runs backwards: the policy adapter follows the anchor's", LORA),
    ("fastbond/lora.py", "with self.wrapped.disable_adapter():", "with nullcontext():",
     "LoRA's π_ref keeps the policy adapter on", LORA),
    ("fastbond/lora.py", "                self.wrapped.set_adapter(POLICY)  # and the policy's trainable flags with it",
     "                pass", "after an anchor draw LoRA trains the anchor adapter", LORA),
    ("fastbond/lora.py", "        merged = merged + head.get_delta_weight(adapter)", "        merged = merged",
     "the fused ops read an adapted LM head without its adapter", LORA),
    ("fastbond/lora.py", "merged = _whole(param).float() + layer.get_delta_weight(adapter).float()",
     "merged = _whole(param).float()", "LoRA's export and vLLM pushes leave the adapter out", LORA),
    ("fastbond/lora.py", "            save_policy_adapter(self.wrapped, Path(path), models.tokenizer, state=state)",
     "            placer.write_pretrained(models.policy, Path(path), models.tokenizer)",
     "a LoRA checkpoint holds the whole base", LORA),
    # the static sampler (docs/rollouts.md): each runs the rollout tests
    ("fastbond/rollout/decode.py", "position_ids=(positions + fed)[:, None]",
     "position_ids=(positions + fed + 1)[:, None]", "the static sampler feeds each token one position late", ROLLOUT),
    ("fastbond/rollout/decode.py", "return self.pick(logits, row_keys, fed + 1)",
     "return self.pick(logits, row_keys, fed)", "the static sampler draws each token with the previous token's noise",
     ROLLOUT),
    ("fastbond/rollout/decode.py", "next_positions[keep], row_keys[keep]",
     "next_positions[keep], row_keys[: len(keep)]",
     "after finished rows leave, the rows left draw with other rows' keys", ROLLOUT),
    ("fastbond/rollout/decode.py", "positions.masked_fill_(prompt_mask == 0, 1)", "pass",
     "the static sampler counts positions over the left padding", ROLLOUT),
    ("fastbond/rollout/static_sampler.py", "            self.copy.stale()", "            pass",
     "the sampling copy keeps the policy's weights from before the update", ROLLOUT),
    ("fastbond/rollout/keyed.py", "    return (x * constant) & _MASK32", "    return (x * constant) & 0x7FFFFFFF",
     "the keyed hash drops a bit of its products", ROLLOUT),
    # chat prompts (docs/prompts.md)
    ("fastbond/chat.py", "tokenize=False, add_generation_prompt=True)", "tokenize=False, add_generation_prompt=False)",
     "chat prompts are rendered without the generation prompt", CHAT),
    ("fastbond/chat.py", "add_special_tokens=not rendered", "add_special_tokens=True",
     "a rendered chat prompt gets a second BOS", CHAT),
    ("fastbond/rewards.py", "chat = conversation(prompt) + [", "chat = [{'role': 'user', 'content': prompt}] + [",
     "the reward model reads the policy's rendering as one user turn, not the messages", CHAT),
    # pairwise judges (docs/judges.md): each runs the judge tests
    ("fastbond/algorithms/jbond.py", "torch.stack([between_anchors > 0, between_anchors < 0], dim=-1)",
     "torch.stack([between_anchors > 0, between_anchors <= 0], dim=-1)",
     "under a judge, a tie between the anchor samples distils the second", JUDGES),
    ("fastbond/algorithms/jbond.py", "lost_both = (against_first < 0) & (against_second < 0)",
     "lost_both = (against_first <= 0) & (against_second <= 0)",
     "under a judge, a tie with an anchor sample counts as worse", JUDGES),
    ("fastbond/algorithms/jbond.py", "judge(prompts.texts * 3, first + policy + policy, second + first + second)",
     "judge(prompts.texts * 3, first + first + policy, second + policy + second)",
     "under a judge, one policy comparison is asked the wrong way round", JUDGES),
    ("fastbond/judges.py", "rounds[p][-1].append(right if outcome < 0 else left)",
     "rounds[p][-1].append(right if outcome <= 0 else left)", "the knockout sends the second through on a tie", JUDGES),
    ("fastbond/judges.py", "            values = values - 0.5\n", "", "a judge's P(a ≻ b) is read as a sign", JUDGES),
    ("fastbond/evaluate.py", "rounds[i][n.bit_length() - 1][j % (largest // n)]", "rounds[i][n.bit_length() - 1][0]",
     "every policy sample meets the first bracket's Best-of-N", JUDGES),
    # reliability (docs/reliability.md): each runs the fault tests
    ("fastbond/checkpoint.py", "found, key=checkpoint_step)", "found, key=lambda p: p.name)",
     "checkpoints are ordered by name", RELIABILITY),
    ("fastbond/run_dir.py", "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
     "a run directory is not locked", RELIABILITY),
    ("fastbond/run_dir.py", "            if not overwrite:\n", "            if False:\n",
     "a fresh run writes over an earlier run", RELIABILITY),
    ("fastbond/checkpoint.py", "    for path in weights:\n        problem = safetensors_damage(path)",
     "    for path in weights:\n        problem = None", "a truncated checkpoint is not noticed", RELIABILITY),
    ("fastbond/metrics_log.py", "                break  # torn by a crash", "                raise  # torn by a crash",
     "a torn metrics line stops the resume", RELIABILITY),
    ("fastbond/resume.py", '    "algorithm.name": ', '    "algorithm.name_": ', "a resume may switch algorithms",
     RELIABILITY),
    ("fastbond/run_dir.py", "        if meaning is None:\n            raise", "        if True:\n            raise",
     "a full disk is a traceback", RELIABILITY),
    ("fastbond/evaluate.py", "        found.append(key)\n        return None",
     "        found.append(key)\n        return value", "eval.json keeps a NaN result", RELIABILITY),
    ("fastbond/prompt_datasets.py", 'DEFAULT_SPLITS = {"train": ("train",), "eval": ("test", "validation")}',
     'DEFAULT_SPLITS = {"train": ("train",), "eval": ("train", "test", "validation")}',
     "the evaluation reads a dataset's training split", DATA),
    ("fastbond/prompt_datasets.py", '(_first(pc.is_null(column)), "is missing"), (_first(blank), "is empty")',
     '(_first(pc.is_null(column)), "is missing")', "an empty prompt in a dataset passes", DATA),
    ("fastbond/prompt_datasets.py", "return self._rows[index % len(self)][self.field]",
     "return self._rows[(index + 1) % len(self)][self.field]", "a dataset's rows are read one off", DATA),
    ("fastbond/prompt_datasets.py", 'if not (pa.types.is_list(kind) or pa.types.is_large_list(kind))',
     'if not pa.types.is_large_list(kind)', "chat messages in a dataset are refused", DATA),
    ("fastbond/data.py", 'order = array("q", range(len(self.prompts)))',
     'order = array("q", range(len(self.prompts)))[::-1]',
     "the prompt order differs from the one earlier checkpoints index", DATA),
    ("fastbond/data.py", "    if is_dataset(path):\n        return open_prompts(",
     "    if False:\n        return open_prompts(", "a dataset is read as a text prompt file", DATA),
    ("fastbond/data.py", "rows = sorted(random.Random(0).sample(rows, FULL_LENGTH_CHECK))", "pass",
     "start-up tokenizes every prompt of a huge set", DATA),
    ("fastbond/resume.py", 'digest.update((("\\n\\x00" if start else "") + texts).encode("utf-8"))',
     'digest.update(texts.encode("utf-8"))', "the fingerprint drops the separator between slices", DATA),
    ("fastbond/metrics_log.py", "self._tb.add_scalar(key, value, step)",
     'self._tb.add_scalar("kl" if key == "kl_ref" else key, value, step)',
     "TensorBoard logs kl_ref under another name", LOGGING),
    ("fastbond/metrics_log.py", "self._wandb.log(record, step=step)",
     'self._wandb.log({("kl" if k == "kl_ref" else k): v for k, v in record.items()}, step=step)',
     "wandb logs kl_ref under another name", LOGGING),
    ("fastbond/metrics_log.py", 'purge_step=purge)', 'purge_step=None)',
     "a resumed run shows the steps after its checkpoint twice in TensorBoard", LOGGING),
    # many processes (docs/deepspeed.md): each runs 2 processes, ranks or a node's cache builders
    ("fastbond/train.py", "    if run.engine.main:\n        finish(run)", "    if True:\n        finish(run)",
     "every rank writes the report into the run directory", NODES),
    ("fastbond/embedded/reference.py", "        fcntl.flock(handle, fcntl.LOCK_EX)\n", "",
     "the ranks of a node build the embedded model's cache at once", CACHE),
    ("fastbond/train.py", "failure = engine.first_failure(hold.failure(engine.rank))",
     "failure = hold.failure(engine.rank)", "a rank's failed rollout is not told to the others", FAULTS),
]


def run(index: int) -> tuple[str | None, str]:
    path, old, new, meaning, *tests = MUTANTS[index]
    file = ROOT / path
    source = file.read_text()
    if source.count(old) != 1:  # the source moved on: the mutant needs updating, and counts as a hole
        return None, f"{meaning} (NOT APPLIED: its text occurs {source.count(old)} times in {path})"
    file.write_text(source.replace(old, new))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               *(tests[0] if tests else TESTS)],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        file.write_text(source)
    failed = re.search(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
    return (failed.group(1) if failed else None), meaning


def main(argv: list[str]) -> int:
    indices = [int(a) for a in argv] or range(len(MUTANTS))
    survivors = []
    for index in indices:
        killer, meaning = run(index)
        print(f"{index:2d}  {meaning}\n    {MUTANTS[index][0]}: caught by {killer or 'NOTHING'}", flush=True)
        if killer is None:
            survivors.append(index)
    if survivors:
        print(f"survived: {survivors}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
