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
        scripts = []
        if isinstance(command, list) and command[:2] == ["bash", "-c"]:  # a shell script: pick its airflow lines
            scripts.extend(command[2:])
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
    assert base == _raw()["services"]["airflow-init"]["build"]["args"]["AIRFLOW_IMAGE"].split(":-", 1)[1].rstrip("}")
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


# --- review findings (one test each; every one fails on the file as it was before the fix) ---


def _default_of(value: str) -> str:
    """``${VAR:-default}`` -> ``default``."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", value)
    assert match, f"{value!r} is not ${{VAR:-default}}"
    return match.group(1)


def _readme_docker_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Docker Compose")
    return text[start : text.index("\n## ", start)]


def test_the_airflow_image_is_built_by_one_service_only() -> None:
    """Services that all build one tag are built in parallel by Compose (buildx bake) and clash on a first build
    ("image ... already exists"): airflow-init builds, the others only use the tag and never pull it."""
    services = _raw()["services"]
    assert [name for name, service in services.items() if "build" in service] == ["airflow-init"]
    image = services["airflow-init"]["image"]
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["image"] == image, name
        assert services[name].get("pull_policy") == "never", name
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_rabbitmq_permits_the_transient_queues_of_the_pinned_celery() -> None:
    """RabbitMQ 4.3 denies transient non-exclusive queues by default; the pinned Celery declares its pidbox and reply
    queues that way unless ``control_queue_exclusive`` is set (celery#10287, kombu#2531)."""
    from celery.app.defaults import DEFAULTS

    if DEFAULTS["control_queue_exclusive"]:
        pytest.skip("this Celery declares its control queues exclusive: any RabbitMQ 4.x accepts them")
    rabbitmq = _raw()["services"]["rabbitmq"]
    tag = _default_of(rabbitmq["image"]).split(":", 1)[1]
    version = re.match(r"(\d+)\.(\d+)", tag)
    assert version, f"rabbitmq tag {tag!r} floats over minor versions (4.3 denies Celery's queues)"
    assert (int(version.group(1)), int(version.group(2))) <= (4, 2), tag
    # And permitted explicitly, so that RABBITMQ_IMAGE may name a 4.3 image.
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in rabbitmq["volumes"] if v.startswith("./")}
    conf = mounts.get("/etc/rabbitmq/conf.d/20-crowd.conf")
    assert conf is not None and conf.is_file()
    assert "deprecated_features.permit.transient_nonexcl_queues = true" in conf.read_text().splitlines()


def test_airflow_services_keep_the_image_entrypoint() -> None:
    """The image's entrypoint adds a passwd entry for an AIRFLOW_UID it does not know before it runs anything;
    without it Airflow's CLI stops ("The user that Airflow is running as has no username"), so an overridden
    entrypoint broke `airflow db migrate` in airflow-init for every AIRFLOW_UID but 50000 (the README asks Linux
    users to set their own), and no Airflow service started. `bash`/`python` commands go through it too."""
    overridden = [name for name in AIRFLOW_SERVICES if "entrypoint" in _raw()["services"][name]]
    assert overridden == []


def test_rabbitmq_waits_longer_for_an_acknowledgement_than_a_task_may_run() -> None:
    """Airflow's Celery executor acknowledges a task's message when the task ends (task_acks_late); RabbitMQ's
    default consumer_timeout (30 min) would close the worker's channel under a longer detection task and deliver it
    again. The bundled broker's limit must exceed the compose's task timeout."""
    conf = (ROOT / "dev" / "docker" / "rabbitmq.conf").read_text().splitlines()
    values = [line.split("=", 1)[1].strip() for line in conf if line.split("=", 1)[0].strip() == "consumer_timeout"]
    assert len(values) == 1, "consumer_timeout not set once in dev/docker/rabbitmq.conf"
    task_timeout_s = int(_env_of(resolved()["services"]["airflow-worker"])["CROWD_DETECT_TASK_TIMEOUT_S"])
    assert int(values[0]) > task_timeout_s * 1000 + 15 * 60 * 1000  # the try, plus a wait in the worker
    assert "consumer_timeout" in _readme_docker_section()  # hosted brokers need it too


def test_tasks_may_wait_for_a_worker_slot_longer_than_a_task_runs() -> None:
    """Airflow fails a task queued longer than [scheduler] task_queued_timeout (default 600 s) after requeueing it
    twice, retries unused: with more mapped parts than worker slots, the last parts of a long video failed without
    running once the parts before them took more than ~10 minutes."""
    scheduler = _env_of(resolved()["services"]["airflow-scheduler"])
    task_timeout_s = int(_env_of(resolved()["services"]["airflow-worker"])["CROWD_DETECT_TASK_TIMEOUT_S"])
    assert float(scheduler["AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT"]) >= task_timeout_s


