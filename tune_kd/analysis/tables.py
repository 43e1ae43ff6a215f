"""The summary as text: the terminal's table, markdown, LaTeX, and the list of failed trials."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from tune_kd.analysis.cells import summary_keys
from tune_kd.analysis.frames import STATUSES, label_keys
from tune_kd.analysis.published import missing
from tune_kd.analysis.runs import CONTEXT_KEYS

# What each `metric` choice summarises, as a table's or an axis' label: top-1, and its top-5.
METRIC_NAMES = {"best": "best test top-1 (%)", "last": "final-epoch test top-1 (%)"}
TOP5_NAMES = {"best": "best test top-5 (%)", "last": "final-epoch test top-5 (%)"}
BEST_MARK, INCOMPLETE_MARK = "★", "†"
LEGEND = f"{BEST_MARK} best cell; {INCOMPLETE_MARK} fewer trials finished than planned"


def failures(trials: pd.DataFrame) -> list[str]:
    """`trial_0001 (lr=0.05, seed=1): RuntimeError: ...` for every trial that ended in error,
    with the labels that tell the trials apart."""
    keys = [k for k in label_keys(trials) if trials[k].nunique(dropna=False) > 1]
    lines = []
    for row in trials[trials["status"].eq("error")].to_dict("records"):
        labels = ", ".join(f"{k}={format_value(row[k])}" for k in keys)
        lines.append(row["trial_id"] + (f" ({labels})" if labels else "") + f": {row['error']}")
    return lines


def format_accuracy(mean: Any, std: Any, n: Any) -> str:
    """`75.43 ± 0.26`; one value `18.36 ± n/a (n=1)`; none `—`."""
    if missing(mean):
        return "—"
    if missing(std):
        return f"{mean:.2f} ± n/a" + ("" if missing(n) else f" (n={n})")
    return f"{mean:.2f} ± {std:.2f}"


def display_table(summary: pd.DataFrame, metric: str = "best") -> pd.DataFrame:
    """The summary as text, one column per thing a reader compares; columns without any known
    value (no published number, no teacher, no GPU-hours on CPUs) and the context keys of
    `shared_line` are left out."""
    rows = [display_row(cell, summary_keys(summary)) for cell in summary.to_dict("records")]
    table = pd.DataFrame(rows).rename(columns={"result": METRIC_NAMES[metric]})
    optional = ["GPU-h", "CPU-h", "teacher (%)", "published teacher", "published", "vs paper SimKD"]
    unknown = [c for c in optional if table[c].eq("-").all()]
    return table.drop(columns=[*unknown, *shared_context(summary)])


def shared_context(summary: pd.DataFrame) -> dict[str, str]:
    """The context keys with one value in every cell: said once rather than in every row."""
    return {
        key: format_value(summary[key].iloc[0])
        for key in CONTEXT_KEYS
        if key in summary and summary[key].nunique(dropna=False) == 1
    }


def shared_line(summary: pd.DataFrame) -> str:
    shared = ", ".join(f"{k}={v}" for k, v in shared_context(summary).items())
    return f"in every cell: {shared}" if shared else ""


def display_row(cell: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
    result = format_accuracy(cell["mean"], cell["std"], cell["n"])
    published = format_accuracy(cell["published_mean"], cell["published_std"], cell["published_n"])
    gap = cell["mean"] - cell["baseline_mean"]
    return {
        **{key: format_value(cell[key]) for key in keys},
        "result": result + (f" {BEST_MARK}" if cell["best"] else ""),
        "n": f"{cell['n']}/{cell['n_planned']}"
        + (f" {INCOMPLETE_MARK}" if cell["incomplete"] else ""),
        "not finished": ", ".join(f"{cell[s]} {s}" for s in STATUSES[1:] if cell[s]) or "-",
        "GPU-h": format_hours(cell["gpu_hours"]),
        "CPU-h": format_hours(cell["cpu_hours"]),
        "teacher (%)": format_value(cell["teacher_acc"], ".2f"),
        "published teacher": format_value(cell["published_teacher"], ".2f"),
        "published": "-" if published == "—" else f"{published} ({cell['published_source']})",
        "vs paper SimKD": format_value(gap, "+.2f"),
    }


def format_value(value: Any, spec: str = "") -> str:
    """A label or number as table text: `-` when missing, a float by `spec` or `:g`."""
    if missing(value):
        return "-"
    if spec:
        return format(value, spec)
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_hours(hours: Any) -> str:
    """Hours as table text: two decimals, two significant digits below 0.1 (a short trial's
    0.0031, never 0.00); `-` when unknown."""
    if missing(hours):
        return "-"
    return format(hours, ".2f" if hours >= 0.1 else ".2g")


def status_line(summary: pd.DataFrame) -> str:
    counts = ", ".join(f"{int(summary[s].sum())} {s}" for s in STATUSES)
    return f"trials: {int(summary['n_planned'].sum())} planned: {counts}"


def aligned(table: pd.DataFrame) -> str:
    """A fixed-width text table, left-aligned."""
    widths = [max(len(str(c)), *(len(v) for v in table[c])) for c in table.columns]
    lines = [[str(c) for c in table.columns], *table.itertuples(index=False)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def format_summary(
    summary: pd.DataFrame,
    metric: str = "best",
    files: Sequence[str] = (),
    failed: Sequence[str] = (),
) -> str:
    """The terminal summary: the cells' table, the trials in each status, the errors of the failed
    ones (`failures`), where the files are."""
    lines = [
        f"{METRIC_NAMES[metric]} per grid cell: mean ± std over completed trials",
        aligned(display_table(summary, metric)),
        LEGEND,
        shared_line(summary),
        status_line(summary),
        *(["failed trials:", *(f"  {line}" for line in failed)] if failed else []),
    ]
    if files:
        folder = files[0].rsplit("/", 1)[0]
        lines.append(f"files in {folder}: " + ", ".join(f.rsplit("/", 1)[-1] for f in files))
    return "\n".join(line for line in lines if line)


def markdown_table(table: pd.DataFrame) -> str:
    """A table of text as markdown: its header, the rule, one line per row (`|` escaped)."""
    rows = [table.columns, *table.itertuples(index=False)]
    lines = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(table.columns))
    return "\n".join(lines)


def summary_markdown(
    summary: pd.DataFrame,
    metric: str,
    title: str,
    problems: Sequence[str],
    failed: Sequence[str] = (),
) -> str:
    lines = markdown_table(display_table(summary, metric)).split("\n")
    header = [f"# {title}", "", f"{METRIC_NAMES[metric]}: mean ± std over completed trials.", ""]
    notes = [LEGEND + ".", shared_line(summary), status_line(summary) + "."]
    footer = [line for note in notes if note for line in ("", note)]
    listed = ["", "Failed trials:", *(f"- {f}" for f in failed)] if failed else []
    listed += ["", "Problems:", *(f"- {p}" for p in problems)] if problems else []
    return "\n".join(header + lines + footer + listed) + "\n"


TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "±": r"$\pm$",
    "—": "---",
    "→": r"$\to$",
    BEST_MARK: r"$\star$",
    INCOMPLETE_MARK: r"$^\dagger$",
}


def tex_escape(value: str) -> str:
    return "".join(TEX_ESCAPES.get(char, char) for char in value)


def summary_tex(summary: pd.DataFrame, metric: str) -> str:
    table = display_table(summary, metric)
    rows = [
        " & ".join(tex_escape(str(v)) for v in row) + r" \\"
        for row in table.itertuples(index=False)
    ]
    header = " & ".join(tex_escape(c) for c in table.columns) + r" \\"
    return "\n".join(
        [
            r"\begin{tabular}{" + "l" * len(table.columns) + "}",
            r"\hline",
            header,
            r"\hline",
            *rows,
            r"\hline",
            r"\end{tabular}",
            *(f"% {line}" for line in (LEGEND, shared_line(summary)) if line),
            "",
        ]
    )


# The methods in the order of the paper's Tables 1 and 2 (DKD after them); others follow by name.
METHOD_ORDER = (
    *("student", "kd", "fitnet", "at", "sp", "vid", "crd", "srrl", "semckd", "simkd"),
    "dkd",
)
PAIR_KEYS = ("teacher", "student", "method")


def pair_methods(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per teacher/student pair (`teacher → student`) of a summary that compares methods or pairs
    (more than one combination of teacher, student and method; the student trained alone is the
    method `student` of every pair with its student): the pair's cells, in the order of
    `METHOD_ORDER`, each labelled in `row` by its method and the keys that tell apart cells of the
    same method. None for a summary of one method on one pair."""
    if not set(PAIR_KEYS) <= set(summary.columns):
        return {}
    if len(summary[list(PAIR_KEYS)].drop_duplicates()) < 2:
        return {}
    pairs = summary.loc[summary["teacher"].notna(), ["teacher", "student"]].drop_duplicates()
    alone = summary["method"].eq("student") & summary["teacher"].isna()
    found = {}
    for teacher, student in pairs.itertuples(index=False):
        cells = summary[(summary["teacher"].eq(teacher) | alone) & summary["student"].eq(student)]
        found[f"{teacher} → {student}"] = labelled_by_method(cells)
    return found


