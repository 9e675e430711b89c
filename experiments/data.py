"""Local question/answer datasets (GSM8K style) from JSONL, JSON or Parquet, through `datasets`.

Answers end in "#### <number>"; the number (NUMBER: integers, decimals, thousands groups,
fractions, exponents) is the reference final answer, and a final answer that is not one number
is a malformed row, never cut to its first digits. Files are read offline only (the packaged
json/parquet builders, cached in a temporary folder), never from the hub. Every malformed row
names the file, its 1-based line (JSONL) or row number, and the fix;
`skip_malformed=True` drops such rows and returns where they were, so the caller can report them.

This module knows nothing about prompts, tokenizers or rewards (experiments/tasks.py).
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# What a number is, for the reference answers here and for the rewards that read the model's
# answers (experiments/tasks.py): an optional sign and "$"; digits, in thousands groups
# separated by commas or by spaces ("1,234", "1 234") or plain; decimals; an exponent ("1e3",
# "2.5E-2"); or a fraction of integers ("3/4"). Grouping alternatives come first so that
# "1,234" reads as one number; the exponent has at most two digits, bounding the value's size.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?: \d{3})+(?!\d)|\d+)"
NUMBER = (rf"(?:-\$?|\$-?)?(?:\d+\s?/\s?\d+|(?:{_INT}(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d{{1,2}}(?!\d))?)")
NUMBER_RE = re.compile(NUMBER)
_WHOLE_NUMBER_RE = re.compile(rf"\s*({NUMBER})\s*\.?\s*")  # a final answer may end its sentence
# How a reference answer may be written, for error messages.
NUMBER_EXAMPLES = "72, -3, 2.5, 1,234, 1 234, $12, 3/4 or 1e3"


class DataError(ValueError):
    """A dataset file the user gave cannot be read; the message names the file, row and fix."""


@dataclass(frozen=True)
class QARecord:
    question: str
    answer: str  # the full worked answer, "... #### 72"
    final: str  # the number after "####", separators and "$" removed: "72", "-3", "1234.5", "3/4", "1e3"


@dataclass(frozen=True)
class Skipped:
    """A malformed row that skip_malformed dropped: where it was and what was wrong."""

    unit: str  # "line" (JSONL) or "row"
    number: int  # 1-based
    problem: str

    @property
    def where(self) -> str:
        return f"{self.unit} {self.number}"


def parse_number(text: str) -> Fraction | None:
    """The exact value of `text` if all of it is one number (NUMBER, a trailing period allowed),
    else None; never raises. Fractions keep "1/3" exact, and "0.75" == "3/4"."""
    if not isinstance(text, str) or len(text) > 64:  # longer is never an answer; bounds the work
        return None
    match = _WHOLE_NUMBER_RE.fullmatch(text)
    if match is None:
        return None
    body = re.sub(r"[\s,$]", "", match.group(1))
    try:
        if "/" in body:
            num, den = body.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(Decimal(body))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def parse_final(answer: str) -> str | None:
    """The number after the last '####' of a GSM8K-style answer, separators and '$' removed;
    None when there is no '####' or what follows it is not one number (NUMBER)."""
    if "####" not in answer:
        return None
    tail = answer.rsplit("####", 1)[1].strip()
    if parse_number(tail) is None:
        return None
    return re.sub(r"[\s,$]", "", tail).rstrip(".")


def load_qa_file(path: str | Path, question_key: str = "question", answer_key: str = "answer",
                 skip_malformed: bool = False) -> tuple[list[QARecord], list[Skipped]]:
    """(records in file order, the malformed rows skipped). Raises DataError on bad input, and
    when no usable row is left (an empty file, or every row malformed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; set task.path to a JSONL or Parquet file with "
                        f"'{question_key}' and '{answer_key}' fields")
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    skipped: list[Skipped] = []
    if path.suffix.lower() == ".jsonl" or (builder == "json" and not _is_json_array(path)):
        good_lines, skipped = _scan_jsonl(path, skip_malformed)
        unit, numbers = "line", [n for n, _ in good_lines]
        if not good_lines:
            rows = []
        elif skipped:  # datasets cannot read the broken lines; hand it the good ones only
            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / "clean.jsonl"
                clean.write_text("".join(text + "\n" for _, text in good_lines))
                rows = _load_rows(clean, "json", shown=path)
        else:
            rows = _load_rows(path, "json")
    else:
        if builder == "json" and _check_json_array(path) == 0:
            rows = []
        else:
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
            skipped.append(Skipped(unit, number, str(e)))
    skipped.sort(key=lambda s: s.number)
    if not records:
        what = f"all {len(skipped)} rows are malformed (first: {skipped[0].where}: {skipped[0].problem})" \
            if skipped else "it holds no rows"
        raise DataError(f"{path}: no usable question/answer rows: {what}; give a file with "
                        f"'{question_key}' and '{answer_key}' fields, answers ending in '#### <number>'")
    return records, skipped


def describe_skipped(path: str | Path, kept: int, skipped: list[Skipped], show: int = 5) -> str:
    """One line for the user: how many rows were dropped, and the first few with their problem."""
    first = "; ".join(f"{s.where}: {s.problem}" for s in skipped[:show])
    more = f"; and {len(skipped) - show} more" if len(skipped) > show else ""
    return (f"task.skip_malformed: skipped {len(skipped)} malformed rows of {path} (kept {kept}): "
            f"{first}{more}")


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _check_json_array(path: Path) -> int:
    """The number of rows in a JSON-array file; DataError if it is not valid JSON."""
    try:
        return len(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg}); fix the file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); re-save it as UTF-8") from None


def _scan_jsonl(path: Path, skip_malformed: bool) -> tuple[list[tuple[int, str]], list[Skipped]]:
    """Check each line with json.loads, since `datasets` does not report where a line broke.

    Returns the (1-based line number, text) of the good non-blank lines and the lines skipped.
    """
    good, skipped = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").strip()
                if not text:
                    continue
                if not isinstance(json.loads(text), dict):
                    raise ValueError("expected a JSON object per line")
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                problem = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                if not skip_malformed:
                    raise DataError(f"{path}: line {number}: invalid JSON ({problem}); fix or remove the "
                                    f"line, or skip malformed rows (task.skip_malformed=true)") from None
                skipped.append(Skipped("line", number, f"invalid JSON ({problem})"))
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
    if "####" not in answer:
        raise ValueError(f"{answer_key!r} has no '#### <number>' final answer: {answer[-60:]!r}")
    final = parse_final(answer)
    if final is None:
        tail = answer.rsplit("####", 1)[1].strip()
        raise ValueError(f"{answer_key!r}: the final answer {tail[:40]!r} after '####' is not one number "
                         f"(write it as {NUMBER_EXAMPLES})")
    return QARecord(question=question, answer=answer, final=final)