def test_a_stopped_worker_has_time_to_finish_its_running_tasks() -> None:
    """The worker's warm shutdown (DUMB_INIT_SETSID=0) waits for its tasks, but Docker kills a container 10 s after
    `docker compose stop` unless told otherwise: every stop or recreate cut the running detection tasks short."""
    worker = resolved()["services"]["airflow-worker"]
    assert _env_of(worker)["DUMB_INIT_SETSID"] == "0"
    grace = str(worker.get("stop_grace_period", "10s"))
    amount, unit = re.fullmatch(r"(\d+)([smh])", grace).groups()
    assert int(amount) * {"s": 1, "m": 60, "h": 3600}[unit] >= 10 * 60, grace


def test_postgres_is_healthy_only_when_it_listens_on_tcp() -> None:
    """Without -h, pg_isready asks the Unix socket, which the image's temporary init server answers before the crowd
    database exists (docker-library/postgres#146); airflow-init and the services wait for this healthcheck (the
    image's entrypoint then only checks that the metadata DB answers, not the crowd database)."""
    test = _raw()["services"]["postgres"]["healthcheck"]["test"]
    command = shlex.split(test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:]))
    assert command[0] == "pg_isready"
    host = command[command.index("-h") + 1] if "-h" in command else None
    assert host in {"127.0.0.1", "localhost"}, command


