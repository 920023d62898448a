"""What users of photos, servers and CLIs expect: upright photos, an allow-list of decoders, honest metrics,
unspoofable logs with an access log and request ids, conventional exit codes and --json, a typed package,
and one home for configuration (albef.settings)."""

from __future__ import annotations

import ast
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO
from tests.helpers.service import live_server, settings


# -- photos ------------------------------------------------------------------------------------------------
def _photo_pair(tmp: Path) -> tuple[Path, Path]:
    """A JPEG stored sideways (40 wide, 20 high) with EXIF orientation 6 ("turn 90 degrees clockwise to
    view"), and the same decoded pixels turned upright and saved as PNG without EXIF (20 wide, 40 high)."""
    rng = np.random.default_rng(3)
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:10] = (230, 30, 30)  # a red band at the top of the upright photo
    upright[10:] = rng.integers(0, 120, (30, 20, 3))
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera writes
    assert stored.size == (40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = tmp / "phone.jpg"
    stored.save(jpeg, quality=95, exif=exif.tobytes())
    decoded = np.asarray(Image.open(jpeg).convert("RGB"))  # the stored pixel order, after JPEG
    png = tmp / "upright.png"
    Image.fromarray(np.rot90(decoded, k=-1).copy()).save(png)  # turned 90 degrees clockwise
    return jpeg, png


def test_exif_orientation_is_applied_unless_the_official_loader_is_asked_for(tmp_path: Path) -> None:
    from albef.model.image import load_image, preprocess

    jpeg, png = _photo_pair(tmp_path)
    assert load_image(jpeg).size == (20, 40) and load_image(jpeg, exif_transpose=False).size == (40, 20)
    assert np.array_equal(np.asarray(load_image(jpeg)), np.asarray(load_image(png)))
    up, ref, official = (
        preprocess([p], 32, exif_transpose=e) for p, e in ((jpeg, True), (png, True), (jpeg, False))
    )
    assert np.array_equal(up, ref) and not np.allclose(official, ref, atol=0.1)


def test_exif_rotated_photo_is_indexed_and_queried_upright(tiny_bundle: Path, tmp_path: Path) -> None:
    """Index build and upload query see the same upright photo: the EXIF JPEG's image vector, stored size and
    query results equal those of the upright PNG; the official loader keeps it sideways."""
    from albef.index.builder import BuildOptions, build
    from albef.index.reader import IndexReader
    from albef.model.runtime import Bundle

    folder = tmp_path / "photos"
    folder.mkdir()
    jpeg, png = _photo_pair(folder)
    (folder / "caption.txt").write_text("a red band above a dark square\n")
    bundle = Bundle.load(tiny_bundle)
    vectors = {}
    for name, official in (("idx", False), ("official", True)):
        build(
            tmp_path / name,
            bundle,
            [folder, folder / "caption.txt"],
            BuildOptions(progress=False, workers=1, exif_transpose=not official),
        )
        with IndexReader.open(tmp_path / name) as r:
            items = {
                Path(it["path"]).name: it
                for it in r.items(range(r.manifest["next_id"]))
                if it["kind"] == "image"
            }
            vectors[name] = {n: r.vector("image", it["id"]) for n, it in items.items()}
            sizes = {n: (it["width"], it["height"]) for n, it in items.items()}
        assert sizes["phone.jpg"] == ((40, 20) if official else (20, 40)) and sizes["upright.png"] == (20, 40)
    assert np.array_equal(vectors["idx"]["phone.jpg"], vectors["idx"]["upright.png"])
    assert not np.array_equal(vectors["official"]["phone.jpg"], vectors["official"]["upright.png"])

    with live_server(settings(tmp_path / "idx")) as srv, srv.client() as c:
        answers = [
            c.post("/v1/search/texts", files={"image": (p.name, p.read_bytes())}, data={"k": "1"}).json()
            for p in (jpeg, png)
        ]
    assert answers[0]["results"] == answers[1]["results"] and answers[0]["results"]


# -- decoders ----------------------------------------------------------------------------------------------
def _pcx_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="PCX")
    return buf.getvalue()


