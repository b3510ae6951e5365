"""J-BOND loss from final hidden states and the LM head, without [tokens × vocab] logits.

    jbond_linear_loss(policy_hidden [N_p, H], policy_targets [N_p], policy_seq_ids [N_p],
                      best_hidden   [N_b, H], best_targets   [N_b], best_seq_ids   [N_b],
                      weight [V, H], anchor_token_logps [N_p], rewards [B], anchor_rewards [B, 2])
        -> (loss, metrics)

The J-BOND surrogate of SPEC §5 step 6, with every token log-prob computed by
`fastbond.kernels.linear_logprobs` from the hidden state and the LM head:

    log π_t(y_k) = log_softmax(softcap(h_k · Wᵀ + b) / T)[y_k]     (per token k)
    ℓ_i  = Σ_{k: seq(k)=i} log π_t(y_k)            (policy sample i)
    a_i  = Σ_{k: seq(k)=i} log π_anc(y_k)          (anchor_token_logps, no gradient)
    ℓ₂_i = Σ_{k: seq(k)=i} log π_t(y_bo2,k)        (better anchor sample i)
    R_i = r_J,i − (ℓ_i − a_i),  b_i = Σ_{j≠i} R_j / (B − 1),  A_i = R_i − b_i
    L = mean_i[ (1−β)·(−ℓ₂_i) + β·(−sg(A_i)·ℓ_i) + γ·sg(ℓ_i − a_i)·ℓ_i ]

`loss` and `metrics` are those of `fastbond.kernels.jbond_loss` (same keys,
same meaning) on the padded token log-probs; with `return_entropy` the
metrics also hold `policy_entropy`, the mean token entropy of π_t over the
policy samples' tokens, from the same pass.

Layout: packed, no padding
--------------------------
Each set is a flat list of response tokens; `*_seq_ids[k] ∈ [0, B)` says which
prompt's sample token k belongs to. Tokens of one sequence need not be
contiguous nor in any order relative to other sequences, only in their own
order (which does not matter for a sum anyway). B is `rewards.shape[0]`; a
sequence with no tokens has log-prob 0, as a fully masked row does in the
padded reference. From a padded [B, T] batch (`input_ids`, final `hidden`
[B, T, H], a response mask), with the usual shift — the state at position t
predicts token t + 1 — and m = response_mask[:, 1:]:
`hidden[:, :-1][m]`, `input_ids[:, 1:][m]`, `torch.arange(B)[:, None].expand(B, T − 1)[m]`.
Per-token ids were chosen over cu_seqlens offsets because they carry no
ordering constraint (the policy and better-anchor samples of one prompt may
come from different packed rows) and are what a scatter consumes directly.

Gradients (closed form, for the record; autograd composes them)
---------------------------------------------------------------
The stop-gradients make every per-sequence coefficient a constant, so with g
the upstream gradient of L each token gets a scalar weight

    w_k = g · (−β·A_i + γ·(ℓ_i − a_i)) / B     policy token k of sequence i
    w_k = g · (−(1−β)) / B                     better-anchor token k

and ∂L/∂h, ∂L/∂W, ∂L/∂b are linear_logprobs' backward with grad_output = w
(one different weight per sequence: SPEC §8's warning about backwards that
assume a uniform grad_output is exactly this case).

Design: how the per-sequence weights are obtained without a wasted pass
-----------------------------------------------------------------------
The weights depend on ℓ_i (the policy's own sequence log-prob, through A_i
and ℓ_i − a_i) and, through the leave-one-out baseline, on every other
sequence of the batch. They cannot be known while the logits GEMM of any one
token runs. Three ways around it were weighed (F = 2·N·H·V flops, one logits-
sized GEMM, N = N_p + N_b tokens):

1. *Two passes, a cheap first one* — a no-grad pass for the log-probs
   (1 GEMM, F), the O(B·T) head, then a second pass that knows the weights.
   The second pass must recompute the logits (F) and form ∂h and ∂W (2F).
   That is exactly linear_logprobs' forward followed by its recomputing
   backward (its forward keeps only the per-token log-sum-exp, [N] fp32), so
   the minimal two-pass scheme *is* the autograd composition
       linear_logprobs → scatter to [B, T] → jbond_loss head
   with the second pass triggered by loss.backward(): 4F in all, the cost of
   linear_logprobs fwd+bwd alone. Nothing in the head multiplies by W, so no
   GEMM is added, and doing the second pass inside autograd keeps the
   upstream gradient g (loss scaling, accumulation, a sum with other losses)
   free, instead of baking it into a forward that already computed
   gradients. **This is the design implemented here.**
2. *Reuse the sampler's log-probs* — with ℓ from the rollout, the weights are
   known up front and a single fused pass computing gradients in its forward
   (as fused cross-entropy kernels do) would cost 3F, 25% less. Rejected: the
   inference engine's log-probs come from other kernels at another precision
   (bf16 logits, sometimes another soft-cap/temperature path) and are stale
   after the first optimizer step on a rollout; their error is of the order
   of the signal in ℓ − a (the KL estimate, the γ term, the return), and the
   loss value and metrics would not be the trained policy's. They are fine
   for logging (see fastbond/kernels/jbond_loss.py).
3. *Chunk whole sequences* — process groups of sequences, each fully (fwd and
   grads) before the next. A baseline per group changes the estimator (fewer
   samples, not SPEC §5's batch mean). Keeping the batch baseline exactly is
   possible because it is linear in S = Σ_j R_j: w_k = u_i + c·S with u_i
   known inside the group, so one would accumulate Σ u ∇ℓ and Σ ∇ℓ apart and
   combine them once S is known. That needs two [V, H] gradient accumulators
   and two ∂W GEMMs per token: 4F again, twice the weight-gradient memory
   (1 GiB more for Gemma-2B in bf16) and a bespoke kernel. No gain.

So the no-grad path (torch.no_grad, or nothing requires grad) does one GEMM
(F), the training path four (4F) — verified in tests by counting the flops of
every matmul (chunked) and the calls into linear_logprobs' forward and
backward (chunked and triton), whose grad_output is checked against the
closed-form w above.

Both sample sets go through one linear_logprobs call (hidden states
concatenated, [N, H]): one stream over the vocabulary per pass instead of two,
so the [V, H] head is read once per chunk and the GEMMs see all N tokens. The
concatenation costs one [N, H] copy (N·H vs the N·V logits it avoids).

The per-sequence sums scatter the fp32 token log-probs into padded [B, T_max]
rows (T_max the longest sequence, one small [B, T_max] buffer per set) and
reuse the fused head `fastbond.kernels.jbond_loss` with its masks: sums in a
fixed order, so results are bitwise reproducible (an atomic index_add on CUDA
is not), and the head's own tested metrics and closed-form backward apply
unchanged. The scatter's backward is a gather: the per-token weights w above.

Backends: "reference" (`jbond_linear_loss_ref`: full [N, V] logits, the
test oracle), "chunked" (linear_logprobs and the head in plain PyTorch, any
device), "triton" (both fused; the CPU interpreter under TRITON_INTERPRET=1);
"auto" = triton on CUDA, else chunked. Token log-probs and all sums are fp32
whatever the input dtype (fp32/bf16/fp16); gradients come back in the inputs'
dtypes.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastbond.kernels._backend import resolve_backend
from fastbond.kernels.jbond_loss import jbond_loss, jbond_loss_ref
from fastbond.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
from fastbond.kernels.sequences import BatchSum

__all__ = ["jbond_linear_loss", "jbond_linear_loss_ref"]

_INT_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------
# packed tokens → padded rows
# ----------------------------------------------------------------------------


def _positions(seq_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each token inside its sequence's row ([N] int64), and tokens per sequence ([B]).

    A stable sort groups tokens by sequence while keeping their packed order;
    a token's column is its rank inside its group.
    """
    seq_ids = seq_ids.to(torch.int64)
    counts = torch.bincount(seq_ids, minlength=batch)  # [B]
    order = torch.argsort(seq_ids, stable=True)  # [N]
    starts = torch.cumsum(counts, 0) - counts  # [B] first sorted slot of each sequence
    ranks = torch.arange(seq_ids.shape[0], device=seq_ids.device) - starts[seq_ids[order]]
    positions = torch.empty_like(seq_ids)
    positions[order] = ranks
    return positions, counts


