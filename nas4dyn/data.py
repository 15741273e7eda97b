"""Datasets: Fashion-MNIST (IDX files), any ImageFolder directory, and a synthetic set for tests.

Every source gives the same :class:`DataBundle`: ``train`` (augmented), ``train_eval`` (the same images
without augmentation, for BN recalibration), ``val`` (carved from the training set by a fixed seed: search and
threshold calibration use it), ``test`` (final reports only), and :class:`DataInfo` — channels, resolution and
class count come from the data, never from constants. Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from nas4dyn.errors import DataError

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data (stored with every supernet and export)."""

    dataset: str
    channels: int
    num_classes: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    unreadable_skipped: int = 0  # ImageFolder images left out as unreadable (--skip-unreadable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataBundle:
    train: Dataset
    train_eval: Dataset
    val: Dataset
    test: Dataset
    info: DataInfo


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N x C x H x W) with labels; ``transform`` maps a uint8 image to a float tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


# ---- readers ------------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a numpy array (the format of MNIST-like datasets)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(data_root: Optional[str] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images N x 1 x 28 x 28 uint8, labels), "test": (...)} from IDX files.

    Raises:
        DataError: no files found — the message says how to install them.
    """
    roots = [Path(data_root)] if data_root else [Path(d) for d in FASHION_MNIST_DIRS]
    for root in roots:
        found = {split: [_find_idx(root, stem) for stem in stems] for split, stems in _IDX_FILES.items()}
        if all(p is not None for paths in found.values() for p in paths):
            out = {}
            for split, (img_path, lbl_path) in found.items():
                images = torch.from_numpy(read_idx(img_path).copy()).unsqueeze(1)
                labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64))
                if len(images) != len(labels):
                    raise DataError(f"{img_path}: {len(images)} images but {len(labels)} labels")
                out[split] = (images, labels)
            return out
    where = data_root or ", ".join(FASHION_MNIST_DIRS)
    raise DataError(
        f"Fashion-MNIST IDX files not found in {where}: run `apt-get install dataset-fashion-mnist` "
        "or pass --data-root DIR holding train-images-idx3-ubyte[.gz] and friends"
    )


def make_synthetic(n_train: int = 600, n_test: int = 200, num_classes: int = 10, channels: int = 1,
                   resolution: int = 16, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A small deterministic dataset: each class is a fixed random smooth pattern plus noise (learnable)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=resolution, mode="bilinear", align_corners=False)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        noise = 0.25 * torch.randn(n, channels, resolution, resolution, generator=g)
        out[split] = (((templates[labels] + noise).clamp(0, 1) * 255).to(torch.uint8), labels)
    return out


# ---- transforms and splits ----------------------------------------------------------------------------------
def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[:10000].float().div(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def train_transform(resolution: int, mean: Sequence[float], std: Sequence[float], flip: bool = True,
                    erasing: float = 0.0) -> v2.Compose:
    """Random crop (padding 1/14 of the side) and flip, normalised, then with probability ``erasing`` one random
    rectangle set to the mean (Random Erasing, Zhong et al. 2020)."""
    steps = [v2.RandomCrop(resolution, padding=max(1, resolution // 14))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(eval_transform(mean, std))
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, value=0.0))
    return v2.Compose(steps)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a fixed-seed permutation, disjoint and covering ``range(n)``."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _bundle_from_tensors(name: str, splits: dict, classes: Sequence[str], val_fraction: float, seed: int,
                         augment: bool, erasing: float, skipped: int = 0) -> DataBundle:
    images, labels = splits["train"]
    mean, std = _stats(images)
    res = images.shape[-1]
    evaluate = eval_transform(mean, std)
    train_tf = train_transform(res, mean, std, erasing=erasing) if augment else evaluate
    train_idx, val_idx = split_indices(len(labels), val_fraction, seed)
    info = DataInfo(name, images.shape[1], len(classes), res, mean, std, tuple(classes), skipped)
    return DataBundle(
        train=Subset(TensorImageDataset(images, labels, train_tf), train_idx),
        train_eval=Subset(TensorImageDataset(images, labels, evaluate), train_idx),
        val=Subset(TensorImageDataset(images, labels, evaluate), val_idx),
        test=TensorImageDataset(*splits["test"], evaluate),
        info=info,
    )


GRAY_MODES = ("L", "LA", "1", "I", "I;16", "F")


def _unreadable(path: str, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot read this image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                     "replace or remove it (`nas4dyn train` and `evaluate` can also leave unreadable images out: "
                     "--skip-unreadable)")


def _header(path: str) -> tuple[int, int]:
    """(channels, short side) from the image file's header (PIL reads no pixels here)."""
    with Image.open(path) as image:
        return (1 if image.mode in GRAY_MODES else 3), min(image.size)


