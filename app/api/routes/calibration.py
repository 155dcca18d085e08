"""/labels/{name}/calibration: the methods' current calibrations of a label set (made by `medzero calibrate`),
and removing one (admin)."""
from fastapi import APIRouter, status

from app.api.deps import AdminDep, RuntimeDep
from app.api.schemas import CalibrationPublic, CalibrationsPublic, ErrorBody
from app.methods.calibration import Calibration

router = APIRouter(tags=["calibration"])
ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 422, 503)}


@router.get("/labels/{name}/calibration", responses=ERRORS)
async def get_calibrations(name: str, runtime: RuntimeDep) -> CalibrationsPublic:
    """Every method's calibration that applies to this label set's current version under the loaded model
    (a label-set update, a model change or a new KPL fit retires the ones made before)."""
    head, calibrations = await runtime.calibrations.current(name)
    return CalibrationsPublic(label_set=head.label_set, label_set_version=head.version, model=head.model_id,
                              data=[to_public(c) for c in calibrations])


@router.delete("/labels/{name}/calibration/{method}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS,
               dependencies=[AdminDep])
async def delete_calibration(name: str, method: str, runtime: RuntimeDep) -> None:
    """Remove the method's calibrations of this label set under the loaded model (probabilities go back to raw)."""
    await runtime.calibrations.delete(name, method)


def to_public(calibration: Calibration) -> CalibrationPublic:
    return CalibrationPublic(
        method=calibration.method, label_set_version=calibration.label_set_version, model=calibration.model_id,
        calibration_version=calibration.version, temperature=calibration.temperature,
        coverage=calibration.coverage, set_threshold=calibration.set_threshold, score=calibration.score,
        method_state_version=calibration.method_state_version, images=calibration.images,
        dataset_hash=calibration.dataset_hash,
        report=calibration.report, created_at=calibration.created_at)
