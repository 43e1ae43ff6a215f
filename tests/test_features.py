"""Tests for tune_kd.analysis.features: the teacher's and students' features of a sweep's finished
trials, their t-SNE figures and the numbers of how close they are."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from nbclient import NotebookClient

from tune_kd import analysis, models, plan, space
from tune_kd import data as datasets
from tune_kd.analysis import features
from tune_kd.config import Config
from tune_kd.storage import Storage
from tune_kd.train import Run, load_data
from tune_kd.trainable import RUN_STATE, student_file, trial_metrics

TEST_IMAGES = 48
NOTEBOOK = Path(__file__).parents[1] / "analysis" / "sweep_report.ipynb"

SPACE = """
name: features-test
dataset: synthetic
synthetic_train_size: 64
synthetic_test_size: {test_images}
teacher: resnet14
teacher_checkpoints: {{resnet14: {checkpoint}}}
student: resnet8
epochs: 1
lr_decay_epochs: [1]
batch_size: 32
device: cpu
grids:
  - method: [simkd, kd, student]
    seed: [0, 1]
  - method: [kd]
    student: [resnet8x4]
    seed: [0]
group_students: {grouped}
resources: {{cpu: 1, gpu: 0}}
"""


def train_experiment(root: Path, teacher_checkpoint: Path, grouped: bool) -> Path:
    """An experiment folder as a sweep of the space above leaves it: its plan, and per Ray trial
    the result lines and the last checkpoint that `trainable.train_trial` writes (the run's state
    and each finished student's exported weights), trained here by `train.Run`."""
    text = SPACE.format(test_images=TEST_IMAGES, checkpoint=teacher_checkpoint, grouped=grouped)
    loaded = space.load_text(text, root / "space.yaml")
    storage = Storage(str(root))
    plan.write_plan(storage, "exp", loaded, text, {}, loaded.resources)
    for position, group in enumerate(loaded.groups):
        folder = root / "exp" / plan.trial_folder_name(position, grouped)
        checkpoint = folder / "checkpoint_000000"
        checkpoint.mkdir(parents=True)
        members = [{"index": t.index} for t in group]
        run = Run([t.config for t in group])
        lines = []
        while not run.done:  # each line with what Tune adds that the analysis reads
            metrics = trial_metrics(run.train_epoch(), members)
            lines.append(json.dumps({**metrics, "time_total_s": float(run.epoch)}))
        (folder / "result.json").write_text("\n".join(lines) + "\n")
        run.save(checkpoint / RUN_STATE)
        for i in range(len(group)):
            run.export_student(i, checkpoint / student_file(i))
    return root / "exp"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_checkpoint) -> Path:
    """The space's 7 trials, each trained alone for one epoch."""
    return train_experiment(tmp_path_factory.mktemp("sweep"), teacher_checkpoint, grouped=False)


