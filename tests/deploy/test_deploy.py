"""Deployment checks that need no Docker engine (issue 8).

- ``docker-compose.yml`` validates against the Compose Specification's JSON Schema (vendored, see tests/data).
- Both Dockerfiles parse (dockerfile-parse), pin their base images, and COPY only paths that exist and that
  ``.dockerignore`` lets into the build context (docker-py's implementation of the .dockerignore rules).
- The serving image's requirements hold no torch: the wheel is built from exactly the files Docker would send,
  and the closure of what the runtime stage pip-installs is resolved from its metadata.
- Every command that compose runs is a real ``albef`` command (``--help`` exits 0, the full argv parses).
- The services' commands run for real, with the environment compose gives them and the container paths mapped
  onto temporary folders, on loopback, with torch made unimportable (as in the serving image): the indexer
  builds an index, the api serves it, a query answers, and a version the indexer publishes later is picked up
  without a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from email.parser import Parser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = REPO
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
# sha256 of compose-spec/compose-spec@00655e2222608fa6eaecdf12ac5195889ca2244a:schema/compose-spec.json
SCHEMA_SHA256 = "bc50c2d79102aed8df21b3a13e56c9396c7a06da6cff5ce37629f2ee7eb41735"
DOCKERFILES = {"serve": ROOT / "docker" / "Dockerfile.serve", "train": ROOT / "docker" / "Dockerfile.train"}
# Never in the serving image (directly or through any dependency).
TORCH_STACK = {"torch", "torchvision", "torchaudio", "timm", "transformers", "triton"}
ALBEF = shutil.which("albef") or "albef"
# An exact tag (x.y.z...), optionally with a digest; never :latest or a floating x.y tag.
PINNED_IMAGE = r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?"


# --- compose helpers ------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``, applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group("name"), m.group("op"), m.group("default")
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VAR.sub(sub, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return raw if env is None else interpolate(raw, env)


def service_env(service: dict[str, Any], host_env: Mapping[str, str]) -> dict[str, str]:
    """The ``environment:`` of a service as compose resolves it (a key without value passes the host's)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    out: dict[str, str] = {}
    for key, value in env.items():
        if value is None:
            if key in host_env:
                out[key] = host_env[key]
        else:
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def service_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container target, read_only) of each volume of a service (short or long syntax)."""
    mounts = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target, ro = vol.get("source", ""), vol["target"], bool(vol.get("read_only"))
        mounts.append((source, target, ro))
    return mounts


def map_paths(value: str, mapping: Mapping[str, Path]) -> str:
    """Rewrite a container path (or a path under one) onto the host folder its mount maps to."""
    for target in sorted(mapping, key=len, reverse=True):
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(mapping[target]) + value[len(target.rstrip("/")) :]
    return value


# --- Dockerfile helpers ---------------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> DockerfileParser:
    # fileobj, not path: DockerfileParser(path=DIR) would take DIR/Dockerfile, and setting .content writes.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=True)


def stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions grouped by build stage (everything before the first FROM is stage -1 and dropped)."""
    out: list[list[dict[str, Any]]] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out and ins["instruction"] != "COMMENT":
            out[-1].append(ins)
    return out


