"""Tests for tune_kd.data: CIFAR files, downloads, synthetic data, splits and device batches."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
import struct
import tarfile
import threading
import time
import urllib.error
import warnings
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import pytest
import torch
import torchvision.datasets.utils
import torchvision.transforms.functional as TF
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100

from tune_kd import data

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# name -> (torchvision class, folder, train files, test files, label key, classes)
LAYOUT = {
    "cifar100": (CIFAR100, "cifar-100-python", ["train"], ["test"], "fine_labels", 100),
    "cifar10": (
        CIFAR10,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
}


# --------------------------------------------------------------------------- CIFAR files


def py2_pickle(entry: dict[str, np.ndarray | list[int]]) -> bytes:
    """Pickle a dict the way the original CIFAR files were written: Python 2 cPickle,
    protocol 2, str keys and NumPy 1.x arrays (`numpy.core.multiarray._reconstruct`)."""

    def string(s: bytes) -> bytes:  # a Python 2 str
        return b"T" + struct.pack("<I", len(s)) + s

    def integer(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    out = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for key, value in entry.items():
        out.append(string(key.encode()))
        if isinstance(value, np.ndarray):
            assert value.dtype == np.uint8 and value.ndim == 2
            # fmt: off
            out += [
                b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
                integer(0), b"\x85", string(b"b"), b"\x87R(",  # _reconstruct(ndarray, (0,), 'b')
                integer(1), integer(value.shape[0]), integer(value.shape[1]), b"\x86",
                b"cnumpy\ndtype\n", string(b"u1"), integer(0), integer(1), b"\x87R(",
                integer(3), string(b"|"), b"NNN", integer(-1), integer(-1), integer(0), b"tb",
                b"\x89", string(value.tobytes()), b"tb",  # BUILD (1, shape, dtype, False, raw)
            ]
            # fmt: on
        else:
            out += [b"](", *(integer(v) for v in value), b"e"]  # EMPTY_LIST, MARK, APPENDS
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def write_cifar(
    root: Path, name: str, per_file: int, *, seed: int = 0, protocol: int | None = None
) -> dict[str, dict]:
    """Write small files in torchvision's on-disk CIFAR layout: as the originals (Python 2
    pickles) when protocol is None, else as Python 3 pickles with bytes keys. Returns what
    each file holds."""
    _, folder, train, test, label_key, classes = LAYOUT[name]
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    entries = {}
    for file in train + test:
        entry = {
            "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, per_file).tolist(),
        }
        if name == "cifar100":
            entry["coarse_labels"] = rng.integers(0, 20, per_file).tolist()
        if protocol is None:
            blob = py2_pickle(entry)
        else:
            blob = pickle.dumps({k.encode(): v for k, v in entry.items()}, protocol=protocol)
        (root / folder / file).write_bytes(blob)
        entries[file] = entry
    return entries


def torchvision_reads(root: Path, name: str, monkeypatch, train: bool):
    """torchvision's own reader on our files, with its MD5 checks and meta file skipped."""
    cls = LAYOUT[name][0]
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cls, "_load_meta", lambda self: None)
    dataset = cls(str(root), train=train)
    return dataset.data, np.array(dataset.targets)


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_read_cifar_matches_torchvision_layout(tmp_path, monkeypatch, name):
    entries = write_cifar(tmp_path, name, per_file=6)
    with warnings.catch_warnings():  # torchvision's plain pickle.load imports numpy.core
        warnings.simplefilter("ignore", DeprecationWarning)
        tv_train, tv_train_labels = torchvision_reads(tmp_path, name, monkeypatch, train=True)
        tv_test, tv_test_labels = torchvision_reads(tmp_path, name, monkeypatch, train=False)

    arrays = data.read_cifar(name, tmp_path)

    num_train = 6 * len(LAYOUT[name][2])
    assert arrays.train_images.shape == (num_train, 3, 32, 32)
    assert arrays.eval_images.shape == (6, 3, 32, 32)
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int64
    assert arrays.eval_split == "test" and arrays.num_classes == LAYOUT[name][5]
    # torchvision keeps HWC images; ours are CHW, otherwise the same pixels and labels.
    np.testing.assert_array_equal(arrays.train_images.transpose(0, 2, 3, 1), tv_train)
    np.testing.assert_array_equal(arrays.eval_images.transpose(0, 2, 3, 1), tv_test)
    np.testing.assert_array_equal(arrays.train_labels, tv_train_labels)
    np.testing.assert_array_equal(arrays.eval_labels, tv_test_labels)
    # Rows are channel-major: byte c*1024 + y*32 + x of image i is pixel (y, x) of channel c.
    row = entries[LAYOUT[name][3][0]]["data"][4]
    assert arrays.eval_images[4, 2, 5, 7] == row[2 * 1024 + 5 * 32 + 7]
    assert arrays.eval_images[4, 0, 31, 0] == row[31 * 32]


