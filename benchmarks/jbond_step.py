"""Time one J-BOND training step of a Gemma-2B-shaped model, phase by phase, with peak GPU memory.

    python benchmarks/jbond_step.py --out step.json            # Gemma-2B shapes, bf16, on CUDA
    python benchmarks/jbond_step.py --out step.json --tiny     # the same path at toy shapes (CPU rehearsal)

Nothing is downloaded: the model is a randomly initialized `GemmaForCausalLM`
with Gemma-2B's dimensions (GemmaConfig's defaults are Gemma-7B's), saved with
`save_pretrained` into a temporary directory beside a word-level tokenizer
built like the embedded one (`fastbond.embedded.build_tokenizer`), padded with
filler words to the model's vocabulary so every sampled id decodes. The run
is the trainer's own: `fastbond.train.setup_run` and `train_step` on the
local engine, with its `time/*` phase timers (generate, logprobs, backward,
ema). The optimizer's step is timed inside `backward` and reported apart.
Step 1 warms up (kernel compilation and autotuning, AdamW's state); step 2 is
the measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fastbond.process import quiet_transformers

GEMMA_2B = {"vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
            "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256}
TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_tokenizer(vocab_size: int):
    """The embedded word-level tokenizer's vocabulary, then filler words up to `vocab_size` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fastbond.embedded.grammar import vocabulary

    words = vocabulary()
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left",
                                   clean_up_tokenization_spaces=False)


def build_model_dir(directory: Path, dims: dict, device: torch.device) -> dict:
    """A random-init Gemma with `dims`, bf16, saved with its tokenizer; returns what was built."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tokenizer = build_tokenizer(dims["vocab_size"])
    config = GemmaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with device:  # initialize where it is fast (the GPU); the weights land on disk either way
        model = GemmaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return {"architecture": "GemmaForCausalLM", **dims, "parameters": params, "dtype": "bfloat16"}


def time_steps(model_dir: Path, run_dir: Path, device: str, prompts: int, new_tokens: int, steps: int,
               sampler: str = "generate") -> dict:
    """`steps` J-BOND steps of the trainer on `model_dir` drawing with `sampler` (rollout.backend); per-step
    phase seconds and peak memory."""
    from fastbond.config import load_config
    from fastbond.embedded.grammar import all_prompts, write_prompts_jsonl
    from fastbond.train import PhaseTimer, setup_run, train_step

    prompt_file = write_prompts_jsonl(all_prompts()[: 4 * prompts], run_dir.parent / "prompts.jsonl")
    config = load_config(overrides=[
        f"steps={steps}", f"run_dir={run_dir}", f"device={device}",
        f"model.policy={model_dir}", "model.dtype=bfloat16",
        f"data.prompts={prompt_file}", f"data.eval_prompts={prompt_file}",
        "algorithm.name=jbond", f"rollout.batch_size={prompts}", f"rollout.max_new_tokens={new_tokens}",
        "logging.progress=false", "evaluation.at_end=false", f"rollout.backend={sampler}",
    ])
    started = time.perf_counter()
    run = setup_run(config)
    cuda = run.engine.device.type == "cuda"
    setup_s = time.perf_counter() - started
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else None
    log(f"models loaded in {setup_s:.1f} s" + (f", {resident:.1f} GiB on the GPU" if cuda else ""))

    timer = PhaseTimer(run.engine.device)
    optimizer = run.engine.optimizer.optimizer  # the local engine's AdamW
    inner_step = optimizer.step

    @functools.wraps(inner_step)  # keeps the LR scheduler's mark on the wrapped step
    def timed_step(*args, **kwargs):
        with timer("optimizer"):
            return inner_step(*args, **kwargs)

    optimizer.step = timed_step

    records = []
    for step in range(1, steps + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        metrics = train_step(run, timer)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        run.step += 1
        t = {key.removeprefix("time/"): value for key, value in timer.pop().items()}
        phases = {
            "generate": t.get("generate"),
            "logprobs_and_loss": t.get("logprobs"),
            "backward_and_clip": t["backward"] - t.get("optimizer", 0.0) if "backward" in t else None,
            "optimizer": t.get("optimizer"),
            "ema": t.get("ema"),
        }
        record = {
            "step": step, "warmup": step == 1, "wall_s": round(wall, 4),
            "phases_s": {k: None if v is None else round(v, 4) for k, v in phases.items()},
            "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "skipped_step": bool(metrics.get("skipped_step")),
            # the static sampler's refills of its sampling copy, inside `generate`
            "sampler_copy_s": metrics.get("time/sampler_copy"),
        }
        records.append(record)
        log(f"step {step}{' (warm-up)' if step == 1 else ''}: {wall:.2f} s, "
            + ", ".join(f"{k} {v:.3f}" for k, v in record["phases_s"].items() if v is not None)
            + (f"; peak {record['peak_memory_GiB']} GiB" if cuda else ""))
    return {"setup_s": round(setup_s, 2), "resident_GiB": None if resident is None else round(resident, 2),
            "prompts": prompts, "new_tokens": new_tokens, "samples_per_prompt": 3, "steps": records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--tiny", action="store_true", help="toy dimensions (the CPU rehearsal)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (J-BOND draws 3 samples each)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="the first one warms up")
    parser.add_argument("--samplers", default="generate,static",
                        help="rollout.backend of each timed run, in order (the first fills the top-level fields)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dims = TINY if args.tiny else GEMMA_2B
    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="fastbond-step-"))
    try:
        started = time.perf_counter()
        model = build_model_dir(work / "model", dims, device)
        build_s = time.perf_counter() - started
        log(f"built and saved a Gemma of {model['parameters'] / 1e6:,.1f}M parameters in {build_s:.1f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = {"model": model, "build_s": round(build_s, 2), "device": str(device)}
        result["by_sampler"] = {}
        for sampler in args.samplers.split(","):
            log(f"rollout.backend={sampler}")
            timed = time_steps(work / "model", work / f"run-{sampler}", str(device), args.prompts, args.new_tokens,
                               args.steps, sampler)
            result["by_sampler"][sampler] = timed
            if len(result["by_sampler"]) == 1:
                result.update(timed)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
