"""Compile every CUDA launch of the fused ops for sm_80 and sm_90, without a GPU.

    python -m fastbond.kernels.compile_check            # the representative subset (CI)
    python -m fastbond.kernels.compile_check --full --record   # every launch; updates the record

Triton compiles a `@triton.jit` function for any GPU target on a machine
without one (`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`),
and the `ptxas` in the Triton wheel reports registers and spills. Each kernel
module lists its launches (`cuda_launches(arch)`), built by the same
functions its launchers use and from the autotune candidate lists of
`fastbond.kernels.tuning`, so a new configuration cannot escape the check. A
launch passes when it

* compiles,
* fits the per-block shared memory (A100 166,912 B; H100 232,448 B),
* spills nothing to local memory (every launch of the trainer's dtypes —
  bf16, fp16, and fp32 on tensor cores as tf32/tf32x3),
* lowers its dots to tensor-core instructions (`mma.sync` on sm_80, `wgmma`
  on sm_90) where it has dots,
* loads 16 bytes at a time where its launch promises it (the EMA's aligned
  tensors, whole chunks and tails alike).

Also checked: every boolean compile-time flag of every kernel is compiled
both ways, and every compile-time parameter has a value (a kernel parameter
added without a launch for it fails here).

The full matrix (1,544 launches) takes about 25 minutes on 2 cores, too long for every CI
run, and a flag combination outside the subset can spill where the subset's
does not. So the last full run is recorded in `benchmarks/results/
compile-check.json` with a fingerprint of every launch and of the kernels'
source; CI recomputes the fingerprint, and a change to a kernel, a flag or a
tile list that was not followed by a clean full run (`--full --record`)
fails the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import sys
import textwrap
import time
import tokenize
from concurrent.futures import ProcessPoolExecutor
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from fastbond.kernels.tuning import ARCHS, SHARED_MEMORY_PER_BLOCK, Launch

RECORD = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compile-check.json"
# Flags only the CPU interpreter sets: a CUDA launch always has them False.
CPU_ONLY_FLAGS = frozenset({"INTERPRETED"})
# Every module with a Triton kernel; each lists its launches in `cuda_launches(arch)`.
KERNEL_MODULES = ("fastbond.kernels.linear_logprobs", "fastbond.kernels.live_tile_grads", "fastbond.kernels.jbond_loss",
                  "fastbond.kernels.ema")


@dataclass
class Compiled:
    kernel: str
    label: str
    arch: int
    ok: bool
    error: str = ""
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    tensor_cores: bool = False
    needs_tensor_cores: bool = False
    vector_loads: int = 0
    needs_vector_loads: int = 0
    seconds: float = 0.0

    def problems(self) -> list[str]:
        where = f"{self.kernel} [{self.label}] on sm_{self.arch}"
        if not self.ok:
            return [f"{where}: does not compile: {self.error}"]
        found = []
        if self.shared > SHARED_MEMORY_PER_BLOCK[self.arch]:
            found.append(f"{where}: {self.shared} B of shared memory > {SHARED_MEMORY_PER_BLOCK[self.arch]} B")
        if self.spill_bytes:
            found.append(f"{where}: {self.spill_bytes} B spilled at {self.registers} registers")
        if self.needs_tensor_cores and not self.tensor_cores:
            found.append(f"{where}: its dots do not use tensor cores")
        if self.vector_loads < self.needs_vector_loads:
            found.append(f"{where}: {self.vector_loads} vector loads, {self.needs_vector_loads} expected")
        return found


@functools.lru_cache(maxsize=None)  # built once per process: every compile task indexes into it
def all_launches(arch: int) -> list[Launch]:
    """Every launch of every fused op for `arch`, from the kernel modules themselves."""
    launches = []
    for name in KERNEL_MODULES:
        launches.extend(importlib.import_module(name).cuda_launches(arch))
    return launches


def kernel_code(kernel, seen: set | None = None) -> str:
    """The tokens of a kernel's source and of every @triton.jit function it calls, without comments
    or layout: what decides the compiled code, not where it sits in its file or how it is commented."""
    from triton.runtime.jit import JITFunction

    seen = set() if seen is None else seen
    if kernel.__name__ in seen:
        return ""
    seen.add(kernel.__name__)
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
    tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(textwrap.dedent(kernel.src)).readline)
              if t.type not in skip]
    code = " ".join(tokens)
    for name in sorted(set(tokens)):
        called = kernel.__globals__.get(name)
        if isinstance(called, JITFunction):
            code += "\n" + kernel_code(called, seen)
    return code


def fingerprint(archs=ARCHS) -> str:
    """A hash of every launch of the full matrix and of the code of every kernel it compiles."""
    digest = hashlib.sha256()
    for arch in archs:
        for launch in all_launches(arch):
            digest.update(repr((arch, launch.name, launch.label, sorted(launch.signature.items()),
                                sorted((k, str(v)) for k, v in launch.constexprs.items()), launch.num_warps,
                                launch.num_stages, sorted(launch.aligned))).encode())
    for kernel in {launch.name: launch.kernel for launch in all_launches(archs[0])}.values():
        digest.update(kernel_code(kernel).encode())
    return digest.hexdigest()


def coverage_problems(launches: list[Launch]) -> list[str]:
    """Every constexpr parameter has a value in every launch; every boolean flag is compiled both ways."""
    problems = []
    by_kernel: dict[str, list[Launch]] = {}
    for launch in launches:
        by_kernel.setdefault(launch.name, []).append(launch)
    for name, group in by_kernel.items():
        params = group[0].kernel.params
        constexpr = [p.name for p in params if p.is_constexpr]
        runtime = [p.name for p in params if not p.is_constexpr]
        for launch in group:
            missing = [p for p in constexpr if p not in launch.constexprs]
            if missing:
                problems.append(f"{name} [{launch.label}]: no value for constexpr {missing}")
            if list(launch.signature) != runtime:
                problems.append(f"{name} [{launch.label}]: signature {list(launch.signature)} != parameters {runtime}")
        for flag in constexpr:
            if flag in CPU_ONLY_FLAGS:
                continue
            values = {launch.constexprs.get(flag) for launch in group}
            if values <= {True, False} and values != {True, False}:
                problems.append(f"{name}: flag {flag} is only ever compiled as {values.pop()}")
    return problems


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(launch: Launch, arch: int) -> Compiled:
    """Compile `launch` for sm_`arch` and read shared memory, registers, spills and instructions."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Compiled(kernel=launch.name, label=launch.label, arch=arch, ok=False,
                      needs_tensor_cores=launch.tensor_cores, needs_vector_loads=launch.min_vector_loads)
    start = time.perf_counter()
    names = list(launch.kernel.arg_names)
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in launch.aligned}
    signature = dict(launch.signature)
    signature.update({p: "constexpr" for p in launch.constexprs})
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=launch.constexprs, attrs=attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    try:
        for attempt in range(3):
            try:
                with contextlib.redirect_stdout(log):
                    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                              options={"num_warps": launch.num_warps,
                                                       "num_stages": launch.num_stages})
                break
            except BlockingIOError:  # EAGAIN starting ptxas on a loaded machine: not the kernel's fault
                if attempt == 2:
                    raise
                time.sleep(2.0)
    except Exception as error:  # noqa: BLE001 - any compiler failure is a finding
        result.error = " ".join(str(error).split())[:300]
        result.seconds = time.perf_counter() - start
        return result
    ptxas = log.getvalue()
    ptx = compiled.asm["ptx"]
    registers = _REGISTERS.search(ptxas)
    spills = _SPILLS.search(ptxas)
    result.ok = True
    result.shared = int(compiled.metadata.shared)
    result.registers = int(registers.group(1)) if registers else -1
    result.spill_bytes = int(spills.group(1)) + int(spills.group(2)) if spills else 0
    result.tensor_cores = ("mma.sync" in ptx) or ("wgmma" in ptx)
    result.vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.b32", ptx))
    result.seconds = time.perf_counter() - start
    return result


