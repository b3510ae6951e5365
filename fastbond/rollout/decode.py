"""The static sampler's decode loop: a KV cache sized once, a prefill, then one token per step.

`generate` re-plans every token: it grows a dynamic cache, rebuilds its
inputs, runs a chain of logits processors and stopping criteria, and asks
the device whether every row is done. Here a token costs one forward of the
model over a `StaticCache` whose buffers are allocated once per batch size
and reused by every draw, plus the sampling itself:

    prefill   the left-padded prompts, positions counted over real tokens (as `generate` does)
    step t    the last token at cache position P + t → logits → the next token:
              keyed noise: argmax(logits/T + Gumbel(row key, t)) (`keyed_gumbel_scores`);
              torch noise: multinomial(softmax(logits/T)) from the global generator
    EOS       whether every row has emitted one is asked every `eos_every` steps (each
              question is a device sync); what a row draws after its EOS is padded away

So a draw is token for token the one `generate` makes with the same noise
(tests/fastbond/rollout/test_static_sampler.py, eight architectures).

Where the step is captured (`capture=True`: `torch.compile`, on CUDA with
CUDA graphs) its shapes are fixed: B rows and a cache of
`max_prompt_tokens + max_new_tokens` positions, whatever the prompts'
length. Where it runs eagerly, rows that finished leave the batch
(`compact`): their cache rows are dropped, and the tokens a step costs
shrink with the rows still drawing. With keyed noise a row's tokens do not
depend on its neighbours, so dropping rows changes nothing; with torch noise
the generator must be consumed as `generate` consumes it (one draw per row
per step), so rows are kept.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from fastbond.rollout.keyed import keyed_gumbel_scores

# batch sizes whose caches a decoder keeps (a run draws with two or three sizes: policy, anchor, evaluation)
CACHES_KEPT = 4


def transformers_model(module: nn.Module) -> nn.Module:
    """The transformers model under wrappers that forward to it (a PEFT model's base)."""
    while hasattr(module, "get_base_model"):
        module = module.get_base_model()
    return module


class ForwardStyle:
    """How this transformers version's models take a cache: `cache=` (5.2x) or `past_key_values=` (5.1x).
    Both count cache positions themselves (the sampler needs transformers >= 5.17: `STATIC_MIN_TRANSFORMERS`)."""

    def __init__(self, model: nn.Module):
        params = inspect.signature(type(transformers_model(model)).forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"

    def kwargs(self, cache) -> dict:
        return {self.cache_name: cache, "use_cache": True}


class HeldCaches:
    """Static caches by (rows, length), allocated on a draw's first use and reused after: the cache of a run's
    policy draws, of its anchor draws, of its evaluation. Dropping rows (`keep_rows`) works on views of the
    buffers; `fresh` puts the full buffers back and rewinds."""

    def __init__(self, config):
        from transformers import StaticCache

        self.config = config
        self.static_cache = StaticCache
        self.caches: OrderedDict[tuple[int, int], tuple[object, list | None]] = OrderedDict()

    def fresh(self, rows: int, length: int):
        key = (rows, length)
        if key in self.caches:
            self.caches.move_to_end(key)
            cache, buffers = self.caches[key]
            if buffers is not None:
                for layer, (keys, values) in zip(cache.layers, buffers):
                    layer.keys, layer.values = keys, values
            cache.reset()
            return cache
        cache = self.static_cache(config=self.config, max_cache_len=length)
        self.caches[key] = (cache, None)
        while len(self.caches) > CACHES_KEPT:
            self.caches.popitem(last=False)
        return cache

    def keep_rows(self, rows: int, length: int, keep: torch.Tensor) -> None:
        cache, buffers = self.caches[(rows, length)]
        if buffers is None:  # remember the full buffers before the first drop
            self.caches[(rows, length)] = (cache, [(layer.keys, layer.values) for layer in cache.layers])
        for layer in cache.layers:
            if getattr(layer, "is_initialized", True) and hasattr(layer, "keys"):
                layer.keys = layer.keys.index_select(0, keep)
                layer.values = layer.values.index_select(0, keep)


class Decoder:
    """Draws responses with one architecture's models (every role of a run shares it).

    `max_prompt_tokens`: the cache holds this many prompt positions plus `max_new_tokens`, so every draw of a
    batch size shares one cache (and one captured step); None sizes it by each draw's prompts.
    """

    def __init__(self, max_new_tokens: int, temperature: float, eos_ids: list[int], pad_id: int, *,
                 max_prompt_tokens: int | None = None, eos_every: int = 1, compact: bool = True,
                 capture: bool = False, note: Callable[[str], None] = print):
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_every = max(1, eos_every)
        self.compact = compact
        self.capture = capture
        self.note = note
        self.caches: dict[int, HeldCaches] = {}
        self.styles: dict[type, ForwardStyle] = {}
        self.captured: dict[int, Callable] = {}

    # -- the pieces of a step ---------------------------------------------------------------------------------

    def _style(self, model: nn.Module) -> ForwardStyle:
        kind = type(transformers_model(model))
        if kind not in self.styles:
            self.styles[kind] = ForwardStyle(model)
        return self.styles[kind]

    def _held(self, model: nn.Module) -> HeldCaches:
        inner = transformers_model(model)
        if id(inner) not in self.caches:
            self.caches[id(inner)] = HeldCaches(inner.config)
        return self.caches[id(inner)]

    def pick(self, logits: torch.Tensor, row_keys: torch.Tensor | None, t) -> torch.Tensor:
        """[R] next tokens from [R, V] logits: the keyed Gumbel-max draw, or `generate`'s multinomial."""
        if row_keys is not None:
            return keyed_gumbel_scores(logits, row_keys, t, self.temperature).argmax(-1)
        scores = logits.float()
        if self.temperature != 1.0:  # generate adds no temperature warper at 1.0
            scores = scores / self.temperature
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    def _step_function(self, model: nn.Module, style: ForwardStyle) -> Callable:
        """One decode step: the last tokens → the next tokens."""

        def step(tokens, positions, mask, cache, row_keys, fed):
            # `tokens` is response token number `fed`, at position positions + fed (the cache counts its own);
            # what it predicts is token fed + 1, drawn with that token's noise
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=(positions + fed)[:, None],
                           **style.kwargs(cache)).logits[:, -1]
            return self.pick(logits, row_keys, fed + 1)

        if not self.capture:
            return step
        key = id(model)
        if key not in self.captured:
            mode = "reduce-overhead" if next(model.parameters()).is_cuda else None  # CUDA graphs where there are any
            self.captured[key] = torch.compile(step, mode=mode, dynamic=False)
        return self.captured[key]

    # -- a draw -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               row_keys: torch.Tensor | None = None, run_to_end: bool = False,
               steps: int | None = None) -> torch.Tensor:
        """[B, T] response tokens; T ≤ `steps` (default `max_new_tokens`) is where every row had ended, as in
        `generate`'s output. `run_to_end`: take every step (ranks in lockstep)."""
        rows, prompt_length = prompt_ids.shape
        new = self.max_new_tokens
        device = prompt_ids.device
        # captured: one cache length (and graph) for every prompt length; eager: attention spans only this draw's
        length = (max(self.max_prompt_tokens or 0, prompt_length) if self.capture else prompt_length) + new
        style, held = self._style(model), self._held(model)
        cache = held.fresh(rows, length)
        mask = torch.zeros(rows, length, dtype=prompt_mask.dtype, device=device)
        mask[:, :prompt_length] = prompt_mask
        mask[:, prompt_length:prompt_length + new] = 1  # generate extends the mask by one per token, finished or not
        positions = prompt_mask.long().cumsum(-1) - 1
        positions.masked_fill_(prompt_mask == 0, 1)
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, logits_to_keep=1,
                       **style.kwargs(cache)).logits[:, -1]
        if row_keys is not None:
            row_keys = row_keys.to(device)
        next_positions = positions[:, -1] + 1
        step = self._step_function(model, style)
        tokens = torch.full((rows, new), self.pad_id, dtype=prompt_ids.dtype, device=device)
        eos = torch.tensor(self.eos_ids or [-1], device=device)
        live = torch.arange(rows, device=device)  # the rows still in the batch
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        compact = self.compact and row_keys is not None and not self.capture and not run_to_end
        token = self.pick(logits, row_keys, 0)
        taken = 0
        for t in range(min(new, steps or new)):
            if t > 0:
                token = step(token, next_positions, mask, cache, row_keys, torch.tensor(t - 1, device=device))
                if self.capture:
                    token = token.clone()  # a captured step's output is overwritten by its next replay
            tokens[live, t] = token
            done = done | torch.isin(token, eos)
            taken = t + 1
            if taken == new or run_to_end or taken % self.eos_every or self.eos_ids == []:
                continue
            finished = int(done.sum())
            if finished == len(done):
                break
            if compact and finished * 4 >= len(done):  # a quarter of the rows are done: drop them
                keep = (~done).nonzero().flatten()
                held.keep_rows(rows, length, keep)
                live, done, token = live[keep], done[keep], token[keep]
                mask, next_positions, row_keys = mask[keep], next_positions[keep], row_keys[keep]
        return tokens[:, :taken]
