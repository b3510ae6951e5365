"""What a rollout is made of: the prompts of a step and the responses drawn for them.

A `Samples` holds one response per row, laid out as `[prompt | response]`
with the prompts left-padded (as `generate` wants them) and the responses
right-padded after their first EOS. `response_mask` marks the response tokens
a sequence log-prob sums over: every generated token up to and including the
first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Prompts:
    texts: list[str]
    ids: torch.Tensor  # [B, P] left-padded
    mask: torch.Tensor  # [B, P]
    # Each row's prompt index in the whole step's batch (over all ranks) and its sample number.
    index: list[int] = field(default_factory=list)
    sample: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.index = self.index or list(range(len(self.texts)))
        self.sample = self.sample or [0] * len(self.texts)

    def repeated(self, times: int) -> "Prompts":
        """Each prompt `times` times in a row: [p0, p0, …, p1, p1, …]."""
        return Prompts(
            [t for t in self.texts for _ in range(times)],
            self.ids.repeat_interleave(times, dim=0),
            self.mask.repeat_interleave(times, dim=0),
            [i for i in self.index for _ in range(times)],
            [j for _ in self.index for j in range(times)],
        )

    def rows(self, rows: list[int]) -> "Prompts":
        """The rows `rows` of these prompts, keeping their batch index and sample number."""
        index = torch.tensor(rows, device=self.ids.device, dtype=torch.long)
        return Prompts([self.texts[i] for i in rows], self.ids[index], self.mask[index],
                       [self.index[i] for i in rows], [self.sample[i] for i in rows])


@dataclass
class Samples:
    sequences: torch.Tensor  # [B, P + T] prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # [B, P + T] 1 on real prompt tokens and response tokens
    response_mask: torch.Tensor  # [B, T] bool, response tokens (through the first EOS)
    prompt_length: int  # P
    texts: list[str]  # decoded responses, without special tokens

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def response_ids(self, row: int) -> list[int]:
        """The response tokens of one row (through its EOS), as a list."""
        return self.responses[row][self.response_mask[row]].tolist()

    @staticmethod
    def from_responses(
        prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]], pad_token_id: int,
        texts: list[str] | None = None,
    ) -> "Samples":
        """Re-assemble a batch from stored response token lists (offline data)."""
        length = max(1, max(len(r) for r in responses))
        padded = torch.full((len(responses), length), pad_token_id, dtype=prompt_ids.dtype)
        mask = torch.zeros((len(responses), length), dtype=torch.bool)
        for row, tokens in enumerate(responses):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
            mask[row, : len(tokens)] = True
        padded, mask = padded.to(prompt_ids.device), mask.to(prompt_ids.device)
        return Samples(
            torch.cat([prompt_ids, padded], dim=1),
            torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1),
            mask,
            prompt_ids.shape[1],
            texts if texts is not None else [""] * len(responses),
        )

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, index: torch.Tensor) -> "Samples":
        """The rows `index` ([B'] long) of this batch."""
        rows = index.tolist()
        return Samples(
            self.sequences[index],
            self.attention_mask[index],
            self.response_mask[index],
            self.prompt_length,
            [self.texts[i] for i in rows],
        )


def concat_samples(first: Samples, second: Samples, pad_token_id: int) -> Samples:
    """Stack two batches over the same prompt layout into one, padding responses
    to a common length, so both go through one forward pass."""
    assert first.prompt_length == second.prompt_length
    length = max(first.responses.shape[1], second.responses.shape[1])

    def pad(samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = length - samples.responses.shape[1]
        seq = nn.functional.pad(samples.sequences, (0, extra), value=pad_token_id)
        att = nn.functional.pad(samples.attention_mask, (0, extra), value=0)
        res = nn.functional.pad(samples.response_mask, (0, extra), value=False)
        return seq, att, res

    a, b = pad(first), pad(second)
    return Samples(
        torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]]),
        first.prompt_length, first.texts + second.texts,
    )
