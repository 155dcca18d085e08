"""The DICOM and delivery settings refuse what would only fail later, in a worker or a pynetdicom thread."""
import pytest
from pydantic import ValidationError

from app.settings import Settings


@pytest.mark.parametrize("values", [
    {"sr_destination": "PACS@host:0"}, {"sr_destination": "PACS@host:65536"}, {"sr_destination": "   @host:104"},
    {"sr_destination": "PACS-host-104"}, {"sr_destination": "A-TITLE-LONGER-THAN-16@host:104"},
    {"dicom_ae_title": "BACK\\\\SLASH"}, {"dicom_allowed_ae_titles": "ORTHANC,SEVENTEEN-CHARS-AE"},
    {"sr_stow_url": "http://[::1"}, {"sr_stow_url": "pacs.example/dicom-web"}, {"result_webhook_url": "ftp://x/y"},
    {"result_webhook_url": "http://hooks.example:99999/x"},
])
def test_unusable_dicom_settings_are_refused_at_start(values: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **values)


def test_usable_ones_are_kept() -> None:
    settings = Settings(_env_file=None, sr_destination="ORTHANC@[fd00::7]:4242",
                        dicom_allowed_ae_titles=" ORTHANC , MODALITY1 ", sr_stow_url="https://pacs/dicom-web")
    assert settings.sr_destination == "ORTHANC@[fd00::7]:4242"
    assert settings.dicom_allowed_ae_titles == ["ORTHANC", "MODALITY1"]
