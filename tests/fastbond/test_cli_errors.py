"""Every mistake a user can make with `fastbond train` is one line on stderr and exit status 2.

Each case runs the real command line in-process (`fastbond.cli.main`) and checks
that stderr holds exactly one line, "fastbond train: error: ...", naming the
key, file, line or scorer at fault, and no traceback. Cases that get past the
config load the embedded π_ref (built once per session by conftest) and stop at
set-up or in the first rollout, so each takes well under a second.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest

from fastbond.cli import main

_module_names = (f"fastbond_cli_rewards_{i}" for i in itertools.count())


def tiny(tmp_path) -> list[str]:
    """Overrides keeping any run that gets that far to a couple of seconds on 2 cores."""
    return [
        "steps=2",
        "rollout.batch_size=4",
        "rollout.max_new_tokens=8",
        "evaluation.at_end=false",
        "logging.progress=false",
        "cpu_threads=1",
        f"run_dir={tmp_path / 'run'}",
    ]


def run_train(capsys, args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `fastbond train ARGS`."""
    capsys.readouterr()  # drop anything printed before
    status = main(["train", *args])
    return status, capsys.readouterr().err


def assert_one_line_error(status: int, err: str, *fragments: str) -> str:
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("fastbond train: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """Writes a module of reward functions into tmp_path (put on sys.path); returns its import name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = next(_module_names)  # a fresh name each time: sys.modules caches imports
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# ---------------------------------------------------------------------------
# the config: keys, ranges, files (nothing is loaded)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["stepz=2"], ["unknown config key 'stepz'", "did you mean 'steps'"]),
        (["algorithm.bta=0.5"], ["unknown config key 'algorithm.bta'", "did you mean 'algorithm.beta'"]),
        (["algoritm.beta=0.5"], ["unknown config key 'algoritm'", "did you mean 'algorithm'"]),
        (["optim.learning_rate=1e-5"], ["unknown config key 'optim.learning_rate'"]),
        (["algorithm.beta=1.5"], ["'algorithm.beta' must lie in [0, 1], got 1.5"]),
        (["algorithm.beta=-0.1"], ["'algorithm.beta' must lie in [0, 1], got -0.1"]),
        (["algorithm.beta=.nan"], ["'algorithm.beta' must lie in [0, 1], got nan"]),
        (["algorithm.eta=1.01"], ["'algorithm.eta' must lie in [0, 1], got 1.01"]),
        (["algorithm.eta=-0.5"], ["'algorithm.eta' must lie in [0, 1], got -0.5"]),
        (["algorithm.name=rloo", "algorithm.gamma=2"], ["'algorithm.gamma' is not used by algorithm rloo"]),
        (["algorithm.gamma=-1"], ["'algorithm.gamma' must be >= 0, got -1.0"]),
        (["algorithm.gamma=-.inf"], ["'algorithm.gamma' must be >= 0, got -inf"]),
        (["model.policy=/nope"], ["'model.policy': path not found: /nope"]),
        (["model.reference=/nope"], ["'model.reference': path not found: /nope"]),
        (["data.prompts=/nope.jsonl"], ["'data.prompts': path not found: /nope.jsonl"]),
        (["data.eval_prompts=/nope.jsonl"], ["'data.eval_prompts': path not found: /nope.jsonl"]),
        (["reward.kind=model", "reward.name=/nope"], ["'reward.name': path not found: /nope"]),
        (["on_nonfinite=ignore"], ["'on_nonfinite' must be one of skip, stop"]),
        (["seed=-1"], ["config key 'seed' must lie in [0, 2**63), got -1"]),
        (["cpu_threads=100000"], ["config key 'cpu_threads' must lie in [0, 1024]", "got 100000"]),
        (["run_dir="], ["config key 'run_dir' must name a directory (got an empty string)"]),
        (["model.attn_implementation=flash"], ["'model.attn_implementation' must be one of auto, eager, sdpa"]),
        (["checkpoint.resume=latest"], ["'checkpoint.resume' must be one of false, true, previous; got 'latest'"]),
    ],
)
def test_config_mistakes_in_overrides(capsys, tmp_path, overrides, fragments):
    status, err = run_train(capsys, tiny(tmp_path) + overrides)
    assert_one_line_error(status, err, *fragments)


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("step: 2\n", ["unknown config key 'step'", "did you mean 'steps'"]),
        ("algorithm:\n  name: jbond\n  bta: 0.5\n", ["unknown config key 'algorithm.bta'", "'algorithm.beta'"]),
        ("algorithm:\n  etta: 0.1\n", ["unknown config key 'algorithm.etta'", "did you mean 'algorithm.eta'"]),
        ("anchor:\n  eta: 0.1\n", ["config section 'anchor' has moved: anchor.eta is now algorithm.eta"]),
        ("algorithm:\n  beta: 2\n", ["'algorithm.beta' must lie in [0, 1], got 2.0"]),
        ("algorithm:\n  eta: 1.5\n", ["'algorithm.eta' must lie in [0, 1], got 1.5"]),
        ("algorithm:\n  name: vbon\n  gamma: 1\n", ["'algorithm.gamma' is not used by algorithm vbon"]),
        ("algorithm:\n  gamma: -0.25\n", ["'algorithm.gamma' must be >= 0, got -0.25"]),
        ("model:\n  policy: /nope\n", ["'model.policy': path not found: /nope"]),
        ("data:\n  prompts: /nope.jsonl\n", ["'data.prompts': path not found: /nope.jsonl"]),
        ("steps: 2\nalgorithm:\n  beta: [0.5\n", ["run.yaml line 4 is not valid YAML"]),
        ("- steps\n", ["run.yaml must hold a mapping at the top level"]),
        ("steps: 2\noptim:\n  lr: 1.0e-5\n  lr: 3.0e-6\n",
         ["run.yaml: key 'lr' appears twice in section optim (lines 3 and 4); keep one"]),
        ("logging:\n  on: true\n", ["run.yaml line 2: key 'on' in section logging was read by YAML as the boolean"]),
        ("1: 2\n", ["run.yaml line 1: key 1 at the top level is not a name"]),
    ],
)
def test_config_mistakes_in_the_yaml_file(capsys, tmp_path, text, fragments):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    status, err = run_train(capsys, [str(path)] + tiny(tmp_path))
    assert_one_line_error(status, err, *fragments)


