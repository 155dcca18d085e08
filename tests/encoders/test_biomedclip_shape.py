"""The default model's shape, offline: a tiny BiomedCLIP (CustomTextCLIP = timm ViT + Hugging Face BERT + HFTokenizer,
context length 256) loads through `local-dir:` and the hub cache, and serves zeroshot and kpl over HTTP."""
import json
import shutil
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
from fastapi.testclient import TestClient
from open_clip.hf_model import ClsLastHiddenStatePooler, HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer
from PIL import Image

from app.encoders.loader import load_encoder
from app.knowledge.corpus import load_corpus_file
from app.settings import BUNDLED_KNOWLEDGE_BASE_DIR, Settings
from tests.conftest import running_app, tiny_settings
from tests.encoders.biomedclip_tiny import CONTEXT_LENGTH, EMBED_DIM, IMAGE_SIZE, PREPROCESS_CFG, build_tiny_biomedclip
from tests.factories import png_bytes

PROMPTS = ["a chest X-ray showing pneumonia.", "a fundus photo with no retinopathy.", "normal lungs"]


@pytest.fixture(scope="session")
def tiny_biomedclip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_biomedclip(tmp_path_factory.mktemp("tiny-biomedclip"), seed=1234)   # loader seeds 0


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """HF_HUB_OFFLINE=1, and an empty default cache: whatever loads here came from the files the test wrote."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-default-hub-cache")))


def count_tower_forwards() -> tuple[dict[str, int], torch.utils.hooks.RemovableHandle]:
    calls = {"visual": 0, "text": 0}

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, TimmModel):
            calls["visual"] += 1
        elif isinstance(module, HFTextEncoder):
            calls["text"] += 1
    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


def test_loads_as_biomedclip_does(tiny_biomedclip: Path, tmp_path: Path) -> None:
    """Model class, towers, tokenizer, preprocessing and weights are open_clip's BiomedCLIP path, not the ViT + text
    transformer the other tests use; load_encoder warmed both towers up before it returned."""
    calls, handle = count_tower_forwards()
    try:
        encoder = load_encoder(Settings(data_dir=tmp_path, model_name=f"local-dir:{tiny_biomedclip}", hub_offline=True))
    finally:
        handle.remove()
    assert calls["visual"] >= 1 and calls["text"] >= 1          # the warm-up forward, through each tower

    model = encoder.model
    assert type(model) is open_clip.CustomTextCLIP
    assert isinstance(model.visual, TimmModel) and isinstance(model.visual.trunk, timm.models.VisionTransformer)
    assert isinstance(model.visual.head.proj, torch.nn.Linear)                     # timm_proj "linear"
    assert isinstance(model.text, HFTextEncoder) and isinstance(model.text.transformer, transformers.BertModel)
    assert isinstance(model.text.pooler, ClsLastHiddenStatePooler)                 # hf_pooler_type
    assert isinstance(model.text.proj, torch.nn.Sequential)                        # hf_proj_type "mlp"
    saved = torch.load(tiny_biomedclip / "open_clip_pytorch_model.bin", weights_only=True)
    for name in ("visual.trunk.patch_embed.proj.weight", "text.transformer.embeddings.word_embeddings.weight"):
        torch.testing.assert_close(model.state_dict()[name], saved[name])          # the folder's weights, not a re-init
    assert encoder.model_id == f"local-dir:{tiny_biomedclip}" and encoder.has_pretrained_weights

    tokenizer = encoder.tokenizer
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.context_length == CONTEXT_LENGTH == 256
    tokens = tokenizer(PROMPTS)
    assert tokens.shape == (len(PROMPTS), CONTEXT_LENGTH)
    pieces = tokenizer.tokenizer.convert_ids_to_tokens(tokens[0].tolist())
    assert pieces[:9] == ["[CLS]", "a", "chest", "x", "-", "ray", "showing", "pneumonia", "."]
    assert tokenizer.tokenizer.unk_token_id not in tokens                          # wordpieces, never [UNK]

    normalize = next(t for t in encoder.preprocess.transforms if type(t).__name__ == "Normalize")
    assert list(normalize.mean) == PREPROCESS_CFG["mean"]                          # the folder's preprocess_cfg
    pixels = torch.stack([encoder.preprocess(Image.open(BytesIO(png_bytes(width=w, height=h)))) for w, h in
                          [(80, 60), (64, 64)]])
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    images, texts = encoder.encode_images(pixels), encoder.encode_texts(PROMPTS)
    assert images.shape == (2, EMBED_DIM) and texts.shape == (len(PROMPTS), EMBED_DIM) and encoder.embed_dim == 48
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(len(PROMPTS)))
    assert (texts @ texts.T).triu(diagonal=1).max() < 0.99        # the tokens reach the text tower


def hub_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """`files` copied into a hub cache as huggingface_hub lays it out (refs/main -> snapshots/<commit>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def cache_like_the_hub(cache: Path, model_dir: Path, *, with_text_tower_repo: bool) -> str:
    """The hub's BiomedCLIP layout: the open_clip repo names a second repo (its BERT) for the text tower."""
    snapshot = hub_snapshot(cache, "acme/tiny-biomedclip", model_dir)
    config = json.loads((snapshot / "open_clip_config.json").read_text())
    text_repo = "acme/tiny-pubmedbert"
    config["model_cfg"]["text_cfg"].update(hf_model_name=text_repo, hf_tokenizer_name=text_repo)
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    if with_text_tower_repo:
        hub_snapshot(cache, text_repo, model_dir.parent / "bert")
    return "hf-hub:acme/tiny-biomedclip"


def test_hub_cache_in_cache_dir_loads_offline(tiny_biomedclip: Path, tmp_path: Path) -> None:
    """MEDZERO_CACHE_DIR holding both repos is enough offline: open_clip's HF text tower reads its BERT config from
    the configured cache too, not only from huggingface_hub's default one (loader.hub_session)."""
    cache = tmp_path / "hub"
    model_name = cache_like_the_hub(cache, tiny_biomedclip, with_text_tower_repo=True)
    encoder = load_encoder(Settings(data_dir=tmp_path, model_name=model_name, cache_dir=cache, hub_offline=True))
    assert encoder.model_id == model_name and type(encoder.model) is open_clip.CustomTextCLIP
    assert isinstance(encoder.tokenizer, HFTokenizer) and encoder.tokenizer.context_length == 256
    assert encoder.encode_texts(PROMPTS).shape == (len(PROMPTS), EMBED_DIM)


@pytest.mark.parametrize("missing", ["text tower repo", "local-dir weights"])
def test_demo_serves_the_tiny_model_when_part_of_biomedclip_is_missing(tiny_biomedclip: Path, tmp_path: Path,
                                                                       missing: str) -> None:
    """--demo must fall back, not refuse to start, when only part of the model is on disk: the open_clip repo
    without its BERT repo, or a local-dir folder without weights."""
    if missing == "text tower repo":
        values = {"model_name": cache_like_the_hub(tmp_path / "hub", tiny_biomedclip, with_text_tower_repo=False),
                  "cache_dir": tmp_path / "hub"}
    else:
        folder = shutil.copytree(tiny_biomedclip, tmp_path / "no-weights")
        (folder / "open_clip_pytorch_model.bin").unlink()
        values = {"model_name": f"local-dir:{folder}"}
    assert load_encoder(Settings(data_dir=tmp_path, demo=True, **values)).model_id == "medzero-tiny"


# ---- over HTTP: one app for the module (start-up embeds the whole bundled knowledge base with this model) ----

@pytest.fixture(scope="module")
def client(tiny_biomedclip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with pytest.MonkeyPatch.context() as patch:           # the module fixture outlives the per-test offline_hub
        from huggingface_hub import constants
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        settings = tiny_settings(tmp_path_factory.mktemp("biomedclip-app"), model_name=f"local-dir:{tiny_biomedclip}")
        with running_app(settings) as c:
            yield c


def classify(client: TestClient, label_set: str, method: str, data: bytes | None = None) -> dict:
    response = client.post("/classify", data={"label_set": label_set, "method": method},
                           files={"file": ("x.png", data or png_bytes())})
    assert response.status_code == 200, response.text
    return response.json()


def test_ready_with_the_local_dir_model_and_its_index(client: TestClient, tiny_biomedclip: Path) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == f"local-dir:{tiny_biomedclip}"
    kb = client.get("/kb").json()
    assert kb["model_id"] == f"local-dir:{tiny_biomedclip}" and kb["dim"] == EMBED_DIM and kb["count"] > 1000


def test_new_label_set_classifies_zeroshot(client: TestClient, tiny_biomedclip: Path) -> None:
    knee = {"name": "knee-oa", "modality": "knee-xray",
            "templates": ["a knee X-ray showing {}.", "a radiograph of a knee with {}."],
            "classes": [{"name": "normal", "display_name": "a normal knee joint"},
                        {"name": "osteoarthritis", "synonyms": ["joint space narrowing", "osteophytes"]},
                        {"name": "fracture"}]}
    created = client.post("/labels", json=knee)
    assert created.status_code == 201, created.text
    body = classify(client, "knee-oa", "zeroshot")
    assert body["model"] == f"local-dir:{tiny_biomedclip}" and body["method"] == "zeroshot"
    assert sorted(p["label"] for p in body["predictions"]) == ["fracture", "normal", "osteoarthritis"]
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_per_image_kpl_explains_with_bundled_descriptions(client: TestClient, tiny_biomedclip: Path) -> None:
    corpus = load_corpus_file(BUNDLED_KNOWLEDGE_BASE_DIR / "chest-xray-covid.json")
    body = classify(client, "chest-xray-covid", "kpl")
    assert body["model"] == f"local-dir:{tiny_biomedclip}" and len(body["predictions"]) == len(corpus.classes) == 3
    for prediction in body["predictions"]:
        evidence = prediction["evidence"]
        assert evidence["proxy"] == "per-image" and len(evidence["descriptions"]) == 8
        assert {d["text"] for d in evidence["descriptions"]} <= set(corpus.texts(prediction["label"]))
        assert all(-1.0 <= d["similarity"] <= 1.0 for d in evidence["descriptions"])


def test_kpl_fit_on_a_pool_then_classifies_with_it(client: TestClient, tiny_biomedclip: Path) -> None:
    rng = np.random.default_rng(0)
    pool = [("files", (f"pool{i}.png", png_bytes(width=int(rng.integers(40, 90)), height=int(rng.integers(40, 90)),
                                                 mode="L" if i % 2 else "RGB"))) for i in range(6)]
    fitted = client.post("/labels/chest-xray-pneumonia/kpl", files=pool)
    assert fitted.status_code == 201, fitted.text
    assert fitted.json()["model"] == f"local-dir:{tiny_biomedclip}" and fitted.json()["pool_size"] == 6
    body = classify(client, "chest-xray-pneumonia", "kpl")
    assert len(body["predictions"]) == 2 and body["model"] == f"local-dir:{tiny_biomedclip}"
    assert all(p["evidence"]["proxy"] == "fitted" for p in body["predictions"])
