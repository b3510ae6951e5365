"""The embedded default world: grammar, tokenizer, reference model and prompts, all made locally.

`fastbond train` with no config must train something meaningful on a fresh
CPU machine without downloading anything. This module builds, from a seed:

1. a corpus of short movie-review sentences from a template grammar
   ("the music in the golden river was not very good and the cast was
   charming ."), shipped as code;
2. a word-level tokenizer (a `PreTrainedTokenizerFast` with BOS/EOS/pad/unk);
3. π_ref: a 2-layer Llama of ~0.1M parameters pretrained on that corpus for a
   few seconds on CPU, saved with `save_pretrained` (safetensors) and loaded
   back with `AutoModelForCausalLM.from_pretrained`, the same path as any
   user checkpoint;
4. disjoint train / held-out eval prompt sets (`{"prompt": ...}` jsonl files).

The format is plain text: the prompt ends where the review's verdict starts
("i thought the silent river was"), and the response is the continuation up to
EOS; the full text is `prompt + " " + response`.

Why Best-of-N matters here: the reward (`fastbond.rewards`, builtin
"sentiment") is +1 per positive word and −1 per negative word of the response.
The grammar draws positive, negative and neutral adjectives, sometimes negated,
with odds set by a hidden quality of the film's noun (a "river" is liked, a
"machine" is not), and a clause after "but" leans the other way. π_ref learns
that mix, so its samples for one prompt spread over roughly −2…+2 and the best
of N of them scores clearly higher as N grows; a policy can reach that by
shifting probability toward positive words, which is what BOND distils.

The grammar is unambiguous (every choice shows in the text), so the corpus
entropy is known exactly and the reference model's loss can be compared to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fastbond.rewards import NEGATIVE_WORDS, POSITIVE_WORDS

__all__ = [
    "VERSION",
    "MAX_NEW_TOKENS",
    "REWARD_NAME",
    "META_FILE",
    "TRAIN_PROMPTS_FILE",
    "EVAL_PROMPTS_FILE",
    "sample_documents",
    "corpus",
    "corpus_entropy",
    "vocabulary",
    "build_tokenizer",
    "reference_config",
    "pretrain",
    "heldout_loss",
    "all_prompts",
    "prompt_splits",
    "write_prompts_jsonl",
    "full_text",
    "sample_responses",
    "cpu_threads",
    "default_cache_root",
    "build_embedded_reference",
    "load_reference",
]

VERSION = "v1"  # bump when the grammar, tokenizer or model changes: it names the cache directory
MAX_NEW_TOKENS = 16  # the longest response the grammar makes is 14 words + EOS
REWARD_NAME = "sentiment"  # the builtin scorer this world is designed for
META_FILE = "fastbond_embedded.json"  # written last: its presence marks a complete build
TRAIN_PROMPTS_FILE = "train_prompts.jsonl"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"

# ---------------------------------------------------------------------------
# the grammar

ASPECTS = ("plot", "acting", "music", "ending", "dialogue", "pacing", "cast", "script")
TITLE_ADJECTIVES = ("silent", "last", "broken", "golden", "hidden", "lost", "final", "dark", "little", "wild")
# Hidden quality q of a film, by its noun: the odds that a verdict is positive
# rather than negative. It makes prompts differ in how hard a high reward is.
NOUN_QUALITY = {
    "river": 0.8, "garden": 0.8, "voyage": 0.8,
    "detective": 0.5, "island": 0.5, "letter": 0.5, "mirror": 0.5,
    "machine": 0.2, "empire": 0.2, "storm": 0.2,
}  # fmt: skip
POSITIVE = tuple(sorted(POSITIVE_WORDS))  # sorted: sets have no stable order across runs
NEGATIVE = tuple(sorted(NEGATIVE_WORDS))
NEUTRAL = ("long", "short", "loud", "quiet", "simple", "ordinary", "familiar", "unusual")
INTENSIFIERS = ("very", "really", "quite", "rather", "so")
CONJUNCTIONS = ("and", "but")

# (prompt template, whether the response opens with a full clause rather than a bare verdict)
TEMPLATES = (
    ("the {aspect} in the {title} was", False),
    ("i thought the {title} was", False),
    ("the {title} : the {aspect} felt", False),
    ("review of the {title} :", True),
)

P_NEUTRAL = 0.3  # of a verdict's adjective being neutral; the rest splits q : 1 − q
P_NOT = 0.15
P_INTENSIFIER = 0.3
P_SECOND_CLAUSE = 0.45


class _Draw:
    """Seeded choices that also sum their log-probability, giving each document's exact log p."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.logp = 0.0

    def choice(self, options: Sequence, weights: Sequence[float] | None = None):
        weights = list(weights) if weights is not None else [1.0] * len(options)
        total = sum(weights)
        index = self.rng.choices(range(len(options)), weights=weights)[0]
        self.logp += math.log(weights[index] / total)
        return options[index]

    def flip(self, p: float) -> bool:
        outcome = self.rng.random() < p
        self.logp += math.log(p if outcome else 1.0 - p)
        return outcome


