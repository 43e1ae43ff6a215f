"""Files from elsewhere never run code, the cluster opens only SSH, results are written whole."""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from ray.autoscaler._private.aws.config import _create_default_inbound_rules
from ray.autoscaler._private.util import prepare_config, validate_config

from tune_kd import analysis, models, storage, train
from tune_kd.config import Config

CLUSTER = Path(__file__).parents[1] / "cluster.yaml"
STUDENT = {
    "dataset": "synthetic",
    "synthetic_train_size": 64,
    "synthetic_test_size": 32,
    "method": "student",
    "student": "resnet8",
    "epochs": 1,
    "lr_decay_epochs": [],
    "batch_size": 32,
    "device": "cpu",
}


class CreatesFile:
    """Unpickled, it creates the file at `path` (as any code could run instead)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture
def marker(tmp_path) -> Path:
    """Appears only if a crafted pickle was executed; the payload is shown to be live first."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFile(proof))).close()
    assert proof.exists()
    return tmp_path / "executed"


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint in the field's format whose weights are a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"conv1.weight": CreatesFile(marker)}, "epoch": 240}, path)
    return path


def one_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in out + err and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


# ----------------------------------------------------------------------------- pickles


def test_a_crafted_teacher_checkpoint_is_refused(tmp_path, marker):
    path = crafted_checkpoint(tmp_path / "resnet14_vanilla" / "ckpt_epoch_240.pth", marker)
    with pytest.raises(ValueError, match="not a plain checkpoint"):
        models.load_checkpoint(path)
    assert not marker.exists()


def test_train_refuses_a_crafted_teacher_checkpoint(tmp_path, marker, capsys):
    path = crafted_checkpoint(tmp_path / "teacher.pth", marker)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(STUDENT))
    argv = [
        "--method=simkd",
        "--teacher=resnet14",
        "--config",
        str(config),
        f"--teacher-checkpoint={path}",
        "--out",
        str(tmp_path / "run"),
    ]
    assert train.main(argv) == 2
    assert "'teacher_checkpoint'" in one_line(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_sweep_refuses_a_crafted_teacher_checkpoint(tmp_path, marker, capsys):
    from tune_kd import run

    path = crafted_checkpoint(tmp_path / "teacher.pth", marker)
    space = tmp_path / "space.yaml"
    keys = {
        "method": "simkd",
        "teacher": "resnet14",
        "teacher_checkpoints": {"resnet14": str(path)},
    }
    space.write_text(yaml.safe_dump({**STUDENT, **keys}))
    assert run.main(["--space", str(space), "--storage", str(tmp_path / "results")]) == 2
    assert "'teacher_checkpoints.resnet14'" in one_line(capsys)
    assert not marker.exists() and not (tmp_path / "results").exists()


def test_resuming_a_run_from_a_crafted_checkpoint_is_refused(tmp_path, marker, capsys):
    out = tmp_path / "run"
    crafted_checkpoint(out / "checkpoint.pt", marker)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(STUDENT))
    assert train.main(["--config", str(config), "--out", str(out), "--resume"]) == 2
    line = one_line(capsys)
    assert "'--resume'" in line and str(out / "checkpoint.pt") in line
    assert not marker.exists() and sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_a_retried_trial_refuses_a_crafted_checkpoint(tmp_path, marker, monkeypatch):
    """Tune hands a retried trial its last checkpoint folder: its run state is never executed,
    and the trial starts over as from an unreadable checkpoint."""
    from ray import tune

    from tune_kd import trainable

    folder = tmp_path / "checkpoint_000000"
    crafted_checkpoint(folder / trainable.RUN_STATE, marker)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(folder))
    reported = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint: reported.append(metrics))
    config = Config.from_dict(STUDENT)
    member = {"index": 0, "axes": {}, "config": config.to_dict()}
    trainable.train_trial(
        {"index": 0},
        plan=[[member]],
        base={},
        data={config.data_key: train.load_data(config)},
        teachers={},
    )
    assert [m["epoch"] for m in reported] == [1]
    assert not marker.exists()


def test_a_crafted_cifar_file_is_refused_in_one_line(tmp_path, marker, capsys):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({b"data": CreatesFile(marker)}, protocol=4))
    flags = ["--dataset=cifar100", f"--data-dir={tmp_path}", "--download=false"]
    argv = [*flags, "--student=resnet8", "--method=student", "--out", str(tmp_path / "run")]
    assert train.main(argv) == 2
    assert str(folder / "train") in one_line(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_analysis_leaves_pickles_of_an_experiment_unopened(
    tmp_path, marker, capsys, pending_experiment
):
    """Tune's folders hold pickles (tuner.pkl, trainable.pkl, checkpoints): the tables and plots
    are made from JSON alone."""
    root = pending_experiment(tmp_path / "experiment")
    payload = pickle.dumps(CreatesFile(marker))
    for name in ("tuner.pkl", "trainable.pkl", "trial_0000/params.pkl"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(payload)
    crafted_checkpoint(root / "trial_0000" / "checkpoint_000000" / "run.pt", marker)
    assert analysis.main([str(root)]) == 0
    assert "trials: 1 planned" in capsys.readouterr().out
    assert not marker.exists()


# ----------------------------------------------------------------------------- results files


def test_an_interrupted_analysis_leaves_the_previous_files_whole(
    tmp_path, monkeypatch, pending_experiment
):
    root = pending_experiment(tmp_path / "experiment")
    assert analysis.main([str(root)]) == 0
    results = root / analysis.RESULTS_FOLDER
    before = {p.name: p.read_bytes() for p in results.iterdir()}
    pending_experiment(root, trials=3)  # the next report differs

    def interrupted_open(path, mode="r", *args, **kwargs):
        """The parquet stream stops halfway, as a killed process would."""
        file = open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by Halfway or the caller)
        if "trials.parquet" not in str(path):
            return file

        class Halfway:
            def __enter__(self):
                return self

            def __exit__(self, *error):
                file.close()

            def write(self, content: bytes) -> None:
                file.write(content[: len(content) // 2])
                file.flush()
                raise KeyboardInterrupt

        return Halfway()

    monkeypatch.setattr(storage, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        analysis.main([str(root)])
    after = {p.name: p.read_bytes() for p in results.iterdir()}
    assert after["trials.parquet"] == before["trials.parquet"]
    assert sorted(after) == sorted(before)  # no temporary file left behind
    assert len(pd.read_parquet(results / "trials.parquet")) == 1


# ----------------------------------------------------------------------------- the cluster


def test_the_cluster_opens_only_ssh_to_the_outside():
    """The rules Ray gives the security group cluster.yaml names: every port between the
    cluster's own nodes, and from anywhere else port 22 alone."""
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)
    group = config["provider"]["security_group"]
    assert group["GroupName"] and not group["GroupName"].startswith("ray-autoscaler-")
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # nodes get the group above
    rules = _create_default_inbound_rules({"sg-cluster"}, group["IpPermissions"])
    outside = [
        rule
        for rule in rules
        if set(rule) - {"FromPort", "ToPort", "IpProtocol", "UserIdGroupPairs"}
    ]
    inside = [rule for rule in rules if rule not in outside]
    assert outside == [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    ]
    assert all(
        pair["GroupId"] == "sg-cluster" for rule in inside for pair in rule["UserIdGroupPairs"]
    )
