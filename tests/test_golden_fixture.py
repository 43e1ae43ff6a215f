"""The golden fixture of distillation losses (tests/golden/methods.json) is well formed: every case
has a finite loss, gradients for its student-side inputs, and tensors whose values fill their
shapes, so a test of a reimplementation can rely on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "golden" / "methods.json"
METHODS = {"kd", "fitnet", "at", "sp", "vid", "crd", "srrl", "semckd", "simkd", "dkd"}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


def check_tensor(where: str, encoded: dict) -> None:
    assert set(encoded) == {"shape", "dtype", "values"}, where
    assert encoded["dtype"] in {"float64", "int64"}, where
    assert len(encoded["values"]) == math.prod(encoded["shape"]), where
    if encoded["dtype"] == "int64":
        assert all(isinstance(v, int) for v in encoded["values"]), where
    else:
        assert all(isinstance(v, float) and math.isfinite(v) for v in encoded["values"]), where


def test_sources_name_commits(fixture):
    for name in ("SimKD", "mdistiller"):
        commit = fixture["sources"][name]["commit"]
        assert len(commit) == 40 and int(commit, 16) >= 0


def test_every_method_has_cases_with_unique_names(fixture):
    cases = fixture["cases"]
    assert {c["method"] for c in cases} == METHODS
    names = [c["case"] for c in cases]
    assert len(names) == len(set(names))


def test_every_case_has_a_finite_loss_and_a_weight(fixture):
    for c in fixture["cases"]:
        for key in ("setup", "inputs", "params", "grads", "loss", "weight", "student_inputs"):
            assert key in c, (c["case"], key)
        assert isinstance(c["loss"], float) and math.isfinite(c["loss"]), c["case"]
        assert c["weight"] > 0, c["case"]


def test_tensor_values_fill_their_shapes(fixture):
    for c in fixture["cases"]:
        groups = [c["inputs"], c["params"], c["grads"]["inputs"], c["grads"]["params"]]
        groups += [c.get("buffers_after", {}), c.get("outputs", {})]
        for group in groups:
            for name, encoded in group.items():
                check_tensor(f"{c['case']}:{name}", encoded)


def test_gradients_match_what_they_differentiate(fixture):
    for c in fixture["cases"]:
        grads = c["grads"]
        assert c["student_inputs"], c["case"]
        assert set(grads["inputs"]) == set(c["student_inputs"]), c["case"]
        for name, g in grads["inputs"].items():
            assert g["shape"] == c["inputs"][name]["shape"], (c["case"], name)
            assert any(v != 0.0 for v in g["values"]), (c["case"], name)
        for name, g in grads["params"].items():
            assert g["shape"] == c["params"][name]["shape"], (c["case"], name)
        trainable = set(grads["params"]) | set(c["params_without_grad"])
        floats = {n for n, p in c["params"].items() if p["dtype"] == "float64"}
        assert trainable <= floats, c["case"]


def test_crd_cases_carry_memory_before_and_after_and_z(fixture):
    crd = [c for c in fixture["cases"] if c["method"] == "crd"]
    assert len(crd) == 2
    first, second = crd
    for c in crd:
        assert c["z"]["Z_v1"] > 0 and c["z"]["Z_v2"] > 0
        for bank in ("contrast.memory_v1", "contrast.memory_v2"):
            assert bank in c["params"] and bank in c["buffers_after"]
            assert c["params"][bank]["values"] != c["buffers_after"][bank]["values"]
    # the second batch starts from the first one's memory and normalisation constants
    assert second["params"]["contrast.memory_v1"] == first["buffers_after"]["contrast.memory_v1"]
    assert second["params"]["contrast.params"] == first["buffers_after"]["contrast.params"]
    assert first["params"]["contrast.params"]["values"][2:4] == [-1.0, -1.0]


def test_dkd_cases_cover_the_warmup(fixture):
    dkd = {c["setup"]["epoch"]: c["loss"] for c in fixture["cases"] if c["method"] == "dkd"}
    assert sorted(dkd) == [1, 10, 20, 30]
    assert dkd[10] == pytest.approx(10 * dkd[1])
    assert dkd[30] == pytest.approx(dkd[20])
