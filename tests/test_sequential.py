"""Method `sequential` (the SimKD paper's Table 4): a new classifier trained on the frozen encoder
of a finished SimKD run. Stage 1 here is conftest's `simkd_run`, a real one-epoch SimKD run of
`python -m tune_kd.train` on synthetic data, or the one a sweep trains first (`tune_kd.stage1`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import sweep

from tune_kd import analysis, cost, distillers, models, run, space, stage1
from tune_kd.analysis.published import published_for
from tune_kd.config import Config, resolve
from tune_kd.distillers.sequential import SequentialDistiller, stage1_config, stage1_member
from tune_kd.storage import Storage
from tune_kd.train import Run, main

INPUTS = ("student_pooled", "projected")


def sequential_config(tiny: dict, simkd_run, **keys) -> dict:
    return {
        **tiny,
        "method": "sequential",
        "sequential_from": str(simkd_run),
        **keys,
    }


def flags(config: dict) -> list[str]:
    return [
        part
        for key, value in config.items()
        for part in (f"--{key.replace('_', '-')}", json.dumps(value).strip('"'))
    ]


def stage1_state(simkd_run) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(simkd_run / "checkpoint.pt", weights_only=True)
    return checkpoint["members"][0]["distiller"]


def frozen_state(distiller: SequentialDistiller) -> dict[str, torch.Tensor]:
    """The encoder's weights and batch-norm statistics: everything but the new classifier."""
    return {
        k: v.clone() for k, v in distiller.state_dict().items() if not k.startswith("classifier.")
    }


@pytest.mark.parametrize("source", INPUTS)
def test_only_the_new_classifier_trains_the_encoder_and_its_statistics_stay_bit_identical(
    source, tiny, simkd_run
):
    run = Run([sequential_config(tiny, simkd_run, sequential_input=source)])
    [member] = run.members
    distiller = member.distiller
    optimized = {id(p) for group in member.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in distiller.classifier.parameters()}
    before = frozen_state(distiller)
    classifier = {k: v.clone() for k, v in distiller.classifier.state_dict().items()}
    stage1 = stage1_state(simkd_run)
    # the encoder is stage 1's: the student's weights and statistics, and its last projector
    for name, value in before.items():
        assert torch.equal(value, stage1[name.replace("projector.", "projectors.0.")])
    for _ in range(2):
        metrics = run.train_epoch()
    assert not metrics[0]["diverged"]
    after = frozen_state(distiller)
    assert after.keys() == before.keys()
    assert any("running_mean" in k for k in after)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not distiller.student.training
    assert all(
        not torch.equal(v, classifier[k]) for k, v in distiller.classifier.state_dict().items()
    )


def test_the_classifier_reads_the_student_s_pooled_feature_or_the_projected_one(
    tiny, simkd_run, teacher_checkpoint
):
    """`student_pooled`: the input of the student's own classifier; `projected`: what SimKD's
    reused teacher classifier reads, the pooled output of stage 1's projector."""
    teacher = distillers.Teacher(models.load_checkpoint(teacher_checkpoint, name="resnet14"))
    stage1 = distillers.create(
        resolve(Config.from_dict(tiny)), models.create("resnet8", 10), [teacher]
    )
    stage1.load_state_dict(stage1_state(simkd_run))
    stage1.eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        features, _ = stage1.student(images, is_feat=True)
        expected = {"student_pooled": features[-1], "projected": stage1.pooled_projection(images)}
    for source in INPUTS:
        run = Run([sequential_config(tiny, simkd_run, sequential_input=source)])
        distiller = run.members[0].distiller
        distiller.train()  # the encoder stays in eval mode: its output does not depend on this
        assert torch.allclose(distiller.features(images), expected[source], atol=1e-6)
        with torch.no_grad():
            logits = distiller.predict(images)
        assert torch.allclose(logits, distiller.classifier(expected[source]), atol=1e-6)
    assert distiller.classifier.in_features == stage1.teacher.stages[-1].channels


def test_two_epochs_from_a_simkd_run_through_the_command_line(tiny, simkd_run, tmp_path, capsys):
    out = tmp_path / "stage2"
    config = sequential_config(tiny, simkd_run, sequential_input="projected")
    assert main([*flags(config), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_loss"] > 0 and not r["diverged"] for r in rows)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["members"][0]["distiller"]
    stage1 = stage1_state(simkd_run)
    student = {k: v for k, v in saved.items() if k.startswith("student.")}
    assert student and all(torch.equal(v, stage1[k]) for k, v in student.items())
    assert {k for k in saved if k.startswith("classifier.")} == {
        "classifier.weight",
        "classifier.bias",
    }


def refusal(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    return line


def test_a_checkpoint_of_another_method_is_refused_in_one_line(
    tiny, simkd_run, teacher_checkpoint, tmp_path, capsys
):
    plain = tmp_path / "student"
    student_run = {
        k: v for k, v in tiny.items() if k not in ("teacher", "teacher_checkpoint", "method")
    }
    assert (
        main([*flags({**student_run, "method": "student", "epochs": 1}), "--out", str(plain)]) == 0
    )
    capsys.readouterr()
    for source, reason in [
        (plain, "is a checkpoint of method student, not of simkd"),
        (teacher_checkpoint, "is not a run checkpoint of tune_kd.train"),
        (tmp_path / "nowhere", "no SimKD run checkpoint at"),
    ]:
        config = sequential_config(tiny, source)
        line = refusal([*flags(config), "--out", str(tmp_path / "out")], capsys)
        assert line.startswith("error: key 'sequential_from': ") and reason in line


def test_a_simkd_run_of_another_pair_or_none_is_refused_in_one_line(
    tiny, simkd_run, tmp_path, capsys
):
    other = sequential_config(tiny, simkd_run, student="resnet14")
    line = refusal([*flags(other), "--out", str(tmp_path / "a")], capsys)
    assert "no single SimKD student resnet14 -> resnet14" in line
    alone = {k: v for k, v in sequential_config(tiny, simkd_run).items() if k != "sequential_from"}
    line = refusal([*flags(alone), "--out", str(tmp_path / "b")], capsys)
    assert line == (
        "error: key 'sequential_from': method 'sequential' needs the finished SimKD run it "
        "starts from (a sweep of python -m tune_kd.run trains it first)"
    )


def test_a_vgg8_from_resnet32x4_builds_and_steps_on_shapes_alone():
    """What the dry run's counts build: no stage-1 file, the pair's shapes with SimKD's default
    projector; the step back-propagates into the classifier only."""
    for source, width in (("student_pooled", 512), ("projected", 256)):
        config = resolve(
            Config(
                teacher="resnet32x4",
                student="vgg8",
                method="sequential",
                sequential_input=source,
                device="cpu",
            )
        )
        teacher = distillers.Teacher(models.create("resnet32x4", 100))
        distiller = distillers.create(config, models.create("vgg8", 100), [teacher])
        assert distiller.classifier.in_features == width
        batch = distillers.Batch(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.arange(2))
        distiller.train_step(batch, []).loss.backward()
        trained = {n for n, p in distiller.named_parameters() if p.grad is not None}
        assert trained == {"classifier.weight", "classifier.bias"}


def test_table_4_stands_beside_the_paper_s_simkd_of_each_pair():
    """Each Table 4 row matches a sequential cell of either input, and its pair's SimKD baseline
    (Table 1) is the SimKD column Table 4 prints."""
    simkd_column = {
        ("resnet38x2", "resnet38"): 75.56,
        ("resnet32x4", "resnet8x4"): 78.08,
        ("resnet110x2", "resnet110"): 77.82,
        ("resnet110x2", "resnet116"): 77.90,
        ("resnet32x4", "vgg8"): 75.76,
        ("resnet38x2", "resnet8x4"): 76.75,
        ("resnet32x4", "ShuffleV2"): 78.39,
    }
    rows = analysis.published_numbers().to_dict("records")
    table4 = [r for r in rows if r["table"] == "Table 4"]
    assert {(r["teacher"], r["student"]) for r in table4} == simkd_column.keys()
    for row in table4:
        pair = {"teacher": row["teacher"], "student": row["student"], "method": "sequential"}
        for source in INPUTS:
            found = published_for({**pair, "sequential_input": source}, rows)
            assert found["published_mean"] == row["mean"]
            assert found["baseline_mean"] == simkd_column[(row["teacher"], row["student"])]


# ----------------------------------------------------------------------------- stage 1 in a sweep

TRAINED_TEACHER = {"epochs": 1, "lr_decay_epochs": [1]}  # a teacher_train of one epoch


def sequential_space(tmp_path: Path, teacher: dict, **keys) -> space.Space:
    """A space of sequential trials of resnet8 from a resnet14 on synthetic data: both inputs x
    seeds 0 and 1 unless `keys` replace the grid; `teacher` says where the teacher comes from."""
    document = {
        "name": "sequential",
        "dataset": "synthetic",
        "synthetic_train_size": 96,
        "synthetic_test_size": 64,
        "teacher": "resnet14",
        "student": "resnet8",
        "method": "sequential",
        "batch_size": 32,
        "epochs": 1,
        "lr_decay_epochs": [1],
        "grid": {"sequential_input": list(INPUTS), "seed": [0, 1]},
        "resources": {"cpu": 1, "gpu": 0.25},
        **teacher,
        **keys,
    }
    path = tmp_path / "sequential.yaml"
    path.write_text(yaml.safe_dump(document))
    return space.load(path)


def test_both_inputs_of_a_seed_share_one_stage1_run_and_seeds_have_their_own(
    tmp_path, teacher_checkpoint
):
    loaded = sequential_space(tmp_path, {"teacher_train": TRAINED_TEACHER})
    assert [n.config.seed for n in loaded.stage1] == [0, 1]
    by_seed = {}
    for trial in loaded.trials:
        by_seed.setdefault(trial.config.seed, set()).add(trial.stage1_key)
    assert by_seed == {seed: {loaded.stage1[seed].key} for seed in (0, 1)}
    for need in loaded.stage1:
        assert need.config.method == "simkd" and need.config.sequential_from is None
        assert need.teacher_key == loaded.teachers[0].key  # the teacher trained first
    # an explicit stage 1 is read from its file: nothing is trained first
    given = sequential_space(
        tmp_path,
        {"teacher_checkpoints": {"resnet14": str(teacher_checkpoint)}},
        sequential_from="elsewhere/run",
    )
    assert given.stage1 == [] and {t.stage1_key for t in given.trials} == {None}
    assert {t.config.sequential_from for t in given.trials} == {"elsewhere/run"}


def test_another_teacher_file_is_another_stage1_run(tmp_path, teacher_checkpoint):
    trained = sequential_space(tmp_path, {"teacher_train": TRAINED_TEACHER})
    from_file = sequential_space(
        tmp_path, {"teacher_checkpoints": {"resnet14": str(teacher_checkpoint)}}
    )
    assert {n.key for n in trained.stage1}.isdisjoint(n.key for n in from_file.stage1)
    assert from_file.stage1[0].config.teacher_checkpoint == str(teacher_checkpoint)


class FakeStage1:
    """Stands in for Tune: every stage-1 run it trains ends with `checkpoint` (None: failed)."""

    def __init__(self, checkpoint: bytes | None):
        self.checkpoint = checkpoint
        self.calls: list[tuple[str, list[Config]]] = []

    def __call__(self, experiment: str, configs: list[Config]) -> list[bytes | None]:
        self.calls.append((experiment, configs))
        return [self.checkpoint for _ in configs]


def test_missing_stage1_runs_are_trained_once_cached_and_read_by_the_trials(
    tmp_path, teacher_checkpoint, simkd_run, tiny
):
    loaded = sequential_space(
        tmp_path, {"teacher_checkpoints": {"resnet14": str(teacher_checkpoint)}}
    )
    storage = Storage(str(tmp_path / "results"))
    train = FakeStage1((simkd_run / "checkpoint.pt").read_bytes())
    stage1.train_missing(loaded, storage, train)
    [(experiment, configs)] = train.calls
    assert experiment.startswith("stage1-")
    for source in INPUTS:  # seeds 0 and 1 of each input
        trials = [t for t in loaded.trials if t.config.sequential_input == source]
        assert configs == [stage1_config(t.config) for t in trials]
    assert [(c.method, c.seed) for c in configs] == [("simkd", 0), ("simkd", 1)]
    stage1.train_missing(loaded, storage, train)
    assert len(train.calls) == 1  # cached: not trained again
    [first, second] = loaded.stage1
    parts = stage1.cache_parts(first)
    assert parts[:2] == ("stage1", f"resnet14-resnet8-{first.hash}")
    assert yaml.safe_load(storage.read(*parts[:2], "config.yaml"))["seed"] == 0
    ready = loaded.with_stage1_runs(stage1.cached_runs(loaded.stage1, storage))
    for trial in ready.trials:
        need = first if trial.config.seed == 0 else second
        assert trial.config.sequential_from == storage.uri_of(*stage1.cache_parts(need))
    # the trial reads the cached run, here through a URI of the storage as on an object store
    uri = "file://" + storage.uri_of(*parts)
    config = Config.from_dict({**tiny, "method": "sequential", "sequential_from": uri})
    member, state = stage1_member(uri, config)
    assert member.method == "simkd"
    assert state.keys() == torch.load(simkd_run / "checkpoint.pt")["members"][0]["distiller"].keys()


def test_a_stage1_run_that_fails_names_its_experiment_and_caches_nothing(
    tmp_path, teacher_checkpoint
):
    loaded = sequential_space(
        tmp_path, {"teacher_checkpoints": {"resnet14": str(teacher_checkpoint)}}
    )
    storage = Storage(str(tmp_path / "results"))
    with pytest.raises(RuntimeError) as raised:
        stage1.train_missing(loaded, storage, FakeStage1(None))
    message = str(raised.value)
    assert message.startswith("training stage-1 SimKD run resnet14 -> resnet8 seed 0 failed: see ")
    assert str(tmp_path / "results" / "stage1-") in message
    assert not storage.exists("stage1")


def test_the_dry_run_lists_the_stage1_runs_and_counts_their_gpu_hours(
    tmp_path, teacher_checkpoint, capsys
):
    teacher = {"teacher_checkpoints": {"resnet14": str(teacher_checkpoint)}}
    loaded = sequential_space(tmp_path, teacher)
    assert run.main(["--dry-run", "--space", str(loaded.path), "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    listed = re.findall(
        r"stage-1 SimKD run resnet14 -> resnet8: trained first \(recipe (\w+), seed (\d)\)", out
    )
    assert listed == [(n.hash, str(n.config.seed)) for n in loaded.stage1]
    given = sequential_space(tmp_path, teacher, sequential_from="elsewhere/run")
    assert "stage-1" not in run.describe_plan(given)
    stage1_hours = sum(cost.gpu_hours(n.config) for n in loaded.stage1)
    assert stage1_hours > 0
    assert run.plan_gpu_hours(loaded) == pytest.approx(run.plan_gpu_hours(given) + stage1_hours)


@pytest.mark.e2e
def test_a_sweep_trains_its_teacher_then_stage1_then_its_trials_and_reuses_stage1(tmp_path):
    """Sequential trials without `sequential_from` under a local Ray: the teacher, then the one
    stage-1 run both inputs share, then the trials; the same command again trains neither."""
    loaded = sequential_space(
        tmp_path,
        {"teacher_train": TRAINED_TEACHER},
        grid={"sequential_input": list(INPUTS), "seed": [0]},
        resources={"cpu": 1, "gpu": 0},
    )
    [need] = loaded.stage1
    storage = tmp_path / "results"
    command = ["--space", str(loaded.path), "--storage", str(storage)]
    first = sweep(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    teacher = out.index("training 1 teacher(s) first: resnet14")
    stage1_line = out.index("training 1 stage-1 SimKD run(s) first: resnet14 -> resnet8 seed 0")
    assert teacher < stage1_line < out.index("2 planned: 2 completed")
    cached = storage / "stage1" / f"resnet14-resnet8-{need.hash}" / "checkpoint.pt"
    [member] = torch.load(cached, weights_only=True)["members"]
    assert member["config"]["method"] == "simkd" and member["config"]["seed"] == 0
    assert any(k.startswith("projectors.") for k in member["distiller"])
    [experiment] = storage.glob("sequential-*")
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    assert {t["config"]["sequential_from"] for t in plan["trials"]} == {str(cached)}
    again = sweep(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout and "2 planned: 2 completed" in again.stdout
    assert len(list(storage.glob("stage1-*"))) == len(list(storage.glob("teachers-*"))) == 1
