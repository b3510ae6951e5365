"""Samples/s of the rollout samplers, `generate`, `static` and `vllm`, on the same models in one run.

    python benchmarks/rollout_speed.py [--out PATH] [--device cpu|cuda] [--quick] [--compile]

Run it where vLLM is installed (on CPU: `.ci/vllm_env.sh` prints that
environment's python); without vLLM it times `generate` alone and says so.

Models: the embedded π_ref (2 layers, hidden 64) and a random Llama of the
same family a few hundred times larger (`--large`: hidden 512, 8 layers,
8 heads of 64, vocabulary 32000; about 50M parameters), both fp32 on CPU.
For each: one batch of prompts, each sampled to at most `max_new_tokens`
at temperature 1 (top-k and top-p off) by `fastbond.rollout.sample`, by the
static sampler (`StaticSampler`, eager on CPU; `--compile` adds its step
through torch.compile, whose first draw is timed apart) and by
`VLLMRunner.draw`, `--repeats` times after a warm-up draw; the best time
counts. `generate` and `static` are timed with both noises: the torch
generator (the default run's) and the keyed noise (the same draws on any
number of ranks), and draw the same tokens under each. The weight push into vLLM (what a training step adds before its
draws) is timed apart. Response lengths differ between engines (different
draws), so tokens/s is reported beside samples/s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fastbond.config import VLLMConfig
from fastbond.rollout import KeyedNoise, Prompts, encode_prompts, eos_token_ids, sample
from fastbond.rollout.sampler import GenerateSampler
from fastbond.rollout.static_sampler import StaticSampler


def _embedded():
    from fastbond.embedded import build_embedded_reference, load_reference
    from fastbond.data import resolve_prompts

    path = build_embedded_reference()
    model, tokenizer = load_reference(path)
    return "embedded", path, model, tokenizer, resolve_prompts("embedded", "train")


def _large(root: Path):
    """A random Llama with the embedded tokenizer's words plus filler up to 32000 ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastbond.data import resolve_prompts
    from fastbond.embedded import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = root / "large"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return "random-llama-50m", path, model, tokenizer, resolve_prompts("embedded", "train")


