"""Detection jobs: find new videos, split them into frame ranges, detect and publish one range, finish videos.

Plain functions (no Airflow imports) so they can be tested and benchmarked on their own; ``crowd.tasks``
wraps them as Airflow tasks. Data flows one way: video -> detection -> message -> Kafka, and the video
registry in PostgreSQL records what was processed (by content hash) and why a video failed.

Example:
    >>> items = find_new_videos(load_settings())                     # doctest: +SKIP
    >>> results = [detect_and_publish(item, DetectOptions()) for item in items]   # doctest: +SKIP
    >>> finish_videos(items, results)                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from crowd import storage
from crowd.config import ConfigError, Settings, load_settings
from crowd.detection import Detector, build_detector
from crowd.kafka import DeliveryTracker, PublishError, reliable_producer
from crowd.messages import FaceMessage
from crowd.models import ModelError
from crowd.pipeline import Progress, format_duration, process_video
from crowd.video import (
    BadFileNameError,
    PinnedFile,
    VideoError,
    VideoInfo,
    VideoNotFoundError,
    VideoPermissionError,
    check_file,
    check_name,
    content_hash,
    probe_video,
    split_ranges,
)

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

VIDEO_SUFFIX = ".mp4"

#: How the reason of a video failed because its file went away during a run starts (see :func:`finish_videos`):
#: unlike other failures, a scan that finds the same content again, under any name, plans it again.
FILE_WENT_AWAY = "the video file went away"


class BadVideoError(RuntimeError):
    """The video itself is unusable (not a video, corrupt): retrying cannot help."""


class VideoUnreachableError(RuntimeError):
    """The work item's file cannot be reached now (moved, outside this worker's roots, not readable): not a fault
    of the video, so the task does not record it as failed; the task fails (after its retries: the file may come
    back). If it is still not there when the run ends, :func:`finish_videos` records the video failed because its
    file went away (:data:`FILE_WENT_AWAY`), and a scan that finds the same content again processes it again."""


class VideoChangedError(VideoUnreachableError):
    """The file is no longer the one identified when the run was planned (rewritten, replaced, still being
    written): processing it would publish other frames under the old content's id. Retrying cannot help; the next
    scan identifies the file again."""


class ResultsFolderError(RuntimeError):
    """The results folder cannot be written (permissions, not a folder, disk full): fix it, then retry the task."""


def _check_results_folder(folder: Path) -> None:
    """Fail fast, before any detection or publishing, when ``folder`` cannot take the pictures."""
    probe = folder / f".crowd-write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb", buffering=0) as handle:
            handle.write(b"\0" * 4096)
    except OSError as exc:
        raise ResultsFolderError(
            f"results folder {folder} cannot be written ({exc.strerror or exc}); fix CROWD_RESULTS_DIR "
            "(permissions, free space) and retry"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkItem:
    """One detection task's share of a video: frames ``[start, stop)`` (``stop`` None = to the end), the detector
    backend the run resolved for all its parts (None: the task's own params and settings decide), and the file's
    signature when its content was identified (size, modification and change times, inode; None: not checked)."""

    path: str
    video_id: str
    start: int = 0
    stop: int | None = None
    part: int = 0
    parts: int = 1
    model: str | None = None
    file_signature: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DetectOptions:
    """Per-run detection choices (the DAG params)."""

    frame_interval: int | None = None
    confidence: float | None = None
    tiles: bool = False
    model: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DetectOptions:
        """Build from DAG params, validating types and ranges with messages that name the param."""
        interval = params.get("frame_interval")
        if isinstance(interval, float) and interval.is_integer():  # 5.0: JSON Schema's "integer" accepts it
            interval = int(interval)
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ConfigError(f"frame_interval={interval!r}: use a whole number >= 1, or leave it empty for fps/3")
        confidence = params.get("confidence")
        if confidence is not None and not (isinstance(confidence, int | float) and 0 < confidence <= 1):
            raise ConfigError(f"confidence={confidence!r}: use a number in (0, 1]")
        model = params.get("model") or None
        if model not in (None, "auto", "yolov3", "mtcnn", "yolov3-tiny"):
            raise ConfigError(f"model={model!r}: use auto, yolov3, mtcnn or yolov3-tiny")
        return cls(frame_interval=interval, confidence=confidence, tiles=bool(params.get("tiles")), model=model)


@dataclass
class _Publisher:
    """Hands every message to Kafka, keyed by video id, and fails fast on the first failed delivery.

    Made by :meth:`create`: the tracker's callback is the producer's delivery report callback (set once, not
    passed per message), and by default librdkafka reports failed deliveries only, the tracker counting the rest
    as acknowledged once :meth:`wait` has flushed the queue (no Python call per acknowledged message).
    """

    producer: Any
    topic: str
    tracker: DeliveryTracker

    @classmethod
    def create(
        cls, kafka_conn_id: str, topic: str, *, timeout_s: float, errors_only: bool = True, **overrides: Any
    ) -> _Publisher:
        """A publisher on a :func:`~crowd.kafka.reliable_producer`; ``errors_only=False`` reports every delivery."""
        tracker = DeliveryTracker(errors_only=errors_only)
        producer = reliable_producer(
            kafka_conn_id,
            timeout_s=timeout_s,
            on_delivery=tracker.callback,
            delivery_report_only_error=errors_only,
            **overrides,
        )
        return cls(producer, topic, tracker)

    @property
    def sent(self) -> int:
        """Messages handed to the producer so far."""
        return self.tracker.sent

    def __call__(self, message: FaceMessage) -> None:
        producer, tracker = self.producer, self.tracker
        key, value = message.video_id.encode(), message.to_json()
        while True:
            try:
                producer.produce(self.topic, value, key)
                break
            except BufferError:  # librdkafka's local queue is full: let deliveries drain, then retry
                producer.poll(0.01)  # not longer: with failure-only reports no event may come to wake it
                if tracker.failed:
                    break
        tracker.sent += 1
        producer.poll(0)  # serve delivery reports as we go
        if tracker.failed:
            tracker.wait(producer, timeout_s=1)  # raises PublishError with the broker's reason

    def wait(self, *, timeout_s: float) -> int:
        """Flush, raise :class:`~crowd.kafka.PublishError` unless every message was acknowledged; the count."""
        return self.tracker.wait(self.producer, timeout_s=timeout_s)

    def __enter__(self) -> _Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Release the producer (its threads and connections); anything still queued is delivered first, within
        the message timeout. A failed task's producer would otherwise go on retrying its broker while it lives."""
        self.producer.close()


class _ClaimKeeper:
    """Renews the run's claim on the video (see :class:`~crowd.storage.VideoState`) every ``interval_s`` from a
    daemon thread while the task works, so that a scan leaves the video to this run.

    On a timer, not per message: a part can go longer than the claim timeout without a message (a large
    ``frame_interval`` on a slow decode, a part seeking from frame 0, the pictures at the end), and a scan would
    plan the video again under a live task. A task that hangs keeps the claim until its execution timeout
    (``CROWD_DETECT_TASK_TIMEOUT_S``) ends it; a killed process renews nothing, so its claim lapses. A database that
    cannot be reached is logged and does not stop the task (publishing does not need it).

    Example:
        >>> with _ClaimKeeper(settings, video_id, run, interval_s=150):  # doctest: +SKIP
        ...     process_video(...)
    """

    def __init__(
        self, settings: Settings, video_id: str, run: storage.RunStamp | None, interval_s: float, *, now: bool = False
    ) -> None:
        self.settings, self.video_id, self.run, self.interval_s, self.now = settings, video_id, run, interval_s, now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"crowd-claim-{video_id[:12]}", daemon=True)

    def __enter__(self) -> _ClaimKeeper:
        """Start renewing (at once too when ``now``: a part after the first, maybe on another worker)."""
        if self.now:
            self.renew()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop renewing, and wait for a renewal in flight (bounded by the connection's timeouts)."""
        self._stop.set()
        self._thread.join()

    def _keep(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except Exception:  # a bug or a missing connection must not end the renewals silently
                log.exception("video %s: renewing this run's claim on it failed; trying again in %g s",
                              self.video_id, self.interval_s)  # fmt: skip

    def renew(self) -> None:
        """Give a sign of life now."""
        import psycopg

        try:
            with storage.connect(self.settings.postgres_conn_id) as conn:
                storage.keep_video_claim(conn, self.video_id, self.run)
        except psycopg.Error as exc:
            log.warning("video %s: could not renew this run's claim on it (%s); going on", self.video_id, exc)


def note_failure_reason(settings: Settings, item: WorkItem, run: storage.RunStamp | None) -> None:
    """Record that this try of ``item`` failed for a reason the video is not to blame for (Kafka, the results folder,
    a model missing on this worker), so the run does not count among those that ended silently (best effort: the
    error is raised anyway, and a database that cannot be reached only makes the run count as one that ended
    silently). The claim is released for a video in one part only (see :func:`crowd.storage.note_video_reason`)."""
    import psycopg

    video_id = item.video_id
    try:
        with storage.connect(settings.postgres_conn_id) as conn:
            storage.note_video_reason(conn, video_id, run, release=item.parts == 1)
    except psycopg.Error as exc:
        log.warning("video %s: could not record why this try failed (%s)", video_id, exc)


def list_videos(roots: Iterable[Path], *, incomplete: set[Path] | None = None) -> list[Path]:
    """Every ``*.mp4`` regular file under ``roots`` (``.MP4`` and any other case too: cameras write them), sorted;
    symlinks leading outside the roots are left out.

    A folder or file that cannot be read (no permission to enter it, moved or deleted while the walk goes on, an
    I/O error of a share) is skipped with a warning, and its root is added to ``incomplete``: its videos wait for
    a later scan. One such folder stopped the scan of every video, at every scan.
    """
    roots = [Path(r) for r in roots]
    found: set[Path] = set()
    for root in roots:

        def cannot_read(error: OSError, root: Path = root) -> None:
            log.warning("video root %s: skipping what cannot be read: %s", root, error)
            if incomplete is not None:
                incomplete.add(root)

        try:
            there = root.is_dir()
        except OSError as exc:  # is_dir() passes on a permission or I/O error
            cannot_read(exc)
            continue
        if not there:
            log.warning("video root %s does not exist or is not a folder; skipping it", root)
            continue
        for folder, _, names in os.walk(root, onerror=cannot_read):  # symlinked folders are not entered
            for name in names:
                path = Path(folder, name)
                if path.suffix.lower() != VIDEO_SUFFIX:
                    continue
                try:
                    check_name(path)  # OpenCV would crash the scan on it, PostgreSQL refuse it
                except BadFileNameError as exc:
                    log.warning("skipping it: %s", exc)
                    continue
                try:
                    resolved = path.resolve()
                except (OSError, RuntimeError) as exc:  # a symlink loop must not break the scan of every video
                    log.warning("skipping %s: cannot resolve it (%s)", path, exc)
                    continue
                if not any(resolved.is_relative_to(r) for r in roots):
                    log.warning("skipping %s: it points outside the video roots (%s)", path, resolved)
                    continue
                try:
                    if resolved.is_file():
                        found.add(path)
                except OSError as exc:
                    cannot_read(exc)
    return sorted(found)


def plan_video(
    path: Path,
    video_id: str,
    settings: Settings,
    max_items: int | None = None,
    signature: storage.FileSignature | None = None,
) -> list[WorkItem]:
    """Split one video into work items of at most ``settings.frames_per_task`` frames, or into ``max_items``
    longer ones when that would make more (Airflow maps at most ``[core] max_map_length`` items in a run).

    Only a video whose frame n is shown at n / fps (``VideoInfo.constant_rate``, from its MP4 index) is split: a
    part seeks to its first frame, and OpenCV seeks by time. A variable-frame-rate video, or one of unknown length,
    gets one item that reads it whole. A video whose metadata cannot be read (or that vanished since it was
    hashed) gets one item too: its task fails with the reason and records it (or, if the path now leads outside
    the roots, refuses it: the video is probed through the descriptor :meth:`Settings.open_video` checked).
    Every item carries ``signature``, the file as it was when ``video_id`` was computed from it.
    """
    items = _split_video(path, video_id, settings, max_items)
    if signature is None:
        return items
    return [replace(item, file_signature=astuple(signature)) for item in items]


def _split_video(path: Path, video_id: str, settings: Settings, max_items: int | None) -> list[WorkItem]:
    try:
        with settings.open_video(path) as video:
            info = probe_video(video)
    except (VideoError, OSError, ConfigError) as exc:
        log.warning("%s cannot be probed (%s); its detection task will check it again and say why", path, exc)
        return [WorkItem(str(path), video_id)]
    if not info.frame_count:
        return [WorkItem(str(path), video_id)]
    if not info.constant_rate and info.frame_count > settings.frames_per_task:
        log.info(
            "%s: frame rate not constant (or not known to be: not an MP4 index), so it is read whole in one task "
            "instead of %d", path, -(-info.frame_count // settings.frames_per_task),
        )  # fmt: skip
        return [WorkItem(str(path), video_id)]
    frames_per_task = settings.frames_per_task
    if max_items and -(-info.frame_count // frames_per_task) > max_items:
        frames_per_task = -(-info.frame_count // max_items)
        log.info(
            "%s: %d frames in at most %d tasks (Airflow's [core] max_map_length): %d frames a task instead of "
            "CROWD_FRAMES_PER_TASK=%d", path, info.frame_count, max_items, frames_per_task, settings.frames_per_task,
        )  # fmt: skip
    ranges = split_ranges(info.frame_count, frames_per_task)
    if len(ranges) == 1:  # read to the end, not to the count: outside an MP4 index it is an estimate
        return [WorkItem(str(path), video_id)]
    return [WorkItem(str(path), video_id, a, b, i, len(ranges)) for i, (a, b) in enumerate(ranges)]


def identify_video(settings: Settings, path: Path) -> tuple[str, storage.FileSignature]:
    """The content hash of the video file at ``path`` and the file's signature while it was read.

    Raises:
        VideoChangedError: the file changed while it was read (still being written): the hash is of no content.
        VideoError, OSError, ConfigError: as :meth:`Settings.open_video` and :func:`~crowd.video.content_hash`.
    """
    with settings.open_video(path) as video:  # hashed is what was checked (see open_video)
        before = storage.FileSignature.of(os.fstat(video.fd))
        video_id = content_hash(video)
        if storage.FileSignature.of(os.fstat(video.fd)) != before:
            raise VideoChangedError(f"{path} changed while it was read (it may still be being written)")
    return video_id, before


def _same_content(item: WorkItem, now: storage.FileSignature, video: PinnedFile) -> bool:
    """Whether the opened file still holds the content ``item`` was planned for. The same signature says so at
    once; another size says not. Other changes (permissions, ownership, a hard link, a relabelling tool: they move
    the change time; a share whose inode numbers differ between workers) are settled by hashing it again."""
    planned = tuple(item.file_signature or ())
    if astuple(now) == planned:
        return True
    if planned and now.size_bytes != planned[0]:
        return False
    same = content_hash(video) == item.video_id
    log.info(
        "video %s: %s since the scan; its content %s (hashed again)", item.video_id, _changes(planned, now),
        "is the same" if same else "is not",
    )  # fmt: skip
    return same


def _changed_while_read(item: WorkItem, opened: storage.FileSignature, video: PinnedFile) -> str | None:
    """What changed in the file read through ``video`` since it was opened (``opened``), if its content changed.

    Another size or modification time says so at once; a change of the change time alone (permissions, a hard
    link) is settled by hashing the file again."""
    now = storage.FileSignature.of(os.fstat(video.fd))
    if now == opened:
        return None
    if (now.size_bytes, now.mtime_ns) == (opened.size_bytes, opened.mtime_ns) and content_hash(video) == item.video_id:
        return None
    return _changes(astuple(opened), now)


def _changes(planned: Iterable[int], now: storage.FileSignature) -> str:
    """What differs between a planned signature and ``now``, e.g. ``size 1200 -> 900 bytes, inode``."""
    names = ("size", "modification time", "change time", "inode")
    changed = [name for name, a, b in zip(names, planned, astuple(now), strict=True) if a != b]
    if "size" in changed:
        changed[0] = f"size {next(iter(planned))} -> {now.size_bytes} bytes"
    return ", ".join(changed) + (" changed" if changed else "")


def find_new_videos(
    settings: Settings | None = None, run_is_active: Callable[[str], bool] | None = None
) -> list[WorkItem]:
    """Work items for every video under the roots whose content was not processed yet.

    Videos are known by content hash: a renamed copy of a processed (or failed) video is skipped, a changed
    file is new; but a video failed because its file went away during a run (:data:`FILE_WENT_AWAY`) is planned
    again where it is found. A video another run is processing (its claim alive, see
    :class:`~crowd.storage.VideoState`) is left to it; one whose runs ended silently ``settings.max_silent_runs``
    times in a row is marked failed. Two copies of the same content found in one scan are processed once. A file modified less than
    ``settings.scan_min_age_s`` ago (or in the future) may still be being written (an upload, a camera's
    recording) and is left for a later scan: processed now, it would fail, or give a part of the video under a
    content hash that is not the finished file's. A file is read whole (hashed) once: its hash is kept in
    ``scanned_files`` with its size, times and inode, and later scans reuse it while these stay the same.
    At most ``settings.max_tasks_per_run`` items are returned (Airflow maps no longer list): whole videos, oldest
    first (modification time, then path), up to the first that does not fit; it and the newer ones are left for the
    next scan, which plans it first (a video too long alone gets that many longer parts), so a stream of new files
    cannot defer an old one for ever. Once the run is full, new files are not read (hashed) either: the next scans
    read them. Each hash is remembered as soon as it is computed, so a scan stopped in a large backlog (its
    execution timeout) does not read the same files again.

    ``run_is_active(run_id)`` tells whether the run a video belongs to is still queued or running in Airflow: a
    video whose claim lapsed is left to that run too (its parts may wait in a queue longer than the claim lasts).
    """
    settings = settings or load_settings()
    items: list[WorkItem] = []
    seen: dict[str, Path] = {}
    already: dict[str, int] = {"done": 0, "failed": 0}
    deferred = in_progress = unread = 0
    blocked: tuple[Path, int] | None = None  # the first video that did not fit, and the tasks it needs
    max_items = settings.max_tasks_per_run
    with storage.connect(settings.postgres_conn_id) as conn:
        conn.autocommit = True  # no transaction left open while files are hashed (minutes for a large backlog)
        storage.migrate(conn)
        incomplete: set[Path] = set()
        listed = list_videos(settings.video_roots, incomplete=incomplete)
        # a root that is not there now (an unmounted share), or not read whole, keeps the hashes remembered under it
        listed_roots = [root for root in settings.video_roots if root not in incomplete and root_present(root)]
        settled = _settled_files(listed, settings.scan_min_age_s)
        known = storage.known_video_ids(conn, {key: signature for key, (_, signature) in settled.items()})
        hashed: dict[str, tuple[storage.FileSignature, str]] = {}
        # oldest first: a video left for the next scan is planned first there, whatever newer files arrive meanwhile
        for key, (path, signature) in sorted(settled.items(), key=lambda kv: (kv[1][1].mtime_ns, kv[0])):
            full = blocked is not None or len(items) >= max_items
            video_id = known.get(key)
            if video_id is None:  # a new or changed file: read it whole once
                if full:  # not read: this run could not take it anyway, and a backlog would be read at every scan
                    unread += 1
                    continue
                started = time.perf_counter()
                try:
                    video_id, read_signature = identify_video(settings, path)
                except (OSError, VideoError, ConfigError, VideoChangedError) as exc:  # an empty file must not fail it
                    log.warning("cannot read %s to hash it (%s); skipping it this time", path, exc)
                    continue
                if read_signature != signature:  # changed between the listing and the read
                    log.warning("%s changed since it was listed; skipping it this time", path)
                    continue
                hashed[key] = (signature, video_id)
                # remembered at once: a scan stopped in a backlog (its execution timeout) keeps what it read
                storage.remember_video_ids(conn, {key: hashed[key]}, listed=(), roots=())
                log.info(
                    "hashed %s (%.1f MB) in %.1f s: video %s", path, signature.size_bytes / 1e6,
                    time.perf_counter() - started, video_id,
                )  # fmt: skip
            if video_id in seen:
                log.info("%s has the same content as %s; processing it once", path, seen[video_id])
                continue
            seen[video_id] = path
            state = storage.get_video_state(conn, video_id)
            if state and state.status == "failed" and _failed_as_gone(conn, video_id):
                log.info(
                    "video %s failed because its file went away during a run; found again at %s: planned like a new "
                    "video", video_id, path,
                )  # fmt: skip
            elif state and state.status in already:
                already[state.status] += 1
                # DEBUG: at INFO every scan would list the whole library (the summary line counts them)
                log.debug("skipping %s: video %s already %s", path.name, video_id, state.status)
                continue
            if state and state.claimed(settings.video_claim_timeout_s):
                in_progress += 1
                log.info(
                    "skipping %s: video %s is being processed by run %s (last sign of life %.0f s ago)", path.name,
                    video_id, state.run_id, state.alive_s_ago,
                )  # fmt: skip
                continue
            if (
                state
                and state.status == "processing"
                and state.run_id
                and run_is_active
                and run_is_active(state.run_id)
            ):
                in_progress += 1
                log.info(
                    "skipping %s: video %s belongs to run %s, still active in Airflow (its tasks wait in a queue: no "
                    "sign of life for %.0f s)", path.name, video_id, state.run_id, state.alive_s_ago,
                )  # fmt: skip
                continue
            given_up = state and state.runs_ended_silently() >= settings.max_silent_runs
            if given_up and storage.fail_abandoned_video(
                conn, video_id, claim_timeout_s=settings.video_claim_timeout_s, max_silent_runs=settings.max_silent_runs
            ):
                already["failed"] += 1
                log.error(
                    "video %s (%s) marked failed: %d runs in a row ended without finishing it or giving a reason, the "
                    "last one %s (CROWD_MAX_SILENT_RUNS=%d); see their task logs, and trigger crowd_video_detect with "
                    "its path to try again", path, video_id, state.runs_ended_silently(), state.run_id,
                    settings.max_silent_runs,
                )  # fmt: skip
                continue
            if full:  # not even probed (a backlog of thousands would be, every scan)
                deferred += 1
                continue
            planned = plan_video(path, video_id, settings, max_items=None if items else max_items, signature=signature)
            if len(items) + len(planned) > max_items:  # stop here: planned first (capped if need be) by the next scan
                deferred += 1
                blocked = (path, len(planned))
                continue
            items.extend(planned)
        storage.remember_video_ids(conn, {}, listed=map(str, listed), roots=map(str, listed_roots))  # forget gone files
    log.info(
        "scan of %s: %d new video(s) in %d task(s), %d already done, %d failed, %d being processed by another run; "
        "%d file(s) hashed (new or changed), %d known by size and times, %d new or changed not read yet (the run is "
        "full); %d left for a later scan (modified less than %g s ago, or not readable)",
        ", ".join(map(str, settings.video_roots)), len({i.video_id for i in items}), len(items), already["done"],
        already["failed"], in_progress,
        len(hashed), len(known), unread, len(listed) - len(settled), settings.scan_min_age_s,
    )  # fmt: skip
    if deferred or unread:
        why = (
            f"{blocked[0]} needs {blocked[1]} task(s) and this run has {len(items)} of the {max_items} a run maps "
            "(Airflow's [core] max_map_length), so the next scan plans it first: newer videos do not overtake it"
            if blocked
            else f"this run has {len(items)} tasks, the most a run maps (Airflow's [core] max_map_length)"
        )
        log.warning(
            "%d more new video(s) left for the next scan, and %d new or changed file(s) not read yet: %s. The next "
            "scans take them oldest first; a larger max_map_length or CROWD_FRAMES_PER_TASK takes more videos a run",
            deferred, unread, why,
        )  # fmt: skip
    return items


def _settled_files(paths: Iterable[Path], min_age_s: float) -> dict[str, tuple[Path, storage.FileSignature]]:
    """The files of ``paths`` modified at least ``min_age_s`` ago, with their signature; the others are logged."""
    settled: dict[str, tuple[Path, storage.FileSignature]] = {}
    for path in paths:
        try:
            st = path.stat()
        except OSError as exc:
            log.warning("cannot read %s (%s); skipping it this time", path, exc)
            continue
        age_s = time.time() - st.st_mtime
        if age_s < min_age_s:
            log.info(
                "leaving %s for a later scan: modified %.0f s ago, less than CROWD_SCAN_MIN_AGE_S=%g s (it may still "
                "be being written)%s", path, age_s, min_age_s,
                "; its modification time is in the future: check the clocks" if age_s < 0 else "",
            )  # fmt: skip
            continue
        settled[str(path)] = (path, storage.FileSignature.of(st))
    return settled


def plan_requested_video(
    video_path: str, settings: Settings | None = None, run: storage.RunStamp | None = None
) -> list[WorkItem]:
    """Work items for one user-given path, after checking it is an existing ``.mp4`` inside the roots.

    With ``run`` (the manual run), the run claims the video at once: a scan between this plan and the run's first
    detection task (queued behind other work, possibly for long) would otherwise plan the same video again and
    compute it twice. The claim lapses like any other (``settings.video_claim_timeout_s``) if the run dies, and
    while the run is queued or running in Airflow the scan leaves it the video anyway.

    Raises:
        ConfigError: outside the roots, missing, not a file, or not ``.mp4``.
        BadVideoError: the file cannot be read to identify it (empty, unreadable): retrying cannot help.
    """
    settings = settings or load_settings()
    path = settings.check_video_path(video_path)
    if path.suffix.lower() != VIDEO_SUFFIX:
        raise ConfigError(f"video path {video_path!r} is not an .mp4 file")
    try:
        video_id, signature = identify_video(settings, path)
    except VideoChangedError as exc:
        raise ConfigError(f"{exc}; trigger the run again once the file is complete") from exc
    except (VideoError, OSError) as exc:
        raise BadVideoError(f"video {path.name} cannot be read to identify it: {exc}; fix or replace the file") from exc
    items = plan_video(path, video_id, settings, max_items=settings.max_tasks_per_run, signature=signature)
    if run is not None:
        with storage.connect(settings.postgres_conn_id) as conn:
            storage.migrate(conn)
            if storage.mark_video_processing(
                conn, video_id, str(path), fps=None, frame_count=None, width=None, height=None,
                size_bytes=signature.size_bytes, model=None, run=run, claim_timeout_s=settings.video_claim_timeout_s,
            ):  # fmt: skip
                log.info(
                    "video %s (%s): claimed by run %s until its tasks take it over", path.name, video_id, run.run_id
                )
            else:
                log.warning(
                    "video %s (%s): a later run owns its status; this run processes it anyway (its frames are stored "
                    "once, whichever run publishes them)", path.name, video_id,
                )  # fmt: skip
    return items


def detect_and_publish(
    item: WorkItem, options: DetectOptions, settings: Settings | None = None, run: storage.RunStamp | None = None
) -> dict[str, Any]:
    """Detect faces on the sampled frames of one work item and publish one message per frame to Kafka.

    ``run`` (the Airflow run) is recorded with the video's status; a stale try cannot undo a later status. The
    run claims the video (part 0) and renews the claim while the task works (every part), so scans leave it to the
    run; a try failing on Kafka or the results folder records that it gave a reason (see
    :class:`~crowd.storage.VideoState`).

    Every delivery is confirmed before this returns (a failed one raises :class:`~crowd.kafka.PublishError`).
    Re-running it publishes the same keys and ids, so the sink stays idempotent.

    Raises:
        BadVideoError: the video cannot be read (recorded as failed in the registry first).
        VideoUnreachableError: the file is not where the item says, or not readable (nothing recorded; the run's
            :func:`finish_videos` records it failed if it is still not there then).
        VideoChangedError: the file is not the one identified when the item was planned (nothing published), or
            it changed while it was read (what was published stays; the run records the file gone).
        PublishError: Kafka did not acknowledge every message (retry the task).
    """
    settings = settings or load_settings()
    path = Path(item.path)
    with contextlib.ExitStack() as closing:
        with storage.connect(settings.postgres_conn_id) as conn:
            storage.migrate(conn)  # a no-op once the schema is current; the manual DAG may run first
            try:
                # read through the descriptor opened and checked here: a symlink swapped later cannot lead elsewhere
                video = closing.enter_context(settings.open_video(path))
                now = storage.FileSignature.of(os.fstat(video.fd))
                if item.file_signature is not None and not _same_content(item, now, video):
                    storage.note_video_reason(conn, item.video_id, run, release=item.parts == 1)
                    raise VideoChangedError(
                        f"video {path.name} ({item.video_id}) is not the file identified when this run was planned: "
                        f"{_changes(item.file_signature, now)} (rewritten, replaced or still being written); its "
                        "frames would be published under another content's id. Not processed and not recorded as "
                        "failed: the next scan identifies the file again"
                    )
                check_file(video)
                info = probe_video(video)
            except (ConfigError, VideoNotFoundError, VideoPermissionError) as exc:  # where it is, not what it holds
                # a part after the first: the run has the claim
                storage.note_video_reason(conn, item.video_id, run, release=item.parts == 1)
                raise VideoUnreachableError(
                    f"video {path.name} ({item.video_id}) cannot be reached: {exc}; retried (it may come back). Not "
                    "recorded as failed by this task: if it is still not there when the run ends, the run records "
                    "that the file went away, and a scan that finds it again processes it again"
                ) from exc
            except VideoError as exc:
                storage.mark_video_failed(conn, item.video_id, str(path), str(exc), run)
                raise BadVideoError(f"video {path.name} ({item.video_id}) failed: {exc}") from exc
            size_bytes = now.size_bytes
            try:
                detector = build_detector(
                    options.model, settings, conf_threshold=options.confidence, tiles=options.tiles
                )
            except ModelError:  # this worker's model files, not the video
                storage.note_video_reason(conn, item.video_id, run, release=item.parts == 1)
                raise
            if item.part == 0 and not storage.mark_video_processing(
                conn, item.video_id, str(path), fps=info.fps, frame_count=info.frame_count, width=info.width,
                height=info.height, size_bytes=size_bytes, model=detector.name, run=run,
                claim_timeout_s=settings.video_claim_timeout_s,
            ):  # fmt: skip
                log.warning(
                    "video %s: its status belongs to a later run, or this run is already done with it (another part "
                    "found it corrupt, or this try is stale): left as it is", item.video_id,
                )  # fmt: skip
        log.info(
            "video %s: %.1f MB, %dx%d, %g fps, %s frames; part %d/%d = frames [%d, %s); model %s; topic %s",
            path.name, size_bytes / 1e6, info.width, info.height, info.fps, info.frame_count,
            item.part + 1, item.parts, item.start, item.stop if item.stop is not None else "end", detector.name,
            settings.faces_topic,
        )  # fmt: skip
        try:
            return _detect_and_publish(item, options, settings, run, video, info, detector, now)
        except (PublishError, ResultsFolderError, KafkaException):  # Kafka, the results folder: not the video
            note_failure_reason(settings, item, run)
            raise


#: Seconds between a detection task's progress lines.
PROGRESS_EVERY_S = 5.0


class _TaskProgress:
    """A detection task's progress sink: logs each report, and warns once when the part's expected time (from its
    speed so far) runs past the task's execution timeout, which would stop it and retry it from its start."""

    def __init__(self, item: WorkItem, name: str, settings: Settings) -> None:
        self.item, self.name, self.timeout_s = item, name, settings.detect_task_timeout_s
        self.frames_per_task = settings.frames_per_task
        self.started = time.perf_counter()
        self.warned = False

    def __call__(self, progress: Progress) -> None:
        log.info("%s", progress)
        elapsed = time.perf_counter() - self.started
        # not from the first seconds' speed (decoder and model warming up), nor twice
        if self.warned or progress.eta_s is None or elapsed < min(60.0, self.timeout_s / 20):
            return
        if (expected := elapsed + progress.eta_s) > self.timeout_s:
            self.warned = True
            item = self.item
            read_whole = item.parts == 1 and progress.total is not None and progress.total > self.frames_per_task
            log.warning(
                "video %s part %d/%d: at %.1f frames/s this part needs about %s, past the task's execution timeout "
                "of %s (CROWD_DETECT_TASK_TIMEOUT_S): it will be stopped there and retried from its start. %s",
                self.name, item.part + 1, item.parts, progress.frames_per_s, format_duration(expected),
                format_duration(self.timeout_s),
                "It is read whole (no constant frame rate in an MP4 index, so not split): remux it to constant rate "
                "MP4, or raise the timeout (and RabbitMQ's consumer_timeout with it)"
                if read_whole
                else "Lower CROWD_FRAMES_PER_TASK or the frame rate sampled, or raise the timeout (and RabbitMQ's "
                "consumer_timeout with it)",
            )  # fmt: skip


def _detect_and_publish(
    item: WorkItem,
    options: DetectOptions,
    settings: Settings,
    run: storage.RunStamp | None,
    video: PinnedFile,
    info: VideoInfo,
    detector: Detector,
    opened: storage.FileSignature,
) -> dict[str, Any]:
    """:func:`detect_and_publish` once the video is opened (its file's signature then: ``opened``), checked and
    claimed."""
    path = Path(str(video))  # the name, for logs and errors (``video`` is read through its descriptor)
    pictures_dir = settings.results_dir / item.video_id
    # the API and dashboard list a video's folder: a part's pictures go there too, named after the part
    pictures_prefix = f"part-{item.part + 1:04d}-" if item.parts > 1 else ""
    _check_results_folder(pictures_dir)
    topic, timeout_s = settings.faces_topic, settings.publish_timeout_s
    # the claim is renewed on a timer until the deliveries are confirmed; part 0 claimed the video above, a later
    # part (maybe on another worker) renews it at once
    keeper = _ClaimKeeper(settings, item.video_id, run, settings.video_claim_timeout_s / 4, now=item.part > 0)
    with _Publisher.create(settings.kafka_conn_id, topic, timeout_s=timeout_s) as publisher, keeper:
        started = time.perf_counter()
        try:
            summary = process_video(
                video, detector, frame_interval=options.frame_interval, frame_range=(item.start, item.stop),
                on_message=publisher, pictures_dir=pictures_dir, pictures_prefix=pictures_prefix,
                video_id=item.video_id, progress=_TaskProgress(item, path.name, settings),
                progress_every_s=PROGRESS_EVERY_S,
            )  # fmt: skip
        except OSError as exc:  # video errors are VideoError; an OSError here is the pictures' write
            try:  # the frames' messages are good: deliver them before failing on the pictures
                publisher.wait(timeout_s=timeout_s)
            except PublishError as publish_error:
                log.error("video %s: delivering its messages failed as well: %s", path.name, publish_error)
            raise ResultsFolderError(
                f"video {path.name} ({item.video_id}): writing results to {pictures_dir} failed ({exc}); fix "
                "CROWD_RESULTS_DIR (permissions, free space) and retry"
            ) from exc
        delivered = publisher.wait(timeout_s=timeout_s)
        log.info(
            "summary %s part %d/%d: %d frames, %d faces, max %d at %.1f s (frame %s), %d messages delivered to %s, "
            "%.1f s wall",
            path.name, item.part + 1, item.parts, summary.frames_processed, summary.faces_total, summary.max_faces,
            (summary.max_faces_ts_ms or 0) / 1000, summary.max_faces_frame_id, delivered, topic,
            time.perf_counter() - started,
        )  # fmt: skip
        for kind, picture in (summary.pictures or {}).items():
            if picture:
                log.info("picture %s: %s", kind, picture)
        if (changes := _changed_while_read(item, opened, video)) is not None:
            with storage.connect(settings.postgres_conn_id) as conn:
                storage.note_video_reason(conn, item.video_id, run, release=item.parts == 1)
            raise VideoChangedError(
                f"video {path.name} ({item.video_id}) changed while it was read ({changes}: rewritten in place, or "
                f"still being written): {delivered} frames were published under this content's id, maybe from the "
                "new content. Not recorded as failed (a decoding error it caused would have failed the content for "
                "good, under any name): the run records that its file went away, and the next scan identifies the "
                "file again"
            )
        if summary.stopped_early:
            with storage.connect(settings.postgres_conn_id) as conn:
                storage.mark_video_failed(conn, item.video_id, str(path), summary.error or "stopped early", run)
            raise BadVideoError(
                f"video {path.name} ({item.video_id}) is corrupt after frame {summary.last_frame_id}: {summary.error}; "
                f"the {delivered} frames before it were published"
            )
        return {**item.to_dict(), "frames": summary.frames_processed, "faces": summary.faces_total,
                "max_faces": summary.max_faces, "messages": delivered}  # fmt: skip


def finish_videos(
    items: Iterable[WorkItem],
    results: Iterable[dict[str, Any] | None],
    settings: Settings | None = None,
    run: storage.RunStamp | None = None,
) -> dict[str, list[str]]:
    """Mark ``done`` every video all of whose parts succeeded; the others stay failed or in processing, the
    run's claim on them released, except those whose file went away during the run.

    A video not completed whose file is no longer at its item's path (deleted, moved or renamed, not readable, other
    content there now) is marked failed, its reason starting with :data:`FILE_WENT_AWAY` and naming the path: left
    ``processing``, it would stay so for good, as no scan lists a file that is not there. What its parts published
    stays stored (a rerun publishes the same keys and ids); a scan that finds the same content again, under any
    name, plans it again. A video failed for a reason of its own (corrupt) keeps that reason.

    A video whose status belongs to a later run (``run`` is older) is left to that run: it is not reported done
    (its row says what the later run made of it) nor incomplete (this run was superseded, it did not fail).

    Returns:
        ``{"done": [...], "incomplete": [...], "superseded": [...], "gone": [...]}`` video ids; ``gone``: those of
        ``incomplete`` marked failed because their file went away.
    """
    settings = settings or load_settings()
    parts_needed: dict[str, int] = {}
    planned: dict[str, WorkItem] = {}
    for item in items:
        parts_needed[item.video_id] = item.parts
        planned.setdefault(item.video_id, item)
    parts_done: dict[str, set[int]] = {}
    for result in results:
        if result:
            parts_done.setdefault(result["video_id"], set()).add(result["part"])
    complete = sorted(v for v, n in parts_needed.items() if len(parts_done.get(v, ())) == n)
    incomplete = sorted(set(parts_needed) - set(complete))
    done: list[str] = []
    superseded: list[str] = []
    gone: list[str] = []
    with storage.connect(settings.postgres_conn_id) as conn:
        conn.autocommit = True  # no transaction left open while a file is checked (hashed again, at worst)
        for video_id in complete:
            if storage.mark_video_done(conn, video_id, run):
                done.append(video_id)
            else:
                superseded.append(video_id)
                log.warning(
                    "video %s: every part was published, but a later run owns its status, so it is not marked done "
                    "by this run; the later run finishes it (see its finish_videos log)", video_id,
                )  # fmt: skip
        for video_id in incomplete:
            if _fail_if_gone(conn, planned[video_id], len(parts_done.get(video_id, ())), settings, run):
                gone.append(video_id)
            else:  # still processing by this run: the next scan plans it again at once
                storage.release_video_claim(conn, video_id, run)
    log.info(
        "videos done: %d %s; incomplete or failed: %d %s (their file went away: %d %s); left to a later run: %d %s",
        len(done), done, len(incomplete), incomplete, len(gone), gone, len(superseded), superseded,
    )  # fmt: skip
    return {"done": done, "incomplete": incomplete, "superseded": superseded, "gone": gone}


def _fail_if_gone(
    conn: psycopg.Connection, item: WorkItem, published: int, settings: Settings, run: storage.RunStamp | None
) -> bool:
    """Mark ``item``'s video failed, saying why, if its file went away during the run; True if it was.

    Only a video with no status yet, or ``processing`` by this run (checked again as it is written): one done or
    failed keeps its status and reason, one another run owns (or claims meanwhile) is left to it.
    """
    state = storage.get_video_state(conn, item.video_id)
    run_id = run.run_id if run else None
    if state is not None and not (state.status == "processing" and state.run_id == run_id):
        return False
    why = _why_gone(item, settings)
    if why is None:
        return False
    reason = (
        f"{FILE_WENT_AWAY} (deleted, moved or renamed, or no longer readable) while run {run_id or '(not recorded)'} "
        f"was processing it: {why}; {published} of {item.parts} part(s) completed, and what was published stays "
        "stored. A scan that finds the same content again in the video roots processes it again, or trigger "
        "crowd_video_detect with its path"
    )
    if not storage.mark_video_failed_if_owned(conn, item.video_id, item.path, reason, run):
        return False  # another run owns it meanwhile
    log.error("video %s marked failed: %s", item.video_id, reason)
    return True


def root_present(root: Path) -> bool:
    """Whether the scan takes the video root ``root`` as there: a folder with something in it. A share not mounted
    leaves nothing, or its mount point as an empty folder, whose remembered hashes are kept for its return (a
    folder emptied on purpose only keeps stale hashes until something is under it again)."""
    try:
        with os.scandir(root) as entries:
            return next(entries, None) is not None
    except OSError:  # missing, not a folder, not readable
        return False


def _why_gone(item: WorkItem, settings: Settings) -> str | None:
    """Why the file ``item`` was planned for is no longer at its path (not there, not readable, other content
    there), or None while it is, or when this worker cannot tell: the path lies outside its video roots (another
    worker's mount), its root is missing (a share not mounted here, or not now), or reading it failed (an I/O error
    is not an absence). An empty root counts as there: its last file deleted must not leave the video
    ``processing`` for good; an unmounted share whose mount point stays as an empty folder then fails its videos in
    flight as gone, and a scan processes them again when the share is back. An item without a file signature is
    only checked to be there and readable."""
    try:
        given = Path(item.path).expanduser()
        paths = {Path(os.path.abspath(given)), given.parent.resolve() / given.name}  # as planned, and linked
        root = next((r for r in settings.video_roots for p in paths if p.is_relative_to(r)), None)
        if root is None or not root.is_dir():
            return None
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return None
    try:
        with settings.open_video(item.path) as video:
            now = storage.FileSignature.of(os.fstat(video.fd))
            if item.file_signature is not None and not _same_content(item, now, video):
                return f"{item.path!r} holds other content now ({_changes(item.file_signature, now)})"
    except (ConfigError, VideoError) as exc:  # missing, moved out, not a file, not readable
        return str(exc)
    except OSError:  # a read error while hashing it again
        log.warning("video %s: %s could not be read to the end; not counted as gone", item.video_id, item.path)
        return None
    return None


def _failed_as_gone(conn: psycopg.Connection, video_id: str) -> bool:
    """Whether ``video_id`` is failed because its file went away during a run (see :func:`finish_videos`)."""
    return storage.video_failed_with(conn, video_id, FILE_WENT_AWAY)
