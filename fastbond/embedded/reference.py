"""The embedded π_ref: a word-level tokenizer and a tiny Llama pretrained on the grammar, cached on disk.

Built from a seed in ~15 s on one CPU core, saved in the transformers layout
(safetensors) and loaded back with `from_pretrained`, the path any user
checkpoint takes. The build is atomic (a temporary sibling renamed into
place), so a killed build never leaves a half-written cache, and it holds a
lock on the cache root, so the processes of one machine (the ranks of a node)
build it once: the first builds, the others wait and read its build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fastbond.embedded.grammar import (
    entropy_per_token,
    corpus,
    full_text,
    prompt_splits,
    sample_documents,
    vocabulary,
    write_prompts_jsonl,
)

VERSION = "v2"  # bump when the grammar, tokenizer or model changes: it names the cache directory
MAX_NEW_TOKENS = 16  # the longest response the grammar makes is 14 words + EOS
REWARD_NAME = "sentiment"  # the builtin scorer this world is designed for
META_FILE = "fastbond_embedded.json"  # written last: its presence marks a complete build
TRAIN_PROMPTS_FILE = "train_prompts.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"


# ---------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(padding_side: str = "left"):
    """A word-level `PreTrainedTokenizerFast`: whitespace split, BOS prepended, unknown words → <unk>.

    Left padding by default, as generation needs; the choice is saved with it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
        model_max_length=128,
        # Clean-up would glue " ." to the previous word and break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
    )


