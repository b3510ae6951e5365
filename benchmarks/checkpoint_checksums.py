"""What the checkpoint manifest costs: a checkpoint of ≥ 100 MB written with and without its checksums, and
the check on resume with and without them (fastbond.integrity).

    PYTHONPATH=. python benchmarks/checkpoint_checksums.py [--mb 300] [--repeats 5] [--json results/FILE.json]

Saves are dominated by writing and flushing (fsync) the files, which varies from one save to the next
on a shared disk; the manifest's share is also timed on its own, inside each save. The checkpoint is the
one-process layout (`save_checkpoint`): a Llama-shaped policy in fp32 and its AdamW
moments beside it, about a third each. The files are read back while still in the page cache (as they
are right after a save, and usually on a resume soon after); a cold read adds the disk's own time to
both sides. Also prints each candidate hash's single-thread speed on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastbond import checkpoint as ckpt
from fastbond import integrity
from fastbond.process import quiet_transformers


def policy_of(megabytes: float) -> LlamaForCausalLM:
    """A Llama whose fp32 weights take about `megabytes`."""
    hidden, vocab = 512, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * 4 * hidden  # attention + MLP
    layers = max(1, round((megabytes * 2**20 / 4 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def hash_speeds(megabytes: int = 256) -> dict[str, float]:
    data = memoryview(os.urandom(megabytes * 2**20))
    candidates = {"sha256": lambda: hashlib.sha256(data).digest(),
                  "blake2b": lambda: hashlib.blake2b(data).digest(),
                  "zlib.crc32": lambda: zlib.crc32(data)}
    speeds = {}
    for name, run in candidates.items():
        start = time.perf_counter()
        run()
        speeds[name] = megabytes / (time.perf_counter() - start)
    return speeds


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=300.0, help="checkpoint size to aim for, in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary dir)")
    args = parser.parse_args()

    quiet_transformers()
    policy = policy_of(args.mb / 3)
    state = {"moments": {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in policy.named_parameters()}}
    root = Path(tempfile.mkdtemp(prefix="fastbond-checksums-", dir=args.dir))
    manifest = integrity.write_manifest
    results: dict[str, list[float]] = {"save_without": [], "save_with": [], "manifest_in_save": [],
                                       "check_structure": [], "check_all": []}

    def timed_manifest(tmp):
        results["manifest_in_save"].append(timed(lambda: manifest(tmp)))

    try:
        for repeat in range(args.repeats):
            ckpt.write_manifest = lambda tmp: None  # the save as it was before manifests
            try:
                results["save_without"].append(timed(lambda: ckpt.save_checkpoint(root / "without", repeat, policy,
                                                                                   None, state, keep=1)))
            finally:
                ckpt.write_manifest = timed_manifest
            saved = []
            try:
                results["save_with"].append(timed(lambda: saved.append(
                    ckpt.save_checkpoint(root / "with", repeat, policy, None, state, keep=1))))
            finally:
                ckpt.write_manifest = manifest
            results["check_structure"].append(timed(lambda: ckpt.damage(saved[0], checksums=False)))
            results["check_all"].append(timed(lambda: ckpt.damage(saved[0])))
            assert ckpt.damage(saved[0]) is None
        size = sum(p.stat().st_size for p in saved[0].rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in results.items()}
    report = {
        "checkpoint_mb": size / 2**20,
        "hash": integrity.HASH,
        "threads": integrity.THREADS,
        "seconds_median": median,
        "seconds_all": results,
        "manifest_in_save_s": median["manifest_in_save"],
        "manifest_in_save_pct_of_save": 100 * median["manifest_in_save"] / median["save_with"],
        "checksum_check_s": median["check_all"] - median["check_structure"],
        "checksum_check_mb_per_s": size / 2**20 / max(median["check_all"] - median["check_structure"], 1e-9),
        "hash_mb_per_s_one_thread": hash_speeds(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