def test_upload_outside_the_allow_list_is_415_naming_the_format(service_index: Path) -> None:
    with live_server(settings(service_index, image_formats="png,jpeg")) as srv, srv.client() as c:
        r = c.post("/v1/search/texts", files={"image": ("x.pcx", _pcx_bytes())})
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_image_format" and "PCX images are not accepted" in err["message"]
        assert err.get("field") == "image" and "PNG, JPEG" in err["message"]
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="WEBP")  # a default format, but not in this allow-list
        assert c.post("/v1/search/texts", files={"image": ("x.webp", buf.getvalue())}).status_code == 415
        assert c.post("/v1/search/texts", files={"image": ("x.png", b"not an image")}).status_code == 422


def test_index_build_reports_and_skips_a_refused_format(tiny_bundle: Path, tmp_path: Path) -> None:
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ok.png")
    (folder / "disguised.png").write_bytes(_pcx_bytes())  # a PCX file with a .png name
    result = build(
        tmp_path / "index", Bundle.load(tiny_bundle), [folder], BuildOptions(progress=False, workers=1)
    )
    assert result.manifest["counts"]["image"] == 1
    failed = result.report["failed"]
    assert len(failed) == 1 and failed[0]["path"].endswith("disguised.png")
    assert failed[0]["error"].startswith("refused: PCX images are not accepted")


def test_format_names_are_validated() -> None:
    from albef.model.image import DEFAULT_FORMATS, parse_formats
    from albef.settings import Settings

    assert parse_formats(" jpeg ,PNG") == ("JPEG", "PNG")
    with pytest.raises(ValueError, match="unknown image formats"):
        parse_formats("jpeg,heic-ish")
    assert tuple(Settings().image_formats) == DEFAULT_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
    from albef.index.cli import FORMATS_HELP

    assert FORMATS_HELP == ",".join(DEFAULT_FORMATS)


# -- metrics, logs, request ids ----------------------------------------------------------------------------
def test_metrics_label_real_routes_and_only_real_404s_as_unmatched(service_index: Path) -> None:
    with live_server(settings(service_index)) as srv, srv.client() as c:
        for path in ("/", "/static/app.js", "/openapi.json", "/docs", "/v1/items/0", "/nowhere"):
            c.get(path)
        text = c.get("/metrics").text
    for route, status in (
        ("/", 200),
        ("/static/{path}", 200),
        ("/openapi.json", 200),
        ("/docs", 200),
        ("/v1/items/{item_id}", 200),
        ("unmatched", 404),
    ):
        assert f'route="{route}",status="{status}"' in text, route
    assert 'route="unmatched",status="200"' not in text
    assert "_created" not in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    for stage in ("decode", "encode_text", "encode_image", "rerank"):
        assert f'albef_queue_rejections_total{{stage="{stage}"}} 0.0' in text
    assert 'albef_index_reloads_total{result="error"} 0.0' in text
    # refused by the API key before routing: still counted under the route it was for
    with live_server(settings(service_index, api_key="k")) as srv, srv.client() as c:
        assert c.get("/v1/items/0").status_code == 401
        text = c.get("/metrics", headers={"X-API-Key": "k"}).text
    assert 'route="/v1/items/{item_id}",status="401"' in text and 'route="unmatched"' not in text


def test_log_extra_cannot_replace_core_keys() -> None:
    from albef.log import JSONFormatter

    record = logging.getLogger("albef.test").makeRecord(
        "albef.test",
        logging.INFO,
        __file__,
        1,
        "real message",
        None,
        None,
        extra={"level": "critical", "ts": "1970", "logger": "root", "exc": "forged", "user": "u1"},
    )
    line = json.loads(JSONFormatter().format(record))
    assert line["level"] == "info" and line["logger"] == "albef.test" and line["msg"] == "real message"
    assert line["ts"] != "1970" and "exc" not in line
    assert line["extra_level"] == "critical" and line["extra_exc"] == "forged" and line["user"] == "u1"
    assert line["extra_ts"] == "1970" and line["extra_logger"] == "root"