def test_force_sets_checkpoint_overwrite_wherever_it_stands(capsys, tmp_path):
    """--force (checkpoint.overwrite=true) with checkpoint.resume: refused before anything loads."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: 2\n")
    status, err = run_train(capsys, [str(path), "--force", *tiny(tmp_path), "checkpoint.resume=true"])
    assert_one_line_error(status, err, "checkpoint.overwrite=true (--force) starts over; "
                                       "it cannot be combined with checkpoint.resume")
    status, err = run_train(capsys, ["checkpoint.resume=previous", "--force"])
    assert_one_line_error(status, err, "checkpoint.overwrite=true (--force) starts over")


def test_run_dir_inside_a_file(capsys, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    status, err = run_train(capsys, tiny(tmp_path) + [f"run_dir={taken}/run"])
    assert_one_line_error(status, err, f"config key 'run_dir': {taken} is a file, not a directory")


def test_yaml_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"steps: 2\nrun_dir: caf\xe9\n")
    status, err = run_train(capsys, [str(path)])
    assert_one_line_error(status, err, f"config file {path} is not valid UTF-8")


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    status, err = run_train(capsys, [str(missing), "steps=2"])
    assert_one_line_error(status, err, f"config file not found: {missing}")


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    status, err = run_train(capsys, tiny(tmp_path) + [f"model.policy={empty}"])
    assert_one_line_error(status, err, "'model.policy'", str(empty), "no config.json")


def test_config_errors_come_from_a_real_process_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastbond", "train", "algorithm.beta=2"],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    expected = "fastbond train: error: config key 'algorithm.beta' must lie in [0, 1], got 2.0"
    assert result.stderr.splitlines() == [expected]
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# prompt files (read after the models load)


def test_empty_prompt_file(capsys, tmp_path, embedded_reference):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n\n")
    status, err = run_train(capsys, tiny(tmp_path) + [f"data.prompts={prompts}"])
    assert_one_line_error(status, err, f"prompt file {prompts} holds no prompts")


def test_malformed_prompt_file_names_the_line(capsys, tmp_path, embedded_reference):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the plot was"}\n{"prompt": "the cast was"}\n{"prompt": "the music was"\n')
    status, err = run_train(capsys, tiny(tmp_path) + [f"data.prompts={prompts}"])
    assert_one_line_error(status, err, f"{prompts} line 3: not valid JSON")


def test_prompt_file_that_is_not_utf8_names_the_line(capsys, tmp_path, embedded_reference):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "the plot was"}\n{"prompt": "the caf\xe9 was"}\n')
    status, err = run_train(capsys, tiny(tmp_path) + [f"data.eval_prompts={prompts}"])
    assert_one_line_error(status, err, f"{prompts} line 2: not valid UTF-8")


@pytest.mark.parametrize("key", ["data.prompts", "data.eval_prompts"])
def test_prompt_over_the_token_limit_names_file_and_prompt(capsys, tmp_path, embedded_reference, key):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the plot was\n" + "the plot was good and " * 10 + "\nthe cast was\n")
    status, err = run_train(capsys, tiny(tmp_path) + [f"{key}={prompts}", "data.max_prompt_tokens=8"])
    assert_one_line_error(status, err, f"{key} ({prompts})", "prompt 2 has", "data.max_prompt_tokens=8")


# ---------------------------------------------------------------------------
# the reward: a user's function that fails, a reward model that cannot read the policy's tokens


@pytest.mark.parametrize(
    "body, fragments",
    [
        ("return [0.0] * (len(responses) - 1)", ["returned shape (", "expected ("]),
        ("return torch.zeros(len(responses), 2)", [", 2), expected ("]),
        ("return None", ["returned NoneType, expected"]),
        ("return ['good'] * len(responses)", ["returned list, expected"]),
    ],
)
def test_failing_reward_function(capsys, tmp_path, embedded_reference, reward_module, body, fragments):
    name = reward_module(f"import torch\n\ndef score(prompts, responses):\n    {body}\n")
    overrides = ["reward.kind=callable", f"reward.name={name}:score"]
    status, err = run_train(capsys, tiny(tmp_path) + overrides)
    assert_one_line_error(status, err, f"reward function {name}:score", *fragments)


def test_reward_function_that_raises_shows_its_traceback_and_saves_the_last_step(
        capsys, tmp_path, embedded_reference, reward_module):
    """User code failing mid-run: its traceback, exit 1, the last completed step saved, how to
    resume; resuming with the fixed function continues exactly as a run that never failed."""
    from safetensors.torch import load_file

    good = reward_module("from fastbond.rewards import sentiment\n\ndef score(prompts, responses):\n"
                         "    return sentiment(prompts, responses)\n")
    # J-BOND scores twice a step (anchor samples, then the policy sample): call 5 opens step 3.
    flaky = reward_module("from fastbond.rewards import sentiment\ncalls = 0\n\n"
                          "def score(prompts, responses):\n    global calls\n    calls += 1\n"
                          "    if calls == 5:\n        raise RuntimeError('kaboom\\nsecond line')\n"
                          "    return sentiment(prompts, responses)\n")
    run_dir = tmp_path / "run"
    base = tiny(tmp_path) + ["steps=4", "reward.kind=callable"]
    status, err = run_train(capsys, base + [f"reward.name={flaky}:score"])
    assert status == 1
    assert "Traceback" in err and "RuntimeError: kaboom" in err and f"{flaky}.py" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastbond train: error: step 3 failed (traceback above); saved the last completed step")
    assert "checkpoint.resume=true" in last and str(run_dir) in last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"

    status, err = run_train(capsys, base + [f"reward.name={good}:score", "checkpoint.resume=true"])
    assert status == 0, err
    straight = tmp_path / "straight"
    status, err = run_train(capsys, base + [f"reward.name={good}:score", f"run_dir={straight}"])
    assert status == 0, err
    resumed, expected = load_file(str(run_dir / "policy" / "model.safetensors")), load_file(
        str(straight / "policy" / "model.safetensors"))
    assert all(torch_equal(resumed[name], expected[name]) for name in expected)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_reward_function_raising_in_the_first_step_says_there_is_nothing_to_resume(
        capsys, tmp_path, embedded_reference, reward_module):
    name = reward_module("def score(prompts, responses):\n    raise ValueError('bad input')\n")
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=callable", f"reward.name={name}:score"])
    assert status == 1 and "ValueError: bad input" in err and "Traceback" in err
    assert err.strip().splitlines()[-1].endswith("no step had completed, so there is nothing to resume: "
                                                 "rerun from the start once fixed")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wrong_length_reward_names_both_lengths(capsys, tmp_path, embedded_reference, reward_module):
    name = reward_module("def score(prompts, responses):\n    return [0.0] * (len(responses) + 3)\n")
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=callable", f"reward.name={name}:score"])
    line = assert_one_line_error(status, err, f"reward function {name}:score returned shape")
    got, expected = map(int, re.search(r"shape \((\d+),\), expected \((\d+),\);", line).groups())
    assert got == expected + 3


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:score", "module 'no_such_module_xyz' not found"),
        ("{name}:missing", "module '{name}' has no attribute 'missing'"),
    ],
)
def test_reward_function_that_cannot_be_found(capsys, tmp_path, embedded_reference, reward_module, spec, fragment):
    name = reward_module("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    spec, fragment = spec.format(name=name), fragment.format(name=name)
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=callable", f"reward.name={spec}"])
    assert_one_line_error(status, err, f"reward function {spec}", fragment)


def _save_reward_model(path, vocab_size: int, tokenizer=None):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def test_reward_model_without_tokenizer_smaller_than_the_policy_vocabulary(capsys, tmp_path, embedded_reference):
    from fastbond.embedded import load_reference

    _, policy_tokenizer = load_reference(embedded_reference)
    model_dir = _save_reward_model(tmp_path / "rm", len(policy_tokenizer) - 10)
    assert not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists()
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=model", f"reward.name={model_dir}"])
    assert_one_line_error(
        status, err, "policy/reward tokenizer mismatch", str(model_dir),
        f"embeds {len(policy_tokenizer) - 10} tokens", f"has {len(policy_tokenizer)}",
    )  # fmt: skip


def test_reward_model_whose_own_tokenizer_outgrows_its_embeddings(capsys, tmp_path, embedded_reference):
    from fastbond.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra_0>", "<extra_1>", "<extra_2>"])
    model_dir = _save_reward_model(tmp_path / "rm", len(tokenizer) - 3, tokenizer)
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=model", f"reward.name={model_dir}"])
    assert_one_line_error(
        status, err, "policy/reward tokenizer mismatch", str(model_dir),
        f"embeds {len(tokenizer) - 3} tokens but its tokenizer has {len(tokenizer)}",
    )  # fmt: skip


# ---------------------------------------------------------------------------
# library warnings: kept in run_dir/warnings.log, out of the one-line error and the progress bar


NOISY = ("import logging, warnings\nfrom fastbond.rewards import sentiment\n\n"
         "def score(prompts, responses):\n"
         "    warnings.warn('a library UserWarning', UserWarning)\n"
         "    logging.getLogger('transformers.generation').warning('a transformers logger warning')\n"
         "    logging.getLogger('torch.distributed').warning('a torch logger warning')\n"
         "    {ending}\n")


def test_library_warnings_go_to_the_run_log_not_around_the_error(capsys, tmp_path, embedded_reference,
                                                                 reward_module):
    import warnings

    shown_before = warnings.showwarning
    name = reward_module(NOISY.format(ending="return [0.0] * (len(responses) - 1)"))
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=callable", f"reward.name={name}:score"])
    assert_one_line_error(status, err, f"reward function {name}:score", "returned shape (")
    log = (tmp_path / "run" / "warnings.log").read_text()
    for text in ("UserWarning: a library UserWarning", "a transformers logger warning", "a torch logger warning"):
        assert text in log
    assert warnings.showwarning is shown_before  # the run put everything back

    # a run that succeeds, progress bar on: the bar's lines hold no warning
    name = reward_module(NOISY.format(ending="return sentiment(prompts, responses)"))
    status, err = run_train(capsys, tiny(tmp_path) + ["reward.kind=callable", f"reward.name={name}:score",
                                                      "logging.progress=true", f"run_dir={tmp_path / 'ok'}"])
    assert status == 0, err
    assert "warning" not in err.lower() and "2/2" in err, err
    assert "a torch logger warning" in (tmp_path / "ok" / "warnings.log").read_text()
