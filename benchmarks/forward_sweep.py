"""Sweep of the linear_logprobs forward on one GPU: tile shapes × vocabulary tiles per program.

    python benchmarks/forward_sweep.py [--out PATH] [--budget-s 170]

The forward walks a vocabulary span per program with an online softmax; only
the inner K loop is software-pipelined, so every span tile refills the
pipeline and the softmax epilogue does not overlap the next tile's MMAs.
This measures, at Gemma-2B's head (N = 4096, H = 2048, V = 256000, bf16),
how the time depends on the tiles (the tuned candidates and larger ones) and
on how many vocabulary tiles a program walks (`per_program`; "auto" is
`_split`'s own choice), against one cuBLAS GEMM of the same shape. Each
configuration's log-probs are checked against the chunked backend. Results
are written after every configuration, so a timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import torch
import triton
import triton.testing

from fastbond.kernels import tuning

ll = importlib.import_module("fastbond.kernels.linear_logprobs")
T = tuning.Tiles

LARGER = (T(128, 128, 64, 8, 3), T(128, 128, 64, 4, 3), T(128, 256, 64, 8, 3), T(256, 128, 64, 8, 3),
          T(128, 128, 128, 8, 2), T(128, 256, 32, 8, 4))
PER_PROGRAM = ("auto", 1, 2, 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="forward-sweep.json")
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"

    def bench(fn, **kwargs):
        if device == "cuda":
            return triton.testing.do_bench(fn, **kwargs)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    t0 = time.time()
    torch.manual_seed(0)
    n, h, v = (64, 32, 1000) if args.tiny else (args.n, 2048, 256000)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device=device, dtype=torch.bfloat16) * 0.02)
    targets = torch.randint(0, v, (n,), device=device)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    opts = ll._Options(temperature=1.0, softcap=None, ignore_index=-100, entropy=False, backend="triton",
                       chunk_size=None)
    want = ll.linear_logprobs(hidden, weight, targets, backend="chunked")
    gemm_ms = bench(lambda: hidden @ weight.T, warmup=25, rep=200)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "triton": triton.__version__, "N": n, "H": h, "V": v, "cublas_gemm_ms": gemm_ms, "configs": []}
    print(f"cuBLAS GEMM {gemm_ms:.2f} ms", flush=True)
    auto_split = ll._split
    for tiles in (*tuning.LINEAR_FORWARD_TILES[(90, "16-bit")], *LARGER):
        for per_program in PER_PROGRAM:
            if time.time() - t0 > args.budget_s:
                result["stopped"] = "budget"
                break
            if per_program == "auto":
                ll._split = auto_split
            else:
                span = tiles.block_v * per_program
                ll._split = lambda _n, vocab, _d, span=span: (triton.cdiv(vocab, span), span)
            entry = {"tiles": str(tiles), "per_program": per_program}
            try:
                def run():
                    return ll._triton_forward(hidden, weight, None, targets, valid, opts, tiles=tiles)[0]
                got = run()
                entry["max_abs_err"] = float((got - want).abs().max())
                entry["ms"] = bench(run, warmup=10, rep=100)
                entry["over_gemm"] = entry["ms"] / gemm_ms
            except Exception as exc:  # out of shared memory or registers: record and go on
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            finally:
                ll._split = auto_split
            result["configs"].append(entry)
            print(json.dumps(entry), flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    result["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    done = sorted((c for c in result["configs"] if "ms" in c), key=lambda c: c["ms"])
    for c in done[:8]:
        print(f"{c['tiles']:>22} per_program={c['per_program']!s:>4}  {c['ms']:.2f} ms  "
              f"{c['over_gemm']:.2f}x GEMM  err {c['max_abs_err']:.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
