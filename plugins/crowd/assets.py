"""The Kafka ``Faces`` topic as an Airflow asset: one definition for the DAG that publishes and the one that drains.

Detection tasks declare it as their outlet; the ingest DAG is scheduled on it, with an ``AssetWatcher`` whose
Kafka trigger (in the triggerer) fires when a message the drain has not stored yet arrives.
"""

from __future__ import annotations

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

from crowd.config import Settings

FACES_ASSET_NAME = "crowd_faces_topic"


def faces_topic_asset(settings: Settings) -> Asset:
    """The asset standing for ``settings.faces_topic``, with its Kafka watcher.

    Every DAG must declare it identically, watcher included: Airflow keeps one definition per asset, and an
    outlet declared without the watcher would unregister it. The watcher only runs for an unpaused DAG that is
    scheduled on the asset. It reads through its own connection (``settings.kafka_watch_conn_id``) whose ``group.id`` differs
    from the drain's: the trigger commits the offset of the message that fires it, and a drain in the same group
    would never see that message.
    """
    watcher = AssetWatcher(
        name="crowd_faces_watcher",
        trigger=MessageQueueTrigger(
            scheme="kafka",
            topics=[settings.faces_topic],
            kafka_config_id=settings.kafka_watch_conn_id,
            apply_function="crowd.ingest.faces_pending",
            apply_function_kwargs={
                "postgres_conn_id": settings.postgres_conn_id,
                "group_id": settings.ingest_group,
                "kafka_conn_id": settings.kafka_watch_conn_id,
            },
            poll_timeout=1,
            poll_interval=0,
            commit_offset=True,
        ),
    )
    return Asset(
        name=FACES_ASSET_NAME,
        uri=f"kafka://{settings.kafka_conn_id}/{settings.faces_topic}",
        group="crowd",
        watchers=[watcher],
    )


def faces_ingest_schedule(settings: Settings) -> list[Asset] | AssetOrTimeSchedule:
    """The ingest DAG's schedule: the Faces asset, and a sweep on ``settings.ingest_sweep_schedule`` too.

    The watcher reads each message once and fires for it once. A run that uses up those events and then fails
    (PostgreSQL down past its retries) would leave the messages in Kafka until another message arrives, which
    may be never; the sweep's run drains them (a run with nothing to drain takes well under a second of work).
    """
    asset = faces_topic_asset(settings)
    if settings.ingest_sweep_schedule is None:
        return [asset]
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(settings.ingest_sweep_schedule, timezone="UTC"), assets=[asset]
    )
