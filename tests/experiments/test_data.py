"""Local GSM8K-style files: good rows load with their final numbers; every bad row is named."""
import json

import pytest

from experiments.data import DataError, QARecord, load_qa_file, parse_final

GOOD = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "Cost of 1000 pens at $1.5?", "answer": "1000 * 1.5 = 1500\n#### 1,500"},
    {"question": "5 - 8?", "answer": "#### -3"},
    {"question": "Half of 5?", "answer": "5 / 2 = 2.5\n#### 2.5"},
]
FINALS = ["7", "1500", "-3", "2.5"]


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parse_final():
    assert parse_final("so 12 total\n#### 12") == "12"
    assert parse_final("#### $1,234,567.25") == "1234567.25"
    assert parse_final("#### -0.5 ") == "-0.5"
    assert parse_final("the answer is 12") is None
    assert parse_final("#### twelve") is None


def test_good_jsonl_loads_in_order_with_final_numbers(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", GOOD[:2] + [""] + GOOD[2:])  # a blank line is fine
    records, skipped = load_qa_file(path)
    assert skipped == 0
    assert [r.final for r in records] == FINALS
    assert records[0] == QARecord(GOOD[0]["question"], GOOD[0]["answer"], "7")


def test_good_parquet_and_json_array_load(tmp_path):
    records, skipped = load_qa_file(_write_parquet(tmp_path / "train.parquet", GOOD))
    assert skipped == 0 and [r.final for r in records] == FINALS
    (tmp_path / "train.json").write_text(json.dumps(GOOD, indent=1))
    assert [r.final for r in load_qa_file(tmp_path / "train.json")[0]] == FINALS


def test_custom_keys(tmp_path):
    rows = [{"problem": r["question"], "solution": r["answer"]} for r in GOOD]
    records, _ = load_qa_file(_write_jsonl(tmp_path / "t.jsonl", rows), "problem", "solution")
    assert [r.final for r in records] == FINALS


def test_broken_json_line_names_path_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "broken.jsonl", GOOD[:2] + ['{"question": "x", "answer": "#### 1"'] + GOOD[2:])
    with pytest.raises(DataError) as info:
        load_qa_file(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value) and "invalid JSON" in str(info.value)


@pytest.mark.parametrize("bad_row, problem", [
    ({"question": "What?"}, "missing key 'answer'"),
    ({"answer": "#### 1"}, "missing key 'question'"),
    ({"question": "What?", "answer": "It is seven."}, "####"),
    ({"question": "  ", "answer": "#### 1"}, "empty question"),
])
def test_malformed_row_names_path_row_and_problem(tmp_path, bad_row, problem):
    rows = GOOD[:1] + [bad_row] + GOOD[1:]
    for path, where in [(_write_jsonl(tmp_path / "t.jsonl", rows), "line 2"),
                        (_write_parquet(tmp_path / "t.parquet", rows), "row 2")]:
        with pytest.raises(DataError) as info:
            load_qa_file(path)
        message = str(info.value)
        assert str(path) in message and where in message and problem in message


def test_skip_malformed_counts_what_it_skipped(tmp_path):
    lines = [GOOD[0], "{not json", {"question": "q"}, GOOD[1], {"question": "q", "answer": "no number"}]
    records, skipped = load_qa_file(_write_jsonl(tmp_path / "t.jsonl", lines), skip_malformed=True)
    assert skipped == 3 and [r.final for r in records] == ["7", "1500"]


def test_missing_file_and_unknown_type_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_qa_file(tmp_path / "nope.jsonl")
    (tmp_path / "t.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="t.csv: unsupported file type"):
        load_qa_file(tmp_path / "t.csv")
