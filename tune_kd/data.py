"""Datasets that live on the training device.

Like airbench, a whole split is one uint8 tensor on the device and every batch is built there:
an index_select for the images, one batched gather for random crop + flip, then normalisation.
The random choices of an epoch (order, crop offsets, flips) are drawn up front on the CPU from a
generator seeded by (seed, epoch) alone, so a resumed run and a CUDA run see the same batches.

Loading only ever produces numpy arrays (`Arrays`), which Ray can share through its object store;
`DeviceData` turns them into tensors inside the trial.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import Tensor

from tune_kd.config import DATASETS

try:  # NumPy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

_SIZE = 32
_PAD = 4  # RandomCrop(32, padding=4): offsets 0..2*_PAD into the zero-padded 40x40 image


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class Arrays:
    """A dataset as plain numpy arrays: picklable, so Ray can share one copy through its
    object store."""

    name: str
    train_images: np.ndarray  # uint8 [N, 3, 32, 32]
    train_labels: np.ndarray  # int64 [N]
    eval_images: np.ndarray  # uint8 [M, 3, 32, 32]  (test set, or a held-out validation split)
    eval_labels: np.ndarray  # int64 [M]
    eval_split: str  # "test" or "val"
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for split in ("train", "eval"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != np.uint8 or images.shape[1:] != (3, _SIZE, _SIZE):
                raise ValueError(
                    f"{split}_images: want uint8 [N, 3, 32, 32], got "
                    f"{images.dtype} {list(images.shape)}"
                )
            if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels: want int64 [{len(images)}], got "
                    f"{labels.dtype} {list(labels.shape)}"
                )
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")


class DatasetUnavailable(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded, or one cannot be read."""


# --------------------------------------------------------------------------- CIFAR on disk


