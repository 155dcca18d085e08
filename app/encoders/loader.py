"""Load an open_clip model the open_clip way and wrap it as an Encoder: images/texts in, unit vectors out.

Model ids stay open_clip strings: a built-in or models/*.json name (+ `pretrained` tag or checkpoint file),
`hf-hub:org/repo`, or `local-dir:/path`. Every way loading can fail ends in one ModelLoadError that names the
setting to change.
"""
import ctypes
import ctypes.util
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import parse_model_name
from PIL import Image

from app.bundles.model_bundle import imported_model_id
from app.encoders.engines import ImageEngine, select_engine
from app.encoders.tower_variants import TowerVariant
from app.errors import ModelLoadError
from app.settings import DEMO_MODEL_NAME, Settings

log = logging.getLogger(__name__)

_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HF_CONFIG_NAME = "open_clip_config.json"
_HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")   # what open_clip takes from a local-dir folder


@dataclass
class Encoder:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]   # PIL image -> (3, H, W) float tensor
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    model_id: str                                       # the open_clip id, plus the weights it was loaded with
    device: torch.device
    dtype: torch.dtype
    has_pretrained_weights: bool
    image_engine: ImageEngine | None = None             # MEDZERO_ENGINE's forward of the image tower (no variant)

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        # CLIP learns log(1/temperature) and clamps it at 100 (open_clip's ClipLoss does the same)
        return min(float(scale.detach().exp()), 100.0) if scale is not None else 100.0

    @property
    def embed_dim(self) -> int:
        return int(self.encode_texts(["x"]).shape[-1])

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, variant: TowerVariant | None = None) -> torch.Tensor:
        """(n, 3, H, W) preprocessed pixels -> (n, dim) float32 on the CPU, L2-normalised; with `variant` the
        vision tower runs changed as a method's state says (a MedUnA adapter's prompt tokens, HiCA's tuned
        weights)."""
        if self.device.type == "cuda":   # page-locked, so the copy to the GPU is one DMA instead of staged
            images = images.pin_memory()
        pixels = images.to(self.device, self.dtype, non_blocking=True)
        if variant is None and self.image_engine is not None:
            features = self.image_engine.forward(pixels)
        elif variant is None:
            features = self.model.encode_image(pixels)
        else:
            features = variant.image_features(self.model.visual, pixels)
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """n strings -> (n, dim) float32 on the CPU, L2-normalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu()

    def warm_up(self) -> None:
        """One forward through each tower, so the first request does not pay for lazy initialisation."""
        pixels = self.preprocess(Image.new("RGB", (256, 256), (128, 128, 128))).unsqueeze(0)
        self.encode_images(pixels)
        self.encode_texts(["a chest X-ray."])


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("MEDZERO_DEVICE=cuda but no CUDA device is visible; set MEDZERO_DEVICE=auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def weights_on_disk(model_name: str, pretrained: str | None, cache_dir: Path | None) -> bool:
    """Whether real weights for this model id can be loaded without the network (checks caches only)."""
    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        folder = Path(identifier)
        return ((folder / _HF_CONFIG_NAME).is_file()
                and any(path.suffix in _CHECKPOINT_SUFFIXES for path in folder.iterdir())
                and _text_tower_on_disk(folder / _HF_CONFIG_NAME, tokenizer_folder=folder, cache_dir=cache_dir))
    if schema == "hf-hub":
        config = _cached_path(identifier, _HF_CONFIG_NAME, cache_dir)
        return (config is not None and any(_in_hf_cache(identifier, name, cache_dir) for name in _HF_WEIGHT_NAMES)
                and _text_tower_on_disk(config, tokenizer_folder=None, cache_dir=cache_dir))
    if not pretrained:
        return False
    if Path(pretrained).is_file():
        return True
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    hub_repo = (tag_cfg.get("hf_hub") or "").rstrip("/")
    return bool(hub_repo) and any(_in_hf_cache(hub_repo, name, cache_dir) for name in _HF_WEIGHT_NAMES)


def _text_tower_on_disk(config_file: Path, tokenizer_folder: Path | None, cache_dir: Path | None) -> bool:
    """A Hugging Face text tower (BiomedCLIP's BERT) lives in another repo, text_cfg.hf_model_name: open_clip reads
    its config.json to build the model. The tokenizer comes from hf_tokenizer_name, or for a local-dir model from
    the folder itself. Those files must be on disk too, or an offline load fails after all."""
    try:
        text_cfg = json.loads(config_file.read_text(encoding="utf-8"))["model_cfg"].get("text_cfg", {})
    except (OSError, ValueError, KeyError, AttributeError):
        return True                             # a broken config: loading it says what is wrong
    needed = []
    if text_cfg.get("hf_model_name"):
        needed.append((text_cfg["hf_model_name"], ("config.json",)))
    if text_cfg.get("hf_tokenizer_name"):
        needed.append((tokenizer_folder or text_cfg["hf_tokenizer_name"], _HF_TOKENIZER_NAMES))
    return all(any(_on_disk(str(source), name, cache_dir) for name in names) for source, names in needed)


def _on_disk(source: str, filename: str, cache_dir: Path | None) -> bool:
    """`source` as transformers' from_pretrained reads it: a folder, else a hub repo id."""
    return (Path(source) / filename).is_file() if Path(source).is_dir() else _in_hf_cache(source, filename, cache_dir)


def _in_hf_cache(repo_id: str, filename: str, cache_dir: Path | None) -> bool:
    return _cached_path(repo_id, filename, cache_dir) is not None


def _cached_path(repo_id: str, filename: str, cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except HFValidationError:                   # not a repo id either: a folder that does not exist
        return None
    return Path(found) if isinstance(found, str) else None


def choose_model(settings: Settings) -> tuple[str, str | None, bool]:
    """(model_name, pretrained, offline): the configured model, or in demo mode the tiny bundled model whenever
    the configured weights are not on this machine. Demo never waits on an unreachable hub: weights it found
    in the cache are loaded offline."""
    if not settings.demo or settings.model_name == DEMO_MODEL_NAME:
        return settings.model_name, settings.pretrained, settings.hub_offline
    if weights_on_disk(settings.model_name, settings.pretrained, settings.cache_dir):
        return settings.model_name, settings.pretrained, True
    log.warning("demo mode: no weights for %s on this machine; serving the bundled random-init %r "
                "(predictions are meaningless; see README 'Real weights')", settings.model_name, DEMO_MODEL_NAME)
    return DEMO_MODEL_NAME, None, True


@contextmanager
def hub_session(offline: bool, cache_dir: Path | None) -> Iterator[None]:
    """huggingface_hub reads these on every request. Offline, cached files are used without a round trip. A
    configured cache is also made the default one while loading: open_clip hands cache_dir to its own downloads
    and the tokenizer, but its HF text tower looks config.json up in the default cache, so BiomedCLIP's BERT config
    would be fetched into, and later looked for in, another cache than the rest of the model."""
    from huggingface_hub import constants
    previous = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE = previous[0] or offline
    if cache_dir is not None:
        constants.HF_HUB_CACHE = str(cache_dir)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = previous


def release_freed_memory() -> None:
    """Hand the heap glibc kept after loading, exporting and compiling back to the OS (hundreds of MiB for a
    ViT-B-16 ONNX export): the resident size a container's memory limit sees. A no-op without glibc."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def load_encoder(settings: Settings) -> Encoder:
    """Build the configured open_clip model on the configured device and precision, and warm it up."""
    open_clip.add_model_config(settings.model_config_dir)
    model_name, pretrained, offline = choose_model(settings)
    device = resolve_device(settings.device)
    _check_model_source(model_name, pretrained)
    schema, _ = parse_model_name(model_name)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.manual_seed(0)   # random-init models (the tiny demo config) get the same weights on every start
    started = time.perf_counter()
    cache_dir = str(settings.cache_dir) if settings.cache_dir else None
    try:
        with hub_session(offline, settings.cache_dir):
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device, precision=settings.precision,
                cache_dir=cache_dir, require_pretrained=schema is not None or pretrained is not None)
            tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except Exception as exc:   # open_clip raises RuntimeError, OSError, ValueError and hub errors alike
        raise ModelLoadError(_explain_load_failure(model_name, pretrained, exc)) from exc
    encoder = Encoder(model=model.eval(), preprocess=preprocess, tokenizer=tokenizer,
                      model_id=model_id_for(model_name, pretrained), device=device,
                      dtype=_PRECISION_DTYPES[settings.precision],
                      has_pretrained_weights=schema is not None or pretrained is not None)
    try:
        encoder.warm_up()
    except RuntimeError as exc:
        raise ModelLoadError(f"warm-up forward failed on {device} at MEDZERO_PRECISION={settings.precision}: "
                             f"{exc}. Try MEDZERO_PRECISION=fp32 (fp16 is for CUDA).") from exc
    pixel_shape = tuple(encoder.preprocess(Image.new("RGB", (256, 256))).unsqueeze(0).shape)
    encoder.image_engine = select_engine(settings.engine, model.visual, model_id=encoder.model_id,
                                         pixel_shape=pixel_shape, cache_root=settings.data_dir / "engines",
                                         threads=torch.get_num_threads(),
                                         batch=min(settings.resolved_max_batch_size(device.type), 8),
                                         device=device, precision=settings.precision)
    encoder.warm_up()                                  # once more, through the engine requests will use
    release_freed_memory()
    log.info("loaded %s on %s (%s) in %.1f s; image engine %s: %s", encoder.model_id, device, settings.precision,
             time.perf_counter() - started, encoder.image_engine.choice.spec, encoder.image_engine.reason)
    return encoder


def model_id_for(model_name: str, pretrained: str | None) -> str:
    """A stable key for 'these weights': cached text embeddings are only reused under the same key.
    A checkpoint file is keyed by its name, size and modification time, so replacing it invalidates caches."""
    if not pretrained:
        return imported_model_id(model_name) or model_name
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        stamp = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return f"{model_name}@{path.name}#{stamp}"
    return f"{model_name}@{pretrained}"


def _check_model_source(model_name: str, pretrained: str | None) -> None:
    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir" and not (Path(identifier) / _HF_CONFIG_NAME).is_file():
        raise ModelLoadError(f"MEDZERO_MODEL_NAME={model_name!r}: no {_HF_CONFIG_NAME} in {identifier}; point it "
                             "at a folder holding open_clip_config.json and the weights")
    if schema is not None:
        return
    if open_clip.get_model_config(model_name.replace("/", "-")) is None:
        raise ModelLoadError(f"MEDZERO_MODEL_NAME={model_name!r} is not an open_clip architecture; use a built-in "
                             "name (e.g. ViT-B-16), an hf-hub:org/repo id, local-dir:/path, or add a JSON config "
                             "to MEDZERO_MODEL_CONFIG_DIR")
    if pretrained and not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        what = "no such checkpoint file" if looks_like_path else f"not a pretrained tag of {model_name}"
        raise ModelLoadError(f"MEDZERO_PRETRAINED={pretrained!r}: {what}"
                             + (f" (known tags: {', '.join(tags)})" if tags else ""))


def _explain_load_failure(model_name: str, pretrained: str | None, exc: Exception) -> str:
    schema, _ = parse_model_name(model_name)
    reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if schema == "hf-hub" or (pretrained and not Path(pretrained).is_file()):
        return (f"could not load {model_name} (pretrained={pretrained}) from the model hub: {reason}. "
                "Download the weights once where the hub is reachable (MEDZERO_CACHE_DIR / HF_HOME), set "
                "MEDZERO_MODEL_NAME=local-dir:/path or MEDZERO_PRETRAINED=/path/to/checkpoint, or run with --demo")
    return (f"could not load MEDZERO_MODEL_NAME={model_name!r} with MEDZERO_PRETRAINED={pretrained!r}: {reason}")
