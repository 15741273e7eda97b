"""Data sources: Fashion-MNIST IDX (real files when installed), ImageFolder, synthetic; splits."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas4dyn.data import FASHION_MNIST_DIRS, load_data, load_fashion_mnist, read_idx, split_indices
from nas4dyn.errors import DataError

REAL = Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_root(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))


@pytest.mark.skipif(not REAL.is_file(), reason="dataset-fashion-mnist not installed (make test installs it)")
def test_real_fashion_mnist_files():
    splits = load_fashion_mnist()
    images, labels = splits["train"]
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert splits["test"][0].shape == (10000, 1, 28, 28)
    assert set(labels.unique().tolist()) == set(range(10))
    bundle = load_data("fashion-mnist")
    assert (bundle.info.channels, bundle.info.num_classes, bundle.info.resolution) == (1, 10, 28)
    assert len(bundle.train) + len(bundle.val) == 60000 and len(bundle.test) == 10000


def test_idx_reader_and_data_root(tmp_path):
    make_idx_root(tmp_path)
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (20, 28, 28)
    bundle = load_data("fashion-mnist", data_root=str(tmp_path))
    assert len(bundle.test) == 10 and len(bundle.train) + len(bundle.val) == 20
    x, y = bundle.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10


def test_truncated_idx_is_reported(tmp_path):
    make_idx_root(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_data("fashion-mnist", data_root=str(tmp_path))


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist", data_root=str(tmp_path))


def test_unknown_source():
    with pytest.raises(DataError, match="unknown data source"):
        load_data("imagenet-on-the-moon")


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = load_data("synthetic"), load_data("synthetic")
    assert torch.equal(a.test[0][0], b.test[0][0])
    assert a.info.num_classes == 10 and a.info.channels == 1
    other = load_data("synthetic", synthetic={"channels": 3, "num_classes": 4, "resolution": 12})
    assert (other.info.channels, other.info.num_classes, other.info.resolution) == (3, 4, 12)


def test_random_erasing_blanks_one_rectangle_of_augmented_training_images_only():
    torch.manual_seed(0)
    for erasing in (0.0, 1.0):
        bundle = load_data("synthetic", synthetic={"n_train": 40, "n_test": 4}, erasing=erasing)
        for i in range(len(bundle.train)):
            x = bundle.train[i][0][0]
            erased = (x == 0).nonzero()  # erased pixels take the mean: exactly 0 after normalisation
            assert (len(erased) > 0) == (erasing == 1.0)
            if len(erased):
                (top, left), (bottom, right) = erased.min(0).values, erased.max(0).values
                assert bool((x[top:bottom + 1, left:right + 1] == 0).all()), "the erased pixels form one rectangle"
        for split in (bundle.train_eval, bundle.val, bundle.test):
            assert not any(bool((split[i][0] == 0).any()) for i in range(len(split)))


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(1000, 0.1, seed=3)
    assert (train, val) == split_indices(1000, 0.1, seed=3)
    assert not set(train) & set(val) and sorted(train + val) == list(range(1000))
    assert len(val) == 100 and split_indices(1000, 0.1, seed=4)[1] != val


def _write_images(folder: Path, classes: list[str], n: int, mode: str, size: int) -> None:
    rng = np.random.default_rng(1)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(folder / c / f"{i}.png")


def test_image_folder_with_train_and_val(tmp_path):
    _write_images(tmp_path / "train", ["cat", "dog", "eel"], 6, "RGB", 20)
    _write_images(tmp_path / "val", ["cat", "dog", "eel"], 2, "RGB", 20)
    bundle = load_data(str(tmp_path), val_fraction=0.2)
    assert (bundle.info.channels, bundle.info.num_classes, bundle.info.resolution) == (3, 3, 20)
    assert bundle.info.classes == ("cat", "dog", "eel")
    assert len(bundle.test) == 6 and len(bundle.train) + len(bundle.val) == 18
    assert bundle.train[0][0].shape == (3, 20, 20)


def test_image_folder_single_folder_split_by_seed(tmp_path):
    _write_images(tmp_path, ["a", "b"], 10, "L", 16)
    bundle = load_data(str(tmp_path))
    assert bundle.info.channels == 1 and bundle.info.num_classes == 2
    assert len(bundle.test) + len(bundle.train) + len(bundle.val) == 20
    again = load_data(str(tmp_path))
    assert torch.equal(bundle.test[0][0], again.test[0][0])


def test_image_folder_format_is_decided_over_every_image_with_one_warning(tmp_path, caplog):
    """The first file (0.png) is grayscale and 24 px, the majority RGB and 20 px: the dataset is RGB at 20 px."""
    _write_images(tmp_path / "train", ["cat", "dog"], 5, "RGB", 20)
    _write_images(tmp_path / "val", ["cat", "dog"], 2, "RGB", 20)
    Image.fromarray(np.zeros((24, 24), np.uint8), "L").save(tmp_path / "train" / "cat" / "0.png")
    with caplog.at_level("WARNING", logger="nas4dyn.data"):
        bundle = load_data(str(tmp_path), val_fraction=0.2)
    assert (bundle.info.channels, bundle.info.resolution) == (3, 20)
    assert bundle.train[0][0].shape == (3, 20, 20)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "1 grayscale and 13 colour images" in warnings[0] and "to 20 px" in warnings[0]


def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    _write_images(tmp_path / "train", ["a", "b"], 4, "L", 16)
    _write_images(tmp_path / "test", ["a", "b"], 2, "L", 16)
    (tmp_path / "train" / "a" / "empty.png").write_bytes(b"")
    whole = (tmp_path / "train" / "b" / "0.png").read_bytes()
    (tmp_path / "test" / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])  # a valid header, pixels cut off
    with pytest.raises(DataError, match="empty.png: cannot read this image.*--skip-unreadable"):
        load_data(str(tmp_path))
    (tmp_path / "train" / "a" / "empty.png").unlink()
    with pytest.raises(DataError, match="cut.png: cannot read this image"):
        load_data(str(tmp_path))
    (tmp_path / "train" / "a" / "empty.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="nas4dyn.data"):
        bundle = load_data(str(tmp_path), skip_unreadable=True)
    assert bundle.info.unreadable_skipped == 2 and len(bundle.test) == 4
    assert len(bundle.train) + len(bundle.val) == 8
    assert any("skipped 2 unreadable image(s)" in r.getMessage() for r in caplog.records)


def test_held_out_split_with_other_classes_is_refused(tmp_path):
    _write_images(tmp_path / "train", ["a", "b", "c"], 2, "L", 16)
    _write_images(tmp_path / "val", ["a", "c"], 2, "L", 16)
    with pytest.raises(DataError, match="differ from"):
        load_data(str(tmp_path))


def test_training_refuses_one_class_and_names_an_unreadable_file(tmp_path, capsys):
    from nas4dyn.cli.main import main

    _write_images(tmp_path / "one", ["only"], 4, "L", 16)
    _write_images(tmp_path / "bad", ["a", "b"], 2, "L", 16)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(b"not an image")
    threads = torch.get_num_threads()
    for data, needle in (("one", "at least 2 classes"), ("bad", "x.jpg: cannot read this image")):
        out = tmp_path / f"run-{data}"
        try:
            assert main(["train", "--space", "tiny", "--data", str(tmp_path / data), "--out", str(out)]) == 2
        finally:
            torch.set_num_threads(threads)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