@pytest.mark.parametrize("protocol", [4, 5])
def test_read_cifar_reads_python3_pickles_with_bytes_keys(tmp_path, protocol):
    entry = write_cifar(tmp_path, "cifar10", per_file=3, protocol=protocol)["data_batch_2"]
    arrays = data.read_cifar("cifar10", tmp_path)
    np.testing.assert_array_equal(arrays.train_images[3:6].reshape(3, -1), entry["data"])
    np.testing.assert_array_equal(arrays.train_labels[3:6], entry["labels"])


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_read_cifar_refuses_pickles_that_would_run_code(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=2)
    marker = tmp_path / "pwned"
    evil = {b"data": _RunsCommand(f"touch {marker}"), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(evil, protocol=4))

    with pytest.raises(
        data.DatasetUnavailable, match=r"test_batch is .*refusing to load \w+\.system"
    ):
        data.read_cifar("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[: len(blob) // 2],  # cut off by a full disk
        lambda blob: b"",
        lambda blob: blob[:40] + bytes(64) + blob[104:],  # overwritten in the middle
    ],
    ids=["truncated", "empty", "corrupt"],
)
def test_a_damaged_file_is_one_line_naming_it(tmp_path, damage):
    write_cifar(tmp_path, "cifar10", per_file=2, protocol=4)
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damage(damaged.read_bytes()))
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert message.startswith(f"{damaged} is unreadable (") and "\n" not in message
    assert "delete it to download the dataset again" in message


