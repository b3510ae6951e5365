"""The config tree: defaults, YAML, dotted overrides, and one-line errors naming the key."""

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
        (["algorithm.name=bonbon", "algorithm.bonbon_alpha=0.1"], "'algorithm.bonbon_alpha' has moved: use algorithm.alpha"),
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
        (["rollout.sampler=gumbel"], "'rollout.sampler' must be one of"),
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
