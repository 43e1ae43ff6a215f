"""Training throughput of SimKD at batch 64: this project's path against a reference-style path.

    python bench/step.py                        # ours vs reference, ResNet-32x4 -> ResNet-8x4
    python bench/step.py --teacher resnet38x2 --group 15 --paths ours   # + 15 sharing a teacher,
                                                # one after another and as one fused model
    python bench/step.py --device cuda --train-size 50000 --compile reduce-overhead
    python bench/step.py --paths ours --method crd   # another method (bench/methods.py: all)

The reference path is written here the way the RepDistiller / official SimKD code feeds a GPU: a
torchvision DataLoader with PIL RandomCrop / RandomHorizontalFlip / ToTensor / Normalize, fp32,
eager, a `.item()` per step for its running averages, and a full teacher forward at evaluation.
Both paths train the same models on the same CIFAR-sized random images. One JSON line per
measurement goes to stdout (and to --json), then a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from tune_kd import models
from tune_kd.data import CIFAR100_MEAN, CIFAR100_STD, Arrays
from tune_kd.distillers.simkd import SimKD
from tune_kd.train import Run, train_one_epoch

BATCH = 64


def random_cifar(train_size: int, test_size: int, seed: int = 0) -> Arrays:
    """CIFAR-100-shaped random images: throughput does not depend on what the pixels show."""
    rng = np.random.default_rng(seed)
    return Arrays(
        name="cifar100",
        train_images=rng.integers(0, 256, (train_size, 3, 32, 32), dtype=np.uint8),
        train_labels=rng.integers(0, 100, train_size, dtype=np.int64),
        eval_images=rng.integers(0, 256, (test_size, 3, 32, 32), dtype=np.uint8),
        eval_labels=rng.integers(0, 100, test_size, dtype=np.int64),
        eval_split="test",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- reference


class PilDataset(torch.utils.data.Dataset):
    """uint8 images through PIL, as torchvision's CIFAR datasets hand them to transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        self.images = images.transpose(0, 2, 3, 1)  # HWC, as the CIFAR pickles are read
        self.labels = labels
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        tail = [transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
        self.transform = transforms.Compose((steps if train else []) + tail)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def reference_epochs(args: argparse.Namespace, arrays: Arrays, device: torch.device) -> list[dict]:
    """The reference-style loop: DataLoader + PIL, fp32, eager, host syncs, teacher at eval."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    teacher = models.create(args.teacher).to(device).eval()
    student = models.create(args.student).to(device)
    shapes = [
        f.shape[1] for f in student(torch.zeros(2, 3, 32, 32, device=device), is_feat=True)[0]
    ]
    teacher_channels = teacher(torch.zeros(2, 3, 32, 32, device=device), is_feat=True)[0][-2].shape[
        1
    ]
    simkd = SimKD(shapes[-2], teacher_channels).to(device)
    params = list(student.parameters()) + list(simkd.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    workers = min(8, os.cpu_count() or 1)
    loader_args = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": True,
    }
    train = torch.utils.data.DataLoader(
        PilDataset(arrays.train_images, arrays.train_labels, True),
        BATCH,
        shuffle=True,
        **loader_args,
    )
    test = torch.utils.data.DataLoader(
        PilDataset(arrays.eval_images, arrays.eval_labels, False), 1000, **loader_args
    )
    classifier = teacher.get_classifier()
    rows = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        student.train()
        simkd.train()
        loss_sum = 0.0
        for images, labels in train:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            features, _ = student(images, is_feat=True)
            with torch.no_grad():
                teacher_features, _ = teacher(images, is_feat=True)
            projected, target, logits = simkd(features[-2], teacher_features[-2], classifier)
            loss = F.mse_loss(projected, target)
            loss_sum += loss.item()  # the reference's running averages read the loss every step
            (logits.argmax(1) == labels).float().mean().item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        synchronize(device)
        train_seconds = time.perf_counter() - start
        student.eval()
        simkd.eval()
        with torch.no_grad():
            for images, labels in test:
                images, labels = images.to(device), labels.to(device)
                features, _ = student(images, is_feat=True)
                teacher_features, _ = teacher(images, is_feat=True)
                _, _, logits = simkd(features[-2], teacher_features[-2], classifier)
                F.cross_entropy(logits, labels).item()
        synchronize(device)
        rows.append(
            epoch_row(
                "reference",
                epoch,
                len(arrays.train_labels),
                train_seconds,
                time.perf_counter() - start,
                1,
            )
        )
    return rows


# ----------------------------------------------------------------------------- ours


def student_configs(args: argparse.Namespace, group: int, fuse: bool = True) -> list[dict]:
    """`group` student-side cells of the study's first grid (loss x lr), one seed; for another
    method than SimKD, its learning rates."""
    rates = (0.001, 0.005, 0.01, 0.05, 0.1)
    if args.method == "simkd":
        cells = [{"loss": loss, "lr": lr} for loss in ("l2", "cosine", "kl") for lr in rates]
    else:
        cells = [{"lr": lr} for _ in range(3) for lr in rates]
    base = {
        "dataset": "cifar100",
        "teacher": args.teacher,
        "student": args.student,
        "method": args.method,
        "device": args.device,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "epochs": args.epochs,
        "lr_decay_epochs": [],
        "seed": 0,
        "fuse_students": fuse,
    }
    return [{**base, **cell} for cell in cells[:group]]


def our_run(args: argparse.Namespace, arrays: Arrays, group: int, fuse: bool = True) -> Run:
    torch.manual_seed(0)  # the same teacher in every process and path
    teacher_state = models.create(args.teacher).state_dict()
    return Run(student_configs(args, group, fuse), data=arrays, teacher_state=teacher_state)


def our_epochs(args: argparse.Namespace, arrays: Arrays, group: int) -> list[dict]:
    run = our_run(args, arrays, group)
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    label = f"ours x{group}" if group > 1 else "ours"
    while not run.done:
        if run.epoch == 1 and args.start_at:  # packed processes start their timed epochs together
            time.sleep(max(0.0, args.start_at - time.time()))
        start = time.perf_counter()
        metrics = run.train_epoch()
        seconds = time.perf_counter() - start
        train_seconds = len(arrays.train_labels) / metrics[0]["images_per_second"]
        row = epoch_row(label, run.epoch, len(arrays.train_labels), train_seconds, seconds, group)
        first = metrics[0]
        rows.append({**row, "train_loss": first["train_loss"], "test_acc": first["test_acc"]})
    if device.type == "cuda":
        rows[-1]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        rows[-1]["peak_rss_gib"] = peak_rss_bytes() / 2**30
    return rows


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux), the CPU's measure of what a run needs."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def group_rounds(args: argparse.Namespace, arrays: Arrays) -> list[dict]:
    """Teacher sharing: training epochs of one student, of a group trained one student after
    another, and of the same group as one fused model, interleaved round by round so that a
    shared, noisy machine slows all alike; the ratios of the medians are the speed-ups. On a GPU,
    each path's peak memory: what its run holds, plus the most its warm-up epoch added."""
    device = torch.device(args.device)
    paths = {
        "ours": lambda: our_run(args, arrays, 1),
        f"ours x{args.group} seq": lambda: our_run(args, arrays, args.group, fuse=False),
        f"ours x{args.group} fused": lambda: our_run(args, arrays, args.group),
    }
    runs, memory = {}, {}
    for label, build in paths.items():
        before = allocated(device)
        runs[label] = build()
        memory[label] = allocated(device) - before
    images = len(arrays.train_labels)
    rows = []
    for epoch in range(1, args.rounds + 2):  # the first round warms up
        for label, run in runs.items():
            if device.type == "cuda" and epoch == 1:
                torch.cuda.reset_peak_memory_stats(device)
            before = allocated(device)
            seconds = train_one_epoch(run, epoch)
            if epoch == 1 and device.type == "cuda":
                memory[label] += torch.cuda.max_memory_allocated(device) - before
            if epoch > 1:
                students = len(run.members)
                row = epoch_row(label, epoch, images, seconds, seconds, students)
                if device.type == "cuda":
                    row["peak_memory_gib"] = memory[label] / 2**30
                rows.append(row)
    return rows


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def epoch_row(
    path: str, epoch: int, images: int, train_seconds: float, epoch_seconds: float, students: int
) -> dict:
    return {
        "path": path,
        "epoch": epoch,
        "students": students,
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "student_images_per_second": students * images / train_seconds,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--method", default="simkd", help="the method of our path's students")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-size", type=int, default=BATCH * 20, help="images per epoch")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per path (the last is timed)")
    parser.add_argument(
        "--paths", default="reference,ours", help="reference, ours (comma-separated)"
    )
    parser.add_argument("--group", type=int, default=1, help="against this many sharing a teacher")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds with --group")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", default="off")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay steps as CUDA graphs")
    parser.add_argument("--rung", default="", help="a label for the JSON lines (bench/gpu.sh)")
    parser.add_argument(
        "--start-at", type=float, help="unix time to start the epochs after the first"
    )
    parser.add_argument("--json", type=Path, help="append the JSON lines here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    arrays = random_cifar(args.train_size, args.test_size)
    device = torch.device(args.device)
    rows: list[dict] = []
    paths = args.paths.split(",")
    if "reference" in paths:
        rows += reference_epochs(args, arrays, device)
    if args.group > 1:
        rows += group_rounds(args, arrays)
    elif "ours" in paths:
        rows += our_epochs(args, arrays, 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    settings = {
        "rung": args.rung,
        "device": name,
        "teacher": args.teacher,
        "student": args.student,
        "method": args.method,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for row in rows:
        line = json.dumps({**settings, **row})
        print(line)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    """Each path's median speed, against the reference and against one student alone."""
    timed = [row for row in rows if row["epoch"] > 1]  # a first epoch warms up...
    warmed = {row["path"] for row in timed}
    timed += [row for row in rows if row["path"] not in warmed]  # ...unless it is all there is
    speeds: dict[str, list[float]] = {}
    for row in timed:
        speeds.setdefault(row["path"], []).append(row["student_images_per_second"])
    median = {path: statistics.median(values) for path, values in speeds.items()}
    print(f"{'path':<16} {'epochs':>6} {'student img/s':>14} {'x reference':>11} {'x ours':>7}")
    for path, speed in median.items():
        ratios = [
            f"{speed / median[base]:.2f}" if base in median else "-"
            for base in ("reference", "ours")
        ]
        print(f"{path:<16} {len(speeds[path]):>6} {speed:>14.0f} {ratios[0]:>11} {ratios[1]:>7}")


if __name__ == "__main__":
    sys.exit(main())
