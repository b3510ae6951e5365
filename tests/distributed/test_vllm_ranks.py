"""rollout.backend=vllm on 2 CPU ranks (DeepSpeed ZeRO-3 over gloo) trains one model.

Each rank builds its own in-process vLLM engine after the process group
exists and pushes its (gathered) weights into it before every draw. Requests
carry the keyed sampler's row keys as seeds, so a row's draw depends neither
on its batch nor on the split over ranks: the 2-rank run must then match the
one-process vLLM run step for step, as the `generate` runs do in
test_train_cli.py. Runs where vLLM and DeepSpeed are both installed
(.ci/vllm_env.sh's environment); skips elsewhere.
"""

from __future__ import annotations

import importlib.util

import pytest

from test_train_cli import deepspeed_train, losses, max_diff, one_process_train, weights

pytest.importorskip("deepspeed")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed here; .ci/run runs these in .ci/vllm_env.sh's environment"),
]

VLLM = ["rollout.backend=vllm", "rollout.vllm.cpu_kv_cache_gib=0.25"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, reference_weights):
    from fastbond.embedded import build_embedded_reference

    root = tmp_path_factory.mktemp("fastbond-cache")
    build_embedded_reference(root, weights=reference_weights)
    return root


def test_two_ranks_with_vllm_rollouts_train_like_one_process(cache, tmp_path):
    one = one_process_train(cache, tmp_path / "one", *VLLM)
    ranks = deepspeed_train(cache, tmp_path / "ranks", "engine.zero_stage=3", *VLLM)
    assert list(losses(ranks)) == [1, 2, 3]
    assert losses(ranks) == pytest.approx(losses(one), rel=1e-5)
    assert max_diff(weights(ranks / "policy"), weights(one / "policy")) <= 1e-5
    initial = weights(ranks / "checkpoints" / "step-000002" / "policy")
    assert max_diff(weights(ranks / "policy"), initial) > 1e-4
    import json

    records = [json.loads(line) for line in (ranks / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/logp_gap_max"] < 1e-4 and r["rollout/weight_pushes"] == 2 for r in records)


def test_two_ranks_with_vllm_rollouts_train_lora_like_one_process(cache, tmp_path):
    """LoRA under ZeRO-3 with vLLM: each role is pushed as the base with its adapter merged in, gathered
    weight by weight with the adapter's two factors; the 2-rank run matches the one-process vLLM run."""
    pytest.importorskip("peft")
    lora = ["model.lora.r=4", "model.lora.alpha=8", "optim.lr=0.05"]
    one = one_process_train(cache, tmp_path / "one", *VLLM, *lora)
    ranks = deepspeed_train(cache, tmp_path / "ranks", "engine.zero_stage=3", *VLLM, *lora)
    assert losses(ranks) == pytest.approx(losses(one), rel=1e-5)
    assert max_diff(weights(ranks / "policy"), weights(one / "policy")) <= 1e-5
    import json

    records = [json.loads(line) for line in (ranks / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/logp_gap_max"] < 1e-4 for r in records)
