"""Small datasets of one's own: phases have a floor in steps, `--preset auto` picks by size, and a run that
ends near chance accuracy says so loudly and records it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from nas4dyn.train.config import AUTO_DEFAULT_MIN_IMAGES, PRESETS, build_config, resolve_preset
from nas4dyn.train.schedule import plan_phases

FMNIST_STEPS_PER_EPOCH = 54000 // 128  # 60,000 images less the 10% validation split, batch 128


def test_presets_keep_their_fashion_mnist_steps_and_floor_small_data():
    for name in PRESETS:
        config = build_config(name)
        on_fmnist = plan_phases(config, FMNIST_STEPS_PER_EPOCH)
        assert [p.steps for p in on_fmnist] == [round(p.epochs * FMNIST_STEPS_PER_EPOCH) for p in config.phases]
        small = plan_phases(config, 21)  # ~2,700 training images at batch 128
        assert [p.steps for p in small] == [p.min_steps for p in config.phases]
        assert all(p.min_steps >= 16 for p in config.phases)
        full = small[0]  # the warmup keeps its share of the lengthened phase
        assert full.warmup_steps == round(config.phases[0].warmup_epochs / config.phases[0].epochs * full.steps)
    assert plan_phases(build_config("default"), 21)[0].steps == 2000


def test_auto_preset_picks_by_training_set_size():
    assert resolve_preset("auto", 2_700) == "quick"
    assert resolve_preset("auto", AUTO_DEFAULT_MIN_IMAGES) == "default"
    assert resolve_preset("auto", 54_000) == "default" and resolve_preset("quick", 54_000) == "quick"


def write_image_folder(root: Path, per_class: int = 60, classes: int = 4, side: int = 16, seed: int = 0) -> None:
    """An ImageFolder with learnable structure: each class a fixed random smooth pattern, each image that
    pattern plus noise (grayscale PNGs)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        coarse = rng.random((4, 4))
        pattern = np.kron(coarse, np.ones((side // 4, side // 4)))
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(0.7 * pattern + 0.3 * rng.random((side, side)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8), mode="L").save(root / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder") / "data"
    write_image_folder(root)
    return root


def train(folder: Path, out: Path, phases: list[dict]) -> tuple[subprocess.CompletedProcess, dict]:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 32, "bn_recal_images": 64, "val_images": 0, "phases": phases}))
    run = subprocess.run([sys.executable, "-m", "nas4dyn", "train", "--space", "tiny", "--data", str(folder),
                          "--out", str(out), "--config", str(config), "--threads", "1"],  # --preset auto
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return run, json.loads((out / "train_metrics.json").read_text())


def test_small_image_folder_trains_to_useful_accuracy_with_a_step_floor(folder, tmp_path):
    run, metrics = train(folder, tmp_path / "run", [{"name": "full", "epochs": 1.0, "lr": 0.05, "min_steps": 40}])
    assert metrics["preset"] == "quick"  # under 240 training images: auto picks quick
    phase = metrics["phases"][0]
    assert metrics["steps_per_epoch"] <= 7 and phase["steps"] == 40  # the floor rules, not the epoch
    assert phase["max_val_acc"] >= 0.8 and metrics["warnings"] == []  # 4 classes: chance is 25%
    assert "WARNING" not in run.stderr


def test_a_run_near_chance_warns_loudly_and_records_it(folder, tmp_path):
    run, metrics = train(folder, tmp_path / "run", [{"name": "full", "epochs": 0.2, "lr": 1e-6, "min_steps": 1}])
    assert metrics["phases"][0]["max_val_acc"] < 0.35
    [warning] = metrics["warnings"]
    assert warning["kind"] == "near_chance" and warning["chance"] == 0.25
    assert "WARNING" in run.stderr and "chance" in run.stderr and "--preset default" in run.stderr
