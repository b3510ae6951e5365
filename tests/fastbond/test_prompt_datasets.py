"""Prompts from datasets on disk (fastbond/prompt_datasets.py): every format `datasets` reads locally gives
the prompts a .jsonl gives, splits are chosen as documented, bad rows and a missing package are one line,
and a run reading a parquet file trains exactly as one reading the same prompts from a .jsonl."""

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

datasets = pytest.importorskip("datasets", reason="the datasets extra is not installed (pip install -e .[datasets])")
pa = pytest.importorskip("pyarrow")
import pyarrow.csv  # noqa: E402
import pyarrow.parquet  # noqa: E402

from fastbond.config import load_config  # noqa: E402
from fastbond.data import PromptStream, check_prompt_lengths, resolve_prompts  # noqa: E402
from fastbond.errors import FastbondError  # noqa: E402
from fastbond.presets import embedded_preset  # noqa: E402
from fastbond.prompt_datasets import DatasetPrompts  # noqa: E402
from fastbond.resume import prompts_fingerprint  # noqa: E402
from fastbond.train import train  # noqa: E402

PROMPTS = ["the film was", "i thought the lost machine was", "a, \"quoted\" prompt", "ünïcode ends here", "last"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets prepares its Arrow copies here, not in the user's ~/.cache/huggingface."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_parquet(path, column="prompt", values=PROMPTS, **more):
    pa.parquet.write_table(pa.table({column: values, **more}), path)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def parquet_file(tmp_path):
    return write_parquet(tmp_path / "prompts.parquet", id=list(range(len(PROMPTS))))


def csv_file(tmp_path):
    path = tmp_path / "prompts.csv"
    pa.csv.write_csv(pa.table({"id": list(range(len(PROMPTS))), "prompt": PROMPTS}), path)
    return path


def json_lines_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.json", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])


def json_array_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": p} for p in PROMPTS]))
    return path


def arrow_file(tmp_path):
    datasets.Dataset.from_dict({"prompt": PROMPTS}).save_to_disk(tmp_path / "saved")
    return next((tmp_path / "saved").glob("*.arrow"))


def folder_of_jsonl_shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [{"prompt": p} for p in PROMPTS[:2]])
    write_jsonl(folder / "part-1.jsonl", [{"prompt": p} for p in PROMPTS[2:]])
    return folder


