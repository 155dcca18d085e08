"""`medzero kpl fit --label-set NAME --images DIR`: the offline twin of POST /labels/{name}/kpl. Encodes every
image under DIR with the configured model, fits KPL proxies for the label set, stores them as its current fit
(the server uses them for method=kpl)."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from app.errors import InvalidInput, MedzeroError
from app.imaging.decode import decode_image
from app.methods.kpl import prior_vector
from app.runtime import load_core
from app.services.kpl_fits import POOL_SUFFIXES, image_files
from app.settings import Settings
from app.storage.db import create_db_engine
from app.storage.kpl_fits import KPLFitRepository, StoredFit
from app.storage.label_sets import LabelSetRepository

log = logging.getLogger(__name__)
ENCODE_BATCH_SIZE = 32


@dataclass(frozen=True)
class FitJobReport:
    fit: StoredFit
    skipped: list[tuple[str, str]]      # (path, error code)


def main(settings: Settings, label_set: str, images_dir: Path, *, progress: bool = True,
         class_prior: dict[str, float] | None = None) -> FitJobReport:
    paths = image_files(images_dir)
    if not paths:
        raise InvalidInput(f"no images ({', '.join(sorted(POOL_SUFFIXES))}) under {images_dir}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_db_engine(settings.resolved_database_url)
    try:
        fits = KPLFitRepository(engine)
        core = load_core(settings, LabelSetRepository(engine), fits, progress=progress)
        head = core.label_sets.head(label_set)
        prior_vector(head, class_prior)                   # refuse a bad prior before encoding anything
        features, skipped = encode_folder(core.encoder, paths, settings.max_image_pixels, progress=progress)
        if len(features) < 2:
            raise InvalidInput(f"a KPL fit needs at least 2 usable images; {len(skipped)} of {len(paths)} failed")
        fit = core.kpl.fit(features, head, class_prior)
        return FitJobReport(fits.add(fit), skipped)
    finally:
        engine.dispose()


def encode_folder(encoder, paths: list[Path], max_pixels: int, *, progress: bool) -> tuple[torch.Tensor, list]:
    """(n_usable, dim) L2-normalised features; unusable files are reported, not fatal."""
    features, skipped, batch = [], [], []
    for path in tqdm(paths, desc="encoding pool", unit="image", disable=not progress):
        try:
            batch.append(encoder.preprocess(decode_image(path.read_bytes(), max_pixels=max_pixels).image))
        except MedzeroError as exc:
            skipped.append((str(path), exc.code))
            log.warning("skipping %s: %s", path, exc.code)
        if len(batch) == ENCODE_BATCH_SIZE:
            features.append(encoder.encode_images(torch.stack(batch)))
            batch = []
    if batch:
        features.append(encoder.encode_images(torch.stack(batch)))
    return (torch.cat(features) if features else torch.empty(0)), skipped
