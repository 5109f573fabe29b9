"""One place for settings: Airflow connection ids, topics, folders and defaults, read from the environment.

Every setting is a ``CROWD_*`` environment variable with a default that works with ``dev/env.sh``. Services
are reached through Airflow connections (``kafka_default``, ``crowd_postgres``), whose ``extra`` is the
single source of client configuration. Per-run choices (frame interval, thresholds) are DAG params.

Example:
    >>> from crowd.config import load_settings
    >>> settings = load_settings()
    >>> settings.faces_topic
    'Faces'
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crowd.video import PinnedFile

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A setting has a value that cannot work; the message names the variable and the value."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip() or default


def _env_number(
    name: str, default: float, minimum: float = 0, *, whole: bool = True, maximum: float = 1e9
) -> int | float:
    """A numeric variable, checked: a whole number when ``whole``, finite, and within [``minimum``, ``maximum``]
    (NaN passes every comparison, and a huge value overflows the time arithmetic it feeds)."""
    raw = _env(name, str(default))
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a {'whole number' if whole else 'number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    if value > maximum:
        raise ConfigError(f"{name}={value} must be <= {maximum:g}")
    return value


def _absolute(name: str, raw: str) -> Path:
    """``raw`` as an absolute path (``~`` expanded); a relative one is refused: each Airflow process (DAG processor,
    worker, api-server) has a working directory of its own, so it would name a different folder in each."""
    path = Path(raw.strip()).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"{name}={raw.strip()!r} is a relative path: give an absolute one (or one starting with ~)")
    return path.resolve()


def _env_paths(name: str, default: str) -> tuple[Path, ...]:
    """Folders separated by ``os.pathsep``, at least one (``":"`` named none: every scan found nothing, silently)."""
    raw = _env(name, default)
    # spaces around a separator are not part of a path ("/a: /b" is /a and /b, not /a and ./ /b)
    paths = tuple(_absolute(name, p) for p in raw.split(os.pathsep) if p.strip())
    if not paths:
        raise ConfigError(
            f"{name}={raw!r} names no folder: give one or more absolute paths separated by {os.pathsep!r}"
        )
    return paths


def _env_dir(name: str, default: str) -> Path:
    return _absolute(name, _env(name, default))


# The preset Airflow resolves (airflow.utils.dates.cron_presets) that croniter does not know; the others are
# croniter's own. Not imported from Airflow: importing it sets up Airflow's logging, which the CLI must not get
# (its JSON lines go to stdout). test_config checks every Airflow preset is taken.
_AIRFLOW_ONLY_PRESETS = {"@quarterly": "0 0 1 */3 *"}


def _env_schedule(name: str, default: str, *, presets: tuple[str, ...] = ()) -> str | None:
    """A cron schedule (5 fields, or a preset such as ``@hourly``), one of ``presets`` (Airflow's ``@once``), or
    None for ``none``/``off``. Airflow takes a bad one without a word where it is a sweep's timetable (the DAG
    imports; no run is ever scheduled)."""
    from croniter import croniter

    value = _optional(_env(name, default))
    if value is None or value in presets:
        return value
    # croniter also takes six and seven fields, the sixth being seconds: '0 */5 * * * *' (Quartz's "every 5
    # minutes") would run every second. Airflow's presets are what Airflow resolves them to.
    cron = _AIRFLOW_ONLY_PRESETS.get(value, value)
    if not (cron.startswith("@") or len(cron.split()) == 5) or not croniter.is_valid(cron):
        raise ConfigError(
            f"{name}={value!r} is not a cron schedule: five fields such as '*/5 * * * *' (minute hour day month "
            "weekday; no seconds field), a preset such as '@hourly', or 'none' to turn it off"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """Deployment settings. Build it with :func:`load_settings`, not by hand, except in tests."""

    kafka_conn_id: str = "kafka_default"
    kafka_watch_conn_id: str = "kafka_watch"
    postgres_conn_id: str = "crowd_postgres"
    faces_topic: str = "Faces"
    alerts_topic: str = "crowd-alerts"
    messages_topic: str = "messages"
    ingest_group: str = "crowd-ingest"
    ingest_linger_s: float = 5.0
    ingest_sweep_schedule: str | None = "*/15 * * * *"
    receiver_group: str = "crowd-api-receiver"
    receiver_max_queue: int = 1000
    receiver_max_queue_bytes: int = 64 * 1024 * 1024
    max_csv_exports: int = 4
    api_statement_timeout_s: float = 30.0  # a results query of the API running longer is cancelled (503)
    alert_threshold: int | None = 10
    alert_min_duration_s: float = 2.0
    video_roots: tuple[Path, ...] = field(default_factory=tuple)
    results_dir: Path = PROJECT_ROOT / ".local" / "results"
    model_dir: Path = PROJECT_ROOT / "include" / "yolov3"
    model_cache: Path = Path.home() / ".cache" / "crowd" / "models"
    detector_backend: str = "auto"
    # MTCNN downscales larger frames to this longest side first (None: full resolution): a 4K frame took 1.6 GB
    # and 3.3 s; the smallest face found grows by as much (20 px at 1920 is 40 px in a 4K frame: tiles find less)
    mtcnn_max_side: int | None = 1920
    scan_schedule: str | None = "*/5 * * * *"
    frames_per_task: int = 3000
    detect_task_timeout_s: int = 6 * 3600
    publish_timeout_s: int = 30
    scan_min_age_s: float = 60.0
    video_claim_timeout_s: float = 600.0
    max_silent_runs: int = 3

    @property
    def max_tasks_per_run(self) -> int:
        """Airflow's ``[core] max_map_length``: a task returning a longer list to map over fails. Read when asked
        (importing Airflow's configuration costs seconds and sets up its logging)."""
        from airflow.sdk.configuration import conf

        return max(1, conf.getint("core", "max_map_length", fallback=1024))

    def check_video_path(self, path: str | os.PathLike[str]) -> Path:
        """Resolve ``path`` and return it if it is a file inside one of :attr:`video_roots`.

        Symlinks and ``..`` are resolved first, so nothing can point outside the roots.

        Raises:
            ConfigError: not valid UTF-8, outside the roots, missing, or not a regular file.
        """
        from crowd.video import BadFileNameError, check_name  # here: DAG files import this module, not OpenCV

        try:
            check_name(path)
        except BadFileNameError as exc:
            raise ConfigError(f"video path {exc.path!r} is not valid UTF-8: rename the file") from None
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
            raise ConfigError(f"video path {str(path)!r} cannot be resolved: {exc}") from None
        if not any(resolved.is_relative_to(root) for root in self.video_roots):
            roots = ", ".join(str(r) for r in self.video_roots) or "(none configured: set CROWD_VIDEO_ROOTS)"
            raise ConfigError(
                f"video path {str(path)!r} resolves to {str(resolved)!r}, outside the video roots {roots}"
            )
        try:
            exists, is_file = resolved.exists(), resolved.is_file()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise ConfigError(f"video path {str(path)!r} cannot be checked: {exc.strerror or exc}") from None
        if not exists:
            raise ConfigError(f"video path {str(path)!r} does not exist")
        if not is_file:
            raise ConfigError(f"video path {str(path)!r} is not a regular file")
        return resolved

    def open_video(self, path: str | os.PathLike[str]) -> PinnedFile:
        """:meth:`check_video_path`, then open the file and check again what was opened: read through the returned
        :class:`~crowd.video.PinnedFile`, nothing outside the roots can be read, even with a symlink swapped
        between the check and the open (by someone who can write in a video root). Close it when done.

        Raises:
            ConfigError: as :meth:`check_video_path`, or what was opened is outside the roots or not a regular file.
            VideoError: the file cannot be opened (missing, permission denied).
        """
        from crowd.video import NotAVideoError, PinnedFile

        self.check_video_path(path)
        try:
            pinned = PinnedFile(Path(path).expanduser())  # by the name given: messages and logs show it
        except NotAVideoError:  # where it is (something else put in its place), as check_video_path says it
            raise ConfigError(f"video path {str(path)!r} is not a regular file") from None
        if not any(pinned.real.is_relative_to(root) for root in self.video_roots):
            pinned.close()
            raise ConfigError(
                f"video path {str(path)!r} led to {str(pinned.real)!r} when it was opened, outside the video roots "
                "(it changed after it was checked); not read"
            )
        return pinned


def _optional(value: str) -> str | None:
    """``none``/``off`` (any case): None. (An empty variable reads as unset, its default, as Compose's
    ``${VAR:-default}`` does: ``none`` is the way to turn a schedule off.)"""
    return None if value.strip().lower() in {"", "none", "off"} else value


def load_settings() -> Settings:
    """Read every ``CROWD_*`` variable once and validate it."""
    backend = _env("CROWD_DETECTOR", "auto")
    if backend not in {"auto", "yolov3", "mtcnn", "yolov3-tiny"}:
        raise ConfigError(f"CROWD_DETECTOR={backend!r}: use auto, yolov3, mtcnn or yolov3-tiny")
    return Settings(
        kafka_conn_id=_env("CROWD_KAFKA_CONN_ID", "kafka_default"),
        kafka_watch_conn_id=_env("CROWD_KAFKA_WATCH_CONN_ID", "kafka_watch"),
        postgres_conn_id=_env("CROWD_POSTGRES_CONN_ID", "crowd_postgres"),
        faces_topic=_env("CROWD_FACES_TOPIC", "Faces"),
        alerts_topic=_env("CROWD_ALERTS_TOPIC", "crowd-alerts"),
        messages_topic=_env("CROWD_MESSAGES_TOPIC", "messages"),
        ingest_group=_env("CROWD_INGEST_GROUP", "crowd-ingest"),
        ingest_linger_s=_env_number("CROWD_INGEST_LINGER_S", 5.0, whole=False),
        ingest_sweep_schedule=_env_schedule("CROWD_INGEST_SWEEP_SCHEDULE", "*/15 * * * *"),
        receiver_group=_env("CROWD_RECEIVER_GROUP", "crowd-api-receiver"),
        receiver_max_queue=_env_number("CROWD_RECEIVER_MAX_QUEUE", 1000, minimum=1),
        receiver_max_queue_bytes=_env_number("CROWD_RECEIVER_MAX_QUEUE_BYTES", 64 * 1024 * 1024, minimum=1),
        max_csv_exports=_env_number("CROWD_MAX_CSV_EXPORTS", 4, minimum=1),
        api_statement_timeout_s=_env_number(
            "CROWD_API_STATEMENT_TIMEOUT_S",
            30.0,
            minimum=0,
            maximum=2_147_483,  # PostgreSQL takes the timeout in ms, an int4
            whole=False,
        ),
        alert_threshold=_env_number("CROWD_ALERT_THRESHOLD", 10, minimum=0) or None,
        alert_min_duration_s=_env_number("CROWD_ALERT_MIN_DURATION_S", 2.0, whole=False),
        video_roots=_env_paths("CROWD_VIDEO_ROOTS", str(PROJECT_ROOT / ".local" / "videos")),
        results_dir=_env_dir("CROWD_RESULTS_DIR", str(PROJECT_ROOT / ".local" / "results")),
        model_dir=_env_dir("CROWD_MODEL_DIR", str(PROJECT_ROOT / "include" / "yolov3")),
        model_cache=_env_dir("CROWD_MODEL_CACHE", str(Path.home() / ".cache" / "crowd" / "models")),
        detector_backend=backend,
        scan_schedule=_env_schedule("CROWD_SCAN_SCHEDULE", "*/5 * * * *", presets=("@once", "@continuous")),
        mtcnn_max_side=_env_number("CROWD_MTCNN_MAX_SIDE", 1920, minimum=0, maximum=8192) or None,
        frames_per_task=_env_number("CROWD_FRAMES_PER_TASK", 3000, minimum=1),
        detect_task_timeout_s=_env_number("CROWD_DETECT_TASK_TIMEOUT_S", 6 * 3600, minimum=1),
        publish_timeout_s=_env_number("CROWD_PUBLISH_TIMEOUT_S", 30, minimum=1, maximum=2_147_483),  # librdkafka ms
        scan_min_age_s=_env_number("CROWD_SCAN_MIN_AGE_S", 60.0, whole=False),
        video_claim_timeout_s=_env_number("CROWD_VIDEO_CLAIM_TIMEOUT_S", 600.0, minimum=1, whole=False),
        max_silent_runs=_env_number("CROWD_MAX_SILENT_RUNS", 3, minimum=1),
    )
