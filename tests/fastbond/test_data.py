"""Prompt files, plain and chat (errors name file and line), and the resumable prompt order."""

import json

import pytest

from fastbond.data import PromptStream, read_prompts
from fastbond.errors import FastbondError


def test_reads_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a b"}\n\n{"prompt": "c", "id": 3}\n')
    assert read_prompts(jsonl) == ["a b", "c"]
    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the plot ?"}]
    chat.write_text(json.dumps({"messages": turns, "id": 1}) + '\n{"prompt": "plain"}\n')
    assert read_prompts(chat) == [turns, "plain"]
    text = tmp_path / "p.txt"
    text.write_text("first prompt\nsecond\n")
    assert read_prompts(text) == ["first prompt", "second"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ("\n\n", "holds no prompts"),
        ('{"prompt": "ok"}\n{"prompt": oops}\n', "line 2: not valid JSON"),
        ('{"prompt": "ok"}\n{"text": "x"}\n', 'line 2: expected an object with a "prompt" or a "messages" key'),
        ('["a"]\n', 'line 1: expected an object with a "prompt" or a "messages" key'),
        ('{"prompt": ""}\n', 'line 1: "prompt" must be a non-empty string'),
        ('{"prompt": 3}\n', 'line 1: "prompt" must be a non-empty string'),
        # chat prompts: TRL's conversational format
        ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n', 'line 1: both "prompt" and "messages"'),
        ('{"messages": []}\n', 'line 1: "messages" must be a non-empty list'),
        ('{"messages": "hi"}\n', 'line 1: "messages" must be a non-empty list'),
        ('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "tool", "content": "b"}]}\n',
         r'line 2: messages\[0\] must be an object whose "role" is one of system, user, assistant'),
        ('{"messages": ["hi"]}\n', r'line 1: messages\[0\] must be an object whose "role"'),
        ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": 3}]}\n',
         r'line 1: messages\[1\] must have a string "content"'),
        ('{"messages": [{"role": "user"}]}\n', r'line 1: messages\[0\] must have a string "content"'),
        ('{"messages": [{"role": "system", "content": "s"}]}\n', "line 1: the last message must be the user's"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
         "line 1: the last message must be the user's .* not the assistant's"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(FastbondError, match=message):
        read_prompts(path)


def test_missing_file():
    with pytest.raises(FastbondError, match="prompt file not found"):
        read_prompts("/no/such/prompts.jsonl")


def test_stream_covers_each_epoch_and_resumes_exactly():
    prompts = [f"p{i}" for i in range(10)]
    stream = PromptStream(prompts, batch_size=4, seed=1)
    first_epoch = stream.next_batch() + stream.next_batch() + stream.next_batch()[:2]
    assert sorted(first_epoch) == sorted(prompts)

    straight = PromptStream(prompts, 4, seed=1)
    for _ in range(3):
        straight.next_batch()
    saved = straight.state_dict()
    expected = [straight.next_batch() for _ in range(5)]

    resumed = PromptStream(prompts, 4, seed=1)
    resumed.load_state_dict(saved)
    assert [resumed.next_batch() for _ in range(5)] == expected


def test_batch_larger_than_prompt_set_spans_epochs():
    stream = PromptStream(["a", "b", "c"], batch_size=7, seed=0)
    batch = stream.next_batch()
    assert len(batch) == 7 and set(batch) == {"a", "b", "c"}