def _best(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: first-call costs (vLLM's scheduler, kernels' first use) are not per-step costs
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def samplers(tokenizer, args, device):
    """(name, sampler) of each timed configuration; each is rebuilt so its draws start from the same keys."""
    settings = dict(max_prompt_tokens=64, say=lambda message: None)
    for noise in ("torch", "keyed"):
        keyed = KeyedNoise(0) if noise == "keyed" else None
        yield f"generate-{noise}", GenerateSampler(tokenizer, args.max_new_tokens, noise=keyed)
        yield f"static-{noise}", StaticSampler(tokenizer, args.max_new_tokens, noise=KeyedNoise(0) if keyed else None,
                                               **settings)
    if args.compile:
        yield "static-compiled-keyed", StaticSampler(tokenizer, args.max_new_tokens, noise=KeyedNoise(0),
                                                     capture=True, **settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="result JSON (default benchmarks/results/rollout-<device>-<date>.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the embedded model only, batch 8, one repeat")
    parser.add_argument("--compile", action="store_true", help="also the static sampler's step compiled")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the embedded default run's cpu_threads; 2 cores oversubscribe "
                             "a model this small)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 8, 1
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    have_vllm = importlib.util.find_spec("vllm") is not None
    result = {"date": datetime.date.today().isoformat(), "device": args.device, "cpu": platform.processor(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "models": []}
    if have_vllm:
        import vllm

        result["vllm"] = vllm.__version__
    else:
        result["vllm"] = "not installed: generate timed alone"
    with tempfile.TemporaryDirectory() as tmp:
        builders = [_embedded] + ([] if args.quick else [lambda: _large(Path(tmp))])
        for build in builders:
            name, path, model, tokenizer, texts = build()
            model = model.to(device)
            texts = (texts * (args.batch // len(texts) + 1))[: args.batch]
            ids, mask = encode_prompts(tokenizer, texts, 64, device)
            prompts = Prompts(texts, ids, mask)
            entry = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}

            for name, sampler in samplers(tokenizer, args, device):
                sampler.start_step(1)
                if name.startswith("static-compiled"):
                    started = time.perf_counter()
                    sampler.draw(model, prompts)
                    entry[f"{name}_first_draw_s"] = time.perf_counter() - started
                seconds, drawn = _best(lambda: sampler.draw(model, prompts), args.repeats)
                tokens = int(drawn.response_mask.sum())
                entry[name] = {"seconds": seconds, "samples_per_s": args.batch / seconds,
                               "tokens_per_s": tokens / seconds}
            for noise in ("torch", "keyed"):
                entry[f"static_over_generate_{noise}"] = (entry[f"static-{noise}"]["samples_per_s"]
                                                          / entry[f"generate-{noise}"]["samples_per_s"])
            if "static-compiled-keyed" in entry:
                entry["compiled_over_generate_keyed"] = (entry["static-compiled-keyed"]["samples_per_s"]
                                                         / entry["generate-keyed"]["samples_per_s"])
            entry["generate"] = entry["generate-torch"]  # what vLLM is compared with, as before
            if have_vllm:
                from fastbond.rollout.vllm_sampler import VLLMRunner

                started = time.perf_counter()
                engine = VLLMRunner(path, torch.float32, device, seed=0, max_model_len=64 + args.max_new_tokens,
                                     settings=VLLMConfig(cpu_kv_cache_gib=1.0))
                entry["vllm_build_s"] = time.perf_counter() - started
                noise = KeyedNoise(0)
                noise.start_step(1)
                seeds = noise.row_keys(prompts.index, prompts.sample).tolist()
                eos = eos_token_ids(model, tokenizer)

                def via_vllm():
                    return engine.draw(model, tokenizer, prompts, args.max_new_tokens, 1.0, seeds, eos)[0]

                seconds, drawn = _best(via_vllm, args.repeats)
                tokens = int(drawn.response_mask.sum())
                pushes = []
                for _ in range(args.repeats):
                    engine.weights_changed()
                    started = time.perf_counter()
                    engine.hold(model)
                    pushes.append(time.perf_counter() - started)
                entry["vllm"] = {"seconds": seconds, "samples_per_s": args.batch / seconds,
                                 "tokens_per_s": tokens / seconds, "push_s": min(pushes)}
                entry["vllm_over_generate"] = entry["vllm"]["samples_per_s"] / entry["generate"]["samples_per_s"]
                del engine
            result["models"].append(entry)
            print(json.dumps(entry), flush=True)
    out = Path(args.out) if args.out else (Path(__file__).parent / "results"
                                           / f"rollout-{args.device}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| model | parameters | noise | generate samples/s | static samples/s | static / generate |")
    print("|---|---|---|---|---|---|")
    for e in result["models"]:
        for noise in ("torch", "keyed"):
            print(f"| {e['model']} | {e['parameters'] / 1e6:.1f}M | {noise} | "
                  f"{e[f'generate-{noise}']['samples_per_s']:.1f} | {e[f'static-{noise}']['samples_per_s']:.1f} | "
                  f"{e[f'static_over_generate_{noise}']:.2f}× |")
        if "static-compiled-keyed" in e:
            print(f"| {e['model']} | {e['parameters'] / 1e6:.1f}M | keyed, static compiled | "
                  f"{e['generate-keyed']['samples_per_s']:.1f} | {e['static-compiled-keyed']['samples_per_s']:.1f} | "
                  f"{e['compiled_over_generate_keyed']:.2f}× "
                  f"(first draw {e['static-compiled-keyed_first_draw_s']:.0f} s) |")
    if any("vllm" in e for e in result["models"]):
        print("\n| model | generate samples/s | vllm samples/s | vllm / generate | push ms |")
        print("|---|---|---|---|---|")
        for e in result["models"]:
            v = e.get("vllm")
            if v:
                print(f"| {e['model']} | {e['generate']['samples_per_s']:.1f} | {v['samples_per_s']:.1f} | "
                      f"{e['vllm_over_generate']:.2f}× | {v['push_s'] * 1e3:.1f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
