"""`medzero train hica` on the tiny model: the bundle and manifest it writes, that stage 2 lowers its loss and moves
the projection and the tower tensors while the loaded model stays untouched, that untrained HiCA is zero-shot,
--resume, --force and the CLI, the blocks mode, and a timm trunk (BiomedCLIP's shape)."""
import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.__main__ import main as cli
from app.errors import InvalidInput
from app.jobs import evaluate, train_hica
from app.jobs.evaluate import EvalOptions
from app.jobs.train_hica import HiCAConfig, HiCATrainer, Shots
from app.jobs.training import description_features
from app.methods.hica import init_trainable
from app.methods.hica_config import AlignConfig, PreAdaptConfig, TuningConfig
from app.runtime import Runtime
from tests.conftest import tiny_settings
from tests.encoders.biomedclip_tiny import build_tiny_biomedclip
from tests.factories import labelled_folder

pytestmark = pytest.mark.e2e
LABEL_SET = "chest-xray-pneumonia"
QUICK = HiCAConfig(tuning=TuningConfig(lr=0.02, text_lr=0.01), pre=PreAdaptConfig(epochs=1, text_steps=20),
                   align=AlignConfig(epochs=2, batch_size=4), seed=3)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = labelled_folder(tmp_path / "shots", {"normal": 4, "pneumonia": 4})
    (folder / "normal" / "broken.png").write_bytes(b"not a png")
    return folder


