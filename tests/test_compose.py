"""compose/: no Docker engine runs here, so the compose file is checked against the code it starts.

Every discflow service's command must parse with the real `discflow` CLI, its queues must be real stages,
every DISCFLOW_* variable must be a setting, Redis needs a password, Flower needs basic auth and is
published on 127.0.0.1 only, and the spool volume is mounted at one path in every worker service.
Each check is a function returning problems, so the tests also show that a wrong file fails.
"""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from orchestration.cli import cli
from orchestration.commands_ops import check_basic_auth
from workers.app import STAGES
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"

EXPECTED_QUEUES = {"worker-scan-media": {"scan", "media"}, "transcode": {"transcode"}, "store": {"store"}}
SUPPORT_SERVICES = {"redis", "postgres", "orthanc"}
SPOOL_VOLUME = "spool"

# --- reading the files as Compose would ------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                       r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution; a required variable missing from `env` is an error."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise KeyError(f"${{{name}}} is required ({arg}) but not in {ENV_EXAMPLE.name}")
        if op in (":+", "+"):
            return arg if value else ""
        if value is None:
            raise KeyError(f"${{{name}}} is used but not set in {ENV_EXAMPLE.name}")
        return value
    return _VARIABLE.sub(replace, text)


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the << merge keys as Compose does