def _verdict(draw: _Draw, quality: float) -> list[str]:
    """[not] [intensifier] adjective — e.g. "not very good"."""
    words = ["not"] if draw.flip(P_NOT) else []
    if draw.flip(P_INTENSIFIER):
        words.append(draw.choice(INTENSIFIERS))
    weights = ((1 - P_NEUTRAL) * quality, (1 - P_NEUTRAL) * (1 - quality), P_NEUTRAL)
    pool = draw.choice((POSITIVE, NEGATIVE, NEUTRAL), weights)
    return words + [draw.choice(pool)]


def _clause(draw: _Draw, quality: float) -> list[str]:
    return ["the", draw.choice(ASPECTS), "was"] + _verdict(draw, quality)


def _response(draw: _Draw, opens_clause: bool, quality: float) -> list[str]:
    words = _clause(draw, quality) if opens_clause else _verdict(draw, quality)
    if draw.flip(P_SECOND_CLAUSE):
        conjunction = draw.choice(CONJUNCTIONS)
        # "but" announces a contrast: the second verdict leans the other way.
        words += [conjunction] + _clause(draw, 1 - quality if conjunction == "but" else quality)
    return words + ["."]


def _prompt(template: str, aspect: str, adjective: str, noun: str) -> str:
    return template.format(aspect=aspect, title=f"{adjective} {noun}")


def sample_documents(num_docs: int, seed: int) -> list[tuple[str, str, float]]:
    """`num_docs` grammar draws as (prompt, response, exact log-probability of the document)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        draw = _Draw(rng)
        template, opens_clause = draw.choice(TEMPLATES)
        aspect = draw.choice(ASPECTS) if "{aspect}" in template else ""
        adjective, noun = draw.choice(TITLE_ADJECTIVES), draw.choice(tuple(NOUN_QUALITY))
        response = _response(draw, opens_clause, NOUN_QUALITY[noun])
        # EOS is part of the document: its probability is 1 once "." ends the response.
        docs.append((_prompt(template, aspect, adjective, noun), " ".join(response), draw.logp))
    return docs


def full_text(prompt: str, response: str) -> str:
    """The document a prompt and its response make (word-level text: one space between)."""
    return f"{prompt} {response}" if response else prompt


def corpus(num_docs: int, seed: int) -> list[str]:
    """Pretraining texts: prompt and response joined."""
    return [full_text(p, r) for p, r, _ in sample_documents(num_docs, seed)]


def corpus_entropy(num_docs: int = 20000, seed: int = 12345) -> float:
    """Entropy of the grammar in nats per predicted token (words + EOS), by exact log-probs of draws.

    The ratio of sums matches how a language model's mean token loss weighs
    documents of different lengths.
    """
    return _entropy_per_token(sample_documents(num_docs, seed))


def _entropy_per_token(docs: list[tuple[str, str, float]]) -> float:
    nats = -sum(logp for _, _, logp in docs)
    tokens = sum(len(full_text(p, r).split()) + 1 for p, r, _ in docs)  # + EOS
    return nats / tokens


def _word_classes() -> list[tuple[str, ...]]:
    function_words = ("the", "in", "was", "i", "thought", "felt", "review", "of", ":", ".", "not")
    return [function_words, ASPECTS, TITLE_ADJECTIVES, tuple(NOUN_QUALITY), POSITIVE, NEGATIVE, NEUTRAL,
            INTENSIFIERS, CONJUNCTIONS]  # fmt: skip


def vocabulary() -> list[str]:
    """Special tokens first (pad 0, bos 1, eos 2, unk 3), then every grammar word, in a fixed order."""
    words = [w for group in _word_classes() for w in group]
    # Disjoint word classes keep the grammar unambiguous, so `corpus_entropy` is exact.
    assert len(words) == len(set(words)), "a word appears in two classes of the grammar"
    return ["<pad>", "<bos>", "<eos>", "<unk>"] + words


# ---------------------------------------------------------------------------
# prompts


def all_prompts() -> list[str]:
    """Every prompt the grammar can open with (1,800), in a fixed order."""
    prompts = []
    for template, _ in TEMPLATES:
        aspects = ASPECTS if "{aspect}" in template else ("",)
        for aspect in aspects:
            for adjective in TITLE_ADJECTIVES:
                for noun in NOUN_QUALITY:
                    prompts.append(_prompt(template, aspect, adjective, noun))
    return prompts


def prompt_splits(seed: int = 0, num_eval: int = 200) -> tuple[list[str], list[str]]:
    """Disjoint (train, eval) prompt lists: a seeded shuffle of `all_prompts`, eval first."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[num_eval:], prompts[:num_eval]


