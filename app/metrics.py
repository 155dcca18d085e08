"""Every Prometheus metric medzero exports, declared once. Labels come from closed sets only."""
from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER = "other"          # the label value of every label set (and class) outside the closed set

REQUESTS = Counter("medzero_requests_total", "HTTP requests by route template, HTTP method and status.",
                   ["endpoint", "method", "status"])
REQUEST_SECONDS = Histogram("medzero_request_duration_seconds", "HTTP request latency by route template.",
                            ["endpoint"], buckets=LATENCY_BUCKETS)
REQUESTS_IN_PROGRESS = Gauge("medzero_requests_in_progress", "HTTP requests being served now.")
ERRORS = Counter("medzero_errors_total", "Refused requests (and refused files in a batch) by error code.", ["code"])
STAGE_SECONDS = Histogram("medzero_stage_duration_seconds",
                          "Seconds per stage: decode, queue and score per image; encode per batched forward.",
                          ["stage"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("medzero_encoder_batch_size", "Images per encoder forward.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUE_IMAGES = Gauge("medzero_queue_images", "Images waiting for the encoder.")
ADMITTED_IMAGES = Gauge("medzero_admitted_images",
                        "Images holding an admission permit: being read, decoded, queued or encoded.")
MODEL_LOAD_SECONDS = Gauge("medzero_model_load_seconds", "Seconds the encoder took to load and warm up.")
MODEL = Info("medzero_model", "Loaded encoder.")
IMAGE_ENGINE = Info("medzero_image_engine", "The image tower's engine, its precision and why it was chosen.")
ENGINE_SETUP_SECONDS = Gauge("medzero_image_engine_setup_seconds",
                             "Seconds spent exporting, compiling and probing image engines at start-up.")
READY = Gauge("medzero_ready", "1 when the encoder is loaded and warm.")
PREDICTIONS = Counter("medzero_predictions_total",
                      "Top-1 predictions by label set, label and method (built-in and allow-listed label sets by "
                      "name, every other one as 'other').", ["label_set", "label", "method"])
DECISIONS = Counter("medzero_decisions_total",
                    "Decisions by method: a class or 'uncertain' (abstained), and whether the method was calibrated.",
                    ["method", "outcome", "calibrated"])
IMAGES = Counter("medzero_images_total", "Images classified, by input format.", ["format"])
KPL_FIT_SECONDS = Histogram("medzero_kpl_fit_duration_seconds", "Seconds per KPL proxy fit (server side).",
                            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
KPL_FIT_IMAGES = Histogram("medzero_kpl_fit_pool_images", "Pool images per KPL proxy fit.",
                           buckets=(2, 16, 64, 256, 1024, 4096, 16384))
INGEST_QUEUE = Gauge("medzero_ingest_queue_instances", "DICOM instances queued or being classified.")
DICOM_RECEIVED = Counter("medzero_dicom_instances_total",
                         "DICOM instances received, by path (stow-rs, c-store) and outcome (queued, skipped: no "
                         "routing rule, duplicate: received before, refused: unusable).", ["source", "outcome"])
DICOM_CLASSIFIED = Counter("medzero_dicom_classified_total",
                           "Queued DICOM instances classified (done), failed for good, or queued again (retry).",
                           ["outcome"])
DELIVERIES = Counter("medzero_result_deliveries_total",
                     "Result deliveries (SR by C-STORE or STOW-RS, JSON webhook) by outcome: sent, retry (will be "
                     "tried again), dead_letter (gave up).", ["target", "outcome"])
DEAD_LETTERS = Gauge("medzero_result_dead_letters", "Result deliveries in the dead-letter state now.", ["target"])