def test_access_log_and_request_ids(service_index: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="albef.access")
    with live_server(settings(service_index)) as srv, srv.client() as c:
        given = c.get("/v1/items/0", headers={"X-Request-ID": "trace-42"})
        made = c.get("/v1/items/999999")
        bad = c.get("/healthz", headers={"X-Request-ID": "x" * 200})
    assert given.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32 and made.status_code == 404
    assert len(bad.headers["x-request-id"]) == 32  # an over-long id is replaced, not logged
    lines = [r for r in caplog.records if r.name == "albef.access"]
    first = next(r for r in lines if getattr(r, "request_id", None) == "trace-42")
    assert (first.method, first.route, first.status) == ("GET", "/v1/items/{item_id}", 200)
    assert first.duration_ms > 0
    assert any(r.request_id == made.headers["x-request-id"] and r.status == 404 for r in lines)

    caplog.clear()
    with live_server(settings(service_index, access_log=False)) as srv, srv.client() as c:
        c.get("/healthz")
    assert not [r for r in caplog.records if r.name == "albef.access"]


# -- CLI ---------------------------------------------------------------------------------------------------
def _albef(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "albef", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "ALBEF_LOG_LEVEL": "WARNING", **(env or {})},
        timeout=300,
    )


def test_exit_codes_and_messages_name_the_subcommand(tmp_path: Path) -> None:
    from albef.cli import main

    r = _albef("index", "info", str(tmp_path / "none"))
    assert r.returncode == 1 and r.stderr.startswith("albef index info: error:"), r.stderr
    r = _albef("index", "delete", "--index", str(tmp_path), "--ids", "a,b")
    assert (
        r.returncode == 2 and "albef index delete: error: --ids must be comma-separated integers" in r.stderr
    )
    assert _albef("index", "info").returncode == 2  # argparse's own usage error
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 1
    assert main(["serve", "--index", str(tmp_path), "--port", "99999"]) == 2


def test_json_outputs_of_index_commands_and_export(
    tiny_bundle: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 10, 200)).save(folder / f"{i}.png")
    r = _albef(
        "index", "build", "--model", str(tiny_bundle), "--out", str(tmp_path / "ix"), "--json", str(folder)
    )
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert built["version"] == "000001" and built["counts"] == {"image": 3, "text": 0}
    assert "\r" not in r.stderr  # no progress frames without a terminal
    Image.new("RGB", (16, 16), (1, 1, 1)).save(folder / "3.png")
    added = json.loads(_albef("index", "add", "--index", str(tmp_path / "ix"), "--json", str(folder)).stdout)
    assert added["version"] == "000002" and added["counts"]["image"] == 4
    deleted = json.loads(
        _albef("index", "delete", "--index", str(tmp_path / "ix"), "--ids", "0", "--json").stdout
    )
    assert deleted["version"] == "000003" and deleted["deleted"] == 1 and deleted["counts"]["image"] == 3
    info = json.loads(_albef("index", "info", str(tmp_path / "ix"), "--at", "000001", "--json").stdout)
    assert info["version"] == "000001"
    r = _albef("export", str(tiny_checkpoint), str(tmp_path / "bundle"), "--variants", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["bundle_id"]) == 64 and list(out["variants"]) == ["fp32"] and "\r" not in r.stderr


def test_progress_bars_only_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from albef.progress import progress_bar

    for _ in progress_bar(range(3), desc="x"):
        pass
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a TTY
    bar = progress_bar(range(3), enabled=False)
    assert bar.disable


# -- package -----------------------------------------------------------------------------------------------
def test_package_is_typed_and_the_api_declares_its_key_and_operation_ids() -> None:
    import albef
    from albef.service.app import create_app
    from albef.settings import Settings

    assert (Path(albef.__file__).parent / "py.typed").is_file()
    spec = create_app(Settings()).openapi()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["bearer"]["scheme"] == "bearer"
    ops = {
        op["operationId"]: (path, op) for path, methods in spec["paths"].items() for op in methods.values()
    }
    assert {
        "search_images",
        "search_texts",
        "explain",
        "get_item",
        "get_item_image",
        "get_index",
        "get_metrics",
        "healthz",
        "readyz",
    } == set(ops)
    for op_id, (_path, op) in ops.items():
        assert ("security" in op) == (op_id not in ("healthz", "readyz")), op_id