def reference_config(tokenizer):
    """The tiny Llama of π_ref: 2 layers, hidden 64, 2 heads of 32; untied embeddings like most real LMs.

    Head size 32, not 16: vLLM's CPU attention has no kernel below 32
    (rollout.backend=vllm); 2 × 32 has the parameters of 4 × 16.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] ids (BOS … EOS) and labels with padding ignored (−100)."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    length = max(len(row) for row in rows)
    # Padding the Python lists and converting once is ~50x faster than filling tensor rows.
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows], dtype=torch.long)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    return ids, labels


def pretrain(
    model, tokenizer, texts: list[str], *, batch_size: int = 64, lr: float = 3e-3, warmup: int = 20
) -> list[float]:
    """Next-token training, one pass over `texts` in order; returns the loss of every step.

    AdamW with linear warm-up and cosine decay to 10 %: 300 steps of batch 64
    come within 0.02 nats/token of the grammar's entropy in ~10 s on one CPU core.
    """
    ids, labels = _encode(tokenizer, texts)
    steps = len(texts) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    for step in range(steps):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        batch_ids, batch_labels = ids[rows], labels[rows]
        length = int((batch_labels != -100).sum(1).max())  # trim the batch's all-pad columns
        batch_ids, batch_labels = batch_ids[:, :length], batch_labels[:, :length]
        loss = model(input_ids=batch_ids, attention_mask=batch_ids.ne(tokenizer.pad_token_id), labels=batch_labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], batch_size: int = 256) -> float:
    """Mean next-token loss in nats per predicted token (words + EOS) over `texts`."""
    ids, labels = _encode(tokenizer, texts)
    nats, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch_ids, batch_labels = ids[start : start + batch_size], labels[start : start + batch_size]
        logits = model(input_ids=batch_ids, attention_mask=batch_ids.ne(tokenizer.pad_token_id)).logits
        targets = batch_labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        nats += loss.item()
        count += int((targets != -100).sum())
    return nats / count


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 1.0
) -> list[str]:
    """One sampled response per prompt, decoded without special tokens; seed with `torch.manual_seed`.

    Pure ancestral sampling: top-k and top-p are switched off, since
    generate's default top_k=50 would cut this ~100-word vocabulary.
    """
    encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")  # left-padded
    device = next(model.parameters()).device
    output = model.generate(
        input_ids=encoded["input_ids"].to(device),
        attention_mask=encoded["attention_mask"].to(device),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------
# the cached build


def default_cache_root() -> Path:
    """$FASTBOND_CACHE, else ~/.cache/fastbond."""
    return Path(os.environ.get("FASTBOND_CACHE") or Path.home() / ".cache" / "fastbond")


@contextlib.contextmanager
def cpu_threads(count: int = 1):
    """Run the block with `count` intra-op CPU threads, then restore the previous number.

    Matmuls of a 64-wide model gain nothing from threads, and on a busy
    2-core machine their synchronisation made training and sampling 3-20x
    slower than one thread: use this around CPU work on the embedded model.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence transformers' shard progress bars, noise for a small checkpoint; restore them after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    # transformers 5 records its own class name "TokenizersBackend"; the older
    # alias loads the same tokenizer.json in both transformers 4 and 5.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_model_files(model, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors, as `save_pretrained` writes them, on any rank.

    Once torch.distributed is initialized, transformers' `save_pretrained` writes the weights and the
    config on global rank 0 only and nothing elsewhere; each node builds its own cache, and on every
    node but the first the rank that builds it is not global rank 0.
    """
    from safetensors.torch import save_model

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _complete(directory: Path) -> bool:
    """A finished build: the metadata written last, and the model files before it."""
    return all((directory / name).is_file() for name in (META_FILE, "config.json", "model.safetensors"))


@contextlib.contextmanager
def _build_lock(root: Path, name: str):
    """An exclusive lock on `root/.name.lock` while one process builds `name`; the others wait for it."""
    with open(root / f".{name}.lock", "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(directory: Path, seed: int, steps: int, batch_size: int, weights: Path | None = None) -> dict:
    """Pretrain π_ref (or load `weights`) and write model, tokenizer, prompts and metadata into `directory`."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    with cpu_threads(1), torch.random.fork_rng(devices=[]):  # fork: leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(reference_config(tokenizer))
        if weights is None:
            losses = pretrain(model, tokenizer, corpus(steps * batch_size, seed=seed), batch_size=batch_size)
        else:
            model.load_state_dict(load_file(str(weights)), strict=True)
            model.eval()
            losses = []
        heldout_docs = sample_documents(2048, seed=seed + 1_000_003)
        heldout = heldout_loss(model, tokenizer, [full_text(p, r) for p, r, _ in heldout_docs])
    entropy = entropy_per_token(heldout_docs)

    # Sampling defaults a plain `generate` call then follows: ancestral sampling, short responses.
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample, generation.top_k, generation.top_p = True, 0, 1.0
    generation.max_new_tokens = MAX_NEW_TOKENS
    save_model_files(model, directory)
    save_tokenizer(tokenizer, directory)

    train, evaluation = prompt_splits(seed)
    write_prompts_jsonl(train, directory / TRAIN_PROMPTS_FILE)
    write_prompts_jsonl(evaluation, directory / EVAL_PROMPTS_FILE)
    meta = {
        "version": VERSION,
        "seed": seed,
        "reward": REWARD_NAME,
        "max_new_tokens": MAX_NEW_TOKENS,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": "pretrained here" if weights is None else f"loaded from {weights.name}",
        "pretrain_steps": steps,
        "pretrain_batch_size": batch_size,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "heldout_loss": heldout,
        "entropy": entropy,  # nats/token of the same held-out documents: the loss floor
        "uniform_loss": math.log(len(tokenizer)),
        "build_seconds": time.perf_counter() - started,
        "train_prompts": TRAIN_PROMPTS_FILE,
        "eval_prompts": EVAL_PROMPTS_FILE,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def build_embedded_reference(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    *,
    steps: int = 300,
    batch_size: int = 64,
    weights: str | Path | None = None,
) -> Path:
    """The directory of the embedded π_ref, built on first use and reused after.

    `cache_dir` is the cache root (default `default_cache_root()`); the build
    lives in `<root>/embedded-v2-seed<seed>` and holds a transformers checkpoint
    (model.safetensors, tokenizer), the train / eval prompt files and
    `fastbond_embedded.json` (losses, entropy, build time).

    The build happens in a temporary sibling directory that is renamed into
    place in one step, so a killed build never leaves a half-written
    checkpoint. Processes that share the cache root (the ranks of one node)
    build it once: the first takes a lock on the root and builds, the others
    wait on the lock and then read its build. Across nodes that share one
    cache on a file system without working locks, two builds at once still
    end with one complete copy (the rename). The cache is keyed by version and
    seed only: `steps` and `batch_size` exist so tests can make a quick build
    in a directory of their own.

    `weights` (a model.safetensors of this version's π_ref) is loaded instead
    of pretraining. Pretraining sums floats in the order of the CPU's vector
    units, so two machines build slightly different π_refs from one seed; the
    tests build theirs from weights kept in the repository
    (tests/fastbond/data/, written by tools/test_reference.py), so numbers
    pinned on one machine hold on another.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / f"embedded-{VERSION}-seed{seed}"
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, target.name):
        if _complete(target):  # built by the process this one waited for
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            _build_into(scratch, seed, steps, batch_size, None if weights is None else Path(weights))
            if target.exists() and not _complete(target):
                # an incomplete directory left by hand, or by a version whose build on a rank other than
                # global rank 0 wrote no model
                shutil.rmtree(target)
            try:
                os.replace(scratch, target)
            except OSError:
                if not _complete(target):  # not a lost race with a build elsewhere: a real failure
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_reference(path: str | Path, padding_side: str = "left"):
    """(model, tokenizer) of a built directory, through the ordinary `from_pretrained` path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    with quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer
