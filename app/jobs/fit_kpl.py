"""`medzero kpl fit --label-set NAME --images DIR`: the offline twin of POST /labels/{name}/kpl, through the same
service: every image under DIR read with the upload limit, decoded, encoded and fitted as an upload pool would be,
the fit stored as the label set's current one (the server uses it for method=kpl), one report."""
import asyncio
from pathlib import Path

from app.errors import InvalidInput
from app.imaging.files import IMAGE_SUFFIXES, image_files
from app.runtime import Runtime
from app.services.kpl_fits import FitReport
from app.settings import Settings


def main(settings: Settings, label_set: str, images_dir: Path, *, progress: bool = True,
         class_prior: dict[str, float] | None = None) -> FitReport:
    if not image_files(images_dir):
        raise InvalidInput(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {images_dir}")
    return asyncio.run(_fit(settings, label_set, images_dir, progress, class_prior))


async def _fit(settings: Settings, label_set: str, images_dir: Path, progress: bool,
               class_prior: dict[str, float] | None) -> FitReport:
    async with Runtime.for_job(settings, progress=progress) as runtime:
        service = runtime.kpl_fits
        return await service.fit(label_set, service.files_in(images_dir), class_prior=class_prior, progress=progress)
