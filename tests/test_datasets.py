"""Loading prompt sets and trajectories: JSONL, JSON, parquet, save_to_disk, verl layout, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metis_cli.data.datasets import Example, iter_examples, load_examples
from metis_cli.errors import DataError
from metis_cli.recipe.schema import DataSource

SYSTEM = {"role": "system", "content": "You can call a calculator."}
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'
PROMPT_ROW = {
    "id": "easy-1",
    "messages": [SYSTEM, {"role": "user", "content": "What is 3 + 5?"}],
    "answer": "8",
    "subset": "easy",
    "source": "unit-test",
}
TRAJECTORY_ROW = {
    "messages": [
        SYSTEM,
        {"role": "user", "content": "What is 123 * 45?"},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "name": "calculator", "content": "5535"},
        {"role": "assistant", "content": "<answer>5535</answer>"},
    ],
    "answer": 5535,
    "subset": "hard",
}
# Table formats need one type per column, so its answer is text like the other rows'.
TABLE_TRAJECTORY_ROW = dict(TRAJECTORY_ROW, answer="5535")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def png_bytes(size=(40, 30), colour=(200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def verl_row(index: int, question: str, answer: str, source: str = "wemath") -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "system", "content": "Think, then answer."},
                   {"role": "user", "content": f"<image>{question}"}],
        "images": [{"bytes": PNG, "path": f"img{index}.png"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": index, "split": "train"},
    }


def test_jsonl_prompts_and_trajectories(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [PROMPT_ROW, "", TRAJECTORY_ROW])
    prompt, trajectory = load_examples(str(path))

    assert prompt == Example(
        id="easy-1", messages=PROMPT_ROW["messages"], answer="8", subset="easy",
        images=[], trajectory=None, meta={"source": "unit-test"},
    )
    assert prompt.question == "What is 3 + 5?"
    assert trajectory.messages == TRAJECTORY_ROW["messages"][:2]
    assert trajectory.trajectory == TRAJECTORY_ROW["messages"]
    assert trajectory.answer == "5535"  # numbers become text
    assert trajectory.subset == "hard"
    assert trajectory.id == "train-3"  # no id: file stem and line number


def test_prompt_ends_at_the_last_user_turn(tmp_path):
    conversation = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<answer>4</answer>"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    (example,) = load_examples(path, need_answer=False)
    assert example.messages == conversation[:3]
    assert example.trajectory == conversation
    assert example.answer is None and example.subset == "default"


def test_recipe_source_limit_and_subset_field(tmp_path):
    rows = [dict(PROMPT_ROW, id=f"r{i}", level=f"L{i}") for i in range(5)]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    source = DataSource(path=str(path), layout="messages", subset_field="level", limit=3)
    examples = load_examples(source)
    assert [e.id for e in examples] == ["r0", "r1", "r2"]
    assert [e.subset for e in examples] == ["L0", "L1", "L2"]
    assert [e.id for e in load_examples(path, limit=2)] == ["r0", "r1"]


def test_bad_source_settings_are_data_errors_naming_the_source(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [PROMPT_ROW])
    with pytest.raises(DataError, match=r"rl\.jsonl: layout: .*'auto', 'messages' or 'verl'"):
        load_examples(path, layout="sharegpt")
    with pytest.raises(DataError, match=r"rl\.jsonl: limit: .*greater than 0"):
        load_examples(path, limit=0)
    with pytest.raises(DataError, match="no `path`"):
        load_examples({"layout": "messages"})


def test_iter_examples_is_lazy(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [PROMPT_ROW, "{broken"])
    examples = iter_examples(path)
    assert next(examples).id == "easy-1"  # the broken second line is not read yet
    with pytest.raises(DataError, match="line 2"):
        next(examples)


def test_json_array_file(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([PROMPT_ROW, TRAJECTORY_ROW]))
    assert [e.answer for e in load_examples(path)] == ["8", "5535"]


def test_parquet_messages_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([PROMPT_ROW, TABLE_TRAJECTORY_ROW]), path)
    prompt, trajectory = load_examples(path)
    # parquet gives every struct every key; the loader must not invent None fields
    assert prompt.messages == PROMPT_ROW["messages"]
    assert trajectory.trajectory == TRAJECTORY_ROW["messages"]
    assert trajectory.id == "train-1"


def test_verl_parquet_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "metis_rl.parquet"
    rows = [verl_row(10, "Area?", "12"), verl_row(11, "x?", "3", "vstar")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    first, second = load_examples(path)
    assert first.id == "10" and second.id == "11"
    assert first.messages[0] == {"role": "system", "content": "Think, then answer."}  # text stays a string
    assert first.messages[-1] == {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Area?"}]}
    assert first.question == "Area?"
    assert first.answer == "12" and second.answer == "3"
    assert first.subset == "wemath" and second.subset == "vstar"
    assert first.images == [PNG]  # the struct's bytes, checked but not decoded
    assert [image.size for image in first.load_images()] == [(43, 32)]  # 40x30: short side raised to 32 px
    assert first.meta["extra_info"] == {"index": 10, "split": "train"}
    assert first.meta["ability"] == "math"
    assert first.trajectory is None
    # forcing the layout works too; forcing the wrong one names the missing field
    assert len(load_examples(path, layout="verl")) == 2
    with pytest.raises(DataError, match="row 0.*messages"):
        load_examples(path, layout="messages")


def test_save_to_disk_folder_and_splits(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([PROMPT_ROW, TABLE_TRAJECTORY_ROW]).save_to_disk(str(folder))
    assert [e.answer for e in load_examples(folder)] == ["8", "5535"]

    dict_folder = tmp_path / "saved_dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([PROMPT_ROW]),
        "test": datasets.Dataset.from_list([TABLE_TRAJECTORY_ROW]),
    }).save_to_disk(str(dict_folder))
    assert [e.subset for e in load_examples(dict_folder)] == ["easy"]  # train by default
    assert [e.subset for e in load_examples(dict_folder, split="test")] == ["hard"]
    with pytest.raises(DataError, match="no split 'validation'.*train"):
        load_examples(dict_folder, split="validation")


def test_openai_native_tool_calls_become_text_tool_calls(tmp_path):
    messages = [
        {"role": "user", "content": "What is 123 * 45?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "123 * 45"}'},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5535"},
        {"role": "assistant", "content": "<answer>5535</answer>"},
    ]
    (example,) = load_examples(write_jsonl(tmp_path / "t.jsonl", [{"messages": messages, "answer": "5535"}]))
    assert example.trajectory[1] == {"role": "assistant", "content": CALL}


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl.*not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_examples(tmp_path / "plain")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_examples(tmp_path / "data.csv")
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(empty)


def test_hf_source_loads_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    # load_dataset also takes a local folder of data files: a hub source without the network
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", [PROMPT_ROW, TABLE_TRAJECTORY_ROW])
    examples = load_examples(f"hf:{tmp_path / 'repo'}", split="train")
    assert [e.answer for e in examples] == ["8", "5535"]
    assert examples[1].trajectory == TRAJECTORY_ROW["messages"]


def test_hub_source_that_is_not_cached_is_a_data_error(monkeypatch):
    import datasets

    # offline, as on this machine; set through the library's config because the environment
    # variable is read once at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hf:nobody/no-such-dataset.*cache"):
        load_examples("hf:nobody/no-such-dataset")


def user(content="What is 1 + 1?"):
    return {"role": "user", "content": content}


MALFORMED = [
    ('{"messages": [', "not valid JSON"),
    ('["a", "list"]', "expected an object"),
    (json.dumps({"answer": "1"}), "missing `messages` .*or `prompt`"),
    (json.dumps({"messages": [], "answer": "1"}), "non-empty list"),
    (json.dumps({"messages": "What is 1 + 1?", "answer": "1"}), "non-empty list"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}], "answer": "1"}), "message 1 has role 'bot'"),
    (json.dumps({"messages": [user(), {"role": "assistant", "content": 2}], "answer": "1"}),
     "message 2 \\(assistant\\) content must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "answer": "1"}),
     "message 1 \\(user\\) content part 1 has type 'audio'"),
    (json.dumps({"messages": [{"role": "user", "content": []}], "answer": "1"}), "non-empty list of content parts"),
    (json.dumps({"messages": [user("<image>hi")], "images": [], "answer": "1"}),
     "row 'rl-3' has 1 image placeholder but 0 images"),
    (json.dumps({"messages": [user()]}), "missing `answer`"),
    (json.dumps({"messages": [user()], "answer": {"value": "1"}}), "`answer` must be a string, a number or a list"),
    (json.dumps({"messages": [user()], "answer": ["1", {"value": "2"}]}), "`answer\\[1\\]` must be a string"),
    (json.dumps({"messages": [user()], "answer": [" ", ""]}), "missing `answer`"),
    (json.dumps({"messages": [SYSTEM, {"role": "assistant", "content": "hi"}], "answer": "1"}),
     "no user message"),
    (json.dumps({"messages": ["hello"], "answer": "1"}), "message 1 must be an object"),
]


@pytest.mark.parametrize(("bad_line", "problem"), MALFORMED)
def test_malformed_rows_name_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_jsonl(tmp_path / "rl.jsonl", [PROMPT_ROW, "", bad_line])
    with pytest.raises(DataError, match=rf"rl\.jsonl line 3: .*{problem}"):
        load_examples(path)


def test_list_ground_truths_are_kept_as_acceptable_answers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = dict(verl_row(0, "q", "x"), reward_model={"style": "rule", "ground_truth": ["NYC", " New York "]})
    path = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    assert [e.answer for e in load_examples(path)] == [["NYC", "New York"]]
    jsonl = write_jsonl(tmp_path / "rl.jsonl", [dict(PROMPT_ROW, answer=["8", 8.0, ""])])
    assert [e.answer for e in load_examples(jsonl)] == [["8", "8.0"]]


def test_verl_row_without_ground_truth(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = verl_row(0, "q", "1")
    bad["reward_model"] = {"style": "rule", "ground_truth": None}
    path = tmp_path / "v.parquet"
    pq.write_table(pa.Table.from_pylist([verl_row(1, "q", "2"), bad]), path)
    with pytest.raises(DataError, match=r"v\.parquet row 1 \(0-based\).*reward_model\.ground_truth"):
        load_examples(path)
    assert [e.answer for e in load_examples(path, need_answer=False)] == ["2", None]


def test_skip_mode_drops_and_reports_malformed_rows(tmp_path):
    rows = [PROMPT_ROW, "{oops", json.dumps({"messages": [user()]}), PROMPT_ROW]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    skipped: list[str] = []
    examples = load_examples(path, malformed_rows="skip", skipped=skipped)
    assert len(examples) == 2
    assert len(skipped) == 2
    assert "line 2" in skipped[0] and "line 3" in skipped[1]


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PROMPT_ROW).encode() + b"\n" + '{"answer": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl line 2: not UTF-8"):
        load_examples(path)
