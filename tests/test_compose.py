"""Static checks of the production stack: docker-compose.yml, .env.example, Dockerfile, docs.

No Docker engine is needed: the files are parsed and checked against the real CLI and config.py.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PRODUCTION_DOC = ROOT / "README.md"  # its Production section

# Variables a brainscan container may get that config.py does not read: the platform's own.
INFRA_PREFIXES = ("POSTGRES_", "TF_", "NVIDIA_", "CUDA_", "PYTHON")
# `${NAME}` or `${NAME:-default}` etc. in compose; `$${...}` is an escaped literal for the container's shell.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def brainscan_services(services: dict) -> dict:
    """Services running the brainscan image (built here), as opposed to redis and postgres."""
    return {name: svc for name, svc in services.items()
            if "build" in svc or str(svc.get("image", "")).startswith("brainscan")}


def tokens(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def argv(svc: dict) -> list[str]:
    """What the container runs: entrypoint + command, as compose would put them together."""
    return tokens(svc.get("entrypoint")) + tokens(svc.get("command"))


def environment(svc: dict) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def config_variables() -> set[str]:
    """Every environment variable config.py reads: recorded while load_settings runs, plus every
    upper-case string literal passed to a call in its source (os.environ.get, _int, ...)."""
    import config

    class Recording(dict):
        def __init__(self):
            super().__init__()
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            self.read.add(key)
            return super().__contains__(key)

    recording = Recording()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config.os, "environ", recording)
        config.load_settings()
    names = set(recording.read)
    for node in ast.walk(ast.parse(Path(config.__file__).read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            value = node.args[0].value
            if isinstance(value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", value):
                names.add(value)
    return names


def env_example_variables() -> dict[str, bool]:
    """Variables of .env.example: name -> True when set on an active line, False when only commented."""
    found: dict[str, bool] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if m:
            found[m.group(2)] = found.get(m.group(2), False) or not m.group(1)
    return found


def test_compose_parses(compose):
    assert isinstance(compose, dict)
    assert isinstance(compose.get("services"), dict) and compose["services"]
    for name, svc in compose["services"].items():
        assert isinstance(svc, dict), name
        assert "image" in svc or "build" in svc, f"{name} has neither image nor build"


def test_service_commands_exist_in_cli(services):
    from cli import cli

    for name, svc in brainscan_services(services).items():
        args = argv(svc)
        if not args:
            continue
        if args[0] == "python":
            assert args[1:2] == ["cli.py"], f"{name}: {args}"
            sub = next((a for a in args[2:] if not a.startswith("-")), None)
            if sub is not None:
                assert sub in cli.commands, f"service {name} runs `cli.py {sub}`, which the CLI does not define"
        elif args[0] == "celery":
            assert "worker.app:app" in args, f"{name}: celery must be given --app worker.app:app: {args}"
        else:
            pytest.fail(f"service {name} runs {args[0]!r}, neither `python cli.py` nor `celery`")


def test_celery_app_references_resolve(services):
    """Every `--app MODULE:ATTR` in commands and healthchecks names a module that exists."""
    specs = set()
    for svc in brainscan_services(services).values():
        words = argv(svc) + [w for part in tokens((svc.get("healthcheck") or {}).get("test"))
                             for w in shlex.split(part)]
        for i, word in enumerate(words):
            if word in ("--app", "-A") and i + 1 < len(words):
                specs.add(words[i + 1])
            elif word.startswith("--app="):
                specs.add(word.split("=", 1)[1])
    assert specs == {"worker.app:app"}
    for spec in specs:
        module, _, attr = spec.partition(":")
        found = importlib.util.find_spec(module)
        assert found is not None and found.origin, f"{module} not found"
        tree = ast.parse(Path(found.origin).read_text())
        assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        assert attr in assigned, f"{module} assigns no {attr}"


def test_docs_commands_exist_in_cli():
    """Commands that the README tells people to run exist."""
    from cli import cli

    text = PRODUCTION_DOC.read_text()
    used = set(re.findall(r"cli\.py\s+([a-z][a-z-]*)", text))
    used |= set(re.findall(r"compose\s+run\s+(?:--?[\w-]+\s+)*cli\s+([a-z][a-z-]*)", text))
    assert used, "no commands found in the README"
    missing = sorted(used - set(cli.commands))
    assert not missing, f"the README uses commands the CLI lacks: {missing}"


def test_compose_sets_only_known_variables(services):
    known = config_variables()
    for name, svc in brainscan_services(services).items():
        unknown = [key for key in environment(svc)
                   if key not in known and not key.startswith(INFRA_PREFIXES)]
        assert not unknown, f"service {name} sets {unknown}, which config.py does not read"


def test_env_example_documents_every_setting():
    documented = env_example_variables()
    missing = sorted(config_variables() - set(documented))
    assert not missing, f".env.example lacks {missing}"
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "ARCHIVE_DIR"} <= set(documented)
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if m and not m.group(1):
            assert i > 0 and lines[i - 1].lstrip().startswith("#"), f"{m.group(2)} has no comment above it"


def test_env_example_variables_are_used():
    compose_refs = set(INTERPOLATION.findall(COMPOSE.read_text()))
    used = compose_refs | config_variables()
    unused = sorted(set(env_example_variables()) - used)
    assert not unused, f".env.example sets {unused}, which neither compose nor config.py reads"


def test_compose_interpolates_only_documented_variables():
    undocumented = sorted(set(INTERPOLATION.findall(COMPOSE.read_text())) - set(env_example_variables()))
    assert not undocumented, f"docker-compose.yml reads {undocumented}, which .env.example does not document"


def test_no_hardcoded_secrets(services):
    for name, svc in services.items():
        for key, value in environment(svc).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", str(value)), f"{name}: {key} is hard-coded"
            if key.endswith("_URL") and value:
                # Each ${...} becomes one placeholder; a password in the URL must be nothing but one.
                masked = re.sub(r"\$\{[^}]*\}", "<VAR>", str(value))
                m = re.match(r"^[\w+.-]+://[^:@/]*:([^@/]*)@", masked)
                assert not m or m.group(1) == "<VAR>", f"{name}: {key} has a hard-coded password"


def test_images_and_volumes_consistent(compose, services):
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                if vol.get("type", "volume") == "volume" and vol.get("source"):
                    used.add(vol["source"])
                continue
            source = vol.split(":", 1)[0]
            if ":" in vol and not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used - declared == set(), f"volumes used but not declared: {sorted(used - declared)}"
    assert declared - used == set(), f"volumes declared but unused: {sorted(declared - used)}"

    by_image: dict[str, list[tuple[str, dict | None]]] = {}
    for name, svc in brainscan_services(services).items():
        assert svc.get("image"), f"{name} builds without an image tag"
        by_image.setdefault(svc["image"], []).append((name, svc.get("build")))
    builds = {}
    for image, users in by_image.items():
        configs = [b for _, b in users if b is not None]
        assert configs, f"no service builds {image}, so compose would try to pull it"
        assert all(c == configs[0] for c in configs), f"services tagging {image} build it differently: {users}"
        builds[image] = configs[0]
    images = list(builds)
    for i, a in enumerate(images):
        for b in images[i + 1:]:
            assert builds[a] != builds[b], f"{a} and {b} are the same build under two tags"


def test_one_dockerfile_for_cpu_and_gpu(services):
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^ARG TF_PACKAGE=tensorflow-cpu\s*$", dockerfile, re.M)
    assert re.search(r"^tensorflow-cpu==", (ROOT / "requirements.txt").read_text(), re.M)
    args = {}
    for svc in brainscan_services(services).values():
        build = svc.get("build")
        if build:
            assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
            args[svc["image"]] = (build.get("args") or {}).get("TF_PACKAGE")
    assert args.get(services["worker"]["image"]) == "tensorflow[and-cuda]"
    assert set(args.values()) == {"tensorflow-cpu", "tensorflow[and-cuda]"}


def test_worker_reserves_a_gpu(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    # Scalable with --scale worker=N: no fixed name, no fixed host port.
    assert "container_name" not in worker
    assert not worker.get("ports")


def test_workers_wait_for_migrate(services):
    assert argv(services["migrate"])[-1] == "migrate"
    for name, svc in brainscan_services(services).items():
        args = argv(svc)
        if args[:3] in (["python", "cli.py", "worker"], ["python", "cli.py", "beat"]):
            deps = svc.get("depends_on") or {}
            assert isinstance(deps, dict) and deps.get("migrate", {}).get("condition") == \
                "service_completed_successfully", f"{name} does not wait for migrate"


def test_archive_mounted_read_only(services):
    for name, svc in brainscan_services(services).items():
        if name == "migrate":
            continue
        mounts = [v for v in svc.get("volumes") or [] if isinstance(v, str) and ":/archive" in v]
        assert mounts, f"{name} lacks the archive"
        assert all(v.startswith("${ARCHIVE_DIR") and v.endswith(":/archive:ro") for v in mounts), mounts


def test_redis_is_durable(services):
    args = tokens(services["redis"].get("command"))
    joined = " ".join(args)
    assert "--appendonly yes" in joined
    assert "--maxmemory-policy noeviction" in joined
    assert any(v.endswith(":/data") for v in services["redis"].get("volumes") or [])


def test_healthchecks(services):
    for name in ("redis", "postgres", "worker", "flower"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            if spec.get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"


def test_flower_is_local_only(services):
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
