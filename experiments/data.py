"""Local question/answer datasets (GSM8K style) from JSONL, JSON or Parquet, through `datasets`.

Answers end in "#### <number>"; the number is the reference final answer. Files are read
offline only (the packaged json/parquet builders, cached in a temporary folder), never from the
hub. Every malformed row names the file, its 1-based line (JSONL) or row number, and the fix;
`skip_malformed=True` drops such rows and returns how many, so the caller can report it.

This module knows nothing about prompts, tokenizers or rewards (experiments/tasks.py).
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# The number after the last "####": optional sign, digits with thousands commas, decimals.
_FINAL_RE = re.compile(r"\$?\s*(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))")


class DataError(ValueError):
    """A dataset file the user gave cannot be read; the message names the file, row and fix."""


@dataclass(frozen=True)
class QARecord:
    question: str
    answer: str  # the full worked answer, "... #### 72"
    final: str  # the number after "####", commas stripped: "72", "-3", "1234.5"


def parse_final(answer: str) -> str | None:
    """The number after the last '####' in a GSM8K-style answer, commas stripped; None if absent."""
    if "####" not in answer:
        return None
    match = _FINAL_RE.match(answer.rsplit("####", 1)[1].strip())
    return match.group(1).replace(",", "") if match else None


def load_qa_file(path: str | Path, question_key: str = "question", answer_key: str = "answer",
                 skip_malformed: bool = False) -> tuple[list[QARecord], int]:
    """(records in file order, number of malformed rows skipped). Raises DataError on bad input."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; set task.path to a JSONL or Parquet file with "
                        f"'{question_key}' and '{answer_key}' fields")
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    skipped = 0
    if path.suffix.lower() == ".jsonl" or (builder == "json" and not _is_json_array(path)):
        good_lines, skipped = _scan_jsonl(path, skip_malformed)
        unit, numbers = "line", [n for n, _ in good_lines]
        if skipped:  # datasets cannot read the broken lines; hand it the good ones only
            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / "clean.jsonl"
                clean.write_text("".join(text + "\n" for _, text in good_lines))
                rows = _load_rows(clean, "json", shown=path)
        else:
            rows = _load_rows(path, "json")
    else:
        if builder == "json":
            _check_json_array(path)
        rows = _load_rows(path, builder)
        unit, numbers = "row", list(range(1, len(rows) + 1))
    records = []
    for number, row in zip(numbers, rows):
        try:
            records.append(_to_record(row, question_key, answer_key))
        except ValueError as e:
            if not skip_malformed:
                raise DataError(f"{path}: {unit} {number}: {e}; fix or remove it, or skip malformed rows "
                                f"(task.skip_malformed=true)") from None
            skipped += 1
    return records, skipped


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _check_json_array(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); fix the file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); re-save it as UTF-8") from None


def _scan_jsonl(path: Path, skip_malformed: bool) -> tuple[list[tuple[int, str]], int]:
    """Check each line with json.loads, since `datasets` does not report where a line broke.

    Returns the (1-based line number, text) of the good non-blank lines and the number skipped.
    """
    good, skipped = [], 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                if not isinstance(json.loads(text), dict):
                    raise ValueError("expected a JSON object per line")
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                if not skip_malformed:
                    problem = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                    raise DataError(f"{path}: line {number}: invalid JSON ({problem}); fix or remove the "
                                    f"line, or skip malformed rows (task.skip_malformed=true)") from None
                skipped += 1
                continue
            good.append((number, text))
    return good, skipped


def _load_rows(path: Path, builder: str, shown: Path | None = None) -> list[dict]:
    """All rows as dicts through the packaged `datasets` builder, offline, in a throwaway cache."""
    import datasets  # slow import; only when a file is read

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # a bar per small local file is noise
    with tempfile.TemporaryDirectory(prefix="specroll-data-") as cache:
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
        except Exception as e:  # pyarrow / datasets: mixed column types, corrupt Parquet, ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{shown or path}: could not be read as {builder} ({first}); check that every "
                            f"row has the same fields with the same types") from None
        finally:
            if bars_were_on:
                datasets.utils.enable_progress_bars()
        return table.to_list()


def _to_record(row: dict, question_key: str, answer_key: str) -> QARecord:
    for key in (question_key, answer_key):
        if row.get(key) is None:
            present = ", ".join(k for k, v in row.items() if v is not None)
            raise ValueError(f"missing key {key!r} (fields present: {present or 'none'})")
    question, answer = row[question_key], row[answer_key]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"empty question in {question_key!r}")
    if not isinstance(answer, str):
        raise ValueError(f"{answer_key!r} must be text ending in '#### <number>', got {type(answer).__name__}")
    final = parse_final(answer)
    if final is None:
        raise ValueError(f"{answer_key!r} has no '#### <number>' final answer: {answer[-60:]!r}")
    return QARecord(question=question, answer=answer, final=final)