def prepare_in_process(root: Path, archive: Path, calls: Path, start: Any, digests: Any) -> None:
    """One trial preparing CIFAR-10 in `root`: the download is the copy of `archive` (slow, so
    that the others arrive while it runs), each logged in `calls`."""

    def download(url, download_root, extract_root=None, filename=None, md5=None):
        with calls.open("a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        with tarfile.open(archive) as tar:
            tar.extractall(extract_root, filter="data")

    torchvision.datasets.utils.download_and_extract_archive = download
    start.wait()
    arrays = data.load("cifar10", root)
    digests.put(image_digest(arrays))


def image_digest(arrays: data.Arrays) -> str:
    parts = (arrays.train_images, arrays.train_labels, arrays.eval_images, arrays.eval_labels)
    return hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest()


FOLDER = LAYOUT["cifar10"][1]


def test_four_processes_preparing_one_folder_download_once_and_read_the_same(tmp_path):
    source = tmp_path / "source"
    write_cifar(source, "cifar10", per_file=3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / FOLDER, arcname=FOLDER)
    expected = image_digest(data.read_cifar("cifar10", source))

    context = multiprocessing.get_context("fork")
    start, digests, calls = context.Barrier(4), context.Queue(), tmp_path / "calls"
    root = tmp_path / "data"
    processes = [
        context.Process(target=prepare_in_process, args=(root, archive, calls, start, digests))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    try:
        results = [digests.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * 4
    assert results == [expected] * 4
    assert len(calls.read_text().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-batches-py.lock",
    ]


def test_missing_files_without_download_raise_one_line_naming_where(tmp_path, monkeypatch):
    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(
        torchvision.datasets.utils, "download_and_extract_archive", must_not_download
    )
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load("cifar100", tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    for part in ("cifar100", str(tmp_path), CIFAR100.url, "data_dir", "$TUNE_KD_DATA"):
        assert part in message


def test_default_data_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_KD_DATA", str(tmp_path / "here"))
    assert data.default_data_dir() == tmp_path / "here"
    with pytest.raises(data.DatasetUnavailable, match=re.escape(str(tmp_path / "here"))):
        data.load("cifar10", download=False)
    monkeypatch.delenv("TUNE_KD_DATA")
    assert data.default_data_dir() == Path.home() / ".cache" / "tune_kd" / "data"


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_download_runs_under_the_lock_with_torchvisions_url_and_md5(tmp_path, monkeypatch, name):
    cls, folder = LAYOUT[name][:2]
    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        with pytest.raises(filelock.Timeout):  # someone (our caller) holds the lock
            filelock.FileLock(tmp_path / f"{folder}.lock").acquire(timeout=0)
        write_cifar(Path(extract_root), name, per_file=2)

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    arrays = data.load(name, tmp_path)
    assert calls == [(cls.url, cls.filename, cls.tgz_md5)]
    assert len(arrays.train_labels) == 2 * len(LAYOUT[name][2])
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder, f"{folder}.lock"]  # no debris

    data.load(name, tmp_path)  # files there now: no second download
    assert len(calls) == 1


def test_failed_download_raises_dataset_unavailable_naming_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(data.DatasetUnavailable) as info:
        data.load("cifar10", tmp_path / "cache")
    message = str(info.value)
    assert str(tmp_path / "cache") in message and CIFAR10.url in message
    assert "name resolution" in message and "\n" not in message


def test_a_second_downloader_waits_for_the_lock_then_finds_the_files(tmp_path, monkeypatch):
    calls, errors = [], []
    monkeypatch.setattr(
        torchvision.datasets.utils,
        "download_and_extract_archive",
        lambda *args, **kwargs: calls.append(args),
    )

    def second_trial():
        try:
            data.download_cifar("cifar10", tmp_path)
        except Exception as err:  # re-raised below, in the test's thread
            errors.append(err)

    first_trial = filelock.FileLock(tmp_path / "cifar-10-batches-py.lock")
    with first_trial:
        waiter = threading.Thread(target=second_trial)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # blocked on the lock
        write_cifar(tmp_path, "cifar10", per_file=1)  # the first trial's download lands
    waiter.join(timeout=10)
    assert not waiter.is_alive() and errors == [] and calls == []


# --------------------------------------------------------------------------- synthetic data


def nearest_class_mean_accuracy(arrays: data.Arrays) -> float:
    train = torch.from_numpy(arrays.train_images).flatten(1).float()
    test = torch.from_numpy(arrays.eval_images).flatten(1).float()
    labels = torch.from_numpy(arrays.train_labels)
    means = torch.stack([train[labels == c].mean(0) for c in range(arrays.num_classes)])
    predicted = torch.cdist(test, means).argmin(1).numpy()
    return float((predicted == arrays.eval_labels).mean())


def test_synthetic_is_deterministic_balanced_and_cifar_shaped():
    a = data.make_synthetic(seed=3, num_classes=7, train_size=45, test_size=13)
    b = data.make_synthetic(seed=3, num_classes=7, train_size=45, test_size=13)
    c = data.make_synthetic(seed=4, num_classes=7, train_size=45, test_size=13)

    assert a.train_images.shape == (45, 3, 32, 32) and a.eval_images.shape == (13, 3, 32, 32)
    assert a.train_images.dtype == np.uint8 and a.train_labels.dtype == np.int64
    assert a.num_classes == 7 and a.eval_split == "test"
    for field in ("train_images", "train_labels", "eval_images", "eval_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.train_images, c.train_images)
    assert np.bincount(a.train_labels, minlength=7).tolist() == [7, 7, 7, 6, 6, 6, 6]
    assert np.bincount(a.eval_labels, minlength=7).tolist() == [2, 2, 2, 2, 2, 2, 1]
    scaled = a.train_images / 255
    np.testing.assert_allclose(a.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(a.std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize(
    ("num_classes", "train_size", "test_size"), [(10, 2000, 500), (100, 3000, 1000)]
)
def test_synthetic_is_learnable_but_not_trivial(num_classes, train_size, test_size):
    arrays = data.make_synthetic(0, num_classes, train_size, test_size)
    accuracy = nearest_class_mean_accuracy(arrays)
    assert 2 / num_classes < accuracy < 0.99


# --------------------------------------------------------------------------- splits


def indexed_arrays(labels: np.ndarray, num_eval: int = 4) -> data.Arrays:
    """Arrays whose train image i carries i in its first two pixels."""
    n = len(labels)
    images = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return data.Arrays(
        "test",
        images,
        labels.astype(np.int64),
        np.zeros((num_eval, 3, 32, 32), np.uint8),
        np.zeros(num_eval, np.int64),
        "test",
        int(labels.max()) + 1,
        data.CIFAR10_MEAN,
        data.CIFAR10_STD,
    )


def image_ids(images: np.ndarray) -> np.ndarray:
    ids = images[:, 0, 0, :2].astype(np.int64)
    return ids[:, 0] + 256 * ids[:, 1]


def test_hold_out_is_disjoint_stratified_seeded_and_ordered():
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    arrays = indexed_arrays(np.random.default_rng(0).permutation(labels))

    split = data.hold_out(arrays, val_size=60, seed=1)

    train_ids, val_ids = image_ids(split.train_images), image_ids(split.eval_images)
    assert split.eval_split == "val" and len(train_ids) == 540 and len(val_ids) == 60
    assert set(train_ids).isdisjoint(val_ids) and set(train_ids) | set(val_ids) == set(range(600))
    np.testing.assert_array_equal(split.train_labels, arrays.train_labels[train_ids])
    np.testing.assert_array_equal(split.eval_labels, arrays.train_labels[val_ids])
    assert np.bincount(split.eval_labels).tolist() == [30, 20, 10]
    assert np.all(np.diff(train_ids) > 0) and np.all(np.diff(val_ids) > 0)

    again = data.hold_out(arrays, val_size=60, seed=1)
    other = data.hold_out(arrays, val_size=60, seed=2)
    np.testing.assert_array_equal(image_ids(again.eval_images), val_ids)
    assert not np.array_equal(image_ids(other.eval_images), val_ids)


@pytest.mark.parametrize("val_size", [-1, 600])
def test_hold_out_rejects_impossible_sizes(val_size):
    with pytest.raises(ValueError, match="val_size"):
        data.hold_out(indexed_arrays(np.arange(600) % 3), val_size, seed=0)


def test_load_keeps_the_test_set_unless_asked_for_a_validation_split():
    kept = data.load("synthetic", seed=5, synthetic_train_size=300, synthetic_test_size=50)
    held = data.load(
        "synthetic", seed=5, val_size=40, synthetic_train_size=300, synthetic_test_size=50
    )
    assert kept.eval_split == "test" and len(kept.eval_labels) == 50
    assert held.eval_split == "val" and len(held.eval_labels) == 40
    assert len(held.train_labels) == 260
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


# --------------------------------------------------------------------------- augmentation


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    fresh = data.epoch_plan(500, epoch=3, seed=7)
    for epoch in range(3):  # an uninterrupted run drew these first
        data.epoch_plan(500, epoch, seed=7)
    torch.manual_seed(123)
    torch.rand(10)
    resumed = data.epoch_plan(500, epoch=3, seed=7)

    for field in ("order", "dx", "dy", "flip"):
        assert torch.equal(getattr(fresh, field), getattr(resumed, field))
    assert torch.equal(fresh.order.sort().values, torch.arange(500))
    assert fresh.order.dtype == fresh.dx.dtype == fresh.dy.dtype == torch.int64
    assert fresh.flip.dtype == torch.bool
    for offsets in (fresh.dx, fresh.dy):
        assert offsets.min() >= 0 and offsets.max() <= 8
    for other in (
        data.epoch_plan(500, 4, 7),
        data.epoch_plan(500, 3, 8),
        data.epoch_plan(500, 7, 3),
    ):
        assert not torch.equal(other.order, fresh.order)
        assert not torch.equal(other.dx, fresh.dx)


def test_augment_equals_torchvision_pad_crop_flip_for_every_offset():
    dy, dx, flip = (
        t.reshape(-1)
        for t in torch.meshgrid(torch.arange(9), torch.arange(9), torch.arange(2), indexing="ij")
    )
    flip = flip.bool()
    images = torch.randint(
        0, 256, (len(dx), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )

    out = data.augment(images, dx, dy, flip)

    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(len(images)):
        expected = TF.crop(TF.pad(images[i], [4]), int(dy[i]), int(dx[i]), 32, 32)
        if flip[i]:
            expected = TF.hflip(expected)
        assert torch.equal(out[i], expected), (int(dx[i]), int(dy[i]), bool(flip[i]))


CHI2_8DOF_999 = 26.12  # 99.9% quantile of chi-square with 8 degrees of freedom


def offsets_look_uniform(offsets: torch.Tensor) -> bool:
    """Chi-square test of offsets against uniform over 0..8 (p = 0.001)."""
    counts = torch.bincount(offsets, minlength=9).double()
    if len(counts) != 9:
        return False
    expected = len(offsets) / 9
    return float(((counts - expected) ** 2 / expected).sum()) < CHI2_8DOF_999


def flips_look_fair(flips: torch.Tensor) -> bool:
    """Flip rate within 4 standard errors of 0.5."""
    return abs(flips.double().mean().item() - 0.5) < 4 * (0.25 / len(flips)) ** 0.5


def torchvision_draws(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets and flips that RandomCrop(32, padding=4) + RandomHorizontalFlip() chose, recovered
    from an image whose pixels are all distinct (and non-zero, unlike the padding)."""
    pipeline = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    )
    image = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.float32).view(3, 32, 32)
    torch.manual_seed(0)
    dx, dy, flip = [], [], []
    for _ in range(n):
        out = pipeline(image)
        # Pixel (16, 16) of the output always comes from inside the original image.
        source = int(out[0, 16, 16]) - 1
        flipped = out[0, 16, 16] < out[0, 16, 15]
        dy.append(source // 32 - 12)
        dx.append(source % 32 - (11 if flipped else 12))
        flip.append(bool(flipped))
    return torch.tensor(dx), torch.tensor(dy), torch.tensor(flip)


def test_crop_and_flip_distribution_matches_torchvision():
    n = 3000
    draws = {"torchvision": torchvision_draws(n)}
    plan = data.epoch_plan(n, epoch=0, seed=0)
    draws["epoch_plan"] = (plan.dx, plan.dy, plan.flip)
    for source, (dx, dy, flip) in draws.items():
        assert offsets_look_uniform(dx) and offsets_look_uniform(dy), source
        assert flips_look_fair(flip), source
    # The checks catch the likely mistakes: offsets 0..7, or flipping a quarter of the time.
    gen = torch.Generator().manual_seed(1)
    assert not offsets_look_uniform(torch.randint(0, 8, (n,), generator=gen))
    assert not flips_look_fair(torch.rand(n, generator=gen) < 0.25)


def test_normalize_scales_then_standardises_each_channel():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)

    out = data.normalize(images, mean, std)

    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), mean, std, strict=True)]
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out[:, :, 2, 3], torch.tensor([expected] * 2, dtype=torch.float32))
    torch.testing.assert_close(data.normalize(images, torch.tensor(mean), torch.tensor(std)), out)


# --------------------------------------------------------------------------- device batches


def labelled_by_index(n: int = 103, num_eval: int = 10) -> data.Arrays:
    """Each train image's label is its index, so batches reveal which images they hold."""
    rng = np.random.default_rng(0)
    return data.Arrays(
        "test",
        rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
        np.arange(n, dtype=np.int64),
        rng.integers(0, 256, (num_eval, 3, 32, 32), dtype=np.uint8),
        np.arange(num_eval, dtype=np.int64) % 3,
        "test",
        n,
        data.CIFAR10_MEAN,
        data.CIFAR10_STD,
    )


def test_train_batches_cover_every_image_once_and_follow_the_plan():
    arrays = labelled_by_index()
    device_data = data.DeviceData(arrays)

    batches = list(device_data.train_batches(epoch=2, batch_size=32, seed=5))

    assert device_data.num_train_batches(32) == len(batches) == 4
    assert [len(labels) for _, labels, _ in batches] == [32, 32, 32, 7]  # last partial one kept
    images = torch.cat([x for x, _, _ in batches])
    labels = torch.cat([y for _, y, _ in batches])
    indices = torch.cat([i for _, _, i in batches])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.shape == (103, 3, 32, 32)
    plan = data.epoch_plan(103, epoch=2, seed=5)
    assert torch.equal(labels, plan.order) and torch.equal(indices, plan.order)
    expected = data.augment(
        torch.from_numpy(arrays.train_images)[plan.order], plan.dx, plan.dy, plan.flip
    )
    torch.testing.assert_close(images, data.normalize(expected, arrays.mean, arrays.std))


def test_train_batches_repeat_for_the_same_seed_and_epoch_only():
    device_data = data.DeviceData(labelled_by_index())

    def epoch(epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(device_data.train_batches(epoch, batch_size=50, seed=seed))
        return torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches])

    first, again = epoch(1, seed=0), epoch(1, seed=0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(epoch(2, seed=0)[1], first[1])
    assert not torch.equal(epoch(1, seed=1)[1], first[1])


def test_eval_batches_are_in_order_and_unaugmented():
    arrays = labelled_by_index()
    device_data = data.DeviceData(arrays)

    batches = list(device_data.eval_batches(batch_size=4))

    assert [len(y) for _, y in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    expected = data.normalize(torch.from_numpy(arrays.eval_images), arrays.mean, arrays.std)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert torch.cat([y for _, y in batches]).tolist() == arrays.eval_labels.tolist()


def test_device_data_copies_read_only_arrays_without_warnings():
    arrays = labelled_by_index()
    for field in ("train_images", "train_labels", "eval_images", "eval_labels"):
        getattr(arrays, field).flags.writeable = False  # as Ray's object store hands them out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device_data = data.DeviceData(arrays)
    assert (device_data.num_train, device_data.num_eval, device_data.num_classes) == (103, 10, 103)


@CUDA
def test_cuda_batches_equal_cpu_batches_without_host_syncs():
    arrays = labelled_by_index(n=300)
    cpu, cuda = data.DeviceData(arrays), data.DeviceData(arrays, "cuda")
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
    try:
        gpu_batches = list(cuda.train_batches(epoch=3, batch_size=64, seed=1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_batches = list(cpu.train_batches(epoch=3, batch_size=64, seed=1))
    assert len(gpu_batches) == len(cpu_batches) == 5
    for (gx, gy, gi), (cx, cy, ci) in zip(gpu_batches, cpu_batches, strict=True):
        assert gx.device.type == "cuda"
        torch.testing.assert_close(gx.cpu(), cx)
        assert torch.equal(gy.cpu(), cy) and torch.equal(gi.cpu(), ci)
