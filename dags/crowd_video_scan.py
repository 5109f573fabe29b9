"""Scheduled scan: new videos in the watched folders -> face detection -> Kafka ``Faces``."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import dag

from crowd.assets import faces_topic_asset
from crowd.config import load_settings
from crowd.tasks import (
    DETECTION_PARAMS,
    detect_and_publish,
    detection_default_args,
    finish_videos,
    scan_video_folders,
)

settings = load_settings()

DOC = """
### Scan the video folders and detect faces in new videos

Every run lists the `.mp4` files (any case) under `CROWD_VIDEO_ROOTS`, skips the ones already processed (known
by content hash, so a renamed copy is skipped and a changed file is new), splits each new video into frame
ranges of `CROWD_FRAMES_PER_TASK` frames, and runs one **mapped** detection task per range (at most Airflow's
`[core] max_map_length` in a run: the rest waits for the next scans). Each task publishes one message per
sampled frame to the Kafka topic `Faces` (key = video id), and the `crowd_faces_ingest` DAG stores them in
PostgreSQL.

A corrupt video fails its own mapped task (no retries: the log says why) and is recorded as failed in the
`videos` table; the other videos go on. A file moved or unreadable since the scan fails its task after the
retries; if it is still gone when the run ends, `finish_videos` records the video failed because its file went
away (naming the path), and a scan that finds the same content again, under any name, processes it again.
`finish_videos` marks a video done when all its parts were published. Schedule: `CROWD_SCAN_SCHEDULE` (default
every 5 minutes; `none`: by hand only).

The params (`frame_interval`, `confidence`, `tiles`, `model`) apply to the new videos of this run only, and
scheduled runs take their defaults. A video is done once, by content: a manual scan run with other params
processes its new videos that way, and later scans do not redo them with the defaults (trigger
`crowd_video_detect` with a path to process one video again with other settings).
"""


@dag(
    dag_id="crowd_video_scan",
    schedule=settings.scan_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["crowd", "detection"],
    doc_md=DOC,
    params=DETECTION_PARAMS,
    default_args=detection_default_args(settings),
)
def crowd_video_scan():
    work_items = scan_video_folders()
    published = detect_and_publish.override(outlets=[faces_topic_asset(settings)]).expand(item=work_items)
    finish_videos(work_items, published)


crowd_video_scan()
