"""Manual run: one video chosen in the trigger form -> face detection -> Kafka ``Faces``."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag

from crowd.assets import faces_topic_asset
from crowd.config import load_settings
from crowd.tasks import (
    DETECTION_PARAMS,
    detect_and_publish,
    detection_default_args,
    finish_videos,
    plan_requested_video,
)

settings = load_settings()

DOC = """
### Detect faces in one video

Trigger with **`video_path`**: an existing `.mp4` file inside `CROWD_VIDEO_ROOTS` (paths with `..` or
symlinks that lead outside the roots are refused). Optional: `frame_interval`, `confidence`, `tiles`, `model`.
The first task checks the parameters and fails with the reason when they are wrong. Long videos are split
into frame ranges processed by parallel mapped tasks; every frame's result goes to the Kafka topic `Faces`.
The video is processed even if it was processed before: with the same settings the same rows are stored
again (the sink is idempotent); with another `frame_interval` or model the new frames are stored beside the
earlier ones. If the file is deleted, moved or made unreadable before the run ends, the video is marked failed
with a reason starting "the video file went away" that names the path; what was published stays stored.
"""


@dag(
    dag_id="crowd_video_detect",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["crowd", "detection", "manual"],
    doc_md=DOC,
    params={
        "video_path": Param(
            type="string",
            minLength=1,
            pattern=r"(?i)\.mp4$",
            description="Path of an .mp4 file inside the configured video roots.",
        ),
        **DETECTION_PARAMS,
    },  # fmt: skip
    default_args=detection_default_args(settings),
)
def crowd_video_detect():
    work_items = plan_requested_video()
    published = detect_and_publish.override(outlets=[faces_topic_asset(settings)]).expand(item=work_items)
    finish_videos(work_items, published)


crowd_video_detect()