def labelled_by_method(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells in method order, `row` naming each: its method, then `key=value` for every key
    that varies among the cells of its method."""
    keys = [k for k in summary_keys(cells) if k not in PAIR_KEYS]
    varying = [k for k in keys if cells.groupby("method")[k].nunique(dropna=False).max() > 1]
    rank = {method: i for i, method in enumerate(METHOD_ORDER)}
    position = [(rank.get(method, len(rank)), method) for method in cells["method"]]
    cells = cells.iloc[sorted(range(len(cells)), key=position.__getitem__)]
    labels = [
        ", ".join(
            [cell["method"]]
            + [f"{k}={format_value(cell[k])}" for k in varying if not missing(cell[k])]
        )
        for cell in cells.to_dict("records")
    ]
    return cells.assign(row=labels).reset_index(drop=True)


def method_tables(summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per pair of `pair_methods`: a row per method (and the teacher's last) with the
    measured mean ± std, the trials finished of those planned, the published mean ± std, where it
    was published and the measured minus the published mean."""
    return {name: method_table(cells) for name, cells in pair_methods(summary).items()}


def method_table(cells: pd.DataFrame) -> pd.DataFrame:
    rows = [
        {
            "method": cell["row"],
            "measured": format_accuracy(cell["mean"], cell["std"], cell["n"]),
            "n": f"{cell['n']}/{cell['n_planned']}",
            "published": "-"
            if missing(cell["published_mean"])
            else format_accuracy(
                cell["published_mean"], cell["published_std"], cell["published_n"]
            ),
            "published in": format_value(cell["published_source"]),
            "difference": format_value(cell["mean"] - cell["published_mean"], "+.2f"),
        }
        for cell in cells.to_dict("records")
    ]
    teacher, published = cells["teacher_acc"].mean(), cells["published_teacher"].dropna()
    published_teacher = published.iloc[0] if len(published) else None
    difference = None if missing(published_teacher) else teacher - published_teacher
    rows.append(
        {
            "method": "teacher",
            "measured": format_value(teacher, ".2f"),
            "n": "-",
            "published": format_value(published_teacher, ".2f"),
            "published in": "-",
            "difference": format_value(difference, "+.2f"),
        }
    )
    return pd.DataFrame(rows)


def method_notes(summary: pd.DataFrame) -> list[str]:
    """`pair, method (source): note` for each row of `pair_methods` whose published number
    carries a note on how it was measured."""
    return [
        f"{name}, {cell['row']} ({cell['published_source']}): {cell['published_note']}"
        for name, cells in pair_methods(summary).items()
        for cell in cells.to_dict("records")
        if not missing(cell["published_note"])
    ]


def format_method_tables(summary: pd.DataFrame, metric: str = "best") -> str:
    """The terminal's `method_tables`, each under its pair, then the published numbers' notes;
    empty without any (see `pair_methods`)."""
    tables = method_tables(summary)
    if not tables:
        return ""
    lines = [f"{METRIC_NAMES[metric]} per method and teacher → student pair, against published"]
    for name, table in tables.items():
        lines += ["", name, aligned(table)]
    notes = method_notes(summary)
    return "\n".join(lines + (["", "notes:", *(f"  {n}" for n in notes)] if notes else []))


def methods_markdown(summary: pd.DataFrame, metric: str, title: str) -> str:
    """`method_tables` as markdown, one section per pair, then the published numbers' notes;
    empty without any (see `pair_methods`)."""
    tables = method_tables(summary)
    if not tables:
        return ""
    lines = [f"# {title}: methods per pair", "", f"{METRIC_NAMES[metric]}: mean ± std.", ""]
    for name, table in tables.items():
        lines += [f"## {name}", "", markdown_table(table), ""]
    notes = method_notes(summary)
    lines += ["Notes:", *(f"- {n}" for n in notes), ""] if notes else []
    return "\n".join(lines)