def _pad(values: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor, batch: int, length: int):
    """values [N] → (rows [B, length] with zeros outside the sequences, mask [B, length] bool).

    Out-of-place index_put with unique indices: differentiable w.r.t. `values`
    (its backward gathers) and deterministic.
    """
    index = (seq_ids.to(torch.int64), positions)
    rows = values.new_zeros((batch, length)).index_put(index, values)
    mask = torch.zeros((batch, length), dtype=torch.bool, device=values.device)
    mask[index] = True
    return rows, mask


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _check_inputs(policy_hidden, policy_targets, policy_seq_ids, best_hidden, best_targets, best_seq_ids, weight,
                  anchor_token_logps, rewards, anchor_rewards, beta, gamma) -> int:
    """Shape, dtype and device checks that need no sync; returns B."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, H], got shape {_shape(weight)}")
    h = weight.shape[1]
    for name, hidden in (("policy_hidden", policy_hidden), ("best_hidden", best_hidden)):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != h:
            raise ValueError(f"{name} must be [N, H] with H = {h} (the weight's), got shape {_shape(hidden)}")
    if best_hidden.dtype != policy_hidden.dtype:
        raise TypeError(f"policy_hidden ({policy_hidden.dtype}) and best_hidden ({best_hidden.dtype}) "
                        "must share a dtype")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor [B] (one per sequence), got shape {_shape(rewards)}")
    batch = rewards.shape[0]
    if not isinstance(anchor_rewards, torch.Tensor) or _shape(anchor_rewards) != (batch, 2):
        raise ValueError(f"anchor_rewards must be [B, 2] = [{batch}, 2] (B = len(rewards)), "
                         f"got shape {_shape(anchor_rewards)}")
    sets = (
        ("policy", policy_hidden, policy_targets, policy_seq_ids),
        ("best", best_hidden, best_targets, best_seq_ids),
    )
    for prefix, hidden, targets, seq_ids in sets:
        n = hidden.shape[0]
        for suffix, tensor in (("targets", targets), ("seq_ids", seq_ids)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != (n,):
                raise ValueError(f"{prefix}_{suffix} must have shape [N] = ({n},) like {prefix}_hidden, "
                                 f"got {_shape(tensor)}")
            if tensor.dtype not in _INT_DTYPES:
                raise TypeError(f"{prefix}_{suffix} must be int64 (or int32), got {tensor.dtype}")
    n_policy = policy_hidden.shape[0]
    if not isinstance(anchor_token_logps, torch.Tensor) or anchor_token_logps.shape != (n_policy,):
        raise ValueError(f"anchor_token_logps must have shape [N_p] = ({n_policy},), got {_shape(anchor_token_logps)}")
    if not anchor_token_logps.is_floating_point():
        raise TypeError(f"anchor_token_logps must be floating point, got {anchor_token_logps.dtype}")
    device = policy_hidden.device
    for name, tensor in (("policy_targets", policy_targets), ("policy_seq_ids", policy_seq_ids),
                         ("best_hidden", best_hidden), ("best_targets", best_targets), ("best_seq_ids", best_seq_ids),
                         ("weight", weight), ("anchor_token_logps", anchor_token_logps), ("rewards", rewards),
                         ("anchor_rewards", anchor_rewards)):
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but policy_hidden on {device}")
    return batch


def _check_values_and_lengths(policy_targets, policy_seq_ids, best_targets, best_seq_ids, vocab, batch):
    """Value checks (ids in [0, B), targets in [0, V)) and the longest sequences, in one host sync."""
    policy_pos, policy_counts = _positions(policy_seq_ids.clamp(0, batch - 1), batch)
    best_pos, best_counts = _positions(best_seq_ids.clamp(0, batch - 1), batch)
    facts = torch.stack([
        ((policy_seq_ids < 0) | (policy_seq_ids >= batch)).any().long(),
        ((best_seq_ids < 0) | (best_seq_ids >= batch)).any().long(),
        ((policy_targets < 0) | (policy_targets >= vocab)).any().long(),
        ((best_targets < 0) | (best_targets >= vocab)).any().long(),
        policy_counts.max(),
        best_counts.max(),
    ]).tolist()
    bad_policy_ids, bad_best_ids, bad_policy_t, bad_best_t, policy_len, best_len = facts
    for bad, name in ((bad_policy_ids, "policy_seq_ids"), (bad_best_ids, "best_seq_ids")):
        if bad:
            raise ValueError(f"{name} must lie in [0, B) with B = len(rewards) = {batch}: "
                             "rewards and the sequence ids disagree on the number of sequences")
    for bad, name in ((bad_policy_t, "policy_targets"), (bad_best_t, "best_targets")):
        if bad:
            raise ValueError(f"{name} must lie in [0, {vocab}) (packed tokens: nothing is ignored)")
    return (policy_pos, policy_len), (best_pos, best_len)


# ----------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------


def jbond_linear_loss_ref(
    policy_hidden: torch.Tensor,
    policy_targets: torch.Tensor,
    policy_seq_ids: torch.Tensor,
    best_hidden: torch.Tensor,
    best_targets: torch.Tensor,
    best_seq_ids: torch.Tensor,
    weight: torch.Tensor,
    anchor_token_logps: torch.Tensor,
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    *,
    beta: float = 0.5,
    gamma: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    batch_sum: Optional[BatchSum] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The naive oracle: full [N, V] logits (fp32; fp64 for fp64 inputs), padded rows, `jbond_loss_ref`."""
    batch = rewards.shape[0]
    vocab = weight.shape[0]
    (policy_pos, policy_len), (best_pos, best_len) = _check_values_and_lengths(
        policy_targets, policy_seq_ids, best_targets, best_seq_ids, vocab, batch)
    common = dict(bias=bias, temperature=temperature, softcap=softcap)
    policy_logp, policy_ent = linear_logprobs_ref(policy_hidden, weight, policy_targets, return_entropy=True, **common)
    best_logp = linear_logprobs_ref(best_hidden, weight, best_targets, **common)
    policy_rows, policy_mask = _pad(policy_logp, policy_seq_ids, policy_pos, batch, policy_len)
    best_rows, best_mask = _pad(best_logp, best_seq_ids, best_pos, batch, best_len)
    anchor_rows, _ = _pad(anchor_token_logps.detach().to(policy_logp.dtype), policy_seq_ids, policy_pos, batch,
                          policy_len)
    loss, metrics = jbond_loss_ref(policy_rows, policy_mask, best_rows, best_mask, anchor_rows, rewards,
                                   anchor_rewards, beta=beta, gamma=gamma, batch_sum=batch_sum)
    if return_entropy:
        metrics["policy_entropy"] = policy_ent.mean()
    return loss, metrics