@pytest.fixture(scope="module")
def analysed(trained) -> tuple[int, str]:
    """`python -m tune_kd.analysis EXPERIMENT --features` run once: exit status and output."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = analysis.main([str(trained), "--features"])
    return code, printed.getvalue()


def trial_of(trained: Path, method: str, seed: int, student: str = "resnet8") -> str:
    trials = analysis.load_experiment(str(trained)).trials
    row = trials[trials.method.eq(method) & trials.seed.eq(seed) & trials.student.eq(student)]
    [trial_id] = row.trial_id
    return trial_id


def the_plan_config(trained: Path, trial_id: str) -> dict:
    written = plan.read_plan(Storage(str(trained)))
    [trial] = [
        t for t in written["trials"] if plan.trial_folder_name(t["index"], False) == trial_id
    ]
    return trial["config"]


# ----------------------------------------------------------------------------- the numbers


def test_agreement_of_hand_made_features():
    teacher = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    student = np.array([[2.0, 0.0], [0.0, -2.0], [3.0, 4.0], [1.0, 0.0]])
    got = features.feature_agreement(teacher, student, [1, 2, 3, 4], [1, 2, 0, 0])
    # cosines 1, -1, 1 and 0 (a row of zeros); distances 1, 4, 0, 1; two of four agree
    assert got["cosine_similarity"] == pytest.approx(0.25)
    assert got["l2_distance"] == pytest.approx(1.5)
    assert got["top1_agreement"] == pytest.approx(50.0)


def test_identical_features_agree_fully():
    rows = np.random.default_rng(0).standard_normal((5, 3))
    got = features.feature_agreement(rows, rows.copy(), np.arange(5), np.arange(5))
    assert got == pytest.approx({"cosine_similarity": 1, "l2_distance": 0, "top1_agreement": 100})


# ----------------------------------------------------------------------------- the command


def test_the_command_writes_features_of_each_finished_trial_with_a_teacher(trained, analysed):
    code, printed = analysed
    assert code == 0
    results = trained / "results"
    table = pd.read_csv(results / "features.csv")
    assert len(table) == 7  # every completed trial: those without features say why
    measured = table[table.note.isna()]
    assert sorted(zip(measured.method, measured.seed)) == [
        ("kd", 0),
        ("kd", 1),
        ("simkd", 0),
        ("simkd", 1),
    ]
    assert set(measured.images) == {TEST_IMAGES} and set(measured.width) == {64}
    notes = dict(zip(table.method + "/" + table.student, table.note))
    assert "method student has no teacher" in notes["student/resnet8"]
    assert "feature width 256 is not its teacher's 64" in notes["kd/resnet8x4"]
    for trial_id in measured.trial_id:
        assert (results / "features" / f"{trial_id}.parquet").is_file()
        assert trial_id in printed
    assert "features on the evaluation split" in printed and "cosine_similarity" in printed
    assert "feature files:" in printed
    assert (results / "summary.md").is_file()  # the report as without --features
    assert "| trial_id |" in (results / "features.md").read_text()


def test_parquet_holds_the_teachers_and_students_features_in_eval_order(trained, analysed):
    trial_id = trial_of(trained, "simkd", 0)
    path = trained / "results" / "features" / f"{trial_id}.parquet"
    table = pq.read_table(path)
    assert table.column_names == [
        "label",
        "teacher_prediction",
        "student_prediction",
        "teacher_feature",
        "student_feature",
    ]
    got, _ = features.read_features(path.read_bytes())
    config = the_plan_config(trained, trial_id)
    teacher = models.load_checkpoint(config["teacher_checkpoint"], name="resnet14")
    arrays = load_data(Config.from_dict(config))
    np.testing.assert_array_equal(got.labels, arrays.eval_labels)
    [(images, _)] = list(datasets.DeviceData(arrays).eval_batches(TEST_IMAGES))
    with torch.no_grad():
        feats, logits = teacher(images, is_feat=True)
    np.testing.assert_allclose(got.teacher, feats[-1].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.teacher_predictions, logits.argmax(1).numpy())
    # SimKD's student point is what enters the reused teacher classifier: its predictions
    with torch.no_grad():
        through = teacher.get_classifier()(torch.tensor(got.student)).argmax(1).numpy()
    np.testing.assert_array_equal(got.student_predictions, through)


def test_the_table_numbers_are_those_of_the_written_features(trained, analysed):
    table = pd.read_csv(trained / "results" / "features.csv")
    for _, row in table[table.note.isna()].iterrows():
        path = trained / "results" / "features" / f"{row.trial_id}.parquet"
        got, _ = features.read_features(path.read_bytes())
        expected = features.feature_agreement(
            got.teacher, got.student, got.teacher_predictions, got.student_predictions
        )
        assert {k: row[k] for k in expected} == pytest.approx(expected)


def test_one_tsne_figure_per_grid_cell_its_first_seed(trained, analysed):
    folder = trained / "results" / "features"
    drawn = sorted(p.name for p in folder.glob("tsne-*"))
    firsts = [trial_of(trained, method, 0) for method in ("kd", "simkd")]
    assert drawn == sorted(f"tsne-{t}.{kind}" for t in firsts for kind in ("png", "svg"))


def test_a_repeated_analysis_reuses_the_features_and_figures(trained, analysed):
    folder = trained / "results" / "features"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with contextlib.redirect_stdout(io.StringIO()):
        assert analysis.main([str(trained), "--features"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_grouped_students_are_found_by_their_position(teacher_checkpoint, tmp_path):
    root = train_experiment(tmp_path, teacher_checkpoint, grouped=True)
    experiment = analysis.load_experiment(str(root))
    report = features.write_features(experiment, str(tmp_path / "out"))
    measured = report.table[report.table.note.isna()]
    assert len(measured) == 4
    assert set(measured.cosine_similarity.round(6)) != {1.0}  # real, distinct features
    for trial_id in measured.trial_id:
        assert (tmp_path / "out" / "features" / f"{trial_id}.parquet").is_file()


def test_the_figure_shows_teacher_magenta_and_student_cyan():
    points = np.random.default_rng(0).standard_normal((40, 2))
    fig = features.plot_embedding(points, "resnet14 → resnet8, simkd", "loss=l2")
    [ax] = fig.axes
    assert "resnet14 → resnet8, simkd" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["teacher", "student"]
    teacher, student = ax.collections
    assert len(teacher.get_offsets()) == len(student.get_offsets()) == 20
    assert teacher.get_facecolor()[0][:3] == pytest.approx((0xD6 / 255, 0x16 / 255, 0x8B / 255))
    assert student.get_facecolor()[0][:3] == pytest.approx((0x17 / 255, 0xBE / 255, 0xCF / 255))


def test_embedding_puts_teacher_rows_first():
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((30, 8)).astype(np.float32)
    student = teacher + 10  # far apart: the t-SNE keeps them apart
    points = features.embed(teacher, student)
    assert points.shape == (60, 2)
    gap = np.linalg.norm(points[:30].mean(0) - points[30:].mean(0))
    assert gap > points[:30].std(0).max()


def test_without_the_tsne_library_one_line_names_the_extra(trained, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openTSNE", None)
    assert analysis.main([str(trained), "--features"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tune-kd[features]" in err


def test_the_notebook_shows_the_tsne_figures(trained, analysed, monkeypatch):
    """The report notebook's last section shows the features table and each t-SNE figure."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("TUNE_KD_EXPERIMENT", str(trained))
    in_analysis = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources=in_analysis).execute()
    last = notebook.cells[-1].outputs
    images = [o for o in last if "image/png" in o.get("data", {})]
    assert len(images) == len(list((trained / "results" / "features").glob("tsne-*.png"))) == 2
    assert any("top1_agreement" in o.get("data", {}).get("text/plain", "") for o in last)


def test_a_figure_is_titled_by_pair_and_method_and_what_tells_its_cell_apart():
    trials = pd.DataFrame(
        {
            "trial_id": [f"trial_{i:04d}" for i in range(5)],
            "status": "completed",
            "teacher": "resnet32x4",
            "student": "resnet8x4",
            "method": ["simkd", "simkd", "simkd", "kd", "kd"],
            "loss": ["l2", "l2", "cosine", None, None],
            "seed": [0, 1, 0, 0, 1],
        }
    )
    titles = features.cell_titles(trials)
    assert titles["trial_0000"] == (0, ("resnet32x4 → resnet8x4, simkd", "loss=l2"))
    assert titles["trial_0001"] == titles["trial_0000"]  # its cell's other seed
    assert titles["trial_0002"] == (1, ("resnet32x4 → resnet8x4, simkd", "loss=cosine"))
    assert titles["trial_0003"] == titles["trial_0004"] == (2, ("resnet32x4 → resnet8x4, kd", ""))
