"""DeepSpeed ZeRO 0-3 over K ranks behind the engine seam: `DeepSpeedEngine`.

Launch with `deepspeed --num_gpus K --module fastbond train CONFIG` and
`engine.zero_stage: 0|1|2|3` (plus `offload_optimizer`, `offload_params`).
Every rank runs the same training loop on `rollout.batch_size / K` prompts of
each step; gradients are averaged over ranks, so a step is the one-process
step on the whole batch.

    engine.py     the seam (`DeepSpeedEngine`): models placed for this rank, the step's collectives,
                  checkpoints, export
    config.py     the DeepSpeed JSON of a fastbond config (a user file merged over it)
    zero.py       the ZeRO machinery: the policy's optimizer, the anchor partitioned like the policy
                  (shard-local EMA, no communication), sampling and export under ZeRO-3

This package is the only part of fastbond that imports deepspeed (engine.py
and zero.py; config.py does not, so the config can be built and tested
without it). How ZeRO-3 is handled (the fused LM head, the anchor's shards,
generation) is described in `zero.py` and in docs/deepspeed.md.
"""
