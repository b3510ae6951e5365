"""The `fastbond` command line.

Subcommands import their modules lazily so `fastbond --help` is instant and
a missing optional dependency only matters for the command that needs it.

How a failure is shown (`fastbond.errors`): a `FastbondError` (a user's
mistake) prints one line and exits with status 2; the user's own code failing
(`UserCodeError`, or any exception inside a training step) prints its
traceback and exits with status 1; a failed step adds what was saved and how
to resume. Under DeepSpeed only the main rank shows a failed step; every
rank exits with its status (`ShownByMainRank`).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fastbond import __version__
from fastbond.errors import FastbondError, ShownByMainRank, StepFailed, UserCodeError


def _run_lab(argv: list[str]) -> int:
    from fastbond.lab import experiments as lab_experiments

    return lab_experiments.main(argv) or 0


def _run_frontier(argv: list[str]) -> int:
    from fastbond.frontier.command import main as frontier_main

    return frontier_main(argv)


TRAIN_EPILOG = """\
examples:
  fastbond train                                  # the embedded default: a tiny LM, built locally, ~minutes on CPU
  fastbond train examples/gemma-2b-jbond.yaml     # a real run
  fastbond train run.yaml algorithm.beta=0.5 algorithm.eta=0.05 optim.lr=3e-6
  fastbond train algorithm.name=rloo algorithm.beta_rl=0.05   # another algorithm, from its own defaults
  fastbond train run.yaml checkpoint.resume=true  # continue from the run directory's latest checkpoint
  fastbond train run.yaml --force                 # start over, deleting the run directory's earlier run
  deepspeed --num_gpus 8 --module fastbond train examples/gemma-7b-zero3.yaml   # DeepSpeed ZeRO over 8 GPUs