def test_serving_dependencies_are_only_what_serving_needs() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert not base & {"httpx", "safetensors", "transformers", "torch"}
    assert project["license"] == "BSD-3-Clause"


# -- code style: ruff format and ruff check over all of the repository's Python code ----------------------
RUFF_PATHS = ("model", "index", "service", "albef", "tests", "bench", "scripts")


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ruff ARGS`` in the repository root with its pyproject.toml settings, writing no cache."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache"],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_ruff_sorts_every_albef_import_into_one_first_party_group() -> None:
    """albef.model/index/service live in model/, index/, service/ (package-dir): without known-first-party
    ruff would file them apart from albef.settings."""
    code = "import numpy\n\nfrom albef.model.image import load_image\n\nfrom albef.settings import Settings\n"
    r = _ruff(
        "check", "--select", "I", "--output-format", "json", "--stdin-filename", "tests/x.py", "-", stdin=code
    )
    assert [f["code"] for f in json.loads(r.stdout)] == ["I001"], r.stdout + r.stderr


def test_python_code_is_ruff_formatted_and_lint_clean() -> None:
    fmt = _ruff("format", "--check", "--diff", *RUFF_PATHS)
    assert fmt.returncode in (0, 1), fmt.stderr
    unformatted = sorted({line[4:].strip() for line in fmt.stdout.splitlines() if line.startswith("+++ ")})
    lint = _ruff("check", "--no-fix", "--output-format", "json", *RUFF_PATHS)
    assert lint.returncode in (0, 1), lint.stderr
    findings = sorted(
        {f"{Path(f['filename']).relative_to(REPO).as_posix()}: {f['code']}" for f in json.loads(lint.stdout)}
    )
    problems = [
        f"ruff format would change {len(unformatted)} files (run `ruff format`):",
        *unformatted,
        f"ruff check finds problems in {len(findings)} file/rule pairs (`ruff check --fix` fixes most):",
        *findings,
    ]
    assert not unformatted and not findings, "\n".join(problems)


# -- configuration: the environment is read in albef.settings only ------------------------------------------
ENV_SCANNED = ("albef", "model", "index", "service")
# torch.distributed's launcher protocol, read where the process group is set up.
ENV_READS_ALLOWED = {("model/train/distributed.py", key) for key in ("WORLD_SIZE", "LOCAL_RANK")}


def _environment_reads(source: str) -> list[tuple[int, str | None]]:
    """(line, variable name or None if not a literal) of every use of ``os.environ``/``os.getenv``."""
    tree = ast.parse(source)
    os_names = {
        a.asname or a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for a in n.names
        if a.name == "os"
    }
    env_attrs = ("environ", "environb", "getenv", "getenvb")
    uses = {
        id(n): n
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr in env_attrs
        and isinstance(n.value, ast.Name)
        and n.value.id in os_names
    }
    keys: dict[int, str | None] = {}
    for n in ast.walk(tree):
        target = None
        if isinstance(n, ast.Subscript):
            target, arg = n.value, n.slice
        elif isinstance(n, ast.Call) and n.args:
            func = n.func
            target = func.value if isinstance(func, ast.Attribute) and func.attr in ("get", "pop") else func
            arg = n.args[0]
        if target is not None and id(target) in uses and isinstance(arg, ast.Constant):
            keys[id(target)] = str(arg.value)
    reads = [(n.lineno, keys.get(i)) for i, n in uses.items()]
    reads += [
        (n.lineno, None)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "os" and any(a.name in env_attrs for a in n.names)
    ]
    return sorted(reads, key=lambda r: r[0])


def test_the_scan_sees_every_form_of_environment_read() -> None:
    code = (
        "import os\nimport os as o\nfrom os import getenv\nos.environ.get('A')\no.getenv('B', '1')\n"
        "os.environ['C']\n'D' in os.environ\nos.cpu_count()\n"
    )
    assert _environment_reads(code) == [(3, None), (4, "A"), (5, "B"), (6, "C"), (7, None)]


