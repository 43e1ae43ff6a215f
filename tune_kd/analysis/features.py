"""Teacher and student features on the evaluation split: how close a student's features come to
its teacher's (the SimKD paper's Figure S.2, where SimKD's are "almost indistinguishable").

    python -m tune_kd.analysis EXPERIMENT_DIR --features

loads each completed trial's student (its file exported in the trial's last checkpoint, and, for a
method that trains modules beside the student, such as SimKD's projector, the distiller's state
saved there) and its teacher (the trial's `teacher_checkpoint`: a file, or the sweep's teacher
cache), runs both in eval mode over the evaluation split, and writes into the results folder:

- `features/<trial_id>.parquet`: one row per evaluation image, in the split's order: `label`,
  `teacher_prediction`, `student_prediction` (top-1 classes) and `teacher_feature`,
  `student_feature` (fixed-size lists of float32, the teacher's width). The teacher's feature is
  its pooled feature, the input of its classifier; the student's is, for SimKD, the projected
  pooled feature that enters the reused teacher classifier, else the student's own pooled
  feature (a student whose width differs from its teacher's is skipped, with a note);
- `features/tsne-<trial_id>.png` and `.svg`: for the first trial of each grid cell that has
  features (lowest seed), the joint t-SNE of its teacher (magenta) and student (cyan) features;
- `features.csv` and `features.md`: per trial, the mean cosine similarity and the mean L2
  distance between each image's teacher and student features, and the teacher-student top-1
  agreement (%), or why the trial has none.

A trial whose features file was written from the same checkpoint is read back, not extracted
again, and its figure is kept when both its images exist. The t-SNE is openTSNE's, an optional
extra (`pip install 'tune-kd[features]'`). This module needs torch; the rest of the analysis
does not.
"""

from __future__ import annotations

import io
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from tune_kd import data as datasets
from tune_kd import distillers, models
from tune_kd.analysis.cells import cell_keys
from tune_kd.analysis.frames import Experiment
from tune_kd.analysis.plots import figure_bytes, pair_name
from tune_kd.analysis.read import is_folder, list_entries
from tune_kd.analysis.tables import aligned, format_value, markdown_table
from tune_kd.config import Config
from tune_kd.distillers.base import feature_shapes
from tune_kd.distillers.simkd import SimKDDistiller
from tune_kd.plan import FOLDER_PREFIXES, TRIAL_FOLDER, trial_folder_name
from tune_kd.storage import Storage
from tune_kd.train import load_data
from tune_kd.trainable import RUN_STATE, student_file

FEATURES_FOLDER = "features"
TABLE = "features"  # features.csv and features.md beside the other results
EXTRA = "features"  # the optional dependencies' name in pyproject.toml
TEACHER_COLOR, STUDENT_COLOR = "#d6168b", "#17becf"  # magenta, cyan
CHECKPOINT_KEY = b"tune_kd_checkpoint"  # the parquet metadata: the checkpoint it was read from
METRICS = ("cosine_similarity", "l2_distance", "top1_agreement")


class FeaturesUnavailable(RuntimeError):
    """Why one trial has no features (no checkpoint, no teacher, widths differ...)."""


def missing_extra() -> str | None:
    """One line naming the extra to install when the t-SNE library is missing; None when not."""
    try:
        import openTSNE  # noqa: F401
    except ImportError:
        return f"--features needs openTSNE: pip install 'tune-kd[{EXTRA}]'"
    return None


# ----------------------------------------------------------------------------- the numbers


@dataclass
class Features:
    """Paired features of the evaluation images, in the split's order."""

    labels: np.ndarray  # int64 [N]
    teacher: np.ndarray  # float32 [N, D]
    student: np.ndarray  # float32 [N, D]
    teacher_predictions: np.ndarray  # int64 [N]
    student_predictions: np.ndarray  # int64 [N]