@dataclass(frozen=True)
class _CifarSource:
    folder: str  # what the archive extracts to, inside data_dir
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    url: str
    archive: str
    md5: str  # of the archive, as torchvision checks it
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The same URLs, archive names and MD5s as torchvision.datasets.CIFAR10 / CIFAR100.
_CIFAR = {
    "cifar100": _CifarSource(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
    "cifar10": _CifarSource(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
}


def default_data_dir() -> Path:
    """$TUNE_KD_DATA if set, else ~/.cache/tune_kd/data."""
    env = os.environ.get("TUNE_KD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tune_kd" / "data"


def _cifar_source(name: str) -> _CifarSource:
    if name not in _CIFAR:
        raise ValueError(f"not a CIFAR dataset: {name!r} (choose from {sorted(_CIFAR)})")
    return _CIFAR[name]


def _has_files(source: _CifarSource, root: Path) -> bool:
    return all((root / source.folder / f).is_file() for f in source.train_files + source.test_files)


def _unavailable(name: str, root: Path, reason: str) -> DatasetUnavailable:
    source = _CIFAR[name]
    reason = " ".join(reason.split())  # keep the message on one line
    return DatasetUnavailable(
        f"{name}: no complete {source.folder}/ in {root} and {reason}; download {source.url} and "
        f"extract it there, or point data_dir (or $TUNE_KD_DATA) at a folder that has it"
    )


# The CIFAR pickles hold only dicts, lists, strings and numpy arrays. Unpickling anything else
# could run code, so those are the only globals the loader will resolve.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # written by NumPy 1.x (the originals)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # NumPy 2, pickle protocol <= 4
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # NumPy 1.x, pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # NumPy 2, pickle protocol 5
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR file holds only numpy arrays, "
                "lists and dicts"
            ) from None


def _unpickle(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        # latin1, as torchvision: the originals are Python 2 pickles with str keys and arrays.
        entry = _CifarUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise ValueError(f"expected a dict, got {type(entry).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_file(source: _CifarSource, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one CIFAR file; a file cut short or corrupt raises
    DatasetUnavailable naming it."""
    try:
        entry = _unpickle(path)
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * _SIZE * _SIZE:
            raise ValueError(f"data must be [N, 3072], got {list(data.shape)}")
        labels = np.asarray(entry[source.label_key], dtype=np.int64)
    except Exception as err:  # a cut pickle raises EOFError, UnpicklingError, KeyError, ...
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DatasetUnavailable(
            f"{path} is unreadable ({reason}); delete it to download the dataset again"
        ) from err
    return data.reshape(-1, 3, _SIZE, _SIZE), labels  # rows are R, G, B planes


def _read_split(
    source: _CifarSource, root: Path, files: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    read = [_read_file(source, root / source.folder / file) for file in files]
    return np.concatenate([r[0] for r in read]), np.concatenate([r[1] for r in read])


def read_cifar(name: str, data_dir: str | Path) -> Arrays:
    """Read torchvision's on-disk CIFAR format from data_dir (no MD5 check)."""
    source, root = _cifar_source(name), Path(data_dir)
    if not _has_files(source, root):
        raise _unavailable(name, root, "downloading was not tried")
    train_images, train_labels = _read_split(source, root, source.train_files)
    eval_images, eval_labels = _read_split(source, root, source.test_files)
    return Arrays(
        name,
        train_images,
        train_labels,
        eval_images,
        eval_labels,
        "test",
        source.num_classes,
        source.mean,
        source.std,
    )


def download_cifar(name: str, data_dir: str | Path) -> None:
    """Download and extract CIFAR into data_dir with torchvision's downloader (MD5-checked).

    Runs under the file lock `<data_dir>/<folder>.lock`, and looks for the files again once it has
    the lock, so trials starting together download once and the rest find the files. The archive
    is extracted into a temporary folder and moved in file by file, so a trial killed mid-way never
    leaves a half-written file where a reader would take it for a real one.
    """
    source, root = _cifar_source(name), Path(data_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(root / f"{source.folder}.lock"):
            if _has_files(source, root):
                return
            # Imported here: torchvision takes seconds to import and is only needed to download.
            from torchvision.datasets.utils import download_and_extract_archive

            with tempfile.TemporaryDirectory(dir=root, prefix=f".{source.folder}-") as tmp:
                download_and_extract_archive(
                    source.url, str(root), extract_root=tmp, filename=source.archive, md5=source.md5
                )
                (root / source.folder).mkdir(exist_ok=True)
                for file in (Path(tmp) / source.folder).iterdir():
                    os.replace(file, root / source.folder / file.name)
    except Exception as err:  # offline, checksum mismatch, read-only folder, ...
        raise _unavailable(
            name, root, f"downloading it failed ({type(err).__name__}: {err})"
        ) from err
    if not _has_files(source, root):
        raise _unavailable(name, root, "the downloaded archive lacked some files")


# --------------------------------------------------------------------------- synthetic data

# Share of the template every class has in common: the higher, the closer the classes.
_SYNTHETIC_SHARED = 0.8
_SYNTHETIC_GRID = 4  # template resolution before upsampling: blobs about 10 pixels across
_SYNTHETIC_CONTRAST = 0.3  # contrast factor uniform in 1 +- this
_SYNTHETIC_BRIGHTNESS = 0.1  # std of the brightness offset, in units of the full range
_SYNTHETIC_NOISE = 0.25  # std of the per-pixel noise, same units
_SYNTHETIC_CHUNK = 1024  # images generated at a time


def make_synthetic(seed: int, num_classes: int, train_size: int, test_size: int) -> Arrays:
    """A CIFAR-shaped stand-in that is learnable but not trivial, made from the seed alone.

    Each class has a smooth random colour template (a 4x4 random pattern, partly shared by all
    classes, upsampled bicubically to 40x40). An image is a random 32x32 window of its class's
    template (a shift of up to +-4 pixels), with per-image contrast and brightness jitter and
    per-pixel Gaussian noise. Labels are balanced. Mean and std are those of the train images.
    """
    if num_classes < 1 or train_size < 1 or test_size < 1:
        raise ValueError("num_classes, train_size and test_size must be positive")
    gen = torch.Generator().manual_seed(seed)
    grid = (3, _SYNTHETIC_GRID, _SYNTHETIC_GRID)
    shared = torch.rand(1, *grid, generator=gen)
    own = torch.rand(num_classes, *grid, generator=gen)
    low_res = _SYNTHETIC_SHARED * shared + (1 - _SYNTHETIC_SHARED) * own
    size = _SIZE + 2 * _PAD
    templates = F.interpolate(low_res, size=(size, size), mode="bicubic", align_corners=False)

    train_images, train_labels = _synthetic_split(templates, train_size, gen)
    eval_images, eval_labels = _synthetic_split(templates, test_size, gen)
    mean, std = _channel_mean_std(train_images)
    return Arrays(
        "synthetic",
        train_images.numpy(),
        train_labels.numpy(),
        eval_images.numpy(),
        eval_labels.numpy(),
        "test",
        num_classes,
        mean,
        std,
    )


def _synthetic_split(templates: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    num_classes = templates.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    dx, dy = torch.randint(0, 2 * _PAD + 1, (2, n), generator=gen)
    no_flip = torch.zeros(n, dtype=torch.bool)
    contrast = 1 + _SYNTHETIC_CONTRAST * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    brightness = _SYNTHETIC_BRIGHTNESS * torch.randn(n, 1, 1, 1, generator=gen)
    images = torch.empty(n, 3, _SIZE, _SIZE, dtype=torch.uint8)
    for start in range(0, n, _SYNTHETIC_CHUNK):  # in chunks, to bound the float memory
        part = slice(start, start + _SYNTHETIC_CHUNK)
        x = _crop(templates[labels[part]], dx[part], dy[part], no_flip[part])
        x.sub_(0.5).mul_(contrast[part]).add_(brightness[part] + 0.5)
        x.add_(torch.randn(x.shape, generator=gen), alpha=_SYNTHETIC_NOISE)
        images[part] = x.mul_(255).round_().clamp_(0, 255)
    return images, labels


def _channel_mean_std(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images scaled to [0, 1], from value histograms."""
    counts = torch.stack(
        [torch.bincount(images[:, c].reshape(-1), minlength=256) for c in range(images.shape[1])]
    ).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    total = counts.sum(1)
    mean = (counts * values).sum(1) / total
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / total
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


# --------------------------------------------------------------------------- splits and loading


def hold_out(arrays: Arrays, val_size: int, seed: int) -> Arrays:
    """Move `val_size` train images into the eval split ("val"), stratified by class and seeded.

    Every class gives up the same share of its images (up to rounding); within a class the images
    are chosen at random. Both splits keep the original order of the train set.
    """
    n = len(arrays.train_labels)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in 1..{n - 1}, got {val_size}")
    shuffled = np.random.default_rng(seed).permutation(n)
    labels = arrays.train_labels[shuffled]
    # Rank of each shuffled image among the images of its class, as a fraction of the class size;
    # taking the smallest fractions takes the same share of every class.
    grouped = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    class_starts = np.repeat(np.cumsum(counts) - counts, counts)
    rank = np.empty(n, dtype=np.int64)
    rank[grouped] = np.arange(n) - class_starts
    chosen = np.argsort(rank / counts[labels], kind="stable")[:val_size]
    is_val = np.zeros(n, dtype=bool)
    is_val[shuffled[chosen]] = True
    return Arrays(
        arrays.name,
        arrays.train_images[~is_val],
        arrays.train_labels[~is_val],
        arrays.train_images[is_val],
        arrays.train_labels[is_val],
        "val",
        arrays.num_classes,
        arrays.mean,
        arrays.std,
    )


def load(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    val_size: int = 0,
    seed: int = 0,
    synthetic_classes: int = 10,
    synthetic_train_size: int = 2000,
    synthetic_test_size: int = 500,
) -> Arrays:
    """Load a dataset from DATASETS as numpy arrays.

    CIFAR is read from data_dir (default: `default_data_dir()`), downloaded first if missing and
    `download` is true. `seed` seeds the synthetic data and the validation split, not training.
    With `val_size` > 0 the eval split is `val_size` images held out of train; with 0 (the paper's
    convention) it is the test set.
    """
    if name == "synthetic":
        arrays = make_synthetic(seed, synthetic_classes, synthetic_train_size, synthetic_test_size)
    elif name in _CIFAR:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        if not _has_files(_CIFAR[name], root):
            if not download:
                raise _unavailable(name, root, "download=False")
            download_cifar(name, root)
        arrays = read_cifar(name, root)
    else:
        raise ValueError(f"unknown dataset {name!r} (choose from {DATASETS})")
    return hold_out(arrays, val_size, seed) if val_size else arrays


# --------------------------------------------------------------------------- batches on the device


@dataclass
class EpochPlan:
    """The random choices of one epoch; position k describes the k-th image of the epoch."""

    order: Tensor  # int64 [N]: train indices in epoch order
    dx: Tensor  # int64 [N]: crop column offset 0..8 into the 40x40 zero-padded image
    dy: Tensor  # int64 [N]: crop row offset 0..8
    flip: Tensor  # bool [N]: mirror horizontally (after the crop)

    def to(self, device: torch.device) -> EpochPlan:
        # From pinned memory the copies are asynchronous: the host need not wait for the GPU.
        pin = device.type == "cuda"
        return EpochPlan(
            *(
                (t.pin_memory() if pin else t).to(device, non_blocking=pin)
                for t in (self.order, self.dx, self.dy, self.flip)
            )
        )


def epoch_plan(n: int, epoch: int, seed: int) -> EpochPlan:
    """Order, crop offsets and flips of one epoch, drawn on the CPU from (seed, epoch) alone.

    Nothing drawn earlier (by this or any other generator) changes the plan, so a run resumed at
    any epoch sees exactly the batches an uninterrupted run sees, on CPU and CUDA alike.
    Offsets are uniform over 0..8 and flips have p=0.5, as torchvision's RandomCrop(32, padding=4)
    and RandomHorizontalFlip().
    """
    mixed = np.random.SeedSequence((seed, epoch)).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator().manual_seed(int(mixed))
    order = torch.randperm(n, generator=gen)
    dx, dy = torch.randint(0, 2 * _PAD + 1, (2, n), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return EpochPlan(order, dx, dy, flip)


def _crop(padded: Tensor, dx: Tensor, dy: Tensor, flip: Tensor) -> Tensor:
    """The 32x32 window at (dy, dx) of each image in padded [B, C, H, W], mirrored where flip."""
    b, c, h, w = padded.shape
    steps = torch.arange(_SIZE, device=padded.device)
    rows = dy[:, None] + steps  # [B, 32]
    cols = dx[:, None] + torch.where(flip[:, None], _SIZE - 1 - steps, steps)  # [B, 32]
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, _SIZE * _SIZE)
    out = padded.reshape(b, c, h * w).gather(2, index.expand(b, c, _SIZE * _SIZE))
    return out.view(b, c, _SIZE, _SIZE)


def augment(images: Tensor, dx: Tensor, dy: Tensor, flip: Tensor) -> Tensor:
    """Random crop 32 with zero padding 4, then horizontal flip, for a whole batch at once.

    uint8 [B, 3, 32, 32] -> uint8 [B, 3, 32, 32] on the input's device; dx, dy (0..8) and flip
    ([B] each, same device) are the offsets into the padded image and the flips.
    """
    return _crop(F.pad(images, (_PAD, _PAD, _PAD, _PAD)), dx, dy, flip)


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 (x/255 - mean) / std, per channel."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


class DeviceData:
    """The dataset on the training device; batches come out augmented and normalised.

    Holds one uint8 copy of each split on the device (about 150 MB for CIFAR train) and builds every
    batch there, so the training loop never waits on Python or on host-to-device copies.
    """

    def __init__(self, arrays: Arrays, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.name = arrays.name
        self.eval_split = arrays.eval_split
        self.num_classes = arrays.num_classes
        self.num_train = len(arrays.train_labels)
        self.num_eval = len(arrays.eval_labels)
        # torch.tensor copies, which also keeps read-only arrays (Ray's object store) safe.
        self._train_images = torch.tensor(arrays.train_images, device=self.device)
        self.train_labels = torch.tensor(arrays.train_labels, device=self.device)
        self._eval_images = torch.tensor(arrays.eval_images, device=self.device)
        self._eval_labels = torch.tensor(arrays.eval_labels, device=self.device)
        self._mean = torch.tensor(arrays.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(arrays.std, dtype=torch.float32, device=self.device)

    def num_train_batches(self, batch_size: int) -> int:
        return -(-self.num_train // batch_size)

    def train_batches(
        self, epoch: int, batch_size: int, seed: int
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Augmented, normalised float32 images [B, 3, 32, 32], int64 labels and the images'
        positions in the training set, on the device.

        The batches follow `epoch_plan(num_train, epoch, seed)`; the last one may be smaller.
        """
        plan = epoch_plan(self.num_train, epoch, seed).to(self.device)
        for start in range(0, self.num_train, batch_size):
            batch = slice(start, start + batch_size)
            index = plan.order[batch]
            images = augment(
                self._train_images.index_select(0, index),
                plan.dx[batch],
                plan.dy[batch],
                plan.flip[batch],
            )
            labels = self.train_labels.index_select(0, index)
            yield normalize(images, self._mean, self._std), labels, index

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised eval images and labels in their stored order, without augmentation."""
        for start in range(0, self.num_eval, batch_size):
            batch = slice(start, start + batch_size)
            images = normalize(self._eval_images[batch], self._mean, self._std)
            yield images, self._eval_labels[batch]
