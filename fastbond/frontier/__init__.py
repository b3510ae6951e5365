"""`fastbond frontier`: the reward/KL trade-off of several methods on one world, in one picture.

Trains a grid of runs of one config (`frontier.runs`: J-BOND, REINFORCE at several β_RL,
BOND-N, vBoN, BoNBoN, …), judges each run's policy at its checkpoints along the way (reward of
one sample and KL(π‖π_ref) on held-out prompts, with 95% confidence intervals), and draws every
run's path beside the Best-of-N curve of π_ref. Modules, in the order the command uses them:

    grid.py      the runs: one config, each run's overrides, checkpoints at the points
    runs.py      training a run, or resuming it, or skipping it when its points are saved
    points.py    judging a policy: reward and KL with their intervals
    bon_curve.py Best-of-N of π_ref: unbiased rewards, the KL bound and a KL estimate
    verdict.py   what the numbers say: J-BOND against REINFORCE, each run against Best-of-N
    plot.py      the PNG; table.py: results.json and results.md
    command.py   the command line
"""