def global_args(parser: DockerfileParser) -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults (what FROM lines may use)."""
    args: dict[str, str] = {}
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            break
        if ins["instruction"] == "ARG":
            name, _, default = ins["value"].partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def resolve_args(text: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def copy_sources(parser: DockerfileParser) -> Iterator[str]:
    """Build-context paths of every COPY/ADD (those with --from= copy from another stage, not the context)."""
    for ins in parser.structure:
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins["value"])
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        if paths and paths[0].startswith("["):  # JSON form
            paths = json.loads(ins["value"][ins["value"].index("[") :])
        yield from paths[:-1]


def pip_installs(instructions: list[dict[str, Any]]) -> list[list[str]]:
    """The arguments after ``pip install`` of each pip call in some RUN instructions."""
    calls = []
    for ins in instructions:
        if ins["instruction"] != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", ins["value"]):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    calls.append(words[i + 2 :])
                    break
    return calls


_PIP_VALUE_OPTIONS = {
    "-f",
    "--find-links",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-c",
    "--constraint",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--platform",
    "--python-version",
}


def pip_requirements(args: list[str]) -> list[str]:
    """Requirement specifiers of one pip install call (option values skipped; -r files are refused)."""
    reqs, skip = [], False
    for word in args:
        if skip:
            skip = False
            continue
        if word in ("-r", "--requirement", "-e", "--editable"):
            raise AssertionError(f"the serving image must install named requirements, not {word}")
        if word in _PIP_VALUE_OPTIONS:
            skip = True
            continue
        if word.startswith("-"):
            continue
        reqs.append(word)
    return reqs


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def build_context() -> set[str]:
    """Paths (files and folders, relative, '/'-separated) that `docker build .` would send."""
    return {p.replace(os.sep, "/") for p in exclude_paths(str(ROOT), dockerignore_patterns())}


@pytest.fixture(scope="module")
def built_wheel(
    build_context: set[str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], Any, str]:
    """The wheel both builder stages build, from exactly the files `docker build` would send:
    (file names, METADATA, entry_points.txt)."""
    tmp = tmp_path_factory.mktemp("wheel")
    ctx = tmp / "ctx"
    for rel in build_context:
        if (ROOT / rel).is_file():
            (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, ctx / rel)
    out = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(out),
            str(ctx),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("albef_search-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = Parser().parsestr(
            zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        )
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    return names, meta, entry_points


# --- albef CLI helpers ----------------------------------------------------------------------------------


def subcommand_path(argv: list[str]) -> list[str]:
    """The leading words of ``argv`` that name (nested) albef subcommands, e.g. ['index', 'build']."""
    from albef.cli import build_parser

    parser, path = build_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        path.append(word)
        parser = subs[0].choices[word]
    return path


# --- compose file ---------------------------------------------------------------------------------------


def test_vendored_schema_is_the_recorded_file() -> None:
    data = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SCHEMA_SHA256
    schema = json.loads(data)
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"
    readme = (SCHEMA_FILE.parent / "README.md").read_text()
    assert "compose-spec/compose-spec" in readme and "00655e2222608fa6eaecdf12ac5195889ca2244a" in readme
    assert "Apache" in readme


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    # As written, and as compose sees it after interpolation (no variables set, and some set).
    for compose in (
        load_compose(),
        load_compose({}),
        load_compose({"API_BIND": "0.0.0.0:9000", "INDEX_NAME": "v2"}),
    ):
        errors = [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)
        ]
        assert errors == []
    # The validator does reject what compose would: a misspelt key and a wrongly typed value.
    broken = load_compose()
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(broken)
    broken = load_compose()
    broken["services"]["api"]["deploy"]["resources"]["limits"]["memory"] = 4
    assert not validator.is_valid(broken)


def test_compose_services_are_wired_as_documented() -> None:
    compose = load_compose({})
    services = compose["services"]
    assert {"api", "indexer", "indexer-update", "trainer", "trainer-gpu", "exporter", "demo"} <= set(services)
    api = services["api"]
    assert "profiles" not in api  # `docker compose up` starts the api
    assert api["restart"] in ("always", "unless-stopped", "on-failure")
    assert api["healthcheck"]["test"][0] == "CMD" and "/readyz" in " ".join(api["healthcheck"]["test"])
    limits = api["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert all(k.startswith("ALBEF_") for k in api["environment"])
    assert api["environment"]["ALBEF_API_KEY"] is None  # passed through from the host; no key is written here
    # The api reads (only) what the indexer writes, through the same named volume.
    api_mounts = {t: (s, ro) for s, t, ro in service_mounts(api)}
    for job in ("indexer", "indexer-update"):
        mounts = {t: (s, ro) for s, t, ro in service_mounts(services[job])}
        assert services[job]["profiles"] == ["index"]
        assert mounts["/data/indexes"] == (api_mounts["/data/indexes"][0], False)
        assert services[job]["restart"] == "no"
    assert api_mounts["/data/indexes"][1] and api_mounts["/data/models"][1]  # read-only in the api
    index_dir = api["environment"]["ALBEF_INDEX_DIR"]
    assert index_dir in services["indexer"]["command"] and index_dir in services["indexer-update"]["command"]
    # The exporter writes the bundle the indexer encodes with.
    bundle = services["indexer"]["command"][services["indexer"]["command"].index("--model") + 1]
    assert services["exporter"]["command"][-1] == bundle
    # Training: CPU by default, a GPU reservation in its own profile.
    assert services["trainer"]["profiles"] == ["train"]
    assert "devices" not in services["trainer"].get("deploy", {}).get("resources", {}).get("reservations", {})
    devices = services["trainer-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and services["trainer-gpu"]["profiles"] == ["train-gpu"]
    # The demo: its own profile and cache volume, the training image (it exports the shipped model).
    demo = services["demo"]
    assert demo["profiles"] == ["demo"] and demo["build"]["dockerfile"].endswith("Dockerfile.train")
    cache = demo["command"][demo["command"].index("--cache") + 1]
    assert any(t == cache and not ro for _, t, ro in service_mounts(demo))
    # Base images passed as build arguments are pinned like the Dockerfiles' own.
    for svc in services.values():
        for arg, value in (svc["build"].get("args") or {}).items():
            if arg.endswith("IMAGE"):
                assert re.fullmatch(PINNED_IMAGE, value), f"{arg}={value}"
    # Images come from the two Dockerfiles.
    for name, svc in services.items():
        dockerfile = svc["build"]["dockerfile"]
        assert (ROOT / svc["build"]["context"] / dockerfile).resolve() in {
            p.resolve() for p in DOCKERFILES.values()
        }
        if name in ("api", "indexer", "indexer-update"):
            assert dockerfile.endswith("Dockerfile.serve")


def test_compose_environment_names_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ALBEF_* variable compose sets is a field of albef.settings.Settings (or a logging variable), and
    the api's values (with the image's ENV under them) are valid settings."""
    from albef.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "ALBEF_"
    known = {prefix + name.upper() for name in Settings.model_fields} | {
        "ALBEF_LOG_LEVEL",
        "ALBEF_LOG_FORMAT",
        "ALBEF_VOCAB",
    }
    services = load_compose({})["services"]
    for name, svc in services.items():
        unknown = set(svc.get("environment") or {}) - known
        assert not unknown, f"{name}: {unknown} are no settings"
    for key in [k for k in os.environ if k.startswith("ALBEF_")]:
        monkeypatch.delenv(key)
    for ins in stages(parse_dockerfile(DOCKERFILES["serve"]))[-1]:
        if ins["instruction"] == "ENV":
            for word in shlex.split(ins["value"]):
                key, _, value = word.partition("=")
                monkeypatch.setenv(key, value)
    api_env = service_env(services["api"], {})
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.index_dir) == api_env["ALBEF_INDEX_DIR"]
    assert settings.host == "0.0.0.0" and settings.port == 8000 and settings.api_key is None


