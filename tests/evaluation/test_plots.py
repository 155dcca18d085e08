"""Evaluation plots: every returned file is a readable PNG of a useful size, for ordinary and degenerate runs."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.evaluation.plots import PlotInput, unique_slugs, write_plots

CLASS_NAMES = ["normal", "pneumonia", "covid-19", "tuberculosis", "pleural effusion"]


def run_of(name: str, y_true: np.ndarray, seed: int, threshold: float | None = None) -> PlotInput:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y_true), len(CLASS_NAMES)))
    logits[np.arange(len(y_true)), y_true] += 1.5
    return PlotInput(name, y_true, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), threshold)


def assert_pngs(out_dir: Path, written: dict[str, list[str]], n_runs: int) -> None:
    assert set(written) == {"confusion", "reliability", "roc", "coverage"}
    assert len(written["confusion"]) == len(written["roc"]) == n_runs
    assert written["reliability"] == ["reliability.png"] and written["coverage"] == ["coverage.png"]
    files = [name for names in written.values() for name in names]
    assert len(set(files)) == len(files)
    for name in files:
        path = out_dir / name
        with Image.open(path) as image:
            image.verify()                  # a complete, uncorrupted PNG
        with Image.open(path) as image:     # verify() leaves the image unusable; reopen for its size
            assert image.format == "PNG"
            assert image.width > 200 and image.height > 200


def test_six_runs_with_thresholds(tmp_path: Path) -> None:
    y_true = np.random.default_rng(0).integers(0, len(CLASS_NAMES), 120)
    runs = [run_of(f"method {k} (transductive, sinkhorn)", y_true, seed=k, threshold=0.4 if k % 2 else None)
            for k in range(6)]
    written = write_plots(tmp_path / "plots", CLASS_NAMES, runs)
    assert_pngs(tmp_path / "plots", written, n_runs=6)
    assert written["confusion"][0] == "confusion_method-0-transductive-sinkhorn.png"
    assert written["roc"][5] == "roc_method-5-transductive-sinkhorn.png"


def test_one_run_with_a_class_absent_and_nothing_above_the_threshold(tmp_path: Path) -> None:
    y_true = np.array([0, 1, 2, 3] * 10)               # "pleural effusion" never occurs
    written = write_plots(tmp_path, CLASS_NAMES, [run_of("zeroshot", y_true, seed=1, threshold=1.0)])
    assert_pngs(tmp_path, written, n_runs=1)


def test_a_single_class_present_still_writes_every_plot(tmp_path: Path) -> None:
    run = run_of("kpl", np.full(15, 2), seed=2)
    written = write_plots(tmp_path, CLASS_NAMES, [run, run_of("kpl", np.full(15, 2), seed=3, threshold=0.3)])
    assert_pngs(tmp_path, written, n_runs=2)
    assert written["roc"] == ["roc_kpl.png", "roc_kpl-2.png"]


def test_slugs_are_unique_per_run() -> None:
    names = ["KPL (transductive, sinkhorn)", "kpl -- transductive/sinkhorn", "!!!", "kpl-transductive-sinkhorn-2"]
    assert unique_slugs(names) == ["kpl-transductive-sinkhorn", "kpl-transductive-sinkhorn-2", "run",
                                   "kpl-transductive-sinkhorn-2-2"]


def test_no_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_plots(tmp_path, CLASS_NAMES, [])