def _decide_format(root: Path, headers: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Channels and resolution of the whole dataset: the majority's mode and the most common short side. Mixed
    folders are converted consistently, with one warning saying so."""
    modes = Counter(c for c, _ in headers.values())
    sides = Counter(s for _, s in headers.values())
    channels = 3 if modes[3] >= modes[1] else 1
    res = max(sides, key=lambda side: (sides[side], side))
    notes = []
    if len(modes) > 1:
        notes.append(f"{modes[1]} grayscale and {modes[3]} colour images: all are read as "
                     f"{'RGB' if channels == 3 else 'grayscale'} (the majority)")
    if len(sides) > 1:
        notes.append(f"short sides from {min(sides)} to {max(sides)} px: all are resized and centre-cropped to "
                     f"{res} px (the most common)")
    if notes:
        log.warning("%s: %s", root, "; ".join(notes))
    return channels, res


def _image_folder(root: Path, val_fraction: float, seed: int, augment: bool, erasing: float,
                  skip_unreadable: bool = False) -> DataBundle:
    """ImageFolder layout: ``train/`` (+ ``val/`` or ``test/`` as the held-out split), or one folder of class
    folders that is split by seed into train and held-out test. Channels and resolution are decided over every
    image (:func:`_decide_format`); an unreadable image stops with its name, or is left out (counted) with
    ``skip_unreadable``."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    held_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    try:
        folders = [datasets.ImageFolder(str(train_dir))]
        if held_dir is not None:
            folders.append(datasets.ImageFolder(str(held_dir)))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root}: not an ImageFolder dataset ({exc}); expected class sub-folders of images") from None
    if held_dir is not None and folders[1].classes != folders[0].classes:
        raise DataError(f"{held_dir}: classes {folders[1].classes} differ from {train_dir}'s {folders[0].classes}; "
                        "the held-out split needs the same class folders (labels would not match)")
    skipped: list[str] = []

    def readable(path: str, read: Callable[[str], Any]) -> Any:
        try:
            return read(path)
        except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for empty, truncated or foreign files
            if not skip_unreadable:
                raise _unreadable(path, exc) from None
            skipped.append(path)
            return None

    headers = {path: h for ds in folders for path, _ in ds.samples if (h := readable(path, _header)) is not None}
    if not headers:
        raise DataError(f"{root}: no readable image")
    channels, res = _decide_format(root, headers)
    to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize(res, antialias=True), v2.CenterCrop(res)])
    mode = "L" if channels == 1 else "RGB"

    def pixels(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            return to_tensor(image.convert(mode))

    def materialise(samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        items = [(x, y) for path, y in samples if path in headers and (x := readable(path, pixels)) is not None]
        if not items:
            raise DataError(f"{root}: no readable image in a split")
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    if held_dir is None:
        samples = [s for s in folders[0].samples if s[0] in headers]
        train_idx, test_idx = split_indices(len(samples), 0.2, seed + 1)
        train = materialise([samples[i] for i in train_idx])
        test = materialise([samples[i] for i in test_idx])
    else:
        train, test = materialise(folders[0].samples), materialise(folders[1].samples)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s) (--skip-unreadable), e.g. %s", root, len(skipped), skipped[0])
    return _bundle_from_tensors(str(root), {"train": train, "test": test}, folders[0].classes, val_fraction, seed,
                                augment, erasing, len(skipped))


def load_data(source: str, data_root: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0,
              augment: bool = True, synthetic: Optional[dict[str, int]] = None, erasing: float = 0.0,
              skip_unreadable: bool = False) -> DataBundle:
    """Load ``fashion-mnist``, ``synthetic`` (options in ``synthetic``), or an ImageFolder directory.

    ``augment`` makes ``train`` randomly cropped and flipped, and then randomly erased with probability
    ``erasing``; the other splits are never augmented. ``skip_unreadable`` leaves unreadable images of an
    ImageFolder out (with one warning counting them) instead of stopping at the first.

    Raises:
        DataError: unknown source or missing files, with how to fix it.
    """
    if source == "fashion-mnist":
        splits = load_fashion_mnist(data_root)
        return _bundle_from_tensors(source, splits, FASHION_MNIST_CLASSES, val_fraction, seed, augment, erasing)
    if source == "synthetic":
        opts = dict(synthetic or {})
        splits = make_synthetic(**opts)
        classes = [f"class{i}" for i in range(opts.get("num_classes", 10))]
        return _bundle_from_tensors(source, splits, classes, val_fraction, seed, augment, erasing)
    path = Path(source)
    if path.is_dir():
        return _image_folder(path, val_fraction, seed, augment, erasing, skip_unreadable)
    raise DataError(f"unknown data source {source!r}: use fashion-mnist, synthetic, or an ImageFolder directory")


def subset_indices(total: int, limit: int, seed: int) -> list[int]:
    """The sorted indices of the fixed-seed random subset of ``limit`` of ``total`` items that make_loader keeps."""
    return sorted(random.Random(seed).sample(range(total), limit))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                limit: Optional[int] = None) -> DataLoader:
    """A single-process DataLoader (both cores go to compute); ``limit`` keeps a fixed-seed random subset."""
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, subset_indices(len(dataset), limit, seed))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)
