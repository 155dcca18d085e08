"""Every refusal medzero can give, each with its HTTP status and a stable machine-readable code.

MedzeroError
 ├── BadRequest (400)
 │    └── LLMNotConfigured         MEDZERO_LLM_URL / MEDZERO_LLM_MODEL unset or unusable
 ├── Unauthorized (401)           no API key, or one that is unknown, malformed or revoked
 ├── Forbidden (403)              an API key without the scope the route needs (classify < admin)
 ├── NotFound (404)
 │    ├── ApiKeyNotFound           `medzero keys revoke` of an id that does not exist
 │    ├── LabelSetNotFound
 │    ├── KPLFitNotFound
 │    ├── CalibrationNotFound      no current calibration of that method (medzero calibrate makes one)
 │    ├── UnknownAdapter           GET/DELETE /adapters/{id} of an id not loaded
 │    └── ResultNotFound
 ├── Conflict (409)
 │    ├── LabelSetExists
 │    ├── RoutesChanged            PUT /routes naming a version that is no longer the current one
 │    ├── AdapterNotFound          method=meduna with no adapter for the label set (says how to train one)
 │    ├── SupportSetNotFound       method=fewshot with no support set for the label set (says what to upload)
 │    └── AdapterMismatch          a bundle for another model, label-set version, class order or corpus
 ├── PayloadTooLarge (413)
 │    └── ImageTooLarge            decoded pixel count over the limit (decompression bombs)
 ├── RequestTimeout (408)          the request body did not arrive within MEDZERO_REQUEST_TIMEOUT_SECONDS
 ├── UnsupportedMediaType (415)
 ├── InvalidAdapter (422)         a bundle that is not one (missing files, bad manifest, hash or shapes)
 ├── InvalidInput (422)
 │    ├── InvalidImage             empty, truncated, or not an image at all
 │    ├── UnsupportedDicom         no pixel data, multi-frame, unknown photometric interpretation
 │    │    └── UnsupportedSOPClass  a received instance of a SOP class medzero does not classify (CT, SR, ...)
 │    ├── WrongStudy               STOW-RS into /studies/{study} of an instance of another study
 │    ├── ExtremeAspectRatio       one side far longer than the other (the model's resize would explode it)
 │    ├── UnknownMethod
 │    ├── InvalidLabelSet          also: a label set whose prompts cost more text encodings than allowed
 │    └── UnusableBatch            a transductive batch with files that cannot be used (all or nothing)
 ├── RateLimited (429, Retry-After) an API key past MEDZERO_RATE_LIMIT_PER_MINUTE
 ├── Overloaded (503, Retry-After) no permits left for the request's images, or too many batch bodies
 ├── NotReady (503, Retry-After)  loading, stopping, or the encoder's batching task died
 ├── EncoderTimeout (503, Retry-After)  a forward did not answer within MEDZERO_ENCODE_TIMEOUT_SECONDS
 ├── StoreBusy (503, Retry-After) the database stayed locked by another writer past its busy timeout
 ├── ProcessingTimeout (503, Retry-After)  the answer was not ready within MEDZERO_REQUEST_TIMEOUT_SECONDS
 ├── ModelLoadError (500)         raised at start-up; the CLI prints it and exits
 ├── LLMUnavailable (502)         the LLM endpoint is down, refused, or gave no completion
 ├── DeliveryFailed (502)         a result's SR or webhook was not accepted (kept for retry, never an HTTP answer)
 └── InvalidCorpus (500)          a knowledge_base file that does not match the schema (names file and entry)

Imports nothing from app: every layer may raise these, and the one handler in app/main.py maps them.
Messages name what went wrong and which setting to change; they never carry patient data.
"""


class MedzeroError(Exception):
    status_code: int = 500
    code: str = "internal"
    retry_after_seconds: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(MedzeroError):
    status_code, code = 400, "bad_request"


class LLMNotConfigured(BadRequest):
    code = "llm_not_configured"


class Unauthorized(MedzeroError):
    status_code, code = 401, "unauthorized"


class Forbidden(MedzeroError):
    status_code, code = 403, "forbidden"


class NotFound(MedzeroError):
    status_code, code = 404, "not_found"


class ApiKeyNotFound(NotFound):
    code = "api_key_not_found"


class LabelSetNotFound(NotFound):
    code = "label_set_not_found"


class KPLFitNotFound(NotFound):
    code = "kpl_fit_not_found"


class CalibrationNotFound(NotFound):
    code = "calibration_not_found"


class UnknownAdapter(NotFound):
    code = "unknown_adapter"


class ResultNotFound(NotFound):
    code = "result_not_found"


class Conflict(MedzeroError):
    status_code, code = 409, "conflict"


class AdapterNotFound(Conflict):
    code = "adapter_not_found"


class SupportSetNotFound(Conflict):
    code = "support_set_not_found"


class AdapterMismatch(Conflict):
    code = "adapter_mismatch"


class InvalidAdapter(MedzeroError):
    status_code, code = 422, "invalid_adapter"


class LabelSetExists(Conflict):
    code = "label_set_exists"


class PayloadTooLarge(MedzeroError):
    status_code, code = 413, "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class UnsupportedMediaType(MedzeroError):
    status_code, code = 415, "unsupported_media_type"


class InvalidInput(MedzeroError):
    status_code, code = 422, "invalid_input"


class InvalidImage(InvalidInput):
    code = "invalid_image"


class UnsupportedDicom(InvalidInput):
    code = "unsupported_dicom"


class UnsupportedSOPClass(UnsupportedDicom):
    code = "unsupported_sop_class"


class WrongStudy(InvalidInput):
    code = "wrong_study"


class ExtremeAspectRatio(InvalidInput):
    code = "extreme_aspect_ratio"


class UnknownMethod(InvalidInput):
    code = "unknown_method"


class InvalidLabelSet(InvalidInput):
    code = "invalid_label_set"


class UnusableBatch(InvalidInput):
    code = "unusable_batch"


class RequestTimeout(MedzeroError):
    status_code, code = 408, "request_timeout"


class RateLimited(MedzeroError):
    status_code, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after_seconds: int = 1) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Overloaded(MedzeroError):
    status_code, code = 503, "overloaded"
    retry_after_seconds = 1


class NotReady(MedzeroError):
    status_code, code = 503, "not_ready"
    retry_after_seconds = 5


class EncoderTimeout(MedzeroError):
    status_code, code = 503, "encoder_timeout"
    retry_after_seconds = 5


class StoreBusy(MedzeroError):
    status_code, code = 503, "store_busy"
    retry_after_seconds = 1


class ProcessingTimeout(MedzeroError):
    status_code, code = 503, "processing_timeout"
    retry_after_seconds = 5


class ModelLoadError(MedzeroError):
    status_code, code = 500, "model_load_failed"


class InvalidCorpus(MedzeroError):
    status_code, code = 500, "invalid_corpus"


class LLMUnavailable(MedzeroError):
    status_code, code = 502, "llm_unavailable"


class DeliveryFailed(MedzeroError):
    status_code, code = 502, "delivery_failed"


class RoutesChanged(Conflict):
    code = "routes_changed"
