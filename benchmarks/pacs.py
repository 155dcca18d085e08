"""The PACS path against the direct one: the same real DICOMs through C-STORE, through STOW-RS and through
/classify/batch, on one server process.

For each path, N instances (the radiographs of ../shared/data/dicom, each sent with fresh Study / Series / SOP
Instance UIDs, cycled up to --instances) go to `python -m app serve` running on free loopback ports with the SCP on,
a routing rule for CR/DX, and its SR destination a pynetdicom storage SCP in this process:

- C-STORE: one association, N stores (pynetdicom SCU), as a PACS forwarding rule would;
- STOW-RS: POST /dicomweb/studies with --stow-batch instances per request;
- direct: POST /classify/batch with the same files, --stow-batch per request (nothing queued, no SR).

Columns: acknowledged / s (the sender's view: stores answered, or parts accepted), classified / s (first send to
the last result in /results), SR / s (first send to the last SR received back), the p50 / p95 seconds from an
instance's send to its SR, and each path's classified / s as a ratio of the direct path's images / s. The queue
adds a database write per instance, a lease and a result write; the SR adds building and one C-STORE each.

    .venv/bin/python benchmarks/pacs.py                       # tiny random-init model, ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/pacs.py --instances 200 --model-name ViT-B-16 --pretrained openai
"""
import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from accuracy import cpu_flags, model_parser  # benchmarks/accuracy.py, beside this script
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage
from throughput import free_port, server_env, tail, wait_ready  # benchmarks/throughput.py

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DICOM_DIR = REPO_ROOT.parent / "shared" / "data" / "dicom"
RADIOGRAPH_MODALITIES = ("CR", "DX")
ROUTES = "rules: [{name: radiographs, modality: [CR, DX], label_set: chest-xray-pneumonia}]\n"
RESULT_TIMEOUT_SECONDS = 600.0


@dataclass
class Row:
    path: str
    instances: int
    acknowledged_per_second: float
    classified_per_second: float
    sr_per_second: float | None
    sr_p50_seconds: float | None
    sr_p95_seconds: float | None


