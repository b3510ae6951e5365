"""The exact Best-of-N lab: BOND's theory and figures checked where every quantity is exact.

    exact.py        `SequenceLab` (a policy over all 256 sequences of 4 tokens from 4
                    symbols, so π, π_BoN, both KLs and rewards are exact sums) and
                    stochastic J-BOND / BOND trainers on it
    experiments.py  `fastbond lab`: the paper's figures 2 and 4 reproduced, each claim judged
"""