def test_training_writes_a_bundle_with_its_manifest(tmp_path: Path, shots: Path) -> None:
    out = tmp_path / "hica"
    unlabelled = labelled_folder(tmp_path / "site", {"a": 5, "b": 5}, seed=7)
    report = train_hica.main(tiny_settings(tmp_path / "data"), LABEL_SET, shots, out, images_dir=unlabelled,
                             shots_per_class=2, config=QUICK, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == report.manifest
    assert manifest["format"] == "medzero-hica/1" and manifest["method"] == "hica"
    assert manifest["model_id"] == "medzero-tiny" and manifest["class_names"] == ["normal", "pneumonia"]
    assert manifest["images"]["shots"] == {"normal": 2, "pneumonia": 2} and manifest["images"]["unlabelled"] == 10
    assert [s["file"] for s in manifest["images"]["skipped"]] == [str(shots / "normal" / "broken.png")]
    assert manifest["tuning"]["mode"] == "lora" and manifest["config"]["seed"] == 3
    stage1 = manifest["metrics"]["stage1"]
    assert stage1["clusters"]["k"] == 8 and sum(stage1["clusters"]["sizes"]) == 10
    assert stage1["text"]["final_loss"] < stage1["text"]["first_loss"]
    assert [e["epoch"] for e in manifest["metrics"]["stage2"]["epochs"]] == [1, 2]
    accuracy = manifest["metrics"]["accuracy"]
    assert accuracy["shots"]["images"] == 4 and accuracy["held_out"]["images"] == 4
    assert manifest["temperature"] == pytest.approx(1 / 14.2857, rel=1e-3)     # the tiny model's 1 / logit scale
    digest = hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest()
    assert manifest["files"]["adapter.safetensors"]["sha256"] == digest
    tensors = load_file(out / "adapter.safetensors")
    assert tensors["class_embeddings"].shape == (2, manifest["embed_dim"])
    tower = sorted(n.removeprefix("tower.") for n in tensors if n.startswith("tower."))
    assert tower and all(".attn." in n and n.endswith((".lora_a", ".lora_b")) for n in tower)
    assert {n.rsplit(".lora_", 1)[0] for n in tower} == set(manifest["tuned_weights"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt", "stage1.pt"]


def test_untrained_hica_is_zero_shot_and_training_lowers_its_loss(tmp_path: Path, shots: Path) -> None:
    config = HiCAConfig(tuning=TuningConfig(lr=0.05, text_lr=0.02), pre=PreAdaptConfig(epochs=1, text_steps=20),
                        align=AlignConfig(epochs=6, batch_size=8), seed=1)

    async def run() -> None:
        async with Runtime.for_job(tiny_settings(tmp_path / "data"), progress=False) as runtime:
            head = await runtime.classifier.head(LABEL_SET)
            trainer = HiCATrainer(runtime.encoder, head, config, runtime.settings)
            descriptions, classes = description_features(runtime, head)
            paths = sorted(p for p in shots.rglob("*.png") if p.name != "broken.png")
            labelled = Shots(paths, [0 if p.parent.name == "normal" else 1 for p in paths])
            weights_before = {k: v.clone() for k, v in runtime.encoder.model.state_dict().items()}
            pixels = trainer._pixels(paths)
            fresh = init_trainable(trainer.visual, config.tuning, torch.Generator().manual_seed(0))
            with torch.no_grad():
                assert torch.allclose(trainer.features(pixels, fresh), runtime.encoder.encode_images(pixels),
                                      atol=1e-5)          # B = 0: the tuned tower starts as the loaded one

            result = trainer.train(descriptions, classes, paths, labelled, tmp_path / "checkpoints", resume=False,
                                   progress=False)
            stage1 = torch.load(tmp_path / "checkpoints" / "stage1.pt", weights_only=False)
            with torch.no_grad():
                before = trainer.align_terms(paths, torch.tensor(labelled.labels), descriptions, classes,
                                             stage1["trainable"], stage1["text_projection"]).total.item()
                after = trainer.align_terms(paths, torch.tensor(labelled.labels), descriptions, classes,
                                            result.trainable, result.text_projection).total.item()
            assert after < before
            assert not torch.equal(result.text_projection, stage1["text_projection"])
            assert any(not torch.equal(result.trainable[n], stage1["trainable"][n]) for n in result.trainable)
            assert all(torch.equal(v, weights_before[k]) for k, v in runtime.encoder.model.state_dict().items())
            assert all(p.requires_grad for p in runtime.encoder.model.parameters())   # restored after training

    asyncio.run(run())


def test_resume_after_an_interruption_ends_identical(tmp_path: Path, shots: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    train_hica.main(settings, LABEL_SET, shots, whole, config=QUICK, progress=False)
    train_hica.main(settings, LABEL_SET, shots, interrupted, config=QUICK, progress=False)
    for name in ("checkpoints/epoch-002.pt", "adapter.safetensors", "manifest.json"):   # killed during epoch 2
        (interrupted / name).unlink()
    train_hica.main(settings, LABEL_SET, shots, interrupted, config=QUICK, resume=True, progress=False)
    first, resumed = load_file(whole / "adapter.safetensors"), load_file(interrupted / "adapter.safetensors")
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)
    for name in ("adapter.safetensors", "manifest.json"):
        (interrupted / name).unlink()
    other = HiCAConfig(tuning=QUICK.tuning, pre=QUICK.pre, align=QUICK.align, seed=4)
    with pytest.raises(InvalidInput, match="another run"):
        train_hica.main(settings, LABEL_SET, shots, interrupted, config=other, resume=True, progress=False)


def test_cli_prints_the_run_and_keeps_a_bundle_without_force(tmp_path: Path, shots: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hica"
    args = ["train", "hica", "--label-set", LABEL_SET, "--shots", str(shots), "--out", str(out),
            "--shots-per-class", "3", "--text-steps", "10", "--pre-epochs", "1", "--epochs", "1", "--no-progress",
            "--model-name", "medzero-tiny", "--data-dir", str(tmp_path / "data")]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "stage 2 epoch | loss | global | local" in printed and "accuracy on the 2 held-out images" in printed
    before = {name: (out / name).read_bytes() for name in ("adapter.safetensors", "manifest.json")}
    assert cli([*args, "--seed", "9"]) == 1
    assert "--force" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert cli([*args, "--seed", "9", "--force"]) == 0
    assert (out / "adapter.safetensors").read_bytes() != before["adapter.safetensors"]
    assert cli([*args, "--shots-per-class", "9", "--force"]) == 1
    assert "has 4 usable images" in capsys.readouterr().err


def test_blocks_mode_trains_every_weight_of_the_last_block(tmp_path: Path, shots: Path) -> None:
    config = HiCAConfig(tuning=TuningConfig(mode="blocks", blocks=1), pre=QUICK.pre, align=QUICK.align)
    report = train_hica.main(tiny_settings(tmp_path / "data"), LABEL_SET, shots, tmp_path / "hica", config=config,
                             progress=False)
    tensors = load_file(tmp_path / "hica" / "adapter.safetensors")
    tower = [n.removeprefix("tower.") for n in tensors if n.startswith("tower.")]
    assert tower and len({n.split(".")[2] for n in tower}) == 1             # one block, transformer.resblocks.N
    assert any(".mlp." in n for n in tower) and any(n.endswith("bias") for n in tower)
    assert report.manifest["tuned_weights"] == sorted(tower)


def test_training_on_a_timm_trunk(tmp_path: Path, shots: Path) -> None:
    """BiomedCLIP's shape: a timm ViT inside open_clip's TimmModel, loaded through local-dir:."""
    model_dir = build_tiny_biomedclip(tmp_path / "biomedclip")
    settings = tiny_settings(tmp_path / "data", model_name=f"local-dir:{model_dir}", hub_offline=True)
    report = train_hica.main(settings, LABEL_SET, shots, tmp_path / "hica", config=QUICK, progress=False)
    assert report.manifest["model_id"] == f"local-dir:{model_dir}"
    assert all(n.startswith("trunk.blocks.") and ".attn." in n for n in report.manifest["tuned_weights"])


def test_medzero_eval_measures_a_loaded_hica_bundle(tmp_path: Path, shots: Path) -> None:
    """A bundle under MEDZERO_ADAPTERS_DIR is loaded at start-up and `medzero eval` scores method=hica through
    its tuned tower, beside zeroshot, on the same images."""
    settings = tiny_settings(tmp_path / "data")
    train_hica.main(settings, LABEL_SET, shots, settings.resolved_adapters_dir / "cxr-hica", config=QUICK,
                    progress=False)
    held_out = labelled_folder(tmp_path / "held-out", {"normal": 3, "pneumonia": 3}, seed=11)
    summary = evaluate.main(settings, held_out, LABEL_SET, tmp_path / "eval",
                            options=EvalOptions(methods=("zeroshot", "hica"), n_bootstrap=20, progress=False))
    rows = {row["name"]: row for row in summary["methods"]}
    assert set(rows) == {"zeroshot", "hica"}
    assert rows["hica"]["method"] == "hica" and "accuracy" in rows["hica"]["metrics"]
    assert not any("hica" in note for note in summary.get("notes", []))      # scored, not skipped for a 409