# --- Dockerfiles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfile_parses_multistage_pinned_non_root(which: str) -> None:
    parser = parse_dockerfile(DOCKERFILES[which])
    st = stages(parser)
    assert len(st) >= 2 and parser.is_multistage
    args = global_args(parser)
    stage_names = {s[0]["value"].split()[-1] for s in st if " AS " in s[0]["value"].upper()}
    for stage in st:
        image = resolve_args(stage[0]["value"].split()[0], args)
        if image in stage_names:
            continue
        assert re.fullmatch(PINNED_IMAGE, image), image
    final = st[-1]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [i["value"] for i in final if i["instruction"] == "ENTRYPOINT"] == ['["albef"]']
    assert not any(i["instruction"] == "ADD" for s in st for i in s)
    # No secrets or data baked in: no credentials in ENV/ARG, no COPY of data folders.
    for ins in parser.structure:
        if ins["instruction"] in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\s*=", ins["value"], re.I), ins["value"]


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_and_are_in_the_build_context(which: str, build_context: set[str]) -> None:
    sources = list(copy_sources(parse_dockerfile(DOCKERFILES[which])))
    assert sources
    for src in sources:
        rel = src.rstrip("/")
        assert (ROOT / rel).exists(), f"COPY {src}: no such path"
        assert rel in build_context, f"COPY {src}: excluded by .dockerignore"
        if (ROOT / rel).is_dir():
            assert any(p.startswith(rel + "/") for p in build_context)


