"""Image-tower engines on the tiny model: each named engine gives torch fp32's embeddings; `auto` measures the
candidates, never keeps one slower than torch or below the quality bar, caches graphs and verdict per weights,
and the server says which engine runs and why."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from app.encoders.engines import (
    MIN_MEAN_COSINE,
    NOT_THE_BOTTLENECK_IMAGES_PER_SECOND,
    EngineChoice,
    ProbeResult,
    candidates,
    choose,
    parse_engine,
    weights_digest,
)
from app.encoders.loader import load_encoder
from app.errors import ModelLoadError
from app.settings import CPU_MAX_BATCH_SIZE
from tests.conftest import metric, running_app, tiny_settings
from tests.factories import png_bytes


def pixels_of(encoder, count: int = 4) -> torch.Tensor:
    images = [Image.new("RGB", (90 + 10 * i, 70), (30 * i, 120, 200 - 20 * i)) for i in range(count)]
    return torch.stack([encoder.preprocess(image) for image in images])


def test_engine_settings_are_parsed_or_refused_by_name() -> None:
    assert parse_engine("auto") is None
    assert parse_engine("openvino:bf16") == EngineChoice("openvino", "bf16")
    assert parse_engine("onnxruntime").spec == "onnxruntime"
    for bad in ("tensorrt", "onnxruntime:bf16", "torch:fp8"):
        with pytest.raises(ModelLoadError, match="MEDZERO_ENGINE"):
            parse_engine(bad)


def test_candidates_follow_the_cpu() -> None:
    with_bf16 = {c.spec for c in candidates({"avx2", "avx512f", "avx512_bf16"})}
    avx2_only = {c.spec for c in candidates({"avx2", "fma"})}
    assert "openvino:bf16" in with_bf16 and not {"torch:int8", "onnxruntime:int8"} & with_bf16
    assert "openvino:bf16" not in avx2_only and {"torch:int8", "onnxruntime:int8"} <= avx2_only
    assert {"torch", "onnxruntime", "openvino", "openvino:int8"} <= with_bf16 & avx2_only


def test_auto_keeps_the_fastest_that_meets_the_bar_and_never_one_slower_than_torch() -> None:
    torch_fp32 = ProbeResult("torch", 10.0, 1.0, 1.0)
    fast_but_wrong = ProbeResult("onnxruntime:int8", 50.0, 0.987, 0.95)      # u8 x s8 saturation
    good = ProbeResult("openvino:bf16", 24.0, 0.99996, 0.9999)
    not_built = ProbeResult("openvino", None, None, None, "ImportError: no openvino")
    assert choose([torch_fp32, fast_but_wrong, good, not_built])[0] == "openvino:bf16"
    assert choose([torch_fp32, fast_but_wrong, not_built])[0] == "torch"
    slower = ProbeResult("openvino", 9.0, 1.0, 1.0)
    barely = ProbeResult("onnxruntime", 10.2, 1.0, 1.0)                    # within the probe's noise
    spec, reason = choose([torch_fp32, slower, barely])
    assert spec == "torch" and "torch fp32" in reason
    # a tower so small that torch already outruns the HTTP path: a faster engine cannot help requests
    tiny = ProbeResult("torch", NOT_THE_BOTTLENECK_IMAGES_PER_SECOND * 2, 1.0, 1.0)
    spec, reason = choose([tiny, ProbeResult("openvino:bf16", NOT_THE_BOTTLENECK_IMAGES_PER_SECOND * 5, 0.99999, 0.9999)])
    assert spec == "torch" and "faster than the server" in reason


@pytest.mark.parametrize("spec", ["onnxruntime", "openvino", "openvino:bf16", "openvino:int8", "torch:int8",
                                  "onnxruntime:int8"])
def test_each_engine_gives_torch_fp32s_embeddings(tmp_path: Path, spec: str) -> None:
    reference = load_encoder(tiny_settings(tmp_path))
    engine = load_encoder(tiny_settings(tmp_path, engine=spec))
    assert engine.image_engine.choice.spec == spec and reference.image_engine.choice.spec == "torch"
    pixels = pixels_of(reference)
    cosine = F.cosine_similarity(engine.encode_images(pixels), reference.encode_images(pixels), dim=-1)
    bar = 0.99 if spec == "onnxruntime:int8" else MIN_MEAN_COSINE    # int8 on a random-init tower: looser
    assert float(cosine.min()) >= bar, cosine
    assert [r.spec for r in engine.image_engine.probe] == [spec]           # checked once against fp32
    if spec == "openvino:int8":    # NNCF compressed the weights once, into the cache a restart reuses
        [cache] = (tmp_path / "engines").iterdir()
        assert (cache / "image_tower.int8.xml").is_file() and (cache / "image_tower.int8.bin").stat().st_size > 0


def test_auto_probes_once_and_a_warm_restart_reuses_the_graphs_and_the_verdict(tmp_path: Path) -> None:
    first = load_encoder(tiny_settings(tmp_path, engine="auto"))
    probed = {r.spec for r in first.image_engine.probe}
    assert {"torch", "onnxruntime", "openvino"} <= probed
    chosen = next(r for r in first.image_engine.probe if r.spec == first.image_engine.choice.spec)
    baseline = next(r for r in first.image_engine.probe if r.spec == "torch")
    assert chosen.spec == "torch" or (chosen.meets_bar() and chosen.images_per_second > baseline.images_per_second)
    [cache] = (tmp_path / "engines").iterdir()
    graph = cache / "image_tower.onnx"
    stamp = graph.stat().st_mtime_ns
    assert (cache / "probe.json").is_file()

    again = load_encoder(tiny_settings(tmp_path, engine="auto"))
    assert again.image_engine.choice == first.image_engine.choice
    assert again.image_engine.reason.endswith("(probe cached)") and graph.stat().st_mtime_ns == stamp
    pixels = pixels_of(first)
    assert torch.allclose(again.encode_images(pixels), first.encode_images(pixels), atol=1e-6)


def test_the_cache_is_keyed_by_the_weights(tmp_path: Path) -> None:
    encoder = load_encoder(tiny_settings(tmp_path))
    digest = weights_digest(encoder.model.visual)
    with torch.no_grad():
        next(encoder.model.visual.parameters()).add_(1e-3)
    assert weights_digest(encoder.model.visual) != digest


def test_the_server_says_which_engine_runs_and_why(tmp_path: Path) -> None:
    with running_app(tiny_settings(tmp_path, engine="onnxruntime")) as client:
        ready = client.get("/readyz").json()
        assert ready["engine"]["engine"] == "onnxruntime" and ready["engine"]["reason"] == "MEDZERO_ENGINE=onnxruntime"
        assert ready["startup_seconds"] > 0
        assert ready["engine"]["max_batch_size"] == CPU_MAX_BATCH_SIZE     # MEDZERO_MAX_BATCH_SIZE unset: the CPU's
        assert metric(client, "medzero_image_engine_info", engine="onnxruntime", precision="fp32",
                      reason="MEDZERO_ENGINE=onnxruntime") == 1.0
        answer = client.post("/classify", data={"label_set": "chest-xray-pneumonia"},
                             files={"file": ("x.png", png_bytes())})
        assert answer.status_code == 200
