"""Peak memory of full J-BOND against LoRA J-BOND on the same model, on CPU, in one run.

    python benchmarks/lora_memory.py [--out PATH] [--hidden 1024] [--layers 8] [--r 16]

The model is a random Llama built here (hidden 1024, 8 layers, 16 heads of
64, MLP 2816: about 100M parameters, fp32) with the embedded world's
tokenizer, prompts and reward, saved with `save_pretrained`. Each run is
`fastbond train` for 2 J-BOND steps in its own process; the process reports
its resident-set size after its imports (the baseline: Python, torch,
transformers) and its peak (`ru_maxrss`) at exit. The figure compared is
peak minus baseline: what the run's models, optimizer and anchor (and the
step's activations) took.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
import torch, transformers  # noqa: F401  the baseline includes the libraries
from fastbond.config import load_config
from fastbond.presets import embedded_preset
from fastbond.train import train
baseline = rss_kib()
train(load_config(embedded_preset(), sys.argv[1:]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MEMORY " + json.dumps({"baseline_kib": baseline, "peak_kib": peak}))
"""


def build_model(path: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastbond.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run(model_dir: Path, run_dir: Path, extra: list[str]) -> dict:
    overrides = [f"model.policy={model_dir}", f"run_dir={run_dir}", "steps=2", "rollout.batch_size=8",
                 "rollout.max_new_tokens=16", "evaluation.at_end=false", "logging.progress=false",
                 "checkpoint.every=0", *extra]
    done = subprocess.run([sys.executable, "-c", CHILD, *overrides], capture_output=True, text=True,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if done.returncode != 0:
        raise SystemExit(f"fastbond train {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("MEMORY "))
    memory = json.loads(line.removeprefix("MEMORY "))
    memory["run_mib"] = (memory["peak_kib"] - memory["baseline_kib"]) / 1024
    return memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    import torch

    result = {"date": datetime.date.today().isoformat(), "device": "cpu", "torch": torch.__version__,
              "hidden": args.hidden, "layers": args.layers, "r": args.r}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        result["parameters"] = build_model(model_dir, args.hidden, args.layers)
        result["full"] = run(model_dir, Path(tmp) / "full", [])
        lora = [f"model.lora.r={args.r}", f"model.lora.alpha={2 * args.r}"]
        result["lora"] = run(model_dir, Path(tmp) / "lora", lora)
    result["lora_over_full"] = result["lora"]["run_mib"] / result["full"]["run_mib"]
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"lora-memory-cpu-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['parameters'] / 1e6:.1f}M parameters, fp32, 2 J-BOND steps on CPU (peak RSS above the baseline):")
    print("| run | peak MiB above baseline | peak RSS MiB |\n|---|---|---|")
    for name in ("full", "lora"):
        r = result[name]
        print(f"| {name} | {r['run_mib']:,.0f} | {r['peak_kib'] / 1024:,.0f} |")
    print(f"LoRA / full: {result['lora_over_full']:.2f}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