class SRReceiver:
    """The SR destination: a pynetdicom storage SCP noting when each SR (by its source instance) arrives."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}          # source SOP Instance UID -> monotonic time
        self._lock = threading.Lock()
        self.ae = AE(ae_title="BENCHPACS")
        self.ae.add_supported_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        sources = {item.ReferencedSOPInstanceUID for item in _image_references(event.dataset)}
        with self._lock:
            for source in sources:
                self.arrived.setdefault(source, time.monotonic())
        return 0x0000

    def count(self, sources: set[str]) -> int:
        with self._lock:
            return len(sources & self.arrived.keys())


def _image_references(dataset: pydicom.Dataset):
    for item in dataset.get("ContentSequence", []):
        if item.get("ValueType") == "IMAGE":
            yield from item.ReferencedSOPSequence
        yield from _image_references(item)


def radiographs(dicom_dir: Path) -> list[pydicom.Dataset]:
    found = []
    for path in sorted(dicom_dir.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        if dataset.get("Modality") in RADIOGRAPH_MODALITIES:
            found.append(dataset)
    if not found:
        raise SystemExit(f"no CR/DX DICOM files in {dicom_dir}")
    return found


def fresh_copies(sources: list[pydicom.Dataset], count: int) -> list[tuple[str, str, bytes]]:
    """(study UID, SOP Instance UID, Part 10 bytes) of `count` instances, each new to the server."""
    copies = []
    for index in range(count):
        dataset = sources[index % len(sources)]
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        copies.append((str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID), buffer.getvalue()))
    return copies


def send_cstore(dicom_port: int, copies: list[tuple[str, str, bytes]]) -> None:
    ae = AE(ae_title="BENCHSCU")
    for transfer_syntax in {pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID for *_, data in copies}:
        for sop_class in {pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPClassUID
                          for *_, data in copies}:
            ae.add_requested_context(sop_class, transfer_syntax)
    association = ae.associate("127.0.0.1", dicom_port, ae_title="MEDZERO")
    if not association.is_established:
        raise SystemExit("the SCP refused the benchmark's association")
    try:
        for *_, data in copies:
            status = association.send_c_store(pydicom.dcmread(io.BytesIO(data)))
            if not status or status.Status != 0:
                raise SystemExit(f"C-STORE answered {status}")
    finally:
        association.release()


def multipart(parts: list[bytes]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def send_stow(base: str, copies: list[tuple[str, str, bytes]], batch: int) -> None:
    with httpx.Client(timeout=300) as client:
        for start in range(0, len(copies), batch):
            body, headers = multipart([data for *_, data in copies[start:start + batch]])
            answer = client.post(f"{base}/dicomweb/studies", content=body, headers=headers)
            if answer.status_code != 200:
                raise SystemExit(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")


def classify_direct(base: str, copies: list[tuple[str, str, bytes]], batch: int) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=300) as client:
        for start in range(0, len(copies), batch):
            files = [("files", (f"{sop}.dcm", data, "application/dicom")) for _, sop, data in copies[start:start + batch]]
            answer = client.post(f"{base}/classify/batch", data={"label_set": "chest-xray-pneumonia"}, files=files)
            if answer.status_code != 200:
                raise SystemExit(f"/classify/batch answered {answer.status_code}: {answer.text[:300]}")
    return len(copies) / (time.monotonic() - started)


def classified(base: str, studies: set[str]) -> int:
    """How many of these studies have their result (one instance each)."""
    results = httpx.get(f"{base}/results", params={"limit": 1000}, timeout=30).json()["data"]
    return len(studies & {r["study_instance_uid"] for r in results})


def measure(path: str, send, base: str, receiver: SRReceiver, copies: list[tuple[str, str, bytes]]) -> Row:
    studies, sources = {study for study, *_ in copies}, {sop for _, sop, _ in copies}
    started = time.monotonic()
    send(copies)
    acknowledged = time.monotonic() - started
    deadline = started + RESULT_TIMEOUT_SECONDS
    while classified(base, studies) < len(copies):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: not every instance was classified in {RESULT_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)
    done = time.monotonic() - started
    while receiver.count(sources) < len(copies):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: not every SR came back in {RESULT_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)
    latencies = sorted(receiver.arrived[source] - started for source in sources)
    return Row(path, len(copies), len(copies) / acknowledged, len(copies) / done, len(copies) / latencies[-1],
               statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = model_parser(__doc__)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=32, help="MEDZERO_MAX_BATCH_SIZE")
    parser.add_argument("--instances", type=int, default=60, help="instances per path")
    parser.add_argument("--stow-batch", type=int, default=10, help="instances per STOW-RS / batch request")
    parser.add_argument("--dicom-dir", type=Path, default=DEFAULT_DICOM_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.dicom_dir.is_dir():
        raise SystemExit(f"no DICOM folder at {args.dicom_dir} (the real files of ../shared/data/dicom)")
    sources = radiographs(args.dicom_dir)
    receiver = SRReceiver()
    with tempfile.TemporaryDirectory(prefix="medzero-pacs-bench-") as temp:
        root = Path(temp)
        (root / "routes.yaml").write_text(ROUTES)
        port, dicom_port = free_port(), free_port()
        env = {**server_env(args, root / "data", port), "MEDZERO_DICOM_PORT": str(dicom_port),
               "MEDZERO_DICOM_ROUTES_FILE": str(root / "routes.yaml"),
               "MEDZERO_SR_DESTINATION": f"BENCHPACS@127.0.0.1:{receiver.port}"}
        log_path = root / "server.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "app", "serve"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            ready = wait_ready(base, server, log_path)
            classify_direct(base, fresh_copies(sources, min(4, args.instances)), args.stow_batch)   # warm-up
            direct = classify_direct(base, fresh_copies(sources, args.instances), args.stow_batch)
            rows = [measure("C-STORE (one association)", lambda c: send_cstore(dicom_port, c), base, receiver,
                            fresh_copies(sources, args.instances)),
                    measure(f"STOW-RS ({args.stow_batch} per request)",
                            lambda c: send_stow(base, c, args.stow_batch), base, receiver,
                            fresh_copies(sources, args.instances))]
        except BaseException:
            print(tail(log_path), file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(timeout=60)
    print_report(args, ready, sources, direct, rows)


def print_report(args: argparse.Namespace, ready: dict, sources: list[pydicom.Dataset], direct: float,
                 rows: list[Row]) -> None:
    syntaxes = sorted({s.file_meta.TransferSyntaxUID.name for s in sources})
    print(f"model {ready['model']} on {ready['device']} ({'pretrained' if ready['pretrained_weights'] else 'random'}"
          f" weights), {args.precision}; {len(sources)} real radiographs cycled ({', '.join(syntaxes)}); "
          f"{args.instances} instances per path")
    print(cpu_flags())
    print()
    print("| path | instances | acknowledged / s | classified / s | SR back / s | send→SR p50 s | send→SR p95 s "
          "| classified / direct |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    print(f"| /classify/batch ({args.stow_batch} per request), direct | {args.instances} | — | {direct:.1f} | — | — "
          f"| — | 1.00 |")
    for row in rows:
        print(f"| {row.path} | {row.instances} | {row.acknowledged_per_second:.1f} | {row.classified_per_second:.1f} "
              f"| {row.sr_per_second:.1f} | {row.sr_p50_seconds:.2f} | {row.sr_p95_seconds:.2f} "
              f"| {row.classified_per_second / direct:.2f} |")


if __name__ == "__main__":
    main()
