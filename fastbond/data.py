"""Prompt files and the deterministic, resumable order in which a run reads them.

A prompt file is either `.jsonl` (one JSON object a line: a "prompt" string,
or "messages", a list of chat messages as in TRL's conversational format) or
plain text (one prompt a line). Blank lines are skipped; anything else
malformed is an error naming the file and line. A dataset (a parquet, arrow,
csv or json file, a folder, a `save_to_disk` directory) is read by
fastbond/prompt_datasets.py, as a sequence that is never a list in memory.
Chat messages are rendered through the policy's chat template once the
tokenizer is loaded (`fastbond.chat`).
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Sequence
from pathlib import Path

from fastbond.chat import RawPrompt, prompt_token_ids
from fastbond.errors import FastbondError
from fastbond.prompt_datasets import is_dataset, open_prompts

CHAT_ROLES = ("system", "user", "assistant")


def read_prompts(path: str | Path) -> list[RawPrompt]:
    path = Path(path)
    if path.is_dir():
        raise FastbondError(f"prompt file {path} is a directory, not a file")
    if not path.is_file():
        raise FastbondError(f"prompt file not found: {path}")
    prompts = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode_line(path, number, raw)
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                prompts.append(_parse_jsonl_line(path, number, line))
            else:
                prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise FastbondError(f"prompt file {path} holds no prompts")
    return prompts


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    # Decoded line by line, so a file that is not UTF-8 is an error naming the line.
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        bad = error.object[error.start]
        raise FastbondError(f"{path} line {number}: not valid UTF-8 (byte {bad:#04x})") from None


def _parse_jsonl_line(path: Path, number: int, line: str) -> RawPrompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise FastbondError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or ("prompt" not in record and "messages" not in record):
        raise FastbondError(f"{path} line {number}: expected an object with a \"prompt\" or a \"messages\" key")
    if "prompt" in record and "messages" in record:
        raise FastbondError(f"{path} line {number}: both \"prompt\" and \"messages\"; a prompt is one or the other")
    if "messages" in record:
        return _parse_messages(path, number, record["messages"])
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise FastbondError(f"{path} line {number}: \"prompt\" must be a non-empty string")
    return prompt


def _parse_messages(path: Path, number: int, messages: object) -> list[dict]:
    """A chat prompt: messages with a role and string content, ending on the user's turn the response answers."""
    where = f"{path} line {number}"
    if not isinstance(messages, list) or not messages:
        raise FastbondError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise FastbondError(f"{where}: messages[{index}] must be an object whose \"role\" is one of "
                                f"{', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FastbondError(f"{where}: messages[{index}] must have a string \"content\"")
    if messages[-1]["role"] != "user":
        raise FastbondError(f"{where}: the last message must be the user's (the response answers it), "
                            f"not the {messages[-1]['role']}'s")
    return [dict(message) for message in messages]


class PromptStream:
    """Batches of prompts, reshuffled each epoch from (seed, epoch) alone, so the
    position (epoch, offset) is all a checkpoint needs to continue exactly."""

    def __init__(self, prompts: Sequence, batch_size: int, seed: int):
        # A prompt set smaller than a batch is fine: a batch then spans epochs.
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> array:
        # 8 bytes a prompt (a list of ints takes ~36): millions of dataset rows stay cheap. shuffle makes
        # the same swaps on an array as on a list, so the order is the one every earlier version drew.
        order = array("q", range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[str]:
        batch = []
        while len(batch) < self.batch_size:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._order = self._shuffled(self.epoch)


def resolve_prompts(path: str, split: str, field: str = "prompt", dataset_split: str = "auto") -> Sequence:
    """The prompts of config `data.prompts` (split "train") / `data.eval_prompts` (split "eval"): the
    embedded world's split, a prompt file, or a dataset's column `field` (of its split `dataset_split`).
    Not yet rendered: `fastbond.chat.render_prompts` makes them what the policy sees."""
    from fastbond.embedded import EMBEDDED

    if path == EMBEDDED:
        from fastbond.embedded import prompt_splits

        train_prompts, eval_prompts = prompt_splits()
        return train_prompts if split == "train" else eval_prompts
    if is_dataset(path):
        return open_prompts(path, split, field, dataset_split)
    return read_prompts(path)


def prompts_for(data, split: str) -> Sequence:
    """data.prompts (split "train") or data.eval_prompts (split "eval") of a DataConfig."""
    if split == "train":
        return resolve_prompts(data.prompts, "train", data.prompt_field, data.prompts_split)
    return resolve_prompts(data.eval_prompts, "eval", data.prompt_field, data.eval_prompts_split)


# Up to this many prompts every one is tokenized before the first step (seconds). A larger set is
# checked on a fixed sample of this size, which finds a limit set too low; a rare long prompt outside
# the sample is then found when a batch draws it (encode_prompts: one line naming it, and the step
# stops with a checkpoint to resume from). Tokenizing millions of rows at start-up would take minutes.
FULL_LENGTH_CHECK = 100_000


def check_prompt_lengths(tokenizer, prompts: Sequence, limit: int, source: str) -> None:
    """Every prompt within data.max_prompt_tokens (a sample of a set over FULL_LENGTH_CHECK), checked
    before the first step; a rendered chat prompt counts as rendered (its template's tokens included)."""
    rows = range(len(prompts))
    if len(rows) > FULL_LENGTH_CHECK:
        rows = sorted(random.Random(0).sample(rows, FULL_LENGTH_CHECK))
    for start in range(0, len(rows), 512):
        chunk = rows[start : start + 512]
        texts = prompts[chunk.start : chunk.stop] if isinstance(chunk, range) else [prompts[i] for i in chunk]
        lengths = [len(ids) for ids in prompt_token_ids(tokenizer, texts)]
        for row, length in zip(chunk, lengths):
            if length > limit:
                raise FastbondError(
                    f"{source}: prompt {row + 1} has {length} tokens, over data.max_prompt_tokens={limit}"
                )