def test_build_context_holds_no_tests_data_or_secrets(build_context: set[str]) -> None:
    assert "pyproject.toml" in build_context and "albef/cli.py" in build_context
    for path in build_context:
        top = path.split("/")[0]
        assert top not in {"tests", "bench", "runs", "artifacts", ".git", "docker", "scripts", ".venv"}, path
        assert "__pycache__" not in path and not path.endswith((".pyc", ".env", ".pem", ".key", ".tmp")), path
        if path.startswith("model/graphs/"):
            # helper graphs of the runtime (a Cast node), package data written by scripts/make_graphs.py
            assert path.endswith(".onnx") and (ROOT / path).stat().st_size < 4096, path
            continue
        assert not path.endswith((".onnx", ".pth", ".faiss", ".sqlite", ".npy")), path


def test_healthcheck_uses_readyz_without_curl() -> None:
    parser = parse_dockerfile(DOCKERFILES["serve"])
    (hc,) = [i["value"] for i in stages(parser)[-1] if i["instruction"] == "HEALTHCHECK"]
    argv = json.loads(hc[hc.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2] and "/readyz" in argv[2]
    assert "curl" not in hc and "wget" not in hc
    compose_hc = load_compose({})["services"]["api"]["healthcheck"]["test"]
    assert compose_hc == ["CMD", *argv]


def test_serving_image_requirements_exclude_torch(built_wheel: tuple[list[str], Any, str]) -> None:
    parser = parse_dockerfile(DOCKERFILES["serve"])
    st = stages(parser)
    # The builder wheels the project itself, without extras.
    builder_runs = " ".join(i["value"] for i in st[0] if i["instruction"] == "RUN")
    assert re.search(r"pip wheel .*\s\.(\s|$)", builder_runs) and "[" not in builder_runs
    # The runtime installs named requirements only; the project without any extra.
    calls = pip_installs(st[-1])
    assert calls, "the runtime stage installs nothing"
    reqs = [Requirement(r) for call in calls for r in pip_requirements(call)]
    project = [r for r in reqs if canonicalize_name(r.name) == "albef-search"]
    assert len(project) == 1 and project[0].extras == set()
    assert not {canonicalize_name(r.name) for r in reqs} & TORCH_STACK

    names, meta, entry_points = built_wheel
    assert "albef = albef.cli:main" in entry_points
    for pkg in (
        "albef/cli.py",
        "albef/model/runtime.py",
        "albef/index/reader.py",
        "albef/service/__init__.py",
        "albef/model/configs/albef-tiny.json",
    ):
        assert pkg in names, f"{pkg} missing from the wheel"
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    base = [r for r in requires if r.marker is None or r.marker.evaluate({"extra": ""})]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(str(r) for r in base) == sorted(str(Requirement(d)) for d in declared)

    # The whole closure of the base dependencies (as installed here) is torch-free.
    seen: set[str] = set()
    todo = list(base) + [r for r in reqs if r not in project]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(f"{name} (a serving dependency) is not installed here to resolve") from None
        todo.extend(Requirement(r) for r in dist.requires or [])
    assert {canonicalize_name(d) for d in ("onnxruntime", "faiss-cpu", "fastapi", "uvicorn")} <= seen
    assert not seen & TORCH_STACK, seen & TORCH_STACK
    assert not [n for n in seen if n.startswith("nvidia-")]


def test_wheel_ships_what_the_compose_defaults_use(built_wheel: tuple[list[str], Any, str]) -> None:
    """In the images the package is a wheel, not a checkout: the trainer's default recipe, the demo's shipped
    checkpoint and the web page must be package data."""
    names = set(built_wheel[0])
    services = load_compose({})["services"]
    recipe = services["trainer"]["command"][services["trainer"]["command"].index("--config") + 1]
    assert f"albef/model/train/recipes/{recipe}.yaml" in names
    for rel in (
        "model/weights/albef-tiny-synth/config.json",
        "model/weights/albef-tiny-synth/model.safetensors",
        "service/static/index.html",
    ):
        assert f"albef/{rel}" in names, f"{rel} is not in the wheel"


def test_training_image_pins_torch_as_pyproject_does() -> None:
    parser = parse_dockerfile(DOCKERFILES["train"])
    args = {}
    for ins in parser.structure:
        if ins["instruction"] == "ARG" and "=" in ins["value"]:
            name, _, value = ins["value"].partition("=")
            args[name] = value.strip('"')
    # The image pins the pair CI tests with (scripts/constraints.txt); the published extra only states ranges
    # that admit it (no exact pins in what users install).
    ci = dict(
        line.split("==")
        for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert ci == {"torch": args["TORCH_VERSION"], "torchvision": args["TORCHVISION_VERSION"]}
    for extra in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ].values():
        for req in map(Requirement, extra):
            assert not any(sp.operator == "==" for sp in req.specifier) or not req.name.startswith("torch"), (
                req
            )
    train = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, train)}
    assert pins["torch"].specifier.contains(args["TORCH_VERSION"])
    assert pins["torchvision"].specifier.contains(args["TORCHVISION_VERSION"])
    assert args["TORCH_INDEX_URL"].endswith("/cpu")  # CPU by default; CUDA by build argument
    runs = " ".join(i["value"] for i in stages(parser)[1] if i["instruction"] == "RUN")
    assert "[train]" in runs and "[test]" not in runs


