"""The embedded default world: grammar, tokenizer, reference model and prompts, all made locally.

`fastbond train` with no config must train something meaningful on a fresh
CPU machine without downloading anything. This package builds, from a seed:

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

    grammar.py     the documents, their exact log-probabilities, the prompts
    reference.py   tokenizer, tiny Llama, pretraining, the cached build

`EMBEDDED` is the config value that names this world (`model.policy`,
`data.prompts`). Importing the package is light (no torch): the config reads
`EMBEDDED` before anything heavy loads, and the names below load their module
on first use.
"""

from __future__ import annotations

import importlib

EMBEDDED = "embedded"  # model.policy / data.prompts / data.eval_prompts: the built-in world, made locally

# name → the module of this package that defines it
_HOME = {
    "ASPECTS": "grammar",
    "INTENSIFIERS": "grammar",
    "NEGATIVE": "grammar",
    "NEUTRAL": "grammar",
    "POSITIVE": "grammar",
    "all_prompts": "grammar",
    "corpus": "grammar",
    "corpus_entropy": "grammar",
    "full_text": "grammar",
    "prompt_splits": "grammar",
    "sample_documents": "grammar",
    "vocabulary": "grammar",
    "write_prompts_jsonl": "grammar",
    "EVAL_PROMPTS_FILE": "reference",
    "MAX_NEW_TOKENS": "reference",
    "META_FILE": "reference",
    "REWARD_NAME": "reference",
    "TRAIN_PROMPTS_FILE": "reference",
    "VERSION": "reference",
    "build_embedded_reference": "reference",
    "build_tokenizer": "reference",
    "cpu_threads": "reference",
    "default_cache_root": "reference",
    "heldout_loss": "reference",
    "load_reference": "reference",
    "pretrain": "reference",
    "reference_config": "reference",
    "sample_responses": "reference",
}

__all__ = ["EMBEDDED", *_HOME]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
