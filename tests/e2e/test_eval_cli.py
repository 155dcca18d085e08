"""`medzero eval` and `medzero calibrate` as a user runs them, in-process and against a running server."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from app.__main__ import main
from app.jobs import train_meduna
from app.jobs.train_meduna import MedUnAConfig
from app.methods.meduna import ImageStageConfig, TextStageConfig
from tests.conftest import free_port, server_env, tiny_settings, wait_ready
from tests.factories import labelled_folder

pytestmark = pytest.mark.e2e
LABEL_SET = "chest-xray-pneumonia"


def medzero(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True, timeout=300)


def test_eval_writes_results_table_and_plots(tmp_path: Path) -> None:
    data = labelled_folder(tmp_path / "images", {"NORMAL": 8, "pneumonia": 8})
    (data / "pneumonia" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    env = server_env(tmp_path / "data", free_port())
    done = medzero("eval", "--label-set", LABEL_SET, "--data", str(data), "--map", "NORMAL=normal",
                   "--out", str(out), "--bootstrap", "200", "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stdout and "| method |" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["model_id"] == "medzero-tiny" and results["pretrained_weights"] is False
    assert results["label_set_version"] == 1 and results["dataset"]["hash"].startswith("sha256:")
    assert results["dataset"]["images"] == 17 and results["dataset"]["scored"] == 16
    assert [s["file"] for s in results["dataset"]["skipped"]] == ["pneumonia/broken.png"]
    names = [m["name"] for m in results["methods"]]
    assert names == ["zeroshot", "kpl", "kpl · transductive · reference", "kpl · transductive · sinkhorn"]
    assert [m["transductive"] for m in results["methods"]] == [False, False, True, True]
    for method in results["methods"]:
        metrics = method["metrics"]
        assert {"acc1", "acc5", "mean_per_class_recall", "balanced_accuracy", "macro_f1", "macro_auroc", "ece",
                "brier", "nll", "confusion_matrix", "intervals", "per_class", "abstention"} <= set(metrics)
        assert sum(map(sum, metrics["confusion_matrix"])) == 16
        low, high = metrics["intervals"]["accuracy"]
        assert low <= metrics["accuracy"] <= high
    assert len(results["predictions"]) == 16
    first = results["predictions"][0]
    assert first["label"] in ("normal", "pneumonia") and set(first["methods"]) == set(names)
    assert results["methods"][2]["settings"]["balancing"] == "reference"

    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    for png in [name for names in results["plots"].values() for name in names]:
        with Image.open(out / png) as image:
            image.verify()
        with Image.open(out / png) as image:
            assert image.width > 200 and image.height > 200
    assert {"confusion", "reliability", "roc", "coverage"} == set(results["plots"])


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder or manifest"),
    ("empty_class", "has no images"),
    ("unmapped", "not a class of the label set"),
])
def test_bad_data_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str,
                                              message: str) -> None:
    data = labelled_folder(tmp_path / "images", {"normal": 3, "pneumonia": 3})
    if layout == "missing":
        data = tmp_path / "nowhere"
    elif layout == "empty_class":
        (data / "pneumonia_extra").mkdir()
    else:
        labelled_folder(data, {"effusion": 2})
    code = main(["eval", "--label-set", LABEL_SET, "--data", str(data), "--out", str(tmp_path / "out"),
                 "--model-name", "medzero-tiny", "--data-dir", str(tmp_path / "db"), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert error[-1].startswith("medzero eval: ") and message in error[-1]
    assert not any("Traceback" in line for line in error)


def test_url_agrees_with_in_process_calibration_included(tmp_path: Path) -> None:
    data = labelled_folder(tmp_path / "images", {"normal": 10, "pneumonia": 10}, seed=3)
    (data / "normal" / "broken.png").write_bytes(b"not a png")    # refused per image; left out of every pool
    port = free_port()
    env = server_env(tmp_path / "data", port)
    calibrated = medzero("calibrate", "--label-set", LABEL_SET, "--data", str(data), "--method", "zeroshot",
                         "--no-progress", env=env)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "calibration v1 of zeroshot" in calibrated.stdout and "held-back images" in calibrated.stdout

    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            base = wait_ready(f"http://127.0.0.1:{port}", server, timeout_seconds=120)
            over_http = medzero("eval", "--label-set", LABEL_SET, "--data", str(data), "--url", base,
                                "--out", str(tmp_path / "http"), "--bootstrap", "100", "--abstain-threshold", "0.5",
                                "--batch-files", "8", "--no-progress", env=env)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    assert over_http.returncode == 0, over_http.stderr
    in_process = medzero("eval", "--label-set", LABEL_SET, "--data", str(data), "--out", str(tmp_path / "local"),
                         "--bootstrap", "100", "--abstain-threshold", "0.5", "--no-progress", env=env)
    assert in_process.returncode == 0, in_process.stderr

    remote = json.loads((tmp_path / "http" / "results.json").read_text())
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    assert remote["mode"] == f"http://127.0.0.1:{port}" and local["mode"] == "in-process"
    assert remote["dataset"]["hash"] == local["dataset"]["hash"]
    assert [s["file"] for s in remote["dataset"]["skipped"]] == [s["file"] for s in local["dataset"]["skipped"]] == [
        "normal/broken.png"]
    remote_rows = {m["name"]: m for m in remote["methods"]}
    local_rows = {m["name"]: m for m in local["methods"]}
    # the server balances with its default reading; in-process shows both
    assert set(remote_rows) == {"zeroshot", "kpl", "kpl · transductive · reference"} < set(local_rows)
    assert remote_rows["zeroshot"]["calibrated"] and local_rows["zeroshot"]["calibrated"]
    assert not remote_rows["kpl"]["calibrated"]
    assert remote_rows["zeroshot"]["calibration"] == local_rows["zeroshot"]["calibration"]      # version, T, held-back
    for name in remote_rows:
        tolerance = 1e-3 if "transductive" in name else 1e-4   # a fit on features from differently sized forwards
        for remote_image, local_image in zip(remote["predictions"], local["predictions"]):
            assert remote_image["file"] == local_image["file"]
            assert remote_image["methods"][name]["probabilities"] == pytest.approx(
                local_image["methods"][name]["probabilities"], abs=tolerance)
            if "transductive" not in name:
                assert remote_image["methods"][name]["decision"] == local_image["methods"][name]["decision"]
        assert remote_rows[name]["metrics"]["accuracy"] == local_rows[name]["metrics"]["accuracy"]
    sets = [(r["methods"]["zeroshot"]["prediction_set"], lo["methods"]["zeroshot"]["prediction_set"])
            for r, lo in zip(remote["predictions"], local["predictions"])]
    assert all(a == b for a, b in sets)
    assert remote_rows["zeroshot"]["metrics"]["prediction_sets"] == local_rows["zeroshot"]["metrics"][
        "prediction_sets"]
    assert remote_rows["zeroshot"]["metrics"]["decisions"] == local_rows["zeroshot"]["metrics"]["decisions"]
    assert local_rows["zeroshot"]["metrics"]["decisions"]["rule"] == "threshold"
    assert all(any("calibrated on these same images" in note for note in r["notes"]) for r in (local, remote))


def test_eval_measures_meduna_once_an_adapter_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = labelled_folder(tmp_path / "images", {"normal": 5, "pneumonia": 5})
    common = ["--label-set", LABEL_SET, "--data", str(data), "--bootstrap", "50", "--no-transductive",
              "--model-name", "medzero-tiny", "--data-dir", str(tmp_path / "db"), "--no-progress"]
    assert main(["eval", *common, "--out", str(tmp_path / "before")]) == 0
    before = json.loads((tmp_path / "before" / "results.json").read_text())
    assert "meduna" not in [m["name"] for m in before["methods"]]
    assert any(note.startswith("meduna: ") and "medzero train meduna" in note for note in before["notes"])

    config = MedUnAConfig(text=TextStageConfig(steps=30), image=ImageStageConfig(n_prompt_tokens=2, epochs=1,
                                                                                 batch_size=5))
    train_meduna.main(tiny_settings(tmp_path / "db"), LABEL_SET, data, tmp_path / "db" / "adapters" / "cxr",
                      config=config, progress=False)
    capsys.readouterr()
    assert main(["eval", *common, "--methods", "zeroshot,meduna", "--out", str(tmp_path / "after")]) == 0
    after = json.loads((tmp_path / "after" / "results.json").read_text())
    assert [m["name"] for m in after["methods"]] == ["zeroshot", "meduna"]
    assert after["methods"][1]["settings"]["adapter_id"]
    assert "| meduna |" in capsys.readouterr().out