def folder_of_parquet(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    write_parquet(folder / "data.parquet")
    return folder


def saved_dataset(tmp_path):
    datasets.Dataset.from_dict({"prompt": PROMPTS, "id": list(range(len(PROMPTS)))}).save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


SOURCES = [parquet_file, csv_file, json_lines_file, json_array_file, arrow_file, folder_of_jsonl_shards,
           folder_of_parquet, saved_dataset]


@pytest.mark.parametrize("source", SOURCES, ids=lambda make: make.__name__)
def test_every_format_gives_the_prompts_in_order_and_hashes_like_the_same_list(tmp_path, source):
    prompts = resolve_prompts(str(source(tmp_path)), "train")
    assert isinstance(prompts, DatasetPrompts)
    assert len(prompts) == len(PROMPTS)
    assert [prompts[i] for i in range(len(prompts))] == PROMPTS
    assert prompts[-1] == PROMPTS[-1] and prompts[1:4] == PROMPTS[1:4] and prompts[::2] == PROMPTS[::2]
    # a resume checks the prompts by this fingerprint: a run may move from a .jsonl to a dataset of the same prompts
    assert prompts_fingerprint(prompts) == prompts_fingerprint(PROMPTS)
    with pytest.raises(IndexError):
        prompts[len(PROMPTS)]


def test_the_fingerprint_hashed_a_slice_at_a_time_is_the_digest_checkpoints_recorded(monkeypatch):
    """Checkpoints record sha256 of the prompts joined by "\\n\\x00": hashing a slice at a time keeps it."""
    from fastbond import resume

    assert prompts_fingerprint(["the film was", "ünï"]) == {
        "count": 2, "sha256": "607e86b47b1b851add977f58e916c1eb942da76c6f28175289608e495c4ab9f0"}
    monkeypatch.setattr(resume, "FINGERPRINT_SLICE", 2)
    for count in range(6):
        prompts = PROMPTS[:count]
        digest = hashlib.sha256("\n\x00".join(prompts).encode("utf-8")).hexdigest()
        assert prompts_fingerprint(prompts) == {"count": count, "sha256": digest}


def test_the_rows_stay_in_memory_mapped_arrow_files(tmp_path):
    prompts = resolve_prompts(str(parquet_file(tmp_path)), "train")
    assert prompts._rows.cache_files, "the rows must be read from datasets' Arrow files, not held in memory"
    assert prompts._rows.column_names == ["prompt"]


def test_the_stream_draws_the_same_batches_from_a_dataset_as_from_the_list(tmp_path):
    prompts = [f"prompt {i}" for i in range(23)]
    rows = resolve_prompts(str(write_parquet(tmp_path / "p.parquet", values=prompts)), "train")
    from_list, from_rows = PromptStream(prompts, 4, seed=3), PromptStream(rows, 4, seed=3)
    assert [from_rows.next_batch() for _ in range(13)] == [from_list.next_batch() for _ in range(13)]
    resumed = PromptStream(rows, 4, seed=3)
    resumed.load_state_dict(from_rows.state_dict())
    assert [resumed.next_batch() for _ in range(7)] == [from_list.next_batch() for _ in range(7)]


def test_the_stream_order_is_the_one_earlier_versions_drew():
    """Checkpoints of earlier versions hold (epoch, offset) into this order: it must never change."""
    import random

    stream = PromptStream([str(i) for i in range(10)], batch_size=10, seed=5)
    order = list(range(10))
    random.Random(5 * 1_000_003).shuffle(order)
    assert stream.next_batch() == [str(i) for i in order]


def test_prompt_field_names_the_column(tmp_path):
    path = write_parquet(tmp_path / "q.parquet", column="question")
    assert list(resolve_prompts(str(path), "train", field="question")) == PROMPTS
    with pytest.raises(FastbondError, match=r"q.parquet: no column 'prompt' \(data.prompt_field\); its columns: question"):
        resolve_prompts(str(path), "train")


def test_chat_messages_pass_through_as_lists_of_records(tmp_path):
    messages = [[{"role": "user", "content": "hi"}],
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the film was"}]]
    datasets.Dataset.from_dict({"messages": messages}).save_to_disk(tmp_path / "chat")
    prompts = resolve_prompts(str(tmp_path / "chat"), "train", field="messages")
    assert prompts[1] == messages[1] and prompts[0:2] == messages
    assert prompts_fingerprint(prompts)["count"] == 2


def split_folder(tmp_path, names=("train", "test")):
    folder = tmp_path / "splits"
    folder.mkdir()
    for name in names:
        write_parquet(folder / f"{name}.parquet", values=[f"{name} {i}" for i in range(3)])
    return str(folder)


def test_a_folder_with_splits_gives_train_for_training_and_test_for_evaluation(tmp_path):
    folder = split_folder(tmp_path)
    assert resolve_prompts(folder, "train")[0] == "train 0"
    assert resolve_prompts(folder, "eval")[0] == "test 0"
    assert resolve_prompts(folder, "train", dataset_split="test")[0] == "test 0"
    with pytest.raises(FastbondError, match=r"^config key 'data.eval_prompts_split': data.eval_prompts=.*splits "
                                             r"has no split 'validation' \(it holds train, test\)$"):
        resolve_prompts(folder, "eval", dataset_split="validation")


def test_a_saved_dataset_dict_without_the_default_split_asks_for_one(tmp_path):
    rows = datasets.Dataset.from_dict({"prompt": PROMPTS})
    datasets.DatasetDict({"first": rows, "second": rows}).save_to_disk(tmp_path / "dict")
    with pytest.raises(FastbondError, match=r"holds the splits first, second: name the one to use with "
                                            r"data.prompts_split$"):
        resolve_prompts(str(tmp_path / "dict"), "train")
    assert list(resolve_prompts(str(tmp_path / "dict"), "train", dataset_split="second")) == PROMPTS
    datasets.DatasetDict({"validation": rows, "train": rows}).save_to_disk(tmp_path / "dict2")
    assert len(resolve_prompts(str(tmp_path / "dict2"), "eval")) == len(PROMPTS)  # test, else validation


@pytest.mark.parametrize("column, why", [
    (["ok", None, "ok"], "row 1: data.prompt_field 'prompt' is missing"),
    (["ok", "ok", ""], "row 2: data.prompt_field 'prompt' is empty"),
    (["ok", " \t ", "ok"], "row 1: data.prompt_field 'prompt' is empty"),
    ([1, 2, 3], "row 0: data.prompt_field 'prompt' holds int64, not a string or a list of chat messages"),
    ([[{"role": "user", "content": "a"}], [], [{"role": "user", "content": "b"}]],
     "row 1: data.prompt_field 'prompt' is empty"),
    ([[{"role": "user", "content": "a"}], None, []], "row 1: data.prompt_field 'prompt' is missing"),
    ([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}, {"role": "user", "content": None}]],
     "row 1: data.prompt_field 'prompt' holds a message without a role or content"),
    ([[{"role": "user", "text": "a"}]], "row 0: data.prompt_field 'prompt' holds list<"),
])
def test_a_bad_row_is_one_line_naming_the_dataset_the_row_and_the_key(tmp_path, column, why):
    path = write_parquet(tmp_path / "bad.parquet", values=column)
    with pytest.raises(FastbondError) as raised:
        resolve_prompts(str(path), "eval")
    message = str(raised.value)
    assert message.startswith(f"data.eval_prompts={path} {why}") and "\n" not in message, message


