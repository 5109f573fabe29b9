"""Settings from the environment: a value that cannot work is refused at load, naming the variable."""

from __future__ import annotations

import pytest

from crowd.config import ConfigError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("CROWD_SCAN_MIN_AGE_S", "nan", "not a finite number"),  # NaN < 60 is False: half-written uploads hashed
        ("CROWD_VIDEO_CLAIM_TIMEOUT_S", "inf", "not a finite number"),
        ("CROWD_ALERT_MIN_DURATION_S", "-inf", "not a finite number"),
        ("CROWD_INGEST_LINGER_S", "NaN", "not a finite number"),
        ("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1e300", "must be <= 1e"),  # overflows PostgreSQL's make_interval
        ("CROWD_DETECT_TASK_TIMEOUT_S", "10" * 20, "must be <= 1e"),  # overflows timedelta
        ("CROWD_PUBLISH_TIMEOUT_S", "3000000", "must be <= 2.14748e"),  # librdkafka's message.timeout.ms
        ("CROWD_FRAMES_PER_TASK", "0", "must be >= 1"),
        ("CROWD_FRAMES_PER_TASK", "1.5", "not a whole number"),
        ("CROWD_MAX_SILENT_RUNS", "three", "not a whole number"),
        # the sweep's timetable took it without a word: the DAG imported, no sweep was ever scheduled
        ("CROWD_INGEST_SWEEP_SCHEDULE", "every 15 minutes", "not a cron schedule"),
        ("CROWD_SCAN_SCHEDULE", "* * * *", "not a cron schedule"),  # Airflow's error did not name the variable
        # a sixth field is seconds to croniter: Quartz's "every 5 minutes" ran the sweep every second
        ("CROWD_INGEST_SWEEP_SCHEDULE", "0 */5 * * * *", "not a cron schedule"),
        ("CROWD_SCAN_SCHEDULE", "*/15 * * * * 30 2027", "not a cron schedule"),
        # relative: each Airflow process has its own working directory (different roots in each)
        ("CROWD_VIDEO_ROOTS", "/data/videos:videos", "'videos' is a relative path"),
        ("CROWD_RESULTS_DIR", "results", "is a relative path"),
        ("CROWD_VIDEO_ROOTS", " : ", "names no folder"),  # was no roots: every scan found nothing, silently
        ("CROWD_MTCNN_MAX_SIDE", "-1", "must be >= 0"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_naming_it(monkeypatch, name: str, value: str, reason: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"^{name}=.*{reason}"):
        load_settings()


def test_the_bounds_themselves_are_accepted(monkeypatch) -> None:
    monkeypatch.setenv("CROWD_PUBLISH_TIMEOUT_S", "2147483")
    monkeypatch.setenv("CROWD_SCAN_MIN_AGE_S", "0")
    monkeypatch.setenv("CROWD_VIDEO_CLAIM_TIMEOUT_S", "1e9")
    settings = load_settings()
    assert (settings.publish_timeout_s, settings.scan_min_age_s, settings.video_claim_timeout_s) == (2147483, 0, 1e9)


def test_paths_are_taken_as_written_around_separators_and_home(monkeypatch, tmp_path) -> None:
    """``"/a: /b"`` gave the root ``<cwd>/ /b`` (every video there refused as outside the roots), and ``~`` was
    kept literally in the folders (``CROWD_MODEL_DIR=~/models`` meant ``<cwd>/~/models``)."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CROWD_VIDEO_ROOTS", "/data/videos : /mnt/cams ")
    monkeypatch.setenv("CROWD_MODEL_DIR", "~/models")
    monkeypatch.setenv("CROWD_MODEL_CACHE", " ~/cache")
    monkeypatch.setenv("CROWD_RESULTS_DIR", "~/results")
    settings = load_settings()
    assert settings.video_roots == (Path("/data/videos"), Path("/mnt/cams"))
    home = tmp_path / "home"
    assert (settings.model_dir, settings.model_cache, settings.results_dir) == (
        home / "models",
        home / "cache",
        home / "results",
    )


def test_schedules_take_cron_presets_and_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv("CROWD_SCAN_SCHEDULE", "@hourly")
    monkeypatch.setenv("CROWD_INGEST_SWEEP_SCHEDULE", "off")
    settings = load_settings()
    assert (settings.scan_schedule, settings.ingest_sweep_schedule) == ("@hourly", None)
    monkeypatch.setenv("CROWD_SCAN_SCHEDULE", "@once")  # Airflow's presets a DAG takes (not a sweep's cron)
    assert load_settings().scan_schedule == "@once"
    monkeypatch.setenv("CROWD_INGEST_SWEEP_SCHEDULE", "@once")
    with pytest.raises(ConfigError, match="CROWD_INGEST_SWEEP_SCHEDULE='@once' is not a cron schedule"):
        load_settings()


def test_every_airflow_cron_preset_is_taken_and_the_sweep_runs_on_it(monkeypatch) -> None:
    """``@quarterly`` is an Airflow preset croniter does not know: it was refused, and the DAG files failed to
    import."""
    from airflow.utils.dates import cron_presets

    from crowd.assets import faces_ingest_schedule

    for preset, cron in cron_presets.items():
        monkeypatch.setenv("CROWD_INGEST_SWEEP_SCHEDULE", preset)
        settings = load_settings()
        assert settings.ingest_sweep_schedule == preset
        timetable = faces_ingest_schedule(settings).timetable
        assert timetable.expression == cron, (preset, timetable.expression)


def test_mtcnn_works_on_frames_of_at_most_1920_pixels_by_default(monkeypatch) -> None:
    """Full resolution by default: a 4K frame took 1.6 GB and 3.3 s per frame, two tasks per worker."""
    from crowd.detection import build_detector

    assert build_detector("mtcnn", load_settings()).max_side == 1920
    monkeypatch.setenv("CROWD_MTCNN_MAX_SIDE", "0")  # 0: full resolution
    assert build_detector("mtcnn", load_settings()).max_side is None
    assert build_detector("mtcnn", load_settings(), mtcnn_max_side=640).max_side == 640
