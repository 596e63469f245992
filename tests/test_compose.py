"""The deployment files, checked without a Docker engine (none runs here or in CI).

``docker-compose.yml`` is validated two ways: against the Compose Specification's JSON schema
(``tests/data/compose-spec.json``, the copy Debian bookworm's docker-compose 1.29.2 ships as
``compose/config/compose_spec.json``, Apache-2.0) and by Debian's ``docker-compose config``, which
also interpolates ``${...}`` from an env file as ``docker compose up`` does. Every service command
must parse with hpo's own CLI parser, and the Dockerfile must only copy what ``.dockerignore``
lets through.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import ROOT, require_real
from sqlalchemy.engine import make_url

from hpo.cli import build_parser
from hpo.spec import load_study_file

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``, over a parsed file."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        present = value is not None and (value != "" or not (op or "").startswith(":"))
        if op and op.endswith("?") and not present:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and not present:
            return str(arg)
        return value or ""

    return _VARIABLE.sub(substitute, node)


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose() -> dict[str, Any]:
    """docker-compose.yml as ``docker compose`` sees it with ``.env.example`` as ``.env``."""
    return interpolate(raw_compose(), env_example())


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)  # the draft its $schema names
    return jsonschema.Draft201909Validator(schema)


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(compose())
    ]
    assert errors == []


def test_the_schema_check_catches_a_broken_gpu_reservation() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = "all"
    assert not validator().is_valid(broken)


def test_docker_compose_config_accepts_the_file_and_resolves_the_same_commands(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        require_real("Debian's docker-compose is not installed (run scripts/ci-compose.sh)")
    result = subprocess.run(
        ["docker-compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    ours = compose()
    assert set(resolved["services"]) == {"postgres", "create-study", "dashboard", "worker", "storage-proxy"}
    for name, service in resolved["services"].items():
        assert service.get("command") == ours["services"][name].get("command"), name
        assert service.get("environment") == ours["services"][name].get("environment"), name


def test_without_a_dot_env_compose_refuses_and_names_the_missing_password(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        require_real("Debian's docker-compose is not installed (run scripts/ci-compose.sh)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = subprocess.run(
        ["docker-compose", "--env-file", str(empty), "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "in .env (see .env.example)" in result.stderr
    with pytest.raises(KeyError, match="POSTGRES_USER"):
        interpolate(raw_compose(), {})


def hpo_commands() -> dict[str, list[str]]:
    return {
        name: service["command"]
        for name, service in compose()["services"].items()
        if service.get("command", [None])[0] == "hpo"
    }


def test_every_service_command_is_one_the_cli_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    commands = hpo_commands()
    assert set(commands) == {"create-study", "dashboard", "worker", "storage-proxy"}
    parser = build_parser()
    parsed = {}
    for name, command in commands.items():
        try:
            parsed[name] = parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"service {name}: `{' '.join(command)}` is rejected: {capsys.readouterr().err}")
    env = env_example()
    assert parsed["create-study"].command == "create-study"
    assert parsed["create-study"].skip_if_exists
    assert parsed["create-study"].study_name == env["HPO_STUDY"]
    load_study_file(ROOT / parsed["create-study"].study_file)  # the default study file is valid
    assert parsed["worker"].command == "worker"
    assert parsed["worker"].study_name == env["HPO_STUDY"]
    assert parsed["worker"].gpus == "all"
    assert parsed["worker"].storage is None  # from $OPTUNA_STORAGE, the PostgreSQL service
    services = compose()["services"]
    for name in ("dashboard", "storage-proxy"):
        (mapping,) = services[name]["ports"]
        assert mapping.rsplit(":", 1)[1] == str(parsed[name].port), name
        assert parsed[name].host == "0.0.0.0", name  # inside the container; the host side is ports:


def test_postgres_keeps_its_data_in_a_named_volume_and_its_credentials_in_dot_env() -> None:
    raw = raw_compose()
    postgres = raw["services"]["postgres"]
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert "pgdata" in raw["volumes"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert postgres["environment"][key].startswith(f"${{{key}:?"), "credentials must come from .env"
    # .env holds the password: git must ignore it, and .env.example must name every variable used.
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".env is not ignored by git"
    used = {m.group("name") for m in _VARIABLE.finditer(COMPOSE.read_text()) if m.group("name")}
    assert used <= set(env_example())
    # Every hpo service reaches that database with those credentials.
    resolved = compose()["services"]
    for name in ("create-study", "dashboard", "worker", "storage-proxy"):
        url = make_url(resolved[name]["environment"]["OPTUNA_STORAGE"])
        assert url.host == "postgres" and url.drivername == "postgresql+psycopg", name
        assert (url.username, url.password, url.database) == (
            resolved["postgres"]["environment"]["POSTGRES_USER"],
            resolved["postgres"]["environment"]["POSTGRES_PASSWORD"],
            resolved["postgres"]["environment"]["POSTGRES_DB"],
        ), name


def test_workers_reserve_nvidia_gpus_and_can_be_scaled() -> None:
    services = compose()["services"]
    worker = services["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == "all"
    # --scale worker=N starts N containers: a fixed name or host port would make the second fail.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"] == {"create-study": {"condition": "service_completed_successfully"}}
    assert services["create-study"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Trials' artifacts land where the dashboard serves them from.
    artifacts = worker["environment"]["HPO_ARTIFACT_DIR"]
    assert f"artifacts:{artifacts}" in worker["volumes"]
    assert f"artifacts:{artifacts}" in services["dashboard"]["volumes"]
    assert services["dashboard"]["environment"]["HPO_ARTIFACT_DIR"] == artifacts


def test_the_dashboard_is_published_on_loopback_unless_dot_env_says_otherwise() -> None:
    (mapping,) = compose()["services"]["dashboard"]["ports"]
    assert mapping == f"127.0.0.1:{env_example()['HPO_DASHBOARD_PORT']}:8080"
    (raw_mapping,) = raw_compose()["services"]["dashboard"]["ports"]
    assert interpolate(raw_mapping, {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p"}) == "127.0.0.1:8080:8080"


REQUIRED = {"POSTGRES_USER": "u", "POSTGRES_PASSWORD": "p"}  # the variables without a default
_BIND_DEFAULT = re.compile(r"^\$\{(?P<name>[A-Z_]+_BIND):-127\.0\.0\.1\}:")


def host_ip(mapping: str | dict[str, Any]) -> str | None:
    """The host address a published port binds to (None: every interface), either syntax."""
    if isinstance(mapping, dict):  # long syntax: {target, published, host_ip, protocol}
        return mapping.get("host_ip") or None
    spec = str(mapping).split("/", 1)[0]  # drop /tcp
    if spec.startswith("["):  # [::1]:8080:80
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else None  # HOST_PORT:CONTAINER_PORT or CONTAINER_PORT: all


def published_ports(services: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(name, mapping) for name, service in services.items() for mapping in service.get("ports", [])]


def test_the_host_address_of_a_port_mapping_is_read_in_every_syntax() -> None:
    assert host_ip("127.0.0.1:13000:13000") == "127.0.0.1"
    assert host_ip("127.0.0.1:13000:13000/tcp") == "127.0.0.1"
    assert host_ip("[::1]:13000:13000") == "::1"
    assert host_ip("13000:13000") is None  # what the storage proxy had: every interface
    assert host_ip("13000") is None
    assert host_ip({"target": 13000, "published": 13000}) is None
    assert host_ip({"target": 13000, "published": 13000, "host_ip": "127.0.0.1"}) == "127.0.0.1"


def test_every_published_port_binds_to_loopback_unless_its_bind_variable_is_set() -> None:
    # The dashboard and the storage proxy have no authentication: on every interface, anyone on
    # the network could read and rewrite every study. Each published port must name its host
    # address through a *_BIND variable that defaults to loopback.
    raw = raw_compose()["services"]
    ports = published_ports(raw)
    assert {name for name, _ in ports} == {"dashboard", "storage-proxy"}  # postgres is not published
    bind_variables = set()
    for name, mapping in ports:
        assert isinstance(mapping, str), f"{name}: use the short syntax HOST_IP:HOST_PORT:PORT"
        match = _BIND_DEFAULT.match(mapping)
        assert match, f"{name}: {mapping!r} must start with ${{..._BIND:-127.0.0.1}}:"
        variable = match.group("name")
        bind_variables.add(variable)
        # Unset (no .env entry), empty, and as .env.example ships it: loopback.
        for env in (REQUIRED, {**REQUIRED, variable: ""}, env_example()):
            assert host_ip(interpolate(mapping, env)) == "127.0.0.1", (name, env.get(variable))
        # Set: where it says, and only for this service.
        assert host_ip(interpolate(mapping, {**REQUIRED, variable: "10.0.0.5"})) == "10.0.0.5", name
    assert bind_variables == {"HPO_DASHBOARD_BIND", "HPO_PROXY_BIND"}  # one variable per service
    assert {"HPO_DASHBOARD_BIND", "HPO_PROXY_BIND"} <= set(env_example())
    for name, mapping in published_ports(compose()["services"]):
        assert host_ip(mapping) == "127.0.0.1", name


def _docker_compose_config(env_file: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE), "--profile", "proxy", "config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_docker_compose_publishes_every_port_on_loopback_by_default(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        require_real("Debian's docker-compose is not installed (run scripts/ci-compose.sh)")
    minimal = tmp_path / "minimal.env"
    minimal.write_text("".join(f"{key}={value}\n" for key, value in REQUIRED.items()))
    services = _docker_compose_config(minimal)
    ports = published_ports(services)
    assert {name for name, _ in ports} == {"dashboard", "storage-proxy"}
    assert all(host_ip(mapping) == "127.0.0.1" for _, mapping in ports), ports
    assert all(host_ip(m) == "127.0.0.1" for _, m in published_ports(_docker_compose_config(ENV_EXAMPLE)))
    exposed = tmp_path / "exposed.env"
    exposed.write_text(minimal.read_text() + "HPO_PROXY_BIND=10.0.0.5\nHPO_PROXY_PORT=13001\n")
    services = _docker_compose_config(exposed)
    assert [host_ip(m) for m in services["storage-proxy"]["ports"]] == ["10.0.0.5"]
    assert str(services["storage-proxy"]["ports"][0]).startswith("10.0.0.5:13001:13000")
    assert [host_ip(m) for m in services["dashboard"]["ports"]] == ["127.0.0.1"]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[0], pattern):
            ignored = not negate
    return ignored


def test_the_dockerfile_installs_the_project_from_files_the_build_context_sends() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    # The base is a build argument (CI builds it from a local Debian root); users get python:3.11-slim.
    assert instructions[:2] == ["ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}"]
    assert any("pip install ." in line for line in instructions)
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _dockerignored(".env", patterns) and _dockerignored(".venv", patterns)
    sources = [src for line in instructions if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert {"pyproject.toml", "constraints.txt", "hpo/", "objectives/"} <= set(sources)
    # The image installs the versions CI tested, not whatever is newest on the day it is built.
    assert "ARG CONSTRAINTS=constraints.txt" in instructions
    assert any('pip install . -c "${CONSTRAINTS}"' in line for line in instructions)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignored(source.rstrip("/"), patterns), f"{source} is excluded by .dockerignore"
    # The services run `hpo ...`: the entry point pip installs.
    assert 'hpo = "hpo.cli:main"' in (ROOT / "pyproject.toml").read_text()
