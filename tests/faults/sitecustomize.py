"""Faults for tests/test_faults.py, injected into every Python process of a sweep that has this
folder on its PYTHONPATH (Ray's workers inherit it).

$TUNE_KD_TEST_FAULTS maps a trial folder to {"epoch": E, "kind": K, "times": N, "wait": W}: the
first N times the trial starts epoch E, `Run.train_epoch` logs `<trial> <K> <E>` in
$TUNE_KD_TEST_FAULT_LOG, waits (if W) for the file `$TUNE_KD_TEST_FAULT_LOG.<trial>.go`, the test's
go-ahead, and then raises (K "raise"), SIGKILLs its own process ("kill") or goes on ("hold").
A process's first epoch of a trial is logged too: `<trial> start <epochs already done>`.
"""

import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import time

FAULTS = json.loads(os.environ.get("TUNE_KD_TEST_FAULTS") or "{}")
LOG = os.environ.get("TUNE_KD_TEST_FAULT_LOG", "")
started = set()


def log(line):
    with open(LOG, "a") as f:
        f.write(line + "\n")


def fired(trial, kind):
    with open(LOG) as f:
        return sum(line.split()[:2] == [trial, kind] for line in f)


def wrap(module):
    original = module.Run.train_epoch

    def train_epoch(self):
        from ray import tune

        trial = os.path.basename(tune.get_context().get_trial_dir())
        if trial not in started:
            started.add(trial)
            log(f"{trial} start {self.epoch}")
        fault = FAULTS.get(trial)
        due = fault and self.epoch + 1 == fault["epoch"]
        if due and fired(trial, fault["kind"]) < fault["times"]:
            log(f"{trial} {fault['kind']} {fault['epoch']}")
            while fault.get("wait") and not os.path.exists(f"{LOG}.{trial}.go"):
                time.sleep(0.1)
            if fault["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault["kind"] == "raise":
                raise RuntimeError(f"injected fault at epoch {fault['epoch']}")
        return original(self)

    module.Run.train_epoch = train_epoch


class WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps `Run.train_epoch` once `tune_kd.train` is imported (and imports nothing before)."""

    def find_spec(self, name, path, target=None):
        if name != "tune_kd.train":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            wrap(module)

        spec.loader.exec_module = exec_module
        return spec


if FAULTS:
    sys.meta_path.insert(0, WrapOnImport())