def test_weights_install_where_compose_and_the_model_code_look() -> None:
    """crowd.models reads cfg, names and weights from one folder, CROWD_MODEL_DIR: in compose that is the mounted
    ./include/yolov3 (with the cfg), and the README sends the weights there, not to the crowd-models volume."""
    init = _raw()["services"]["airflow-init"]
    model_dir = _env_of(init)["CROWD_MODEL_DIR"]
    host_dir = None
    for volume in init["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (model_dir == target or model_dir.startswith(target + "/")):
            host_dir = ROOT / source / model_dir[len(target) :].lstrip("/")
    assert host_dir is not None, f"CROWD_MODEL_DIR {model_dir} is not on a host mount"
    assert (host_dir / "yolov3-face.cfg").is_file() and (host_dir / "face.names").is_file()
    section = _readme_docker_section()
    install = section[section.index("YOLOv3 face weights") :]
    install = install[: install.index("\n\n")]
    assert "crowd.models install" in install and "crowd-models` volume with" not in install
    assert str(host_dir.relative_to(ROOT)) in install


def test_env_example_as_is_makes_airflow_init_refuse(tmp_path: Path) -> None:
    """change-me passes compose's ${VAR:?} checks: airflow-init's script stops first, naming every placeholder."""
    init = resolved()["services"]["airflow-init"]
    assert init["command"][:2] == ["bash", "-c"]
    script = init["command"][2].replace("$$", "$")
    assert "airflow db migrate" in script
    check = script.split("airflow db migrate", 1)[0] + "echo CHECKS-PASSED\n"
    secrets = [line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if not line.startswith("#") and SECRET_WORDS.search(line.split("=", 1)[0])]  # fmt: skip
    env = {k: str(v) for k, v in init["environment"].items()}
    run = dict(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", check], env={**env, **run}, capture_output=True, text=True)
    assert result.returncode != 0 and "CHECKS-PASSED" not in result.stdout, "airflow-init runs with change-me"
    assert all(name in result.stderr for name in secrets), result.stderr
    assert set(secrets) <= set(env["CROWD_INIT_CHECK_VARS"].split()), "some .env secret is not checked"
    assert "secrets.token_urlsafe" in result.stderr and "down -v" in result.stderr
    from cryptography.fernet import Fernet

    filled = {**env, **{name: "s3cret-value" for name in secrets}}
    filled["AIRFLOW_FERNET_KEY"] = filled["AIRFLOW__CORE__FERNET_KEY"] = Fernet.generate_key().decode()
    result = subprocess.run(["bash", "-c", check], env={**filled, **run}, capture_output=True, text=True)
    assert result.returncode == 0 and "CHECKS-PASSED" in result.stdout, result.stderr
    assert "down -v" in _readme_docker_section()  # changing passwords after the first start


def test_published_ports_listen_on_localhost_unless_configured() -> None:
    for name, service in _raw()["services"].items():
        for port in service.get("ports") or []:
            assert str(port).startswith("${CROWD_PUBLISH_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


def test_execution_api_url_comes_from_env(tmp_path: Path) -> None:
    """Workers on other machines reach the api-server by another address than the compose service name."""
    raw = _env_of(_raw()["services"]["airflow-worker"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    assert _default_of(raw) == "http://airflow-api-server:8080/execution/"
    resolved()  # skips without a tool
    url = "http://airflow.example:8080/execution/"
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text() + f"\nAIRFLOW_EXECUTION_API_SERVER_URL={url}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CROWD_", "KAFKA", "RABBITMQ"))}
    out = subprocess.run([*_compose_cmd(), "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout  # fmt: skip
    assert _env_of(yaml.safe_load(out)["services"]["airflow-worker"])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == url
    section = _readme_docker_section()
    assert "AIRFLOW_EXECUTION_API_SERVER_URL" in section and "remote logging" in section


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether a top-level path of the build context is excluded (Docker's rule: the last matching pattern wins)."""
    from fnmatch import fnmatchcase

    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if fnmatchcase(path, pattern) or path.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_state_out_and_what_the_dockerfile_copies_in() -> None:
    build = _raw()["services"]["airflow-init"]["build"]
    assert build["context"] == "."
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (".venv", ".local", ".env", "videos", "test-artifacts", ".git", ".hypothesis"):
        assert _dockerignored(path, patterns), path
    copied = []
    for line in (ROOT / build["dockerfile"]).read_text().splitlines():
        if line.startswith(("COPY ", "ADD ")):
            args = [a for a in shlex.split(line)[1:] if not a.startswith("--")]
            copied.extend(args[:-1])
    assert copied
    assert [path for path in copied if _dockerignored(path, patterns)] == []


def test_stop_script_stops_every_dev_service_with_a_stop_command() -> None:
    """dev/stop.sh says it stops everything the dev scripts started: every dev/*.sh with a `stop` command."""
    stop = (ROOT / "dev" / "stop.sh").read_text()
    with_stop = sorted(p.name for p in (ROOT / "dev").glob("*.sh") if re.search(r"^\s*stop\)", p.read_text(), re.M))
    assert {"celery.sh", "kafka.sh", "postgres.sh"} <= set(with_stop)
    missing = [name for name in with_stop if not re.search(rf"dev/{re.escape(name)}\"?\s+stop\b", stop)]
    assert not missing, missing
    assert subprocess.run(["bash", "-n", str(ROOT / "dev" / "stop.sh")]).returncode == 0


def test_every_crowd_setting_is_passed_from_env_with_the_code_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CROWD_* variable plugins/crowd/config.py reads reaches the Airflow services ("only .env changes"):
    ``${VAR:-default}`` with config.py's own default, or a fixed container path of a mount; each is in .env.example."""
    from crowd import config

    names = set(re.findall(r'"(CROWD_[A-Z0-9_]+)"', (ROOT / "plugins" / "crowd" / "config.py").read_text()))
    assert len(names) > 20
    env = _env_of(_raw()["x-airflow-common"])
    assert sorted(names - set(env)) == [], "not passed in x-airflow-common"
    example = ENV_EXAMPLE.read_text()
    assert sorted(n for n in names if not re.search(rf"\b{n}\b", example)) == [], "not in .env.example"
    fixed = {"CROWD_VIDEO_ROOTS", "CROWD_RESULTS_DIR", "CROWD_MODEL_DIR", "CROWD_MODEL_CACHE"}
    for name in sorted(names - fixed):
        assert env[name].startswith(f"${{{name}:-"), f"{name}: {env[name]} does not come from .env"
        assert re.search(rf"^#? ?{name}=", example, re.M), f"{name}: no {name}= line in .env.example"
    # The compose defaults are the code's: the settings read with them equal the settings read without them.
    for name in names:
        monkeypatch.delenv(name, raising=False)
    expected = config.load_settings()
    for name in sorted(names - fixed):
        monkeypatch.setenv(name, _default_of(env[name]))
        assert config.load_settings() == expected, f"{name}: compose default {_default_of(env[name])!r}"
        monkeypatch.delenv(name)
    # The connection ids name the connections the file defines.
    for name in ("CROWD_KAFKA_CONN_ID", "CROWD_KAFKA_WATCH_CONN_ID", "CROWD_POSTGRES_CONN_ID"):
        assert f"AIRFLOW_CONN_{_default_of(env[name]).upper()}" in env, name


def test_kafka_advertises_its_external_listener_at_a_configurable_host() -> None:
    """The EXTERNAL listener is published on CROWD_PUBLISH_ADDRESS; advertised as localhost, a client on another
    machine is told to reconnect to itself."""
    kafka = _env_of(_raw()["services"]["kafka"])
    external = [x for x in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",") if x.startswith("EXTERNAL://")]
    assert external == ["EXTERNAL://${KAFKA_ADVERTISED_HOST:-localhost}:${KAFKA_HOST_PORT:-9094}"]
    assert "KAFKA_ADVERTISED_HOST" in _readme_docker_section()
    ui = _env_of(_raw()["services"]["kafka-ui"])
    assert ui["KAFKA_CLUSTERS_0_PROPERTIES_SECURITY_PROTOCOL"] == "${KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}"