@pytest.fixture(scope="module")
def compose(raw_compose: dict) -> dict:
    return resolve(raw_compose, read_env_file(ENV_EXAMPLE))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_words(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def discflow_services(compose: dict) -> dict[str, dict]:
    """Services running the discflow image (built from compose/Dockerfile)."""
    return {name: service for name, service in compose["services"].items()
            if "build" in service or str(service.get("image", "")).startswith("discflow")}


def worker_services(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in discflow_services(compose).items()
            if command_words(service)[1:2] == ["worker"]}


def published_ports(service: dict) -> list[tuple[str | None, str]]:
    """(host address or None for every interface, container port) per published port."""
    published = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published.append((entry.get("host_ip"), str(entry.get("target"))))
            continue
        entry = str(entry).split("/")[0]
        if entry.startswith("["):  # [::1]:5555:5555
            address, _, rest = entry[1:].partition("]:")
            published.append((address, rest.split(":")[-1]))
            continue
        parts = entry.split(":")
        published.append((parts[0] if len(parts) == 3 else None, parts[-1]))
    return published


# --- the checks --------------------------------------------------------------------------------------------

def parse_discflow_command(words: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse `discflow SUB --options` with the real Typer app (unknown options, bad values raise)."""
    if not words or words[0] != "discflow":
        raise ValueError(f"command does not start the discflow entry point: {words}")
    group = typer.main.get_command(cli)
    if len(words) < 2 or words[1] not in group.commands:
        raise ValueError(f"no such discflow sub-command: {words[1:2]}; have {sorted(group.commands)}")
    command = group.commands[words[1]]
    context = command.make_context(f"discflow {words[1]}", list(words[2:]))
    return words[1], context.params


def command_problems(name: str, service: dict) -> list[str]:
    try:
        sub, params = parse_discflow_command(command_words(service))
    except Exception as error:  # the CLI's own usage errors: unknown option, bad value, no such command
        return [f"{name}: {error}"]
    problems = []
    if sub == "worker":
        queues = set(params["queues"].split(","))
        if not queues <= set(STAGES):
            problems.append(f"{name}: queues {sorted(queues - set(STAGES))} are not stages {STAGES}")
    return problems


def environment_problems(name: str, service: dict) -> list[str]:
    problems = []
    settings_values = {}
    for key, value in environment(service).items():
        if not key.startswith("DISCFLOW_"):
            continue
        field = key.removeprefix("DISCFLOW_").lower()
        if field not in Settings.model_fields:
            problems.append(f"{name}: {key} is not a discflow setting (workers.settings.Settings)")
        else:
            settings_values[field] = value
    if not problems:
        try:
            Settings(**settings_values)  # the values parse as the settings' types
        except Exception as error:
            problems.append(f"{name}: {error}")
    return problems


def flower_problems(service: dict) -> list[str]:
    problems = []
    try:
        _, params = parse_discflow_command(command_words(service))
    except Exception as error:
        return [f"flower: {error}"]
    credentials = params.get("basic_auth") or environment(service).get("DISCFLOW_FLOWER_BASIC_AUTH")
    try:
        check_basic_auth(credentials or "")
    except ValueError as error:
        problems.append(f"flower: no usable basic auth ({error})")
    if "FLOWER_UNAUTHENTICATED_API" in environment(service):
        problems.append("flower: FLOWER_UNAUTHENTICATED_API opens the API without auth")
    port = str(params.get("port") or Settings.model_fields["flower_port"].default)
    ports = published_ports(service)
    if not ports:
        problems.append("flower: no port published")
    for address, target in ports:
        if address != "127.0.0.1":
            problems.append(f"flower: published on {address or 'every interface'}, not 127.0.0.1 only")
        if target != port:
            problems.append(f"flower: publishes container port {target} but listens on {port}")
    return problems


def spool_problems(compose: dict) -> list[str]:
    problems = []
    if SPOOL_VOLUME not in (compose.get("volumes") or {}):
        problems.append(f"no top-level named volume {SPOOL_VOLUME!r}")
    targets = {}
    for name, service in worker_services(compose).items():
        mounts = [str(v).split(":") for v in service.get("volumes") or [] if isinstance(v, str)]
        mounts += [[v.get("source"), v.get("target")] for v in service.get("volumes") or [] if isinstance(v, dict)]
        spool = [mount[1] for mount in mounts if mount[0] == SPOOL_VOLUME and len(mount) > 1]
        if not spool:
            problems.append(f"{name}: does not mount the {SPOOL_VOLUME!r} volume")
            continue
        targets[name] = spool[0]
        if environment(service).get("DISCFLOW_SPOOL_DIR") != spool[0]:
            problems.append(f"{name}: DISCFLOW_SPOOL_DIR is not the spool mount {spool[0]}")
    if len(set(targets.values())) > 1:
        problems.append(f"the spool is mounted at different paths: {targets}")
    return problems


# --- tests on the real files -------------------------------------------------------------------------------

def test_every_variable_the_compose_file_needs_is_in_env_example(raw_compose):
    resolve(raw_compose, read_env_file(ENV_EXAMPLE))  # raises KeyError naming the missing variable


def test_services_exist(compose):
    services = set(compose["services"])
    assert SUPPORT_SERVICES | set(EXPECTED_QUEUES) | {"flower"} <= services
    assert set(discflow_services(compose)) == set(EXPECTED_QUEUES) | {"flower"}
    assert str(compose["services"]["orthanc"]["image"]).split(":")[0] in ("orthancteam/orthanc", "jodogne/orthanc")


def test_every_discflow_command_is_a_real_entry_point(compose):
    problems = [p for name, service in discflow_services(compose).items() for p in command_problems(name, service)]
    assert problems == []


def test_workers_consume_every_stage_in_the_documented_groups(compose):
    queues = {name: set(parse_discflow_command(command_words(service))[1]["queues"].split(","))
              for name, service in worker_services(compose).items()}
    assert queues == EXPECTED_QUEUES
    assert set().union(*queues.values()) == set(STAGES)


def test_transcode_scales(compose):
    transcode = compose["services"]["transcode"]
    assert "container_name" not in transcode and not transcode.get("ports")  # --scale transcode=8 needs both


def test_every_discflow_variable_is_a_setting(compose):
    problems = [p for name, service in discflow_services(compose).items() for p in environment_problems(name, service)]
    assert problems == []


def test_workers_share_redis_with_the_password_and_postgres(compose):
    env_file = read_env_file(ENV_EXAMPLE)
    for name, service in worker_services(compose).items():
        env = environment(service)
        assert env["DISCFLOW_BROKER_URL"] == f"redis://:{env_file['REDIS_PASSWORD']}@redis:6379/0", name
        assert env["DISCFLOW_DATABASE_URL"].startswith("postgresql+psycopg://discflow:"), name
        assert f":{env_file['POSTGRES_PASSWORD']}@postgres" in env["DISCFLOW_DATABASE_URL"], name
    assert environment(compose["services"]["flower"])["DISCFLOW_BROKER_URL"].startswith("redis://:")


def test_redis_requires_a_password(raw_compose, compose):
    words = command_words(compose["services"]["redis"])
    assert "--requirepass" in words
    password = words[words.index("--requirepass") + 1]
    assert password and password == read_env_file(ENV_EXAMPLE)["REDIS_PASSWORD"]
    raw_words = command_words(raw_compose["services"]["redis"])
    assert raw_words[raw_words.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")  # not a literal


def test_postgres_has_the_ledger_database(compose):
    env = environment(compose["services"]["postgres"])
    assert env["POSTGRES_USER"] == "discflow" and env["POSTGRES_DB"] == "discflow" and env["POSTGRES_PASSWORD"]


def test_flower_has_basic_auth_and_is_published_on_loopback_only(compose):
    assert flower_problems(compose["services"]["flower"]) == []


def test_nothing_is_published_on_every_interface(compose):
    exposed = {name: ports for name, service in compose["services"].items()
               for ports in [published_ports(service)] if any(address in (None, "0.0.0.0", "::") for address, _ in ports)}
    assert exposed == {}


def test_spool_is_one_named_volume_at_one_path(compose):
    assert spool_problems(compose) == []


def test_dockerfile_base_image_and_install_steps():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    apt = next(line for line in instructions if "apt-get install" in line)
    assert {"dcmtk", "xorriso", "genisoimage"} <= set(apt.split())
    assert "apt-get update" in text
    assert re.search(r"^RUN pip install \.(\s|$)", text, re.M)
    copied = " ".join(line for line in instructions if line.startswith("COPY"))
    for needed in ("pyproject.toml", "README.md", "workers", "tasks", "orchestration"):
        assert needed in copied, f"the image does not COPY {needed}"
    user = [line for line in instructions if line.startswith("USER ")]
    assert user and user[-1] != "USER root"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for service in discflow_services(compose).values():
        build = service["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_pip_install_ships_every_package_the_image_runs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(setuptools["packages"])
    package_data = setuptools.get("package-data", {})
    missing = []
    for top in ("workers", "tasks", "orchestration"):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__":
                continue
            files = [f for f in folder.iterdir() if f.is_file() and f.suffix != ".pyc"]
            if not files:
                continue
            dotted = ".".join(folder.relative_to(ROOT).parts)
            if dotted not in packages:
                missing.append(dotted)
            for data in (f for f in files if f.suffix != ".py"):
                if not any(Path(data.name).match(pattern) for pattern in package_data.get(dotted, [])):
                    missing.append(f"{dotted}/{data.name}")
    assert missing == []


def test_readme_says_how_to_run_scale_and_find_flower():
    text = (COMPOSE_DIR / "README.md").read_text()
    assert "docker compose -f compose/docker-compose.yml up -d --scale transcode=" in text
    assert "NFS" in text and "127.0.0.1:5555" in text


# --- the checks fail on a wrong file -----------------------------------------------------------------------

def _broken(compose: dict, service: str, **changes: Any) -> dict:
    broken = copy.deepcopy(compose["services"][service])
    broken.update(changes)
    return broken


@pytest.mark.parametrize("command, complaint", [
    (["discflow", "worker", "--queues", "transcode", "--concurency", "2"], "No such option"),
    (["discflow", "worker", "--queues", "transcode", "--concurrency", "many"], "integer"),
    (["discflow", "worker", "--queues", "transcode,pixels"], "not stages"),
    (["discflow", "workers", "--queues", "transcode"], "no such discflow sub-command"),
    (["celery", "-A", "workers.app", "worker"], "does not start the discflow entry point"),
    ("discflow worker --queue transcode", "No such option"),
])
def test_a_wrong_command_is_caught(compose, command, complaint):
    [problem] = command_problems("transcode", _broken(compose, "transcode", command=command))
    assert complaint in problem


def test_an_unknown_or_malformed_setting_is_caught(compose):
    unknown = _broken(compose, "store", environment={**environment(compose["services"]["store"]),
                                                     "DISCFLOW_BROKER": "redis://redis:6379/0"})
    assert "DISCFLOW_BROKER is not a discflow setting" in environment_problems("store", unknown)[0]
    malformed = _broken(compose, "store", environment={"DISCFLOW_BATCH_SIZE": "lots"})
    assert "batch_size" in environment_problems("store", malformed)[0]


@pytest.mark.parametrize("changes, complaint", [
    ({"ports": ["5555:5555"]}, "every interface"),
    ({"ports": ["0.0.0.0:5555:5555"]}, "not 127.0.0.1"),
    ({"ports": [{"target": 5555, "published": 5555}]}, "every interface"),
    ({"ports": ["127.0.0.1:5555:5556"]}, "listens on 5555"),
    ({"environment": {"DISCFLOW_BROKER_URL": "redis://:pw@redis:6379/0"}}, "no usable basic auth"),
    ({"environment": {"DISCFLOW_FLOWER_BASIC_AUTH": "desk"}}, "no usable basic auth"),
    ({"environment": {"DISCFLOW_FLOWER_BASIC_AUTH": "desk:pw", "FLOWER_UNAUTHENTICATED_API": "true"}},
     "FLOWER_UNAUTHENTICATED_API"),
    ({"command": ["discflow", "flower", "--bind", "0.0.0.0"]}, "No such option"),
])
def test_an_open_flower_is_caught(compose, changes, complaint):
    problems = flower_problems(_broken(compose, "flower", **changes))
    assert any(complaint in problem for problem in problems), problems


def test_a_spool_at_another_path_is_caught(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["store"]["volumes"] = ["spool:/data/spool"]
    broken["services"]["store"]["environment"] = {**environment(broken["services"]["store"]),
                                                  "DISCFLOW_SPOOL_DIR": "/data/spool"}
    assert any("different paths" in problem for problem in spool_problems(broken))
    broken["services"]["store"]["volumes"] = []
    assert any("store: does not mount" in problem for problem in spool_problems(broken))


def test_a_missing_password_variable_is_caught(raw_compose):
    env = read_env_file(ENV_EXAMPLE)
    del env["REDIS_PASSWORD"]
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        resolve(raw_compose, env)
