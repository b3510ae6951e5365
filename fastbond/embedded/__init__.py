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
"""

from fastbond.embedded.grammar import (
    ASPECTS,
    INTENSIFIERS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    all_prompts,
    corpus,
    corpus_entropy,
    full_text,
    prompt_splits,
    sample_documents,
    vocabulary,
    write_prompts_jsonl,
)
from fastbond.embedded.reference import (
    EVAL_PROMPTS_FILE,
    MAX_NEW_TOKENS,
    META_FILE,
    REWARD_NAME,
    TRAIN_PROMPTS_FILE,
    VERSION,
    build_embedded_reference,
    build_tokenizer,
    cpu_threads,
    default_cache_root,
    heldout_loss,
    load_reference,
    pretrain,
    reference_config,
    sample_responses,
)

__all__ = [
    "ASPECTS",
    "INTENSIFIERS",
    "NEGATIVE",
    "NEUTRAL",
    "POSITIVE",
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