def test_no_environment_reads_outside_the_settings() -> None:
    found = []
    for top in ENV_SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "albef/settings.py":
                continue
            found += [
                f"{rel}:{line} {key}"
                for line, key in _environment_reads(path.read_text())
                if (rel, key) not in ENV_READS_ALLOWED
            ]
    assert not found, "read the environment through albef.settings: " + ", ".join(found)


def test_environment_variables_reach_their_fields(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from albef.demo import default_cache_dir
    from albef.model.text import default_vocab_path
    from albef.settings import DemoSettings, LogSettings, ModelSettings

    monkeypatch.setenv("ALBEF_VOCAB", str(tmp_path / "vocab.txt"))
    assert ModelSettings().vocab == default_vocab_path() == tmp_path / "vocab.txt"
    monkeypatch.setenv("ALBEF_LOG_LEVEL", "debug")
    monkeypatch.setenv("ALBEF_LOG_FORMAT", "TEXT")
    assert LogSettings().level == "DEBUG" and LogSettings().text_format
    monkeypatch.setenv("ALBEF_LOG_LEVEL", "")  # set but empty: the default level, and counted as asked for
    assert LogSettings().level == "INFO" and LogSettings().log_level is not None
    monkeypatch.delenv("ALBEF_DEMO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DemoSettings().xdg_cache_home == tmp_path / "xdg"
    monkeypatch.setenv("ALBEF_DEMO_CACHE", "")  # empty: unset, as before
    assert default_cache_dir() == tmp_path / "xdg" / "albef-search" / "demo"
    monkeypatch.setenv("ALBEF_DEMO_CACHE", str(tmp_path / "mine"))
    assert DemoSettings().demo_cache == default_cache_dir() == tmp_path / "mine"


def test_index_build_defaults_are_written_once_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    from albef.cli import build_parser
    from albef.errors import UsageError
    from albef.index import ann
    from albef.index import cli as index_cli
    from albef.index.options import BuildOptions
    from albef.settings import INDEX_BUILD_DEFAULTS, IndexBuildSettings

    for key in [k for k in os.environ if k.startswith("ALBEF_INDEX_")]:
        monkeypatch.delenv(key)

    def options(*flags: str) -> BuildOptions:
        args = build_parser().parse_args(["index", "build", "--model", "m", "--out", "o", *flags, "src"])
        index_cli._apply_settings(args)
        return index_cli._options(args)

    # the library, the CLI and the settings share one set of defaults; the ANN policy's stay in albef.index.ann
    shared = set(IndexBuildSettings.model_fields) & set(BuildOptions.__dataclass_fields__) - {
        "max_memory",
        "flat_below",
    }
    assert options() == BuildOptions()
    assert {n: getattr(BuildOptions(), n) for n in shared} == {
        n: getattr(INDEX_BUILD_DEFAULTS, n) for n in shared
    }
    assert BuildOptions().flat_below == ann.FLAT_BELOW and BuildOptions().max_memory is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"images per encoder call (default {INDEX_BUILD_DEFAULTS.batch_size})" in help_text
    assert f"for build, {ann.DEFAULT_MAX_MEMORY})" in help_text and f"(default {ann.FLAT_BELOW})" in help_text
    # a variable sets a default, a flag wins over it, a bad value names the variable
    monkeypatch.setenv("ALBEF_INDEX_BATCH_SIZE", "8")
    monkeypatch.setenv("ALBEF_INDEX_MAX_MEMORY", "64M")
    monkeypatch.setenv("ALBEF_INDEX_FLAT_BELOW", "10")
    monkeypatch.setenv("ALBEF_INDEX_THREADS", "")  # empty: unset
    got = options()
    assert (got.batch_size, got.max_memory, got.flat_below) == (8, "64M", 10)
    assert options("--batch-size", "3", "--flat-below", "20").batch_size == 3
    monkeypatch.setenv("ALBEF_INDEX_WORKERS", "many")
    with pytest.raises(UsageError, match="ALBEF_INDEX_WORKERS"):
        options()