# ----------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------


def jbond_linear_loss(
    policy_hidden: torch.Tensor,
    policy_targets: torch.Tensor,
    policy_seq_ids: torch.Tensor,
    best_hidden: torch.Tensor,
    best_targets: torch.Tensor,
    best_seq_ids: torch.Tensor,
    weight: torch.Tensor,
    anchor_token_logps: torch.Tensor,
    rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    *,
    beta: float = 0.5,
    gamma: float = 0.0,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    return_entropy: bool = False,
    batch_sum: Optional[BatchSum] = None,
    filter: Optional[bool] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J-BOND surrogate loss (SPEC §5 step 6) from final hidden states, never holding [N, V] logits.

    Args:
        policy_hidden:      [N_p, H] final hidden states at the policy samples' response tokens
                            (the state that predicts each token; with grad).
        policy_targets:     [N_p] int64 the tokens they predict.
        policy_seq_ids:     [N_p] int64 the prompt (sequence) index in [0, B) of each token.
        best_hidden:        [N_b, H] the same for the better of the two anchor samples (with grad).
        best_targets:       [N_b]
        best_seq_ids:       [N_b]
        weight:             [V, H] the LM head (with grad), gathered if ZeRO-3 partitioned.
        anchor_token_logps: [N_p] log π_anc of the policy tokens (no grad; detached here).
        rewards:            [B] reward of each policy sample; B is its length.
        anchor_rewards:     [B, 2] rewards of the two anchor samples.
        beta:  Jeffreys weight in [0, 1].  gamma: weight ≥ 0 of KL(π ‖ π_anc).
        bias:  [V] LM-head bias or None.  temperature, softcap: as in the model (SPEC §8:
               soft-cap on the raw logits, then divide by the temperature).
        backend: "auto" (triton on CUDA, else chunked), "reference", "chunked", "triton".
        chunk_size: vocabulary columns per chunk in linear_logprobs (default: sized from N).
        return_entropy: also report `policy_entropy` (mean token entropy over policy tokens).
        batch_sum: these sequences are one rank's share of a larger batch; a function summing a
            tensor over every share (e.g. an all-reduce). The leave-one-out baseline is then the
            whole batch's, as in `jbond_loss`; the metrics stay the share's.
        filter: linear_logprobs' gradient filter (triton, 16-bit; docs/kernels.md); None: its default (off).
    Returns:
        (loss, metrics): an fp32 scalar to minimize, and the detached scalars of
        `fastbond.kernels.jbond_loss.jbond_loss` under the same keys.

    Differentiable w.r.t. policy_hidden, best_hidden, weight and bias. With grad the
    GEMM work is that of linear_logprobs fwd+bwd on N_p + N_b tokens; without, one forward.
    """
    batch = _check_inputs(policy_hidden, policy_targets, policy_seq_ids, best_hidden, best_targets, best_seq_ids,
                          weight, anchor_token_logps, rewards, anchor_rewards, beta, gamma)
    resolved = resolve_backend(backend, policy_hidden)
    common = dict(bias=bias, temperature=temperature, softcap=softcap)
    if resolved == "reference":
        return jbond_linear_loss_ref(policy_hidden, policy_targets, policy_seq_ids, best_hidden, best_targets,
                                     best_seq_ids, weight, anchor_token_logps, rewards, anchor_rewards, beta=beta,
                                     gamma=gamma, return_entropy=return_entropy, batch_sum=batch_sum, **common)

    (policy_pos, policy_len), (best_pos, best_len) = _check_values_and_lengths(
        policy_targets, policy_seq_ids, best_targets, best_seq_ids, weight.shape[0], batch)
    n_policy = policy_hidden.shape[0]

    # One linear_logprobs call over both sets: its forward is the cheap first pass
    # (token log-probs, lse kept), its recomputing backward the second (see the module docstring).
    hidden = torch.cat([policy_hidden, best_hidden])  # [N_p + N_b, H]
    targets = torch.cat([policy_targets.to(torch.int64), best_targets.to(torch.int64)])  # [N_p + N_b]
    out = linear_logprobs(hidden, weight, targets, backend=backend, chunk_size=chunk_size,
                          return_entropy=return_entropy, filter=filter, **common)
    logp, entropy = out if return_entropy else (out, None)  # [N_p + N_b] fp32

    # O(N) glue: packed fp32 log-probs → padded [B, T] rows for the fused head
    policy_rows, policy_mask = _pad(logp[:n_policy], policy_seq_ids, policy_pos, batch, policy_len)
    best_rows, best_mask = _pad(logp[n_policy:], best_seq_ids, best_pos, batch, best_len)
    anchor_rows, _ = _pad(anchor_token_logps.detach().float(), policy_seq_ids, policy_pos, batch, policy_len)

    # The head: loss, metrics and the per-sequence weights; its backward hands
    # linear_logprobs one weight per token (gathered back through the padding).
    loss, metrics = jbond_loss(policy_rows, policy_mask, best_rows, best_mask, anchor_rows, rewards, anchor_rewards,
                               beta=beta, gamma=gamma, backend=resolved, batch_sum=batch_sum)
    if return_entropy:
        metrics["policy_entropy"] = entropy[:n_policy].mean()
    return loss, metrics