def _compile_task(task: tuple[int, int, bool]) -> Compiled:
    arch, index, full = task
    return compile_one(_selected(arch, full)[index], arch)


def _selected(arch: int, full: bool) -> list[Launch]:
    launches = all_launches(arch)
    return launches if full else [launch for launch in launches if launch.representative]


def run(archs=ARCHS, full: bool = False, jobs: int = 1, progress=None) -> tuple[list[Compiled], list[str]]:
    """Compile the launches of `archs`; return the results and every problem found."""
    problems = []
    tasks = []
    for arch in archs:
        problems += [f"sm_{arch}: {p}" for p in coverage_problems(all_launches(arch))]
        tasks += [(arch, i, full) for i in range(len(_selected(arch, full)))]
    results = []
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            for result in pool.map(_compile_task, tasks):
                results.append(result)
                if progress:
                    progress(result, len(results), len(tasks))
    else:
        for task in tasks:
            results.append(_compile_task(task))
            if progress:
                progress(results[-1], len(results), len(tasks))
    for result in results:
        problems += result.problems()
    return results, problems


def write_record(results: list[Compiled]) -> None:
    """The full run's summary for CI: fingerprint, versions, and per kernel, arch and tiles the worst case."""
    import triton

    worst: dict[str, dict] = {}
    for r in results:
        operands_and_tiles = " ".join(r.label.split(" ")[:4]) if r.kernel.startswith("_linear") else ""
        key = f"{r.kernel} sm_{r.arch} {operands_and_tiles}".strip()
        row = worst.setdefault(key, {"launches": 0, "max_registers": 0, "max_spill_bytes": 0, "max_shared": 0})
        row["launches"] += 1
        row["max_registers"] = max(row["max_registers"], r.registers)
        row["max_spill_bytes"] = max(row["max_spill_bytes"], r.spill_bytes)
        row["max_shared"] = max(row["max_shared"], r.shared)
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({
        "fingerprint": fingerprint(), "triton": triton.__version__, "launches": len(results),
        "date": time.strftime("%Y-%m-%d"), "worst_case": dict(sorted(worst.items())),
    }, indent=1) + "\n")


