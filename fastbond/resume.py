"""What a resumed run may change: the checkpoint's config against the new one.

A resume continues the saved state — weights, optimizer, anchor, prompt
position, RNG — under the new config. Some changes make that state mean
something else, and are refused with a one-line error; every other change is
allowed and printed, so a run never silently does a different job from the
one its checkpoint started.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Callable

from fastbond.config import RENAMED_KEYS
from fastbond.errors import FastbondError

# Changes the saved state cannot carry over, and why.
REFUSED = {
    "algorithm.name": "the saved anchor, pairs and optimizer state belong to the checkpoint's algorithm",
    "model.policy": "the saved weights are the checkpoint's model's",
    "model.reference": "π_ref defines the objective the saved policy was trained on",
    "engine.kind": "the checkpoint's files are laid out for its engine",
    "engine.zero_stage": "DeepSpeed's checkpoint layout depends on the ZeRO stage",
    "seed": "each epoch's prompt order comes from the seed: the saved position would point into another order",
}
# data.prompts may move (another path, the same prompts); other prompts are refused by content.
PROMPTS_REFUSED = "the saved position indexes the checkpoint's prompt list"
# Keys that say how to start, not what to run.
IGNORED = {"checkpoint.resume", "checkpoint.overwrite"}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key that differs, in the new config's order; keys renamed
    since `old` was saved are compared under their new names."""
    before = {RENAMED_KEYS.get(key, key): value for key, value in flatten(old).items()}
    after = flatten(new)
    keys = list(after) + [k for k in before if k not in after]
    missing = object()
    return [(k, before.get(k, missing), after.get(k, missing)) for k in keys
            if k not in IGNORED and before.get(k, missing) != after.get(k, missing)]


# prompts hashed per slice: a dataset's are read from disk a slice at a time, never all at once
FINGERPRINT_SLICE = 65_536


def prompts_fingerprint(prompts: Sequence, template: str | None = None) -> dict[str, Any]:
    r"""Count and sha256 of the prompts as written, joined by "\n\x00", hashed a slice at a time: the same
    digest as hashing the joined text (what checkpoints of a list of strings have always recorded), for any
    sequence. With the chat template the prompts are rendered with (`fastbond.chat.template_in_use`), its
    sha256 too: the rendered prompts are a function of both, so a change of template or of
    data.chat_template changes what is trained, and plain runs keep the digest they always had."""
    digest = hashlib.sha256()
    for start in range(0, len(prompts), FINGERPRINT_SLICE):
        texts = "\n\x00".join(map(_prompt_text, prompts[start : start + FINGERPRINT_SLICE]))
        digest.update((("\n\x00" if start else "") + texts).encode("utf-8"))
    fingerprint = {"count": len(prompts), "sha256": digest.hexdigest()}
    if template is not None:
        fingerprint["chat_template_sha256"] = hashlib.sha256(template.encode("utf-8")).hexdigest()
    return fingerprint


def _prompt_text(prompt) -> str:
    # a prompt of chat messages is hashed as its JSON text
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _show(value: Any) -> str:
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, tuple, type(None))) else repr(value)


def check_resume(checkpoint_name: str, old: dict | None, new: dict, saved_prompts: dict | None,
                 prompts: dict, say: Callable[[str], None] = print) -> list[tuple[str, Any, Any]]:
    """Refuse a change the saved state cannot carry; print every other change. Returns the changes."""
    if saved_prompts is not None and saved_prompts != prompts:
        raise FastbondError(
            f"cannot resume from {checkpoint_name}: data.prompts holds other prompts than when it was saved "
            f"({saved_prompts['count']} then, {prompts['count']} now, compared as rendered by data.chat_template) "
            f"and {PROMPTS_REFUSED}; "
            "resume with the same prompts, or start a new run")
    if old is None:
        say(f"resuming from {checkpoint_name}, which records no config: changes to the config are not checked")
        return []
    changes = config_changes(old, new)
    for key, before, after in changes:
        if key in REFUSED:
            raise FastbondError(
                f"cannot resume from {checkpoint_name}: {key} changed from {_show(before)} to {_show(after)} and "
                f"{REFUSED[key]}; set it back, or start a new run (another run_dir, or --force)")
    if changes:
        say(f"resuming from {checkpoint_name} with changed settings: "
            + "; ".join(f"{key}: {_show(before)} → {_show(after)}" for key, before, after in changes))
    return changes