# --- commands -------------------------------------------------------------------------------------------


def test_every_compose_command_is_a_real_albef_command() -> None:
    from albef.cli import build_parser

    services = load_compose({})["services"]
    procs = {}
    for name, svc in services.items():
        argv = [str(a) for a in svc["command"]]
        path = subcommand_path(argv)
        assert path, f"{name}: {argv[0]!r} is no albef command"
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"{name}: `albef {' '.join(argv)}` does not parse") from exc
        procs[name] = (
            path,
            subprocess.Popen(
                [ALBEF, *path, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
    for name, (path, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: albef {' '.join(path)} --help: {err}"
        assert out.startswith(f"usage: albef {' '.join(path)}"), out[:200]


# --- the services' commands, run for real ---------------------------------------------------------------

# Put first on PYTHONPATH of the serving commands: makes the torch stack unimportable, as in the serving image.
_NO_TORCH = '''
import sys

class _NotInServingImage:
    """Import finder that refuses the torch stack: it is not installed in docker/Dockerfile.serve's image."""
    BLOCKED = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the serving image)", name=name)
        return None

sys.meta_path.insert(0, _NotInServingImage())
'''


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComposeRunner:
    """Runs compose services' commands as local processes: compose's environment, image ENV, volume paths
    mapped onto folders under ``root`` (one folder per named volume, shared by the services)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.compose = load_compose({})  # compose's defaults: no variables set
        self.image_env = {}  # ALBEF_* set by ENV in each image's final stage
        for which, path in DOCKERFILES.items():
            env = {}
            for ins in stages(parse_dockerfile(path))[-1]:
                if ins["instruction"] == "ENV":
                    env.update(word.partition("=")[::2] for word in shlex.split(ins["value"]))
            self.image_env[which] = {k: v for k, v in env.items() if k.startswith("ALBEF_")}
        blocker = root / "no-torch"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(_NO_TORCH.format(BLOCKED=sorted(TORCH_STACK)))
        self.blocker = blocker

    def folder(self, source: str) -> Path:
        """The host folder of a volume: named volumes and bind mounts each get their own."""
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        path = self.root / f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', source.strip('./')) or 'root'}"
        path.mkdir(exist_ok=True)
        return path

    def mapping(self, service: str) -> dict[str, Path]:
        return {
            target: self.folder(source)
            for source, target, _ in service_mounts(self.compose["services"][service])
        }

    def command(
        self, service: str, overrides: Mapping[str, str] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """argv and environment of a service's process. Services of the serving image run without torch."""
        svc = self.compose["services"][service]
        which = "serve" if svc["build"]["dockerfile"].endswith("Dockerfile.serve") else "train"
        mapping = self.mapping(service)
        host = {k: v for k, v in os.environ.items() if not k.startswith("ALBEF_")}
        env = {**host, **self.image_env[which]}
        env.update({k: map_paths(v, mapping) for k, v in service_env(svc, host).items()})
        env.update(overrides or {})
        if which == "serve":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.blocker), env.get("PYTHONPATH")]))
        argv = [ALBEF, *(map_paths(str(a), mapping) for a in svc["command"])]
        return argv, env

    def run(self, service: str, *, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        argv, env = self.command(service)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        assert proc.returncode == 0, f"{service}: {' '.join(argv)}\n{proc.stderr[-3000:]}"
        return proc


def _healthcheck(argv: list[str], env: Mapping[str, str]) -> int:
    return subprocess.run(argv, env=dict(env), capture_output=True, timeout=30).returncode


def test_compose_services_run_index_serve_query_and_hot_swap(tiny_bundle: Path, tmp_path: Path) -> None:
    import time

    import httpx

    runner = ComposeRunner(tmp_path)
    services = runner.compose["services"]

    # A tiny synthetic gallery (albef data synth) in the indexer's bind mount; the model bundle (albef export
    # of the tiny checkpoint) where the exporter would have written it.
    synth = tmp_path / "synth"
    subprocess.run(
        [ALBEF, "data", "synth", "--images", "12", "--seed", "3", str(synth)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    images = sorted((synth / "images").glob("*.png"))
    gallery = runner.mapping("indexer")["/data/gallery"]
    for img in images[:8]:
        shutil.copy2(img, gallery / img.name)
    exporter_out = map_paths(services["exporter"]["command"][-1], runner.mapping("exporter"))
    shutil.copytree(tiny_bundle, exporter_out)

    # indexer: version 000001 in the shared indexes volume.
    runner.run("indexer")
    index_dir = Path(map_paths(services["api"]["environment"]["ALBEF_INDEX_DIR"], runner.mapping("api")))
    assert (index_dir / "current").read_text().strip() == "000001"

    # api: on loopback (compose binds 0.0.0.0 inside its own network namespace) and a free port.
    port = _free_port()
    argv, env = runner.command(
        "api", {"ALBEF_HOST": "127.0.0.1", "ALBEF_PORT": str(port), "ALBEF_RELOAD_INTERVAL_S": "0.5"}
    )
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(runner.blocker)  # the api runs without torch
    hc = services["api"]["healthcheck"]["test"][1:]
    assert _healthcheck(hc, env) != 0  # nothing listens yet: unhealthy
    api = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while _healthcheck(hc, env) != 0:
            assert api.poll() is None, f"api exited: {api.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "api never became ready"
            time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            info = client.get("/v1/index").json()
            assert info["version"] == "000001" and info["counts"]["image"] == 8
            r = client.post("/v1/search/images", json={"text": "a red square above a green circle", "k": 3})
            assert r.status_code == 200, r.text
            hits = r.json()["results"]
            assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
            first_ids = {h["id"] for h in hits}

            # The indexer publishes a new version (more images); the same api process swaps to it.
            for img in images[8:]:
                shutil.copy2(img, gallery / img.name)
            runner.run("indexer-update")
            assert (index_dir / "current").read_text().strip() == "000002"
            deadline = time.monotonic() + 30
            while (info := client.get("/v1/index").json())["version"] != "000002":
                assert time.monotonic() < deadline, f"api still serves {info['version']}"
                time.sleep(0.25)
            assert info["counts"]["image"] == 12 and api.poll() is None
            r = client.post(
                "/v1/search/images",
                json={"text": "a red square above a green circle", "k": 12, "rerank": False},
            )
            assert r.status_code == 200, r.text
            ids = [h["id"] for h in r.json()["results"]]
            assert len(ids) == 12 == len(set(ids)) and first_ids <= set(ids)
            # The image's own HEALTHCHECK (as written in the Dockerfile) agrees.
            df_hc = json.loads(
                next(
                    i["value"]
                    for i in stages(parse_dockerfile(DOCKERFILES["serve"]))[-1]
                    if i["instruction"] == "HEALTHCHECK"
                ).split("CMD", 1)[1]
            )
            assert _healthcheck(df_hc, env) == 0
    finally:
        api.terminate()
        try:
            api.wait(timeout=20)
        except subprocess.TimeoutExpired:
            api.kill()
            raise
    assert api.returncode == 0 or api.returncode == -15


def test_demo_in_a_serving_only_install_names_the_extra_it_needs(tmp_path: Path) -> None:
    """Without torch (the serving install), building the demo stops with one line naming the extra."""
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_NO_TORCH.format(BLOCKED=sorted(TORCH_STACK)))
    env = {**os.environ, "PYTHONPATH": str(blocker), "ALBEF_LOG_LEVEL": "WARNING"}
    r = subprocess.run(
        [ALBEF, "demo", "--no-serve", "--cache", str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("albef demo: error: building the demo needs the train extra")
    assert "pip install 'albef-search[train]'" in last
