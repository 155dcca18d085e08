"""A zero-shot CLIP classifier written the obvious way: the peer `benchmarks/throughput.py --compare` measures
medzero against. FastAPI + open_clip, one request -> one decode -> one fp32 forward, no batching, no queue.

    .venv/bin/python benchmarks/peers/plain_server.py --model-name medzero-tiny --port 8100
    curl -s -F file=@chest.png http://127.0.0.1:8100/classify

The class prompts are fixed and embedded once at start-up; each POST /classify decodes the uploaded `file` with
Pillow, runs open_clip's preprocess and `encode_image` under torch.inference_mode, and answers the softmax over
the prompts. The endpoint is a plain `def`, so FastAPI runs it in its thread pool and the event loop stays free
(what FastAPI's documentation says to do with blocking work); nothing else is tuned. The model directory's
configs (`models/*.json`) are registered, so `--model-name medzero-tiny` serves the tiny random-init model, seeded
as medzero seeds it.
"""
import argparse
from io import BytesIO
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CLASS_PROMPTS = {   # chest-xray-pneumonia's classes, one prompt each
    "normal": "a chest X-ray of healthy lungs.",
    "pneumonia": "a chest X-ray showing pneumonia.",
}


def create_app(model_name: str, pretrained: str | None, device: str) -> FastAPI:
    open_clip.add_model_config(REPO_ROOT / "models")    # medzero-tiny and the other bundled configs
    torch.manual_seed(0)                                # random-init configs get medzero's weights
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.inference_mode():
        class_features = F.normalize(model.encode_text(tokenizer(list(CLASS_PROMPTS.values())).to(device)), dim=-1)
        logit_scale = model.logit_scale.exp().clamp(max=100.0)
    app = FastAPI(title="plain open_clip classifier")

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "model": model_name, "device": device,
                "engine": {"engine": "torch", "precision": "fp32"}}

    @app.post("/classify")
    def classify(file: UploadFile) -> dict:
        try:
            image = Image.open(BytesIO(file.file.read())).convert("RGB")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
            raise HTTPException(status_code=422, detail=f"not a readable image ({type(exc).__name__})") from exc
        pixels = preprocess(image).unsqueeze(0).to(device)   # (1, 3, H, W)
        with torch.inference_mode():
            image_features = F.normalize(model.encode_image(pixels), dim=-1)   # (1, dim)
            probabilities = (logit_scale * image_features @ class_features.T).softmax(dim=-1)[0]
        return {"model": model_name,
                "probabilities": dict(zip(CLASS_PROMPTS, (round(float(p), 6) for p in probabilities), strict=True))}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", default="medzero-tiny", help="open_clip model id")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint path")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    app = create_app(args.model_name, args.pretrained, device)   # loaded before the port opens: up means ready
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
