"""docker-compose.airflow.yml checked without a Docker engine.

A real compose implementation (``docker compose`` v2 when installed, else Debian's ``docker-compose`` v1) resolves
the file with ``.env.example``; the resolved file is then checked against Airflow itself: every
``AIRFLOW__SECTION__KEY`` exists in Airflow's (and the providers') configuration, every ``airflow`` command is
accepted by Airflow's CLI parser, mounts exist, dependencies exist, and secrets only come from ``.env``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.airflow.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "dev" / "docker" / "Dockerfile"
AIRFLOW_SERVICES = (
    "airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    "airflow-worker",
)  # fmt: skip
SECRET_WORDS = re.compile(r"PASSWORD|PASS$|SECRET|FERNET|TOKEN|_KEY$", re.IGNORECASE)


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@cache
def resolved() -> dict:
    """The file as the compose tool resolves it with .env.example (skips when no compose tool is installed)."""
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no compose implementation: apt-get install docker-compose (Debian) or the docker compose plugin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_", "KAFKA", "RABBITMQ"))}
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, f"{' '.join(cmd)} config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def _raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_tool_resolves_the_file_with_env_example() -> None:
    services = resolved()["services"]
    assert {"postgres", "rabbitmq", "kafka", "kafka-ui", *AIRFLOW_SERVICES} <= set(services)
    worker = services["airflow-worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale airflow-worker=N` must work
    assert _env_of(worker)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_missing_secrets_make_the_tool_refuse_the_file(tmp_path: Path) -> None:
    resolved()  # skips without a tool
    env_file = tmp_path / ".env"
    env_file.write_text(
        "\n".join(line for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith("AIRFLOW_FERNET_KEY"))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_"))}
    result = subprocess.run([*_compose_cmd(), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                            capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    assert result.returncode != 0 and "AIRFLOW_FERNET_KEY" in result.stderr + result.stdout


def test_every_airflow_setting_exists_in_airflow_config() -> None:
    from airflow.configuration import retrieve_configuration_description

    description = retrieve_configuration_description(include_providers=True)
    unknown = []
    for name in AIRFLOW_SERVICES:
        for key in _env_of(resolved()["services"][name]):
            match = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", key)
            if not match:
                continue
            section, option = match.group(1).lower(), match.group(2).lower()
            if option not in description.get(section, {}).get("options", {}):
                unknown.append(f"{name}: {key}")
    assert not unknown, unknown


def _airflow_commands() -> list[tuple[str, list[str]]]:
    """Every `airflow ...` invocation in the file: service commands (the image's entrypoint runs `airflow`),
    lines of shell scripts and healthchecks."""
    found = []
    for name, service in resolved()["services"].items():
        if name not in AIRFLOW_SERVICES:
            continue
        command = service.get("command")
        entrypoint = service.get("entrypoint")
        scripts = []
        if entrypoint:  # a shell script: pick its airflow lines
            scripts.extend(command if isinstance(command, list) else [command])
        elif command:
            found.append((name, command if isinstance(command, list) else shlex.split(command)))
        test = (service.get("healthcheck") or {}).get("test") or []
        scripts.extend(test[1:] if test and test[0] == "CMD-SHELL" else [" ".join(test[1:])] if test else [])
        for script in scripts:
            for line in str(script).splitlines():
                line = line.strip().replace("$${", "${").replace("${HOSTNAME}", "host")
                if line.startswith("airflow "):
                    args = shlex.split(line)[1:]
                    ops = [i for i, a in enumerate(args) if a in {"||", "&&", ";", "|", ">", "2>&1"}]
                    found.append((f"{name} (script)", args[: ops[0]] if ops else args))
    return found


def test_every_airflow_command_is_valid_for_airflow_cli() -> None:
    commands = _airflow_commands()
    assert {" ".join(c[:2]) for _, c in commands} >= {"db migrate", "api-server", "scheduler", "dag-processor",
                                                       "triggerer", "celery worker"}  # fmt: skip
    # The parser lists the celery commands only when the executor is the CeleryExecutor: parse in a subprocess.
    code = (
        "import json, sys\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "parser = get_parser()\n"
        "bad = []\n"
        "for name, args in json.load(sys.stdin):\n"
        "    try:\n"
        "        parser.parse_args(args)\n"
        "    except SystemExit:\n"
        "        bad.append([name, args])\n"
        "print(json.dumps(bad))\n"
    )
    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(commands), capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], result.stderr[-2000:]


def test_every_mounted_host_path_exists_or_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = []
    for name, service in resolved()["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if not source.startswith(("/", ".")):
                continue  # a named volume
            path = Path(source)
            if path.exists():
                continue
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            if f"mkdir -p {rel}" not in readme:  # created by a documented step
                missing.append(f"{name}: {source}")
    assert not missing, missing
    init = ROOT / "dev" / "docker" / "postgres-init.sh"
    assert os.access(init, os.X_OK)
    assert subprocess.run(["bash", "-n", str(init)]).returncode == 0


def test_depends_on_targets_exist_and_airflow_waits_for_init() -> None:
    services = resolved()["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert set(depends) <= set(services), (name, depends)
        if isinstance(depends, dict):
            for target, spec in depends.items():
                if spec.get("condition") == "service_healthy":
                    assert services[target].get("healthcheck"), f"{name} waits for {target}, which has no healthcheck"
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert services[name].get("healthcheck"), f"{name} has no healthcheck"


def test_no_secret_value_in_the_file() -> None:
    """Secrets come only from .env: a secret-looking setting is a ${VAR} without default, and URLs carry no
    literal password."""
    text = COMPOSE.read_text()
    leaks = []
    for name, service in _raw()["services"].items():
        for key, value in _env_of(service).items():
            if (
                SECRET_WORDS.search(key)
                and not key.endswith("_FILE")
                and not re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", value)
            ):
                leaks.append(f"{name}: {key}={value}")
    for url in re.findall(r"[a-z+]+://[^\s'\"]+", text):
        credentials = re.match(r"[a-z+]+://([^@/]*)@", url)
        if credentials and ":" in credentials.group(1):
            password = credentials.group(1).split(":", 1)[1]
            if not re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", password):
                leaks.append(url)
    assert not leaks, leaks
    # .env.example has placeholders only.
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, _, value = line.partition("=")
        if not line.startswith("#") and SECRET_WORDS.search(key):
            assert value == "change-me", line


def test_every_compose_variable_is_in_env_example() -> None:
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text()))  # $${X} is the container's
    documented = {
        line.split("=", 1)[0].lstrip("# ").strip() for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line
    }
    optional_images = {"CROWD_AIRFLOW_IMAGE", "POSTGRES_IMAGE", "RABBITMQ_IMAGE", "KAFKA_IMAGE", "KAFKA_UI_IMAGE"}
    assert used - documented - optional_images == set()


def test_image_matches_the_python_and_airflow_of_constraints() -> None:
    """constraints.txt was frozen on this venv's Python with Airflow 3.3.2: the base image must have both."""
    base = re.search(r"ARG AIRFLOW_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert base == _raw()["x-airflow-common"]["build"]["args"]["AIRFLOW_IMAGE"].split(":-", 1)[1].rstrip("}")
    tag = base.split(":", 1)[1]
    python = re.search(r"python(\d+\.\d+)", tag).group(1)
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert re.search(r"(\d+\.\d+\.\d+)", tag).group(1) == pins["apache-airflow"]
    assert "constraints.txt" in DOCKERFILE.read_text() and "pip check" in DOCKERFILE.read_text()


def test_hosted_services_come_from_env_only(tmp_path: Path) -> None:
    """Pointing at hosted services (e.g. the Redback server) is a matter of .env: the connections follow."""
    resolved()  # skips without a tool
    hosted = {"KAFKA_BOOTSTRAP": "redback.example:9093", "KAFKA_SECURITY_PROTOCOL": "SSL",
              "CROWD_DB_HOST": "db.redback.example", "AIRFLOW_DB_HOST": "meta.redback.example",
              "RABBITMQ_HOST": "mq.redback.example"}  # fmt: skip
    lines = [ln for ln in ENV_EXAMPLE.read_text().splitlines() if ln.split("=", 1)[0] not in hosted]
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines + [f"{k}={v}" for k, v in hosted.items()]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_", "KAFKA", "RABBITMQ"))}
    out = subprocess.run([*_compose_cmd(), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout  # fmt: skip
    worker = _env_of(yaml.safe_load(out)["services"]["airflow-worker"])
    kafka = json.loads(worker["AIRFLOW_CONN_KAFKA_DEFAULT"])["extra"]
    assert kafka["bootstrap.servers"] == "redback.example:9093" and kafka["security.protocol"] == "SSL"
    assert json.loads(worker["AIRFLOW_CONN_KAFKA_WATCH"])["extra"]["group.id"] == "crowd-ingest-watch"
    assert "@db.redback.example:5432/crowd" in worker["AIRFLOW_CONN_CROWD_POSTGRES"]
    assert "@meta.redback.example:5432/airflow" in worker["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert "@mq.redback.example:5672/" in worker["AIRFLOW__CELERY__BROKER_URL"]


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["x86_64-manylinux_2_28", "aarch64-manylinux_2_28"])
def test_requirements_resolve_as_wheels_for_the_image(platform: str, tmp_path: Path) -> None:
    """The image's pip install (requirements.txt with constraints.txt on CPython 3.11, Debian 12 glibc) resolves
    to wheels only, on amd64 and arm64 hosts: uv resolves it for that target from the package index."""
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed (dev/setup.sh installs it)")
    result = subprocess.run(
        [uv, "pip", "compile", "requirements.txt", "-c", "constraints.txt", "--python-version", "3.11",
         "--python-platform", platform, "--only-binary", ":all:", "-q", "-o", str(tmp_path / "resolved.txt")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resolved_pins = (tmp_path / "resolved.txt").read_text()
    assert "apache-airflow==3.3.2" in resolved_pins and "opencv-python-headless==4.14.0.94" in resolved_pins