config sections: model, reward, data, algorithm, optim, rollout, engine, logging, checkpoint, evaluation
(every key and its default: docs/config.md; the algorithm section's keys depend on algorithm.name)
"""


def _config_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", help="YAML config file (omit for the embedded default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-6")
    return parser


def _split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # argparse can't tell "CONFIG key=value" from "key=value key=value": a first
    # positional holding '=' is an override, not a file.
    if args.config is not None and "=" in args.config:
        return None, [args.config] + args.overrides
    return args.config, args.overrides


def _run_train(argv: list[str]) -> int:
    parser = _config_parser(
        "fastbond train",
        "Train a policy to be its own Best-of-N (J-BOND by default). With no config, trains the "
        "embedded default: a tiny causal LM, tokenizer, prompts and reward all built locally.",
        TRAIN_EPILOG,
    )
    parser.add_argument("--force", action="store_true",
                        help="start over in a run directory that holds an earlier run (checkpoint.overwrite=true)")
    # Intermixed: `run.yaml --force steps=2` would otherwise leave steps=2 unrecognized.
    args = parser.parse_intermixed_args(argv)
    from fastbond.config import load_config
    from fastbond.presets import embedded_preset

    path, overrides = _split_config_args(args)
    if args.force:
        overrides = [*overrides, "checkpoint.overwrite=true"]
    if path is None:
        path = embedded_preset()
    notes: list[str] = []
    config = load_config(path, overrides, notes=notes)
    for note in notes:
        print(f"fastbond train: note: {note}", file=sys.stderr)
    # Imported only once the config is valid: a mistake in it is reported
    # at once, without waiting for torch and transformers to import.
    from fastbond.train import train

    train(config)
    return 0


def _run_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastbond eval",
        description="Judge a trained policy on held-out prompts: its reward at one sample, Best-of-N "
        "sampling from π_ref (N = 1..16) with the KL bound log N − (N−1)/N, KL(π‖π_ref) and the win rate.",
    )
    parser.add_argument("run_dir", help="a run directory written by `fastbond train` (config.yaml + policy/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. evaluation.max_prompts=512 data.eval_prompts=held_out.jsonl")
    parser.add_argument("--policy", help="policy directory to judge (default: RUN_DIR/policy)")
    args = parser.parse_args(argv)
    from fastbond.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.overrides, args.policy)
    return 0


def merge_run(run_dir: Path, out: Path, policy_dir: Path | None = None) -> Path:
    """`fastbond merge`: a checkpoint's policy (the latest, or `policy_dir`) written to `out` as a plain
    transformers model in the run's compute dtype, as the run's policy form merges it (LoRA: the policy
    adapter into the base; a full policy is whole already, and says so)."""
    from fastbond.checkpoint import latest_checkpoint
    from fastbond.config import load_config
    from fastbond.models import make_form

    if not (run_dir / "config.yaml").is_file():
        raise FastbondError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml", ["checkpoint.resume=false"])
    form = make_form(config)
    if policy_dir is None:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise FastbondError(f"{run_dir} has no checkpoint to merge; name a policy directory with --policy")
        policy_dir = checkpoint / "policy"
    return form.merge(config, Path(policy_dir), out, run_dir)



def _run_merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastbond merge",
        description="Write a LoRA run's policy adapter merged into its base as a plain transformers model "
        "(safetensors): what `fastbond train` exports at the end, for any checkpoint.",
    )
    parser.add_argument("run_dir", help="a LoRA run directory written by `fastbond train` (config.yaml)")
    parser.add_argument("out", help="directory to write the merged model to (replaced atomically)")
    parser.add_argument("--policy", help="the adapter directory to merge (default: the latest checkpoint's policy/)")
    args = parser.parse_args(argv)
    out = merge_run(Path(args.run_dir), Path(args.out), Path(args.policy) if args.policy else None)
    print(f"merged policy written to {out}")
    return 0


def _run_plan(argv: list[str]) -> int:
    parser = _config_parser(
        "fastbond plan",
        "Print the bytes each rank will hold (policy, optimizer, anchor, reference, reward) for a "
        "config on K GPUs, under its ZeRO stage and offload settings, without loading any model.",
        "examples:\n  fastbond plan examples/gemma-7b-zero3.yaml --gpus 8\n"
        "  fastbond plan examples/gemma-7b-zero3.yaml engine.zero_stage=2 --gpus 8\n"
        "  fastbond plan run.yaml --gpus 4 --model /models/my-sft   # size from a local config.json\n",
    )
    parser.add_argument("--gpus", type=int, required=True, help="number of ranks (GPUs) K")
    parser.add_argument("--model", help="size the policy from this preset or directory instead of model.policy")
    parser.add_argument("--reference", help="size the reference from this preset or directory")
    parser.add_argument("--reward", help="size the reward model from this preset or directory")
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB, to say what is left for activations and generation "
                             "(default 80)")
    args = parser.parse_args(argv)
    from fastbond.config import load_config
    from fastbond.memory import format_plan
    from fastbond.plan import comparisons, fit_line, plan_for_config
    from fastbond.presets import embedded_preset

    path, overrides = _split_config_args(args)
    config = load_config(path or embedded_preset(), overrides, check_paths=False)
    specs = dict(model=args.model, reference=args.reference, reward=args.reward)
    plan = plan_for_config(config, args.gpus, **specs)
    print(format_plan(plan, header=f"fastbond plan: {path or 'embedded default'} on {args.gpus} GPU(s)"))
    print(fit_line(plan, args.gpu_gib))
    for line in comparisons(config, plan, args.gpus, args.gpu_gib, **specs):  # LoRA: against every weight trained
        print(line)
    return 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


# name → (one-line help, runner taking the remaining argv)
COMMANDS = {
    "train": ("train a policy (J-BOND, BOND-N, iterative BOND, vBoN, BoNBoN, REINFORCE)", _run_train),
    "eval": ("judge a policy against Best-of-N sampling from π_ref", _run_eval),
    "merge": ("a LoRA checkpoint's policy adapter merged into its base: a plain transformers model", _run_merge),
    "plan": ("per-rank memory of a config on K GPUs (ZeRO stage, offload), without loading models", _run_plan),
    "frontier": (
        "the reward/KL frontier: a grid of runs (J-BOND, REINFORCE, BOND-N, vBoN, BoNBoN) against Best-of-N",
        _run_frontier,
    ),
    "lab": (
        "exact Best-of-N lab: verify the theory and reproduce the BOND paper's figures 2 and 4",
        _run_lab,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastbond",
        description="Best-of-N distillation (BOND, J-BOND) with fused kernels.",
        epilog="Run `fastbond COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastbond {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, _) in COMMANDS.items():
        # add_help=False: the command's own parser answers `--help`.
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    _, runner = COMMANDS[argv[0]]
    try:
        return runner(argv[1:])
    except FastbondError as error:
        print(f"fastbond {argv[0]}: error: {error}", file=sys.stderr)
        return 2
    except StepFailed as failure:
        if failure.trace:  # another rank's
            print(failure.trace, end="", file=sys.stderr)
        else:
            traceback.print_exception(failure.__cause__)
        print(f"fastbond {argv[0]}: error: step {failure.step} failed{failure.where} (traceback above); "
              f"{failure.note}", file=sys.stderr)
        return 1
    except ShownByMainRank as stopped:
        return stopped.status
    except UserCodeError as error:
        traceback.print_exception(error)
        print(f"fastbond {argv[0]}: error: {error} (traceback above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastbond {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