def test_a_bad_row_past_the_first_read_is_named_by_its_row_in_the_whole_set(tmp_path, monkeypatch):
    from fastbond import prompt_datasets

    monkeypatch.setattr(prompt_datasets, "ROWS_PER_READ", 4)
    path = write_parquet(tmp_path / "bad.parquet", values=["ok"] * 9 + [""] + ["ok"] * 3)
    with pytest.raises(FastbondError, match=r"bad.parquet row 9: data.prompt_field 'prompt' is empty$"):
        resolve_prompts(str(path), "train")


def test_unreadable_and_empty_datasets_are_one_line(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(FastbondError, match=r"^data.prompts=.*broken.parquet: datasets cannot read it \(") as raised:
        resolve_prompts(str(broken), "train")
    assert "\n" not in str(raised.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")  # datasets itself refuses a set of no rows
    with pytest.raises(FastbondError, match=r"^data.prompts=.*empty.csv: datasets cannot read it \(.*\)$"):
        resolve_prompts(str(empty), "train")
    with pytest.raises(FastbondError, match=r"^src holds no prompts$"):
        DatasetPrompts(datasets.Dataset.from_dict({"prompt": pa.array([], pa.string())}), "prompt", "src")
    with pytest.raises(FastbondError, match=r"^data.eval_prompts: dataset not found: .*gone.parquet$"):
        resolve_prompts(str(tmp_path / "gone.parquet"), "eval")


def test_without_the_datasets_package_a_dataset_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    path = str(parquet_file(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    expected = f"data.prompts={path} is a dataset: pip install 'fastbond[datasets]'"
    with pytest.raises(FastbondError) as raised:
        resolve_prompts(path, "train")
    assert str(raised.value) == expected
    # the config says so before anything loads
    with pytest.raises(FastbondError) as raised:
        load_config(embedded_preset(), [f"data.prompts={path}"]).check(environment=True)
    assert str(raised.value) == expected
    # prompt files do not need it
    text = tmp_path / "p.txt"
    text.write_text("a prompt\n")
    assert resolve_prompts(str(text), "train") == ["a prompt"]


def test_the_data_keys_are_checked():
    with pytest.raises(FastbondError, match="data.prompt_field"):
        load_config(embedded_preset(), ["data.prompt_field="]).check(environment=False)


class CountingTokenizer:
    """Tokens are characters; remembers how many prompts it was asked to encode."""

    def __init__(self):
        self.seen = 0

    def __call__(self, texts, add_special_tokens=True):
        self.seen += len(texts)
        return {"input_ids": [list(text) for text in texts]}


def test_the_length_check_covers_a_set_up_to_its_bound_and_samples_a_larger_one(monkeypatch):
    from fastbond import data

    monkeypatch.setattr(data, "FULL_LENGTH_CHECK", 50)
    tokenizer = CountingTokenizer()
    prompts = ["short"] * 49 + ["far too long"]
    with pytest.raises(FastbondError, match=r"^src: prompt 50 has 12 tokens, over data.max_prompt_tokens=8$"):
        check_prompt_lengths(tokenizer, prompts, 8, "src")
    assert tokenizer.seen == 50
    tokenizer = CountingTokenizer()
    check_prompt_lengths(tokenizer, ["short"] * 10_000, 8, "src")
    assert tokenizer.seen == 50  # a fixed sample: start-up does not tokenize every row of a huge set
    with pytest.raises(FastbondError, match="over data.max_prompt_tokens=8"):
        check_prompt_lengths(CountingTokenizer(), ["far too long"] * 10_000, 8, "src")


TINY = ["rollout.batch_size=4", "rollout.max_new_tokens=8", "evaluation.at_end=false", "logging.progress=false",
        "cpu_threads=1", "checkpoint.every=2", "algorithm.eta=0.3"]


def test_a_parquet_dataset_trains_as_the_same_prompts_from_a_jsonl_and_a_run_may_move_between_them(
        tmp_path, embedded_reference):
    from fastbond.embedded import prompt_splits

    train_prompts, _ = prompt_splits()
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
    parquet = write_parquet(tmp_path / "prompts.parquet", column="text", values=train_prompts)

    def run(name, *overrides):
        return train(load_config(embedded_preset(), TINY + [f"run_dir={tmp_path / name}", *overrides]))

    from_jsonl = run("jsonl", "steps=4", f"data.prompts={jsonl}")
    run("parquet", "steps=2", f"data.prompts={parquet}", "data.prompt_field=text")
    # same prompts, another file: the resume is allowed, and continues where the parquet run stopped
    moved = run("parquet", "steps=4", f"data.prompts={jsonl}", "checkpoint.resume=true")

    def records(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not (k.startswith("time/") or k == "samples_per_s")}
                for line in lines]

    assert [r["step"] for r in records(moved)] == [1, 2, 3, 4]
    assert records(moved) == records(from_jsonl)
    expected, got = (load_file(str(d / "policy" / "model.safetensors")) for d in (from_jsonl, moved))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