def feature_agreement(
    teacher: np.ndarray,
    student: np.ndarray,
    teacher_predictions: np.ndarray,
    student_predictions: np.ndarray,
) -> dict[str, float]:
    """Over paired rows: the mean cosine similarity (0 for a row of zeros) and the mean L2
    distance between teacher and student features, and the share (%) of images whose top-1
    predictions agree."""
    teacher, student = np.asarray(teacher, np.float64), np.asarray(student, np.float64)
    norms = np.linalg.norm(teacher, axis=1) * np.linalg.norm(student, axis=1)
    dots = (teacher * student).sum(axis=1)
    cosine = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    agree = np.asarray(teacher_predictions) == np.asarray(student_predictions)
    return {
        "cosine_similarity": float(cosine.mean()),
        "l2_distance": float(np.linalg.norm(teacher - student, axis=1).mean()),
        "top1_agreement": 100 * float(agree.mean()),
    }


# ----------------------------------------------------------------------------- parquet


def features_bytes(features: Features, checkpoint: str) -> bytes:
    """The parquet file of `features`, noting the `checkpoint` they come from."""
    width = features.teacher.shape[1]

    def vectors(values: np.ndarray) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, width)

    table = pa.table(
        {
            "label": features.labels.astype(np.int64),
            "teacher_prediction": features.teacher_predictions.astype(np.int64),
            "student_prediction": features.student_predictions.astype(np.int64),
            "teacher_feature": vectors(features.teacher),
            "student_feature": vectors(features.student),
        }
    ).replace_schema_metadata({CHECKPOINT_KEY: checkpoint.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_features(content: bytes) -> tuple[Features, str]:
    """A features file as `features_bytes` writes it, and the checkpoint it notes."""
    table = pq.read_table(io.BytesIO(content))

    def matrix(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)

    features = Features(
        labels=table.column("label").to_numpy(),
        teacher=matrix("teacher_feature"),
        student=matrix("student_feature"),
        teacher_predictions=table.column("teacher_prediction").to_numpy(),
        student_predictions=table.column("student_prediction").to_numpy(),
    )
    metadata = table.schema.metadata or {}
    return features, metadata.get(CHECKPOINT_KEY, b"").decode()


# ----------------------------------------------------------------------------- a trial's files


@dataclass(frozen=True)
class TrialCheckpoint:
    """Where a finished student is: its trial's last checkpoint folder (relative to the
    experiment) and its position among the students that trial trained."""

    folder: str
    member: int


def trial_folders(storage: Storage, plan: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """The Tune folder of every trial the plan names, and its position there, by trial id: a
    planned trial's by the plan's groups (`trial_0007` of plan index 7 in `group_0002`), an
    Optuna sample's its own folder."""
    names = [n for n, info in list_entries(storage).items() if is_folder(info)]
    names = [n for n in names if n.startswith(FOLDER_PREFIXES)]
    if not plan.get("trials"):
        return {name: (name, 0) for name in names}
    by_position = {int(m[1]): n for n in names if (m := TRIAL_FOLDER.fullmatch(n))}
    groups = plan.get("groups") or [[t["index"]] for t in plan["trials"]]
    found = {}
    for position, members in enumerate(groups):
        if position in by_position:
            for member, index in enumerate(members):
                found[trial_folder_name(index, grouped=False)] = (by_position[position], member)
    return found


def last_checkpoint(storage: Storage, folder: str, member: int) -> TrialCheckpoint:
    """The newest checkpoint of a trial's folder that holds the exported student `member`."""
    entries = list_entries(storage, folder)
    checkpoints = sorted(
        (n for n, info in entries.items() if is_folder(info) and n.startswith("checkpoint_")),
        reverse=True,
    )
    for name in checkpoints:
        if storage.exists(folder, name, student_file(member)):
            return TrialCheckpoint(f"{folder}/{name}", member)
    raise FeaturesUnavailable(f"no checkpoint in {folder} holds {student_file(member)}")


def read_tensors(content: bytes) -> Any:
    """A torch file's tensors (never unpickling anything else)."""
    return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- the networks


@dataclass
class Loaded:
    """What one analysis loads once for all trials: datasets and teachers, by their keys."""

    device: torch.device
    data: dict[Any, datasets.Arrays] = field(default_factory=dict)
    teachers: dict[str, nn.Module] = field(default_factory=dict)

    def dataset(self, config: Config) -> datasets.Arrays:
        if config.data_key not in self.data:
            self.data[config.data_key] = load_data(config)
        return self.data[config.data_key]

    def teacher(self, config: Config) -> nn.Module:
        """The trial's teacher in eval mode: its checkpoint file, or the file a storage URI
        names (the sweep's teacher cache)."""
        where = config.teacher_checkpoint
        if where is None:
            raise FeaturesUnavailable("its configuration names no teacher checkpoint")
        if where not in self.teachers:
            self.teachers[where] = load_teacher(where, config.teacher).to(self.device)
        return self.teachers[where]


def load_teacher(where: str, arch: str) -> nn.Module:
    if "://" not in where:
        if not Path(where).is_file():
            raise FeaturesUnavailable(f"its teacher checkpoint {where} is missing")
        return load_model(where, arch)
    folder, name = where.rsplit("/", 1)
    storage = Storage(folder)
    if not storage.exists(name):
        raise FeaturesUnavailable(f"its teacher checkpoint {where} is missing")
    with tempfile.TemporaryDirectory() as local:
        path = Path(local) / name
        path.write_bytes(storage.read(name))
        return load_model(path, arch)


def load_model(path: str | Path, arch: str) -> nn.Module:
    try:
        return models.load_checkpoint(path, name=arch)
    except ValueError as error:
        raise FeaturesUnavailable(str(error).splitlines()[0]) from None


def load_distiller(
    storage: Storage, checkpoint: TrialCheckpoint, loaded: Loaded
) -> tuple[Config, distillers.Distiller, nn.Module]:
    """A trial's configuration, its distiller around the exported student (with the state the
    checkpoint holds of what the method trains beside the student), and its teacher."""
    state = read_tensors(storage.read(checkpoint.folder, RUN_STATE))
    saved = state["members"][checkpoint.member]
    config = Config.from_dict(saved["config"])
    if not distillers.get(config.method).uses_teacher:
        raise FeaturesUnavailable(f"method {config.method} has no teacher")
    arrays = loaded.dataset(config)
    teacher = loaded.teacher(config)
    student = models.create(config.student, num_classes=arrays.num_classes)
    exported = read_tensors(storage.read(checkpoint.folder, student_file(checkpoint.member)))
    student.load_state_dict(exported["model"])
    train_labels = torch.as_tensor(arrays.train_labels)
    distiller = distillers.create(config, student, [distillers.Teacher(teacher)], train_labels)
    own = {f"student.{k}" for k in student.state_dict()}
    if set(distiller.state_dict()) - own:  # modules beside the student: SimKD's projectors
        distiller.load_state_dict(saved["distiller"])
    return config, distiller.to(loaded.device).eval(), teacher


def student_feature(distiller: distillers.Distiller, images: Tensor) -> Tensor:
    """The student's point of the pair: SimKD's projected pooled feature, which enters the reused
    teacher classifier; another method's student's own pooled feature."""
    if isinstance(distiller, SimKDDistiller):
        return distiller.pooled_projection(images)
    features, _ = distiller.student(images, is_feat=True)
    return features[-1]


def extract(
    distiller: distillers.Distiller,
    teacher: nn.Module,
    arrays: datasets.Arrays,
    batch_size: int,
    device: torch.device,
) -> Features:
    """The paired features and top-1 predictions of every evaluation image, in eval mode."""
    width_t = feature_shapes(teacher)[-1]
    if not isinstance(distiller, SimKDDistiller):
        width_s = feature_shapes(distiller.student)[-1]
        if width_s != width_t:
            raise FeaturesUnavailable(
                f"its student's feature width {width_s[0]} is not its teacher's {width_t[0]}"
            )
    parts: dict[str, list[Tensor]] = {k: [] for k in ("t", "s", "tp", "sp")}
    data = datasets.DeviceData(arrays, device)
    with torch.inference_mode():
        for images, _ in data.eval_batches(batch_size):
            teacher_features, teacher_logits = teacher(images, is_feat=True)
            parts["t"].append(teacher_features[-1].float().cpu())
            parts["s"].append(student_feature(distiller, images).float().cpu())
            parts["tp"].append(teacher_logits.argmax(dim=1).cpu())
            parts["sp"].append(distiller.predict(images).argmax(dim=1).cpu())
    joined = {k: torch.cat(v).numpy() for k, v in parts.items()}
    return Features(
        np.asarray(arrays.eval_labels, np.int64),
        joined["t"],
        joined["s"],
        joined["tp"],
        joined["sp"],
    )


# ----------------------------------------------------------------------------- the figure


def embed(teacher: np.ndarray, student: np.ndarray, seed: int = 0) -> np.ndarray:
    """The joint 2-d t-SNE of the teacher's and the student's points (openTSNE, PCA start,
    perplexity 30 or a third of fewer points): the teacher's rows first, then the student's."""
    from openTSNE import TSNE

    points = np.concatenate([teacher, student]).astype(np.float32)
    perplexity = min(30.0, (len(points) - 1) / 3)
    # One thread: on the shared 2-core machine a second one made it slower at every size
    # (docs/PERFORMANCE.md).
    tsne = TSNE(2, perplexity=perplexity, initialization="pca", random_state=seed, n_jobs=1)
    return np.asarray(tsne.fit(points))


def plot_embedding(points: np.ndarray, title: str, subtitle: str = "") -> Figure:
    """Teacher points (the first half of `points`) in magenta, student points in cyan."""
    half = len(points) // 2
    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.subplots()
    size = max(0.5, min(8.0, 4000 / len(points)))
    for rows, color, label in (
        (slice(0, half), TEACHER_COLOR, "teacher"),
        (slice(half, None), STUDENT_COLOR, "student"),
    ):
        ax.scatter(*points[rows].T, s=size, c=color, alpha=0.6, linewidths=0, label=label)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=11)
    ax.legend(loc="upper right", markerscale=max(1.0, 12 / size), frameon=True)
    return fig


# ----------------------------------------------------------------------------- the analysis


@dataclass
class FeaturesReport:
    """Per trial: its labels and numbers, or why it has none (`note`); what was written."""

    table: pd.DataFrame
    files: list[str]


def write_features(experiment: Experiment, out: str) -> FeaturesReport:
    """Every completed trial's features, the t-SNE figure of each grid cell's first trial that
    has them (lowest seed), and the table of their numbers, written into `out` (see the
    module's docstring). The networks run on the GPU where there is one."""
    storage, target = Storage(experiment.location), Storage(out)
    trials = experiment.trials
    done = trials[trials["status"].eq("completed")]
    if "seed" in done:
        done = done.sort_values("seed", kind="stable")
    folders = trial_folders(storage, experiment.plan)
    loaded = Loaded(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cells = cell_titles(done)
    rows, files, drawn = [], [], set()
    for _, trial in done.iterrows():
        trial_id = trial["trial_id"]
        row = {"trial_id": trial_id, **{k: trial[k] for k in cell_keys(trials)}}
        if "seed" in trials:
            row["seed"] = trial["seed"]
        try:
            features, fresh = trial_features(storage, target, folders, trial_id, loaded)
        except FeaturesUnavailable as error:
            rows.append({**row, "note": str(error)})
            continue
        files.append(target.uri_of(FEATURES_FOLDER, f"{trial_id}.parquet"))
        numbers = feature_agreement(
            features.teacher,
            features.student,
            features.teacher_predictions,
            features.student_predictions,
        )
        rows.append({**row, "images": len(features.labels), "width": features.teacher.shape[1]})
        rows[-1].update(numbers)
        cell, titles = cells[trial_id]
        if cell not in drawn:
            drawn.add(cell)
            files += trial_figure(target, trial_id, features, titles, redraw=fresh)
    order = {trial_id: i for i, trial_id in enumerate(trials["trial_id"])}
    rows.sort(key=lambda row: order[row["trial_id"]])  # the trials' order, as in trials.parquet
    table = pd.DataFrame(rows, columns=table_columns(rows))
    target.write(table.to_csv(index=False).encode(), f"{TABLE}.csv")
    target.write(features_markdown(table, experiment.name).encode(), f"{TABLE}.md")
    return FeaturesReport(
        table, [target.uri_of(f"{TABLE}.csv"), target.uri_of(f"{TABLE}.md"), *files]
    )


def trial_features(
    storage: Storage,
    target: Storage,
    folders: Mapping[str, tuple[str, int]],
    trial_id: str,
    loaded: Loaded,
) -> tuple[Features, bool]:
    """A trial's features: read back where its file was written from the same checkpoint, else
    extracted and written; whether they were extracted now."""
    if trial_id not in folders:
        raise FeaturesUnavailable(f"no folder of {trial_id} in {storage.uri}")
    checkpoint = last_checkpoint(storage, *folders[trial_id])
    source = storage.uri_of(checkpoint.folder, student_file(checkpoint.member))
    name = (FEATURES_FOLDER, f"{trial_id}.parquet")
    if target.exists(*name):
        features, written_from = read_features(target.read(*name))
        if written_from == source:
            return features, False
    try:
        config, distiller, teacher = load_distiller(storage, checkpoint, loaded)
    except FeaturesUnavailable:
        raise
    except (KeyError, RuntimeError, ValueError, OSError, datasets.DatasetUnavailable) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FeaturesUnavailable(f"{checkpoint.folder} cannot be loaded: {reason}") from None
    features = extract(
        distiller, teacher, loaded.dataset(config), config.eval_batch_size, loaded.device
    )
    target.write(features_bytes(features, source), *name)
    return features, True


PAIR_KEYS = ("teacher", "student", "method")  # a figure's title; the other cell keys below it


def cell_titles(trials: pd.DataFrame) -> dict[str, tuple[int, tuple[str, str]]]:
    """Each trial's grid cell (numbered), and the title of the cell's figure: its pair and
    method, and below them the labels that tell it from the other cells of that pair and
    method."""
    if trials.empty:
        return {}
    keys = cell_keys(trials)
    titles, cells = {}, 0
    pairs = trials.groupby([k for k in PAIR_KEYS if k in keys], dropna=False, sort=False)
    for _, pair in pairs:
        varying = [k for k in keys if k not in PAIR_KEYS and pair[k].nunique(dropna=False) > 1]
        for _, cell in pair.groupby(keys, dropna=False, sort=False):
            first = cell.iloc[0]
            subtitle = ", ".join(f"{k}={format_value(first[k])}" for k in varying)
            title = (pair_name(cell), textwrap.fill(subtitle, 60))
            titles.update({t: (cells, title) for t in cell["trial_id"]})
            cells += 1
    return titles


def trial_figure(
    target: Storage, trial_id: str, features: Features, titles: tuple[str, str], redraw: bool
) -> list[str]:
    """The t-SNE figure of one trial as PNG and SVG, drawn unless both are there and its
    features are unchanged; where they are."""
    names = [f"tsne-{trial_id}.png", f"tsne-{trial_id}.svg"]
    if redraw or not all(target.exists(FEATURES_FOLDER, n) for n in names):
        fig = plot_embedding(embed(features.teacher, features.student), *titles)
        for name in names:
            target.write(figure_bytes(fig, name[-3:]), FEATURES_FOLDER, name)
    return [target.uri_of(FEATURES_FOLDER, n) for n in names]


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = list(dict.fromkeys(k for row in rows for k in row))
    labels = [k for k in labels if k not in ("images", "width", *METRICS, "note")]
    return [*labels, "images", "width", *METRICS, "note"]


def display_features(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text: labels, the numbers (cosine 3 decimals, L2 2, agreement %), note."""
    shown = table.drop(columns=["images", "width"]).astype(object)
    formats = {"cosine_similarity": ".3f", "l2_distance": ".2f", "top1_agreement": ".2f"}
    for column in shown.columns:
        shown[column] = [format_value(v, formats.get(column, "")) for v in shown[column]]
    return shown


def format_features(report: FeaturesReport) -> str:
    """The terminal lines: the table, and where the files are."""
    if report.table.empty:
        return "features: no completed trial"
    lines = [
        "features on the evaluation split: teacher vs student (cosine, L2: means over images;"
        " agreement: % same top-1)",
        aligned(display_features(report.table)),
    ]
    if report.files:
        lines.append(f"feature files: {len(report.files)} in {report.files[0].rsplit('/', 1)[0]}")
    return "\n".join(lines)


def features_markdown(table: pd.DataFrame, title: str) -> str:
    header = [
        f"# {title}: teacher and student features",
        "",
        "On the evaluation split, per completed trial: mean cosine similarity and mean L2"
        " distance between each image's teacher and student features, and the % of images"
        " whose top-1 predictions agree.",
        "",
    ]
    body = markdown_table(display_features(table)) if not table.empty else "No completed trial."
    return "\n".join([*header, body]) + "\n"
