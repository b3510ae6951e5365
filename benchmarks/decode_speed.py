"""Milliseconds per decode step of `generate` and of the static sampler, beside the weight-read floor.

    python benchmarks/decode_speed.py --out decode.json                  # Gemma-2B shapes, bf16, on CUDA
    python benchmarks/decode_speed.py --out decode.json --tiny           # the same path at toy shapes (CPU)

One decode step of a model at small batch reads every weight once: its floor
is the weights' bytes over the bandwidth of a device-to-device copy measured
in the same run (bytes read plus bytes written, over the time of
`dst.copy_(src)`). Each sampler decodes `--short` and then `--long` new
tokens with no EOS (every row runs to the end) after the same prefill; the
difference over `long − short` steps is the cost of one step, prefill and
first-call costs excluded. The static sampler's first draw of each batch size
(its compile and graph capture where it captures) is timed apart as `warmup_s`.
vLLM is not timed per step here: `rollout_speed.py` times its samples/s where it imports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from jbond_step import GEMMA_2B, TINY, build_tokenizer, log


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes moved per second (read + written) by the best of a few device-to-device copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def per_step_ms(draw, device: torch.device, short: int, long: int, repeats: int, tries: int = 4) -> float:
    """(time of `long` new tokens − time of `short`) / (long − short), in ms: one decode step.

    A difference of two timings can come out at or below zero when noise (a busy CPU, a clock change) outweighs
    the few steps between them; such a result is measured again with twice the repeats, a few times at most."""
    for _ in range(tries):
        ms = (_timed(lambda: draw(long), device, repeats) - _timed(lambda: draw(short), device, repeats)) \
            / (long - short) * 1e3
        if ms > 0:
            break
        repeats *= 2
    return ms


def kernel_profile(run, device: torch.device, steps: int, top: int = 15) -> list[dict]:
    """The `top` device kernels of one `run` by total time: where a decode step's time goes, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        _sync(device)
    events = prof.key_averages()
    kernels = []
    for event in events:
        total_us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if total_us > 0 and (device.type != "cuda" or event.device_type.name == "CUDA"):
            kernels.append({"name": event.key[:120], "calls": event.count, "total_ms": round(total_us / 1e3, 3),
                            "us_per_step": round(total_us / steps, 1)})
    kernels.sort(key=lambda k: -k["total_ms"])
    return kernels[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="toy dimensions (the CPU rehearsal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="8,24,64")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", help="the model's attention implementation (eager, sdpa, ...); default: transformers'")
    parser.add_argument("--profile", action="store_true",
                        help="also record the static sampler's kernels (torch.profiler) over --long steps, per batch")
    args = parser.parse_args(argv)
    from transformers import GemmaConfig, GemmaForCausalLM

    from fastbond.process import quiet_transformers
    from fastbond.rollout.decode import Decoder

    quiet_transformers()
    device = torch.device(args.device)
    dims = TINY if args.tiny else GEMMA_2B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_tokenizer(dims["vocab_size"])
    config = GemmaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    if args.attn:
        config._attn_implementation = args.attn
    torch.manual_seed(0)
    with device:
        model = GemmaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device, min(2 * 2**30, 4 * weight_bytes))
    floor_ms = weight_bytes / bandwidth * 1e3
    log(f"{weight_bytes / 1e9:.2f} GB of weights; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"weight-read floor {floor_ms:.3f} ms per step")
    result = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "torch": torch.__version__, "model": {"architecture": "GemmaForCausalLM", **dims},
              "dtype": str(dtype).removeprefix("torch."), "weight_bytes": weight_bytes,
              "attention": model.config._attn_implementation,
              "copy_bandwidth_Bps": bandwidth, "floor_ms": floor_ms, "prompt_tokens": args.prompt_tokens,
              "steps_timed": args.long - args.short, "batches": []}
    capture = device.type == "cuda"
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, dims["vocab_size"], (batch, args.prompt_tokens), device=device)
        mask = torch.ones_like(ids)
        entry = {"batch": batch}

        def generate(new: int):
            # no EOS: every row runs to `new` tokens
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                   max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)

        generate(args.short)
        entry["generate_ms"] = per_step_ms(generate, device, args.short, args.long, args.repeats)
        decoder = Decoder(args.long, 1.0, [], tokenizer.pad_token_id, max_prompt_tokens=args.prompt_tokens,
                          capture=capture)
        started = time.perf_counter()
        decoder.decode(model, ids, mask)
        _sync(device)
        entry["static_warmup_s"] = time.perf_counter() - started
        entry["static_ms"] = per_step_ms(lambda new: decoder.decode(model, ids, mask, steps=new), device,
                                         args.short, args.long, args.repeats)
        entry["static_captured"] = capture and decoder.capture
        if args.profile:
            entry["static_kernels"] = kernel_profile(lambda: decoder.decode(model, ids, mask, steps=args.long),
                                                     device, args.long)
        entry["generate_over_floor"] = entry["generate_ms"] / floor_ms
        entry["static_over_floor"] = entry["static_ms"] / floor_ms
        result["batches"].append(entry)
        log(f"batch {batch}: generate {entry['generate_ms']:.2f} ms/step ({entry['generate_over_floor']:.1f}× "
            f"floor), static {entry['static_ms']:.2f} ms/step ({entry['static_over_floor']:.1f}× floor, "
            f"{'captured' if entry['static_captured'] else 'eager'}; first draws {entry['static_warmup_s']:.1f} s)")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
