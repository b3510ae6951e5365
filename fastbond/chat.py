"""Conversational prompts: chat messages rendered once, when the prompts load, through the policy's chat template.

A prompt is a string or a list of chat messages (`{"role": ..., "content": ...}`, TRL's conversational
format). Config `data.chat_template` says whether prompts go through the policy tokenizer's template:
`auto` when the tokenizer has one, `true` always (a tokenizer without one is an error), `false` never.
Rendered, a prompt is `apply_chat_template(messages, add_generation_prompt=True)` as text, a plain string
being one user turn. The result is a `RenderedPrompt`, a `str` that also carries the messages it came
from: the prompt stream, the samplers, the rewards and the evaluation pass it on as they pass any
prompt, and a reward model with a template of its own reads the messages instead.

A rendered prompt is complete: its template wrote every special token it needs (BOS, turn markers), so
it is tokenized without adding any (`prompt_token_ids`), and its ids are exactly those of
`apply_chat_template(messages, add_generation_prompt=True)`. A plain prompt is tokenized as before, with
the tokenizer's special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastbond.errors import FastbondError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
# A prompt as read from a file: a string, or a list of chat messages.
RawPrompt = str | list


class RenderedPrompt(str):
    """The text a chat template made of `messages` (generation prompt included), with the messages kept."""

    messages: tuple[Message, ...]

    def __new__(cls, text: str, messages: Sequence[Message]):
        prompt = super().__new__(cls, text)
        prompt.messages = tuple(dict(message) for message in messages)
        return prompt

    def __getnewargs__(self):  # copies and pickles keep the messages
        return str(self), self.messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def conversation(prompt: str) -> list[Message]:
    """The messages of a prompt: a rendered prompt's own, or a plain prompt as one user turn."""
    if isinstance(prompt, RenderedPrompt):
        return [dict(message) for message in prompt.messages]
    return [{"role": "user", "content": str(prompt)}]


def template_in_use(tokenizer, setting: str | bool) -> str | None:
    """The chat template prompts are rendered with under `data.chat_template=setting`, or None."""
    return tokenizer.chat_template if setting is not False and has_chat_template(tokenizer) else None


def render_prompts(prompts: Sequence[RawPrompt], tokenizer, setting: str | bool, source: str) -> Sequence[str]:
    """The prompts as the policy sees them under `data.chat_template=setting`: each rendered through the
    tokenizer's template (a `RenderedPrompt`), or the plain strings untouched. `source` names the prompts
    in errors ("data.prompts (path)").

    A list (a prompt file) is rendered and checked whole, now. Any other sequence is a dataset's column,
    memory-mapped and possibly millions of rows: it stays lazy (`RenderedView`), each prompt rendered when
    read; one row's type stands for the column's (a dataset column has one type)."""
    templated = has_chat_template(tokenizer)
    if setting is True and not templated:
        raise FastbondError(f"data.chat_template=true, but the policy's tokenizer has no chat template "
                            f"(to render {source}); set data.chat_template=false to use the prompts as written")
    eager = isinstance(prompts, list)
    if setting is False or not templated:
        for number, prompt in enumerate(prompts if eager else prompts[:1], start=1):
            if not isinstance(prompt, str):
                why = ("data.chat_template=false" if setting is False else
                       "the policy's tokenizer has no chat template (data.chat_template=auto)")
                raise FastbondError(f"{source}: prompt {number} is a list of chat messages, but {why}; "
                                    "give the tokenizer a chat template or write the prompts as plain strings")
        return list(prompts) if eager else prompts
    if not eager:
        return RenderedView(prompts, tokenizer, source)
    return [_render(tokenizer, prompt, source, number) for number, prompt in enumerate(prompts, start=1)]


class RenderedView(Sequence):
    """A dataset's prompts, each rendered through the template when read (`render_prompts`)."""

    def __init__(self, prompts: Sequence[RawPrompt], tokenizer, source: str):
        self.prompts, self.tokenizer, self.source = prompts, tokenizer, source

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            return [_render(self.tokenizer, prompt, self.source, row + 1)
                    for row, prompt in zip(rows, self.prompts[index])]
        row = range(len(self))[index]
        return _render(self.tokenizer, self.prompts[row], self.source, row + 1)


def _render(tokenizer, prompt: RawPrompt, source: str, number: int) -> RenderedPrompt:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # the template's own complaint (jinja's raise_exception), about the user's data
        lines = str(error).strip().splitlines()
        raise FastbondError(f"{source}: the policy's chat template refused prompt {number} "
                            f"({type(error).__name__}: {lines[0] if lines else ''}); the template decides which "
                            "roles and turn orders it takes (data.chat_template)") from None
    return RenderedPrompt(text, messages)


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids, unpadded: a rendered prompt exactly as its template wrote it (no special
    tokens added: BOS is already in its text), a plain one with the tokenizer's special tokens."""
    ids: list[list[int]] = [[] for _ in prompts]
    for rendered in (True, False):
        rows = [i for i, prompt in enumerate(prompts) if isinstance(prompt, RenderedPrompt) == rendered]
        if rows:
            encoded = tokenizer([str(prompts[i]) for i in rows], add_special_tokens=not rendered)["input_ids"]
            for row, row_ids in zip(rows, encoded):
                ids[row] = list(row_ids)
    return ids