def write_prompts_jsonl(prompts: Iterable[str], path: str | Path) -> Path:
    """One `{"prompt": ...}` object a line, the format `data.prompts` reads."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return path


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
    """The tiny Llama of π_ref: 2 layers, hidden 64, 4 heads; untied embeddings like most real LMs."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
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
def _quiet_progress_bars():
    """Silence transformers' shard progress bars, noise for a 0.4 MB checkpoint; restore them after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_tokenizer(tokenizer, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    # transformers 5 records its own class name "TokenizersBackend"; the older
    # alias loads the same tokenizer.json in both transformers 4 and 5.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _build_into(directory: Path, seed: int, steps: int, batch_size: int) -> dict:
    """Pretrain π_ref and write model, tokenizer, prompts and metadata into `directory`."""
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = build_tokenizer()
    with cpu_threads(1), torch.random.fork_rng(devices=[]):  # fork: leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(reference_config(tokenizer))
        losses = pretrain(model, tokenizer, corpus(steps * batch_size, seed=seed), batch_size=batch_size)
        heldout_docs = sample_documents(2048, seed=seed + 1_000_003)
        heldout = heldout_loss(model, tokenizer, [full_text(p, r) for p, r, _ in heldout_docs])
    entropy = _entropy_per_token(heldout_docs)

    # Sampling defaults a plain `generate` call then follows: ancestral sampling, short responses.
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample, generation.top_k, generation.top_p = True, 0, 1.0
    generation.max_new_tokens = MAX_NEW_TOKENS
    with _quiet_progress_bars():
        model.save_pretrained(directory)
    _save_tokenizer(tokenizer, directory)

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
        "pretrain_steps": steps,
        "pretrain_batch_size": batch_size,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
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
    cache_dir: str | Path | None = None, seed: int = 0, *, steps: int = 300, batch_size: int = 64
) -> Path:
    """The directory of the embedded π_ref, built on first use and reused after.

    `cache_dir` is the cache root (default `default_cache_root()`); the build
    lives in `<root>/embedded-v1-seed<seed>` and holds a transformers checkpoint
    (model.safetensors, tokenizer), the train / eval prompt files and
    `fastbond_embedded.json` (losses, entropy, build time).

    The build happens in a temporary sibling directory that is renamed into
    place in one step, so a killed build never leaves a half-written
    checkpoint, and two processes building at once both end with one
    complete copy. The cache is keyed by version and seed only: `steps` and
    `batch_size` exist so tests can make a quick build in a directory of
    their own.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / f"embedded-{VERSION}-seed{seed}"
    if (target / META_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        _build_into(scratch, seed, steps, batch_size)
        if target.exists() and not (target / META_FILE).is_file():
            shutil.rmtree(target)  # an incomplete directory left by hand or by an old version
        try:
            os.replace(scratch, target)
        except OSError:
            if not (target / META_FILE).is_file():  # not a lost race with a concurrent build: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_reference(path: str | Path, padding_side: str = "left"):
    """(model, tokenizer) of a built directory, through the ordinary `from_pretrained` path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    with _quiet_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer
