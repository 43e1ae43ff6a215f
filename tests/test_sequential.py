"""Method `sequential` (the SimKD paper's Table 4): a new classifier trained on the frozen encoder
of a finished SimKD run. Stage 1 here is conftest's `simkd_run`, a real one-epoch SimKD run of
`python -m tune_kd.train` on synthetic data."""

from __future__ import annotations

import json

import pytest
import torch

from tune_kd import analysis, distillers, models
from tune_kd.analysis.published import published_for
from tune_kd.config import Config, resolve
from tune_kd.distillers.sequential import SequentialDistiller
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
        "starts from"
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
