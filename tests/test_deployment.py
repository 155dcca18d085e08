"""The deployment files under docker/, checked without Docker: Prometheus' config and alert rules (promtool, and
promtool's unit tests that make each new alert fire on bad input and stay quiet on healthy input), the Grafana
dashboard, the compose stack and everything it mounts, the Orthanc <-> medzero wiring, the auto-forward script and
the routing rules. Every metric an alert or panel reads, and every MEDZERO_ variable the files set, must be one
medzero really has (app/metrics.py's registry, app/settings.py's fields). `docker compose config` runs where a
compose client exists."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from pydicom.dataset import Dataset

import app.metrics
from app.api.routes.dicomweb import router as dicomweb_router
from app.dicom.routing import Route, Skip, load_routes
from app.methods.zero_shot import ZeroShot
from app.services.builtin_label_sets import BUILTIN_LABEL_SETS
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "medzero.json"
ORTHANC_CONFIG = DOCKER / "orthanc" / "orthanc.json"
AUTOFORWARD = DOCKER / "orthanc" / "autoforward.lua"
ROUTES = DOCKER / "medzero" / "routes.yaml"

NEW_ALERTS = ("MedzeroSlowClassify", "MedzeroIngestBacklog", "MedzeroResultDeadLetters",
              "MedzeroDicomClassificationFailures")
# What the dashboard must show (the panel list); names as exported.
DASHBOARD_METRICS = {
    "medzero_requests_total", "medzero_request_duration_seconds_bucket", "medzero_errors_total",
    "medzero_encoder_batch_size_bucket", "medzero_queue_images", "medzero_admitted_images",
    "medzero_dicom_instances_total", "medzero_ingest_queue_instances", "medzero_dicom_classified_total",
    "medzero_result_deliveries_total", "medzero_result_dead_letters", "medzero_decisions_total",
    "medzero_model_info", "medzero_ready",
}
PROMETHEUS_OWN = {"up"}          # series Prometheus writes itself for every target
# The sample names a metric family of each type exposes (prometheus_client drops _total/_info from family names).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("", "_count", "_sum", "_created"), "info": ("_info",), "stateset": ("",), "enum": ("",),
            "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "unknown": ("",)}
TARGET_LABELS = {"job", "instance"}   # added by Prometheus at scrape time


# ---- helpers -------------------------------------------------------------------------------------------------------

def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (apt-get install prometheus, or the prometheus release tarball)")
    return found


def run_promtool(*args: str) -> None:
    done = subprocess.run([promtool(), *args], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def exported_metrics() -> dict[str, set[str] | None]:
    """Sample name -> label names (None: not known up front, as for an Info's or another library's collector),
    for every series medzero's /metrics can expose: the default registry, which /metrics serves, once app.metrics
    has declared everything."""
    labels = {}
    for metric in vars(app.metrics).values():
        if isinstance(metric, MetricWrapperBase) and metric._type != "info":     # private: no public accessor
            labels[metric._name] = set(metric._labelnames)
    exported: dict[str, set[str] | None] = {}
    for family in REGISTRY.collect():
        known = labels.get(family.name)
        for suffix in SUFFIXES[family.type]:
            exported[family.name + suffix] = None if known is None else known | ({"le"} if suffix == "_bucket" else set())
    return exported


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once label matchers, ranges, grouping
    clauses and strings are gone, that are neither functions (followed by '(') nor keywords."""
    stripped = _STRING.sub('""', expr)
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    stripped = re.sub(r"\[[^\]]*\]", " ", stripped)
    stripped = _GROUPING.sub(" ", stripped)
    stripped = re.sub(r"\boffset\s+\S+", " ", stripped)
    return {name for name in _IDENTIFIER.findall(stripped) if name.lower() not in _KEYWORDS}


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    return [(name, set(_MATCHER.findall(body))) for name, body in _SELECTOR.findall(expr)]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DOCKER / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels", [])))
    return found


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(metric, label) as metric)."""
    board = dashboard()
    found = [(f"panel {panel['id']} {panel.get('title')!r}", target["expr"])
             for panel in all_panels(board["panels"]) for target in panel.get("targets", []) if "expr" in target]
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            found.append((f"variable {variable['name']}", label_values.group(1) if label_values else query))
    return found


def compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def medzero_environment(*files: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for path in files or (COMPOSE,):
        env.update({k: str(v) for k, v in (compose(path)["services"]["medzero"].get("environment") or {}).items()})
    return env


def bind_mounts(service: dict) -> list[tuple[Path, PurePosixPath]]:
    """(host path, container path) of every bind mount from the repository (short syntax, ./ or ../)."""
    found = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            found.append(((DOCKER / source).resolve(), PurePosixPath(target)))
    return found


def mount_targets(service: dict) -> set[PurePosixPath]:
    return {PurePosixPath(volume.split(":")[1]) for volume in service.get("volumes", [])}


def published_ports(service: dict) -> dict[int, int]:
    """container port -> host port."""
    ports = {}
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        ports[int(container.split("/")[0])] = int(host or container.split("/")[0])
    return ports


# ---- Prometheus ----------------------------------------------------------------------------------------------------

def test_prometheus_config_and_its_rule_files_are_valid() -> None:
    run_promtool("check", "config", "docker/prometheus.yml")


def test_alert_rules_are_valid() -> None:
    run_promtool("check", "rules", "docker/alerts.yml")


def test_alert_unit_tests_pass() -> None:
    """docker/alerts_test.yml feeds a healthy and an unhealthy instance; the new alerts fire for the unhealthy one
    only, at the times their `for` allows, with the rendered annotations."""
    run_promtool("test", "rules", "docker/alerts_test.yml")


def test_alert_unit_tests_cover_every_alert() -> None:
    """Each alert has a case where it must stay quiet; each new one also a case where it must fire."""
    cases = [case for test in yaml.safe_load((DOCKER / "alerts_test.yml").read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    names = [rule["alert"] for rule in alert_rules() if "alert" in rule]
    assert set(NEW_ALERTS) <= set(names), f"alerts.yml lacks {set(NEW_ALERTS) - set(names)}"
    assert not set(names) - quiet, f"no healthy-input case for {sorted(set(names) - quiet)}"
    assert not set(NEW_ALERTS) - firing, f"no firing case for {sorted(set(NEW_ALERTS) - firing)}"


def test_the_metric_name_parser_finds_metrics_not_functions_or_labels() -> None:
    expr = ('histogram_quantile(0.95, sum by (instance, le) (rate(a_bucket{job="m", endpoint=~"/x|/y"}[5m])))'
            ' / on (instance) group_left b_total offset 5m > bool 1e3 and c')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert selector_labels(expr) == [("a_bucket", {"job", "endpoint"})]


def test_alerts_and_panels_read_only_metrics_medzero_exports() -> None:
    """Derived from the live registry, so a renamed metric or label fails here rather than leaving an alert that
    can never fire or an empty panel."""
    exported = exported_metrics()
    expressions = [(f"alert {rule.get('alert', rule.get('record'))}", rule["expr"]) for rule in alert_rules()]
    expressions += dashboard_expressions()
    unknown, bad_labels = [], []
    for where, expr in expressions:
        unknown += [f"{where}: {name}" for name in sorted(metric_names(expr) - set(exported) - PROMETHEUS_OWN)]
        for name, labels in selector_labels(expr):
            if exported.get(name) is not None:
                bad_labels += [f"{where}: {name}{{{label}}}" for label in sorted(labels - exported[name] - TARGET_LABELS)]
    assert not unknown, "metrics medzero does not export:\n" + "\n".join(unknown)
    assert not bad_labels, "labels those metrics do not have:\n" + "\n".join(bad_labels)


# ---- Grafana -------------------------------------------------------------------------------------------------------

def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = all_panels(dashboard()["panels"])
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"repeated panel ids: {sorted({i for i in ids if ids.count(i) > 1})}"
    boxes = [(panel["id"], panel["gridPos"]) for panel in panels]
    for n, (a, first) in enumerate(boxes):
        assert first["x"] + first["w"] <= 24, f"panel {a} is wider than the grid"
        for b, second in boxes[n + 1:]:
            apart = (first["x"] + first["w"] <= second["x"] or second["x"] + second["w"] <= first["x"]
                     or first["y"] + first["h"] <= second["y"] or second["y"] + second["h"] <= first["y"])
            assert apart, f"panels {a} and {b} overlap"


def test_dashboard_reads_prometheus_through_its_datasource_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    datasource_variables = [name for name, v in variables.items()
                            if v["type"] == "datasource" and v["query"] == "prometheus"]
    assert datasource_variables, "no templated Prometheus datasource variable"
    allowed = {f"${{{name}}}" for name in datasource_variables} | {f"${name}" for name in datasource_variables}
    provisioned = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    allowed |= {source["uid"] for source in provisioned["datasources"]}
    for panel in all_panels(board["panels"]):
        if panel["type"] == "row":
            continue
        sources = [panel.get("datasource")] + [target.get("datasource") for target in panel.get("targets", [])]
        assert panel.get("targets"), f"panel {panel['id']} {panel['title']!r} queries nothing"
        for source in sources:
            assert source and source.get("uid") in allowed, (panel["id"], panel["title"], source)


def test_dashboard_has_the_panels_the_operators_need() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    assert not DASHBOARD_METRICS - used, f"no panel reads {sorted(DASHBOARD_METRICS - used)}"


def test_grafana_provisioning_points_at_the_stack() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    host, _, port = source["url"].removeprefix("http://").partition(":")
    assert source["type"] == "prometheus" and host in services and int(port) in published_ports(services[host])
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/medzero.yaml").read_text())["providers"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    for provider in providers:
        path = PurePosixPath(provider["options"]["path"])
        assert mounts.get(path) == DASHBOARD.parent, f"the provider reads {path}; compose mounts {mounts}"
    for folder in ("datasources", "dashboards"):
        target = PurePosixPath("/etc/grafana/provisioning") / folder
        assert mounts.get(target) == DOCKER / "grafana/provisioning" / folder, f"{target} is not provisioned"


# ---- compose -------------------------------------------------------------------------------------------------------

def test_compose_mounts_files_that_exist_and_declares_its_volumes() -> None:
    stack = compose()
    for name, service in stack["services"].items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source.relative_to(ROOT)}, which does not exist"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$", "~")):
                assert source in (stack.get("volumes") or {}), f"{name}: named volume {source} is not declared"
        build = service.get("build")
        if build:
            assert (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
    assert "medzero-data" in {volume.split(":")[0] for volume in stack["services"]["medzero"]["volumes"]
                              if volume.endswith(":/data")}, "medzero's /data is not on the medzero-data volume"


def test_prometheus_loads_the_mounted_rules_and_scrapes_medzero() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_path = PurePosixPath(config_flag.partition("=")[2])
    mounts = {target: source for source, target in bind_mounts(prometheus)}
    assert mounts.get(config_path) == DOCKER / "prometheus.yml"
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert mounts.get(config_path.parent / rule_file) == DOCKER / rule_file, f"{rule_file} is not mounted"
    targets = [t for job in config["scrape_configs"] if job["job_name"] == "medzero"
               for static in job["static_configs"] for t in static["targets"]]
    port = int(medzero_environment().get("MEDZERO_PORT", Settings.model_fields["port"].default))
    assert targets == [f"medzero:{port}"] and port in published_ports(services["medzero"]), targets


def test_compose_names_only_real_settings() -> None:
    """Every MEDZERO_ variable the compose files set, or mention in a comment as one to set, is a Settings field
    (MEDZERO_ + the field name upper-cased); the README's too."""
    fields = {f"MEDZERO_{name.upper()}" for name in Settings.model_fields}
    for path in (COMPOSE, COMPOSE_GPU, DOCKER / "README.md", ROOT / "Dockerfile"):
        named = set(re.findall(r"\bMEDZERO_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        assert not named - fields, f"{path.relative_to(ROOT)} names variables Settings lacks: {sorted(named - fields)}"
    for env in (medzero_environment(COMPOSE), medzero_environment(COMPOSE, COMPOSE_GPU)):
        assert not set(env) - fields, sorted(set(env) - fields)


def test_compose_environment_is_accepted_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values too: what the container would be started with validates (a port that is not a number, an
    SR destination not in AET@host:port form, ... would stop the server at start)."""
    for variable in [v for v in os.environ if v.startswith("MEDZERO_")]:
        monkeypatch.delenv(variable)
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_GPU)):
        env = medzero_environment(*files)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)
        assert settings.dicom_port == int(env["MEDZERO_DICOM_PORT"])
        assert settings.dicom_ae_title == env["MEDZERO_DICOM_AE_TITLE"]


def test_gpu_overlay_builds_for_cuda_and_reserves_a_gpu() -> None:
    medzero = compose(COMPOSE_GPU)["services"]["medzero"]
    assert re.fullmatch(r"cu\d{3}", medzero["build"]["args"]["COMPUTE"]), medzero["build"]["args"]
    devices = medzero["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert compose()["services"]["medzero"]["build"]["args"]["COMPUTE"] == "cpu"


def compose_client() -> list[str]:
    """A Compose v2 client: the `docker compose` plugin, or a docker-compose binary of version 2 or later. Compose
    v1 (docker-compose 1.x, Python) predates the Compose Specification these files use (top-level `name`,
    `deploy.resources.reservations.devices`) and would reject them, so it is not used."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version", "--short"], check=False, capture_output=True, text=True,
                                 timeout=30).stdout.strip().removeprefix("v")
        if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 2:
            return [standalone]
        pytest.skip(f"docker-compose {version} is Compose v1, which does not read the Compose Specification; "
                    "no `docker compose` (v2) client here")
    pytest.skip("no docker compose client here (neither the `docker compose` plugin nor docker-compose v2)")


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_docker_compose_accepts_the_stack(files: tuple[Path, ...]) -> None:
    client = compose_client()
    arguments = [arg for path in files for arg in ("-f", str(path))]
    done = subprocess.run([*client, *arguments, "config", "-q"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- Orthanc <-> medzero -------------------------------------------------------------------------------------------

def test_orthanc_knows_medzero_by_its_ae_title_host_and_port() -> None:
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    services = compose()["services"]
    env = medzero_environment()
    aet, host, port = orthanc["DicomModalities"]["medzero"]
    assert (aet, host, port) == (env["MEDZERO_DICOM_AE_TITLE"], "medzero", int(env["MEDZERO_DICOM_PORT"]))
    assert port in published_ports(services["medzero"]), "medzero's DICOM port is not published"
    assert orthanc["DicomAet"] == "ORTHANC" and orthanc["DicomPort"] in published_ports(services["orthanc"])


def test_medzero_sends_results_to_orthanc_and_accepts_it() -> None:
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    env = medzero_environment()
    aet, _, address = env["MEDZERO_SR_DESTINATION"].partition("@")
    host, _, port = address.partition(":")
    assert (aet, host, int(port)) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    allowed = [title.strip() for title in env["MEDZERO_DICOM_ALLOWED_AE_TITLES"].split(",")]
    assert orthanc["DicomAet"] in allowed, "medzero would refuse Orthanc's C-STOREs"
    assert orthanc.get("DicomAlwaysAllowStore", True), "Orthanc would refuse medzero's SRs (not a known modality)"


def test_orthanc_dicomweb_is_enabled_and_points_at_medzero_stow() -> None:
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    web = orthanc["DicomWeb"]
    assert web["Enable"] is True and web["Root"] == "/dicom-web/"
    (url,) = web["Servers"]["medzero"]
    base = url.removeprefix(f"http://medzero:{medzero_environment().get('MEDZERO_PORT', 8000)}").rstrip("/")
    assert f"{base}/studies" in {route.path for route in dicomweb_router.routes}, url
    assert orthanc["AuthenticationEnabled"] is False, "the demo says so; the image's default is true"
    mounts = {target for _, target in bind_mounts(compose()["services"]["orthanc"])}
    assert {PurePosixPath(script) for script in orthanc["LuaScripts"]} <= mounts, "a Lua script is not mounted"
    assert PurePosixPath("/etc/orthanc") / ORTHANC_CONFIG.name in mounts


def lua() -> str:
    for name in ("lua5.4", "lua5.3", "lua5.1", "lua", "luajit"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Lua interpreter here (apt-get install lua5.4) to run docker/orthanc/autoforward.lua")


HARNESS = """
sent = {}
function SendToModality(instance, modality) table.insert(sent, instance .. '>' .. modality) end
function print() end
dofile(arg[1])
local cases = {
  {'cr', 'CR', 'DicomProtocol', 'ORTHANC_CLIENT'}, {'dx', 'DX', 'RestApi', ''}, {'us', 'US', 'DicomProtocol', 'US1'},
  {'xc', 'XC', 'DicomProtocol', 'CAM'}, {'op', 'OP', 'DicomProtocol', 'FUNDUS'},
  {'sr', 'SR', 'DicomProtocol', 'MEDZERO'}, {'sr2', 'SR', 'RestApi', ''}, {'ct', 'CT', 'DicomProtocol', 'CT1'},
  {'mr', 'MR', 'DicomProtocol', 'MR1'}, {'back', 'CR', 'DicomProtocol', 'MEDZERO'}, {'none', nil, 'RestApi', ''},
}
for _, c in ipairs(cases) do
  OnStoredInstance(c[1], { Modality = c[2] }, {}, { RequestOrigin = c[3], RemoteAet = c[4] })
end
io.write(table.concat(sent, ' '))
"""


def test_autoforward_sends_images_medzero_routes_and_never_its_results(tmp_path: Path) -> None:
    """Run the Orthanc Lua script with SendToModality recorded: CR/DX/US/XC/OP go to the `medzero` modality;
    SR (the results), other modalities and anything medzero sent stay. Its modalities are those routes.yaml has
    rules for, so nothing is forwarded only to be skipped."""
    harness = tmp_path / "harness.lua"
    harness.write_text(HARNESS)
    done = subprocess.run([lua(), str(harness), str(AUTOFORWARD)], check=False, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cr>medzero", "dx>medzero", "us>medzero", "xc>medzero", "op>medzero"]
    assert "medzero" in json.loads(ORTHANC_CONFIG.read_text())["DicomModalities"]
    routed = {modality for rule in load_routes(ROUTES).rules for modality in rule.modality or []}
    assert routed == {"CR", "DX", "US", "XC", "OP"}, routed


# ---- routing rules -------------------------------------------------------------------------------------------------

def instance(modality: str, body_part: str = "", series_description: str = "") -> Dataset:
    dataset = Dataset()
    dataset.Modality, dataset.BodyPartExamined, dataset.SeriesDescription = modality, body_part, series_description
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    return dataset


def test_routes_load_and_name_built_in_label_sets_with_nothing_to_fit() -> None:
    table = load_routes(ROUTES)
    builtin = {spec.name for spec in BUILTIN_LABEL_SETS}
    assert table.rules, "no rules: every instance would be skipped"
    assert not {rule.label_set for rule in table.rules} - builtin, "a rule names a label set that is not built in"
    assert {rule.method for rule in table.rules} == {ZeroShot.name}, "a fresh stack has no fits or adapters"


@pytest.mark.parametrize(("dataset", "label_set"), [
    (instance("CR", "CHEST"), "chest-xray-pneumonia"),
    (instance("DX", "CHEST"), "chest-xray-pneumonia"),
    (instance("US", "BREAST"), "breast-ultrasound"),
    (instance("US", "", "Left Breast US"), "breast-ultrasound"),
    (instance("OP", "EYE"), "diabetic-retinopathy"),
    (instance("XC", "SKIN"), "ham10000"),
    (instance("CT", "CHEST"), None),
    (instance("DX", "HAND"), None),
    (instance("US", "ABDOMEN", "Liver"), None),
    (instance("SR"), None),
], ids=["cr-chest", "dx-chest", "us-breast", "us-breast-description", "op", "xc-skin", "ct", "dx-hand",
        "us-abdomen", "sr"])
def test_routes_send_each_study_to_its_label_set(dataset: Dataset, label_set: str | None) -> None:
    decision = load_routes(ROUTES).route(dataset)
    if label_set is None:
        assert isinstance(decision, Skip), decision
    else:
        assert isinstance(decision, Route) and decision.label_set == label_set, decision
