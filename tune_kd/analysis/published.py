"""The published numbers (`tune_kd/published.csv`: the paper's tables and the study's) and the
row of them that matches a grid cell."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import pandas as pd

MATCH_KEYS = (
    "teacher",
    "student",
    "method",
    "loss",
    "projector",
    "projector_design",
    "teacher_correct_only",
    "lr",
    "reuse_stage",
    "reuse_factor",
)

PUBLISHED_COLUMNS = {
    "published_teacher": "float64",
    "published_mean": "float64",
    "published_std": "float64",
    "published_n": "Int64",
    "published_source": object,
    "published_note": object,
    "baseline_mean": "float64",
    "baseline_std": "float64",
}


def with_published(cells: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    rows = published.to_dict("records")
    matches = [published_for(cell, rows) for cell in cells.to_dict("records")]
    extra = pd.DataFrame(matches, index=cells.index, columns=PUBLISHED_COLUMNS)
    return pd.concat([cells, extra.astype(PUBLISHED_COLUMNS)], axis=1)


def published_numbers() -> pd.DataFrame:
    """The paper's Tables 1, 2, 4 (Sequential), 5, 6 (multi-teacher: `extra_teachers` names the
    teachers after `teacher`) and S.10 (SimKD+ and SimKD++), DKD's CIFAR-100 numbers and the
    study's tables (`tune_kd/published.csv`); keys a row does not constrain are null, as is the
    `note` (how numbers from elsewhere were measured, or a configuration inferred) of a row
    without one."""
    text = resources.files("tune_kd").joinpath("published.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    frame = pd.DataFrame(rows).replace("", None)
    frame["teacher_correct_only"] = frame["teacher_correct_only"].map(
        {"true": True, "false": False}, na_action="ignore"
    )
    for key in ("lr", "reuse_stage", "reuse_factor", "mean", "std"):
        frame[key] = pd.to_numeric(frame[key])
    frame["n"] = pd.to_numeric(frame["n"]).astype("Int64")
    return frame


def published_for(cell: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The published teacher, the number of the same setting (with its note) and the paper's SimKD
    of the pair."""
    teacher = first_match(
        r for r in rows if r["method"] == "teacher" and same(cell.get("teacher"), r["teacher"])
    )
    match = most_specific(cell, [r for r in rows if r["method"] != "teacher"])
    if match is None and cell.get("method") == "student":  # a teacher architecture trained alone
        match = first_match(
            r for r in rows if r["method"] == "teacher" and same(cell.get("student"), r["teacher"])
        )
    baseline = paper_simkd(rows, cell.get("teacher"), cell.get("student"))
    return {
        "published_teacher": teacher["mean"] if teacher else None,
        "published_mean": match["mean"] if match else None,
        "published_std": match["std"] if match else None,
        "published_n": match["n"] if match else None,
        "published_source": f"{match['source']} {match['table']}" if match else None,
        "published_note": match.get("note") if match else None,
        "baseline_mean": baseline["mean"] if baseline else None,
        "baseline_std": baseline["std"] if baseline else None,
    }


def most_specific(cell: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Any:
    """The row whose every given key the cell shares (keys the cell lacks are not compared) with
    the most keys given, and its extra teachers (a multi-teacher row matches only a cell of the
    same teachers); the first of equals."""
    best, best_count = None, -1
    for row in rows:
        given = [k for k in MATCH_KEYS if k in cell and not missing(row[k])]
        if (
            len(given) > best_count
            and same_teachers(cell, row)
            and all(same(cell[k], row[k]) for k in given)
        ):
            best, best_count = row, len(given)
    return best


def same_teachers(cell: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    """The cell's `extra_teachers` and the row's name the same architectures in order (none for
    either: single-teacher)."""
    return teacher_names(cell.get("extra_teachers")) == teacher_names(row.get("extra_teachers"))


def teacher_names(value: Any) -> list[str]:
    """Architectures of an `extra_teachers` value: a list, its text in a results table, or the
    space-separated names of `published.csv`."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [] if missing(value) else re.findall(r"[A-Za-z0-9_.]+", str(value))


def paper_simkd(rows: Sequence[Mapping[str, Any]], teacher: Any, student: Any) -> Any:
    """The paper's single-teacher SimKD result for a teacher and student (Tables 1 and 2), the
    study's baseline."""
    return first_match(
        r
        for r in rows
        if r["source"] == "paper"
        and r["method"] == "simkd"
        and missing(r["projector_design"])
        and missing(r.get("extra_teachers"))
        and same(teacher, r["teacher"])
        and same(student, r["student"])
    )


def first_match(rows: Iterator[Any]) -> Any:
    """The first of the matching rows a generator yields; None when it yields none."""
    return next(rows, None)


def missing(value: Any) -> bool:
    """None, pandas' NA or NaN: a value not known."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def same(value: Any, published: Any) -> bool:
    """A cell's value and a published one agree: numbers within 1e-9 relative, text whatever its
    case; a missing value agrees with none."""
    if missing(value) or missing(published):
        return False
    if isinstance(published, float) and not isinstance(value, str):
        return math.isclose(float(value), published, rel_tol=1e-9)
    return str(value).lower() == str(published).lower()