def table(results: list[Compiled]) -> str:
    """A markdown table, one row per compiled launch."""
    lines = ["| kernel | configuration | arch | shared B | registers | spills B | tensor cores | vector loads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.kernel} | {r.label} | sm_{r.arch} | — | — | — | — | FAILED: {r.error[:60]} |")
            continue
        cores = "yes" if r.tensor_cores else ("NO" if r.needs_tensor_cores else "—")
        lines.append(f"| {r.kernel} | {r.label} | sm_{r.arch} | {r.shared} | {r.registers} | {r.spill_bytes} | "
                     f"{cores} | {r.vector_loads} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbond.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every launch, not the representative subset")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--table", action="store_true", help="print the markdown table")
    parser.add_argument("--record", action="store_true",
                        help=f"with --full and no problems: write the record CI checks against ({RECORD.name})")
    parser.add_argument("--fingerprint", action="store_true", help="print the launches' fingerprint and exit")
    args = parser.parse_args(argv)
    if args.fingerprint:
        print(fingerprint())
        return 0
    if args.record and not (args.full and set(args.arch) == set(ARCHS)):
        parser.error("--record needs --full over every architecture")

    def progress(result: Compiled, done: int, total: int):
        status = "ok" if not result.problems() else "PROBLEM"
        print(f"[{done}/{total}] sm_{result.arch} {result.kernel} {result.label}: {status} "
              f"({result.registers} regs, {result.spill_bytes} B spilled, {result.shared} B shared, "
              f"{result.seconds:.1f} s)", flush=True)

    results, problems = run(args.arch, args.full, args.jobs, progress)
    if args.table:
        print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": [asdict(r) for r in results], "problems": problems}, f, indent=1)
    if args.record and not problems:
        write_record(results)
        print(f"recorded in {RECORD}")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(results)} launches compiled, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
