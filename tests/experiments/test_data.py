"""Local GSM8K-style files: good rows load with their final numbers; every bad row is named."""
import json

import pytest

from fractions import Fraction

from experiments.data import DataError, QARecord, describe_skipped, load_qa_file, parse_final, parse_number

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
    assert skipped == []
    assert [r.final for r in records] == FINALS
    assert records[0] == QARecord(GOOD[0]["question"], GOOD[0]["answer"], "7")


def test_good_parquet_and_json_array_load(tmp_path):
    records, skipped = load_qa_file(_write_parquet(tmp_path / "train.parquet", GOOD))
    assert skipped == [] and [r.final for r in records] == FINALS
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
    assert [s.where for s in skipped] == ["line 2", "line 3", "line 5"] and [r.final for r in records] == ["7", "1500"]
    assert "invalid JSON" in skipped[0].problem and "missing key 'answer'" in skipped[1].problem


def test_missing_file_and_unknown_type_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_qa_file(tmp_path / "nope.jsonl")
    (tmp_path / "t.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="t.csv: unsupported file type"):
        load_qa_file(tmp_path / "t.csv")


@pytest.mark.parametrize("text, value", [
    ("72", 72), ("-3", -3), ("2.5", Fraction(5, 2)), ("1,234", 1234), ("1,234,567.25", Fraction(123456725, 100)),
    ("1 000", 1000), ("1 000 000", 1000000), ("$12", 12), ("-$5", -5), ("3/4", Fraction(3, 4)),
    ("-1/2", Fraction(-1, 2)), ("1e3", 1000), ("2.5E-2", Fraction(1, 40)), (".5", Fraction(1, 2)), ("72.", 72),
])
def test_numbers_parse_whole_and_exactly(text, value):
    assert parse_number(text) == value
    assert parse_number(f"  {text} ") == value


@pytest.mark.parametrize("text", ["", "abc", "1 2 3", "12,34", "3 apples", "1/0", "1e999", "7 or 8", "1,2345"])
def test_text_that_is_not_one_number_is_not_a_number(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("final, value", [("1/2", Fraction(1, 2)), ("1 000", 1000), ("1e3", 1000), ("3,000", 3000)])
def test_final_answers_are_read_whole_never_cut_to_their_first_number(tmp_path, final, value):
    records, _ = load_qa_file(_write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": f"x\n#### {final}"}]))
    assert parse_number(records[0].final) == value


@pytest.mark.parametrize("final", ["3 apples", "1 2", "seven", "4 or 5"])
def test_a_final_answer_that_is_not_one_number_rejects_its_row(tmp_path, final):
    rows = GOOD[:2] + [{"question": "q", "answer": f"#### {final}"}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_qa_file(path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "not one number" in message and repr(final) in message
    records, skipped = load_qa_file(path, skip_malformed=True)
    assert len(records) == 2 and [s.where for s in skipped] == ["line 3"]


def test_empty_files_and_files_with_no_usable_row_are_clear_errors(tmp_path):
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: no usable question/answer rows: it holds no rows"):
            load_qa_file(tmp_path / name)
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{no", {"question": "q"}])
    with pytest.raises(DataError, match="all 2 rows are malformed .first: line 1"):
        load_qa_file(path, skip_malformed=True)


def test_the_skip_report_counts_and_names_the_first_lines():
    from experiments.data import Skipped

    skipped = [Skipped("line", n, "invalid JSON") for n in (3, 8, 9, 20, 31, 40, 41)]
    line = describe_skipped("t.jsonl", 100, skipped)
    assert "skipped 7 malformed rows of t.jsonl (kept 100)" in line
    assert "line 3: invalid JSON" in line and "line 31" in line and "line 40" not in line and "2 more" in line
