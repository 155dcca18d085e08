"""`medzero calibrate --label-set NAME --data DIR --method M`: a temperature and a conformal prediction-set
threshold for one method of a label set, fitted on labelled images and stored as that method's calibration for
the label set's current version under the loaded model; /classify then answers calibrated probabilities and a
prediction set. The images are read, decoded and encoded as /classify does."""
import asyncio
from pathlib import Path

from app.errors import InvalidInput
from app.evaluation.dataset import dataset_hash, load_labelled, relative_name
from app.runtime import Runtime
from app.services.calibration import CalibrationReport, CalibrationSplit
from app.services.uploads import on_disk
from app.settings import Settings


def main(settings: Settings, label_set: str, data: Path, method: str, *, coverage: float = 0.9,
         split: CalibrationSplit = CalibrationSplit(), mapping: dict[str, str] | None = None,
         progress: bool = True) -> CalibrationReport:
    if not data.exists():             # before the model loads: a typo costs no start-up
        raise InvalidInput(f"no such folder or manifest: {data}")
    return asyncio.run(_calibrate(settings, label_set, data, method, coverage, split, mapping or {}, progress))


async def _calibrate(settings: Settings, label_set: str, data: Path, method: str, coverage: float,
                     split: CalibrationSplit, mapping: dict[str, str], progress: bool) -> CalibrationReport:
    async with Runtime.for_job(settings, progress=progress) as runtime:
        runtime.classifier.method(method)                       # an unknown method fails before any image is read
        head = await runtime.classifier.head(label_set)
        images = load_labelled(data, head.class_names, mapping)
        files = [on_disk(path, relative_name(images, path), settings.max_upload_bytes) for path in images.paths]
        return await runtime.calibrations.calibrate(label_set, method, files, images.labels, coverage=coverage,
                                                    split=split, dataset_hash=dataset_hash(images),
                                                    progress=progress)
