"""The real open_clip loading paths, with tiny configs: built-in name, checkpoint file, local-dir, hf-hub cache."""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from app.encoders.loader import load_encoder, model_id_for
from app.errors import ModelLoadError
from app.settings import BUNDLED_MODEL_DIR, Settings


def settings(tmp_path: Path, **values) -> Settings:
    return Settings(data_dir=tmp_path, **{"model_name": "medzero-tiny", **values})


def test_tiny_model_loads_deterministically(tmp_path: Path) -> None:
    first, second = load_encoder(settings(tmp_path)), load_encoder(settings(tmp_path))
    texts = first.encode_texts(["a chest X-ray showing pneumonia.", "normal lungs"])
    assert texts.shape == (2, 64)
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts, second.encode_texts(["a chest X-ray showing pneumonia.", "normal lungs"]))
    assert first.model_id == "medzero-tiny" and not first.has_pretrained_weights


def save_checkpoint(path: Path, seed: int) -> torch.nn.Module:
    open_clip.add_model_config(BUNDLED_MODEL_DIR)
    torch.manual_seed(seed)
    model = open_clip.create_model("medzero-tiny")
    torch.save({"state_dict": model.state_dict()}, path)
    return model.eval()


def test_checkpoint_file_is_loaded(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny.pt"
    trained = save_checkpoint(checkpoint, seed=123)
    encoder = load_encoder(settings(tmp_path, pretrained=str(checkpoint)))
    torch.testing.assert_close(encoder.model.visual.conv1.weight, trained.visual.conv1.weight)
    assert encoder.has_pretrained_weights
    assert encoder.model_id.startswith("medzero-tiny@tiny.pt#")
    before = model_id_for("medzero-tiny", str(checkpoint))
    save_checkpoint(checkpoint, seed=7)                 # replaced weights -> new id -> embeddings recomputed
    assert model_id_for("medzero-tiny", str(checkpoint)) != before


def test_local_dir_and_hf_hub_cache_are_loaded(tmp_path: Path) -> None:
    """The open_clip `local-dir:` and `hf-hub:` schemas, the latter from a hub cache laid out as
    huggingface_hub lays it out (no network: a hit in the cache is all it needs)."""
    config = json.loads((BUNDLED_MODEL_DIR / "medzero-tiny.json").read_text())
    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    trained = save_checkpoint(folder / "open_clip_pytorch_model.bin", seed=5)
    from_dir = load_encoder(settings(tmp_path, model_name=f"local-dir:{folder}"))
    torch.testing.assert_close(from_dir.model.visual.conv1.weight, trained.visual.conv1.weight)

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy(folder / name, snapshot / name)
    (cache / "models--acme--tiny-clip" / "refs").mkdir()
    (cache / "models--acme--tiny-clip" / "refs" / "main").write_text("0" * 40)
    demo = settings(tmp_path, model_name="hf-hub:acme/tiny-clip", cache_dir=cache, demo=True)
    from_hub = load_encoder(demo)
    assert from_hub.model_id == "hf-hub:acme/tiny-clip"      # demo mode kept the real weights it found on disk
    torch.testing.assert_close(from_hub.model.visual.conv1.weight, trained.visual.conv1.weight)


def test_demo_falls_back_to_the_tiny_model_without_touching_the_network(tmp_path: Path) -> None:
    encoder = load_encoder(settings(tmp_path, model_name="hf-hub:acme/not-downloaded", cache_dir=tmp_path, demo=True))
    assert encoder.model_id == "medzero-tiny"


@pytest.mark.parametrize("values, fragment", [
    ({"model_name": "ViT-Nope-99"}, "MEDZERO_MODEL_NAME"),
    ({"pretrained": "/no/such/weights.pt"}, "MEDZERO_PRETRAINED"),
    ({"model_name": "ViT-B-16", "pretrained": "not-a-tag"}, "known tags"),
    ({"model_name": "local-dir:/no/such/dir"}, "open_clip_config.json"),
    ({"device": "cuda"}, "MEDZERO_DEVICE"),
])
def test_load_failures_name_the_setting(tmp_path: Path, values: dict, fragment: str) -> None:
    if values.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(ModelLoadError, match=fragment):
        load_encoder(settings(tmp_path, **values))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="MEDZERO_PRETRAINED"):
        load_encoder(settings(tmp_path, pretrained=str(broken)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lower_precision_gives_nearly_the_fp32_embeddings(tmp_path: Path, precision: str) -> None:
    full = load_encoder(settings(tmp_path))
    reduced = load_encoder(settings(tmp_path, precision=precision))
    assert reduced.model.visual.conv1.weight.dtype == reduced.dtype != torch.float32
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    agreement = (full.encode_images(pixels) * reduced.encode_images(pixels)).sum(dim=-1)   # cosine, unit vectors
    assert reduced.encode_images(pixels).dtype == torch.float32
    assert agreement.min() > 0.98
