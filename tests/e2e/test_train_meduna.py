"""`medzero train meduna` on the tiny model: stage 1 on the bundled descriptions, stage 2 on generated images,
the bundle it writes, --resume and --force."""
import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from app.__main__ import main as cli
from app.encoders.visual_prompts import prompts_inserted
from app.errors import InvalidInput
from app.jobs import train_meduna
from app.jobs.train_meduna import MedUnAConfig
from app.jobs.training import description_features
from app.methods.meduna import ImageStageConfig, TextStageConfig, stage2_loss
from app.runtime import Runtime
from tests.conftest import tiny_settings
from tests.encoders.biomedclip_tiny import build_tiny_biomedclip
from tests.factories import labelled_folder

pytestmark = pytest.mark.e2e
LABEL_SET = "chest-xray-pneumonia"
QUICK = MedUnAConfig(text=TextStageConfig(steps=40), image=ImageStageConfig(n_prompt_tokens=4, epochs=2,
                                                                            batch_size=5), seed=3)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = labelled_folder(tmp_path / "images", {"normal": 6, "pneumonia": 6})
    (folder / "normal" / "broken.png").write_bytes(b"not a png")
    return folder


def test_training_writes_a_bundle_with_its_manifest(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "adapter"
    report = train_meduna.main(tiny_settings(tmp_path / "data"), LABEL_SET, images, out, config=QUICK,
                               progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == report.manifest
    assert manifest["model_id"] == "medzero-tiny" and manifest["label_set_version"] == 1
    assert manifest["class_names"] == ["normal", "pneumonia"] and manifest["corpus_hash"]
    assert manifest["config"]["text"]["steps"] == 40 and manifest["config"]["image"]["n_prompt_tokens"] == 4
    assert manifest["images"]["used"] == 12 and [s["file"] for s in manifest["images"]["skipped"]] == [
        str(images / "normal" / "broken.png")]
    stage1, stage2 = manifest["metrics"]["stage1"], manifest["metrics"]["stage2"]
    assert stage1["final_loss"] < stage1["first_loss"] and 0 <= stage1["train_accuracy"] <= 1
    assert [e["epoch"] for e in stage2["epochs"]] == [1, 2]
    assert set(stage2["epochs"][0]["pseudo_label_balance"]) == {"normal", "pneumonia"}
    assert set(manifest["metrics"]["labelled_accuracy"]) == {"images", "zeroshot", "stage1", "stage2"}
    digest = hashlib.sha256((out / "adapter.safetensors").read_bytes()).hexdigest()
    assert manifest["files"]["adapter.safetensors"]["sha256"] == digest
    tensors = load_file(out / "adapter.safetensors")
    assert tensors["adapter"].shape == (2, manifest["embed_dim"])
    assert tensors["prompt_tokens"].shape == (4, manifest["vision_width"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-001.pt", "epoch-002.pt", "stage1.pt"]


def test_resume_after_an_interruption_ends_identical(tmp_path: Path, images: Path) -> None:
    settings = tiny_settings(tmp_path / "data")
    whole = tmp_path / "whole"
    train_meduna.main(settings, LABEL_SET, images, whole, config=QUICK, progress=False)
    interrupted = tmp_path / "interrupted"
    train_meduna.main(settings, LABEL_SET, images, interrupted, config=QUICK, progress=False)
    # as if killed during epoch 2: its checkpoint and the results were never written
    for name in ("checkpoints/epoch-002.pt", "adapter.safetensors", "manifest.json"):
        (interrupted / name).unlink()
    train_meduna.main(settings, LABEL_SET, images, interrupted, config=QUICK, resume=True, progress=False)
    first, resumed = load_file(whole / "adapter.safetensors"), load_file(interrupted / "adapter.safetensors")
    assert torch.equal(first["adapter"], resumed["adapter"])
    assert torch.equal(first["prompt_tokens"], resumed["prompt_tokens"])
    other = MedUnAConfig(text=QUICK.text, image=QUICK.image, seed=4)
    (interrupted / "manifest.json").unlink()
    (interrupted / "adapter.safetensors").unlink()
    with pytest.raises(InvalidInput, match="another run"):
        train_meduna.main(settings, LABEL_SET, images, interrupted, config=other, resume=True, progress=False)


def test_an_existing_bundle_is_kept_without_force(tmp_path: Path, images: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "adapter"
    args = ["train", "meduna", "--label-set", LABEL_SET, "--images", str(images), "--out", str(out),
            "--text-steps", "20", "--prompt-tokens", "2", "--epochs", "1", "--batch-size", "6", "--no-progress",
            "--model-name", "medzero-tiny", "--data-dir", str(tmp_path / "data")]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert "stage 1: loss" in printed and "labelled accuracy on 12 images" in printed
    before = {name: (out / name).read_bytes() for name in ("adapter.safetensors", "manifest.json")}
    assert cli([*args, "--seed", "9"]) == 1
    assert "--force" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert cli([*args, "--seed", "9", "--force"]) == 0
    assert (out / "adapter.safetensors").read_bytes() != before["adapter.safetensors"]


def test_stage2_lowers_the_loss_moves_the_prompts_and_leaves_the_encoder_alone(tmp_path: Path,
                                                                               images: Path) -> None:
    config = MedUnAConfig(text=TextStageConfig(steps=40),
                          image=ImageStageConfig(n_prompt_tokens=4, epochs=3, batch_size=6, lr=0.5), seed=1)

    async def run() -> None:
        async with Runtime.for_job(tiny_settings(tmp_path / "data"), progress=False) as runtime:
            head = await runtime.classifier.head(LABEL_SET)
            trainer = train_meduna.MedUnATrainer(runtime.encoder, head, config, runtime.settings)
            features, labels = description_features(runtime, head)
            paths, _ = trainer.usable_images(sorted(images.rglob("*.png")))
            weights_before = {k: v.clone() for k, v in runtime.encoder.model.state_dict().items()}
            pixels = torch.stack([trainer.weak(trainer._decode(p)) for p in paths])   # a fixed view to score on

            def loss_of(prompts: torch.Tensor, adapter: torch.Tensor, teacher: torch.Tensor) -> float:
                with torch.no_grad(), prompts_inserted(trainer.visual, prompts):
                    student = F.normalize(runtime.encoder.model.encode_image(pixels), dim=-1) @ adapter.T
                return float(stage2_loss(student, teacher)[0])

            result = trainer.train(features, labels, paths, tmp_path / "checkpoints", resume=False,
                                   progress=False)
            stage1 = torch.load(tmp_path / "checkpoints" / "stage1.pt", weights_only=False)
            teacher = trainer._teacher_logits(paths, result.stage1_weight, progress=False)
            before = loss_of(stage1["prompt_tokens"], result.stage1_weight, teacher)
            after = loss_of(result.prompt_tokens, result.adapter_weight, teacher)
            assert after < before
            assert not torch.equal(result.prompt_tokens, stage1["prompt_tokens"])
            assert not torch.equal(result.adapter_weight, result.stage1_weight)
            assert all(torch.equal(v, weights_before[k]) for k, v in runtime.encoder.model.state_dict().items())
            assert all(p.requires_grad for p in runtime.encoder.model.parameters())   # restored after training

    asyncio.run(run())


def test_training_on_a_timm_trunk(tmp_path: Path, images: Path) -> None:
    """BiomedCLIP's shape: a timm ViT inside open_clip's TimmModel, loaded through local-dir:."""
    model_dir = build_tiny_biomedclip(tmp_path / "biomedclip")
    settings = tiny_settings(tmp_path / "data", model_name=f"local-dir:{model_dir}", hub_offline=True)
    report = train_meduna.main(settings, LABEL_SET, images, tmp_path / "adapter", config=QUICK, progress=False)
    assert report.manifest["model_id"] == f"local-dir:{model_dir}"
    assert load_file(tmp_path / "adapter" / "adapter.safetensors")["prompt_tokens"].shape[0] == 4
