"""Benchmark end to end: video -> detections -> Kafka -> PostgreSQL, our design vs the seed's, same video.

* ``ours``: :func:`crowd.pipeline.process_video` (threaded decoder, ``grab()`` on skipped frames) publishing through
  ``crowd.jobs._Publisher`` (:func:`crowd.kafka.reliable_producer`, batched, failed deliveries reported), then
  :func:`crowd.ingest.drain` (COPY, offsets in the same transaction) into a fresh schema;
* ``seed``: ``cap.read()`` on every frame, detect every ``interval``-th, ``producer.produce`` + ``flush()`` per
  message, then a consumer that reads one message at a time and stores it with one INSERT per row and one
  commit per message.

Same detector, same frames, same message content (``build_message``); the rows stored by both are compared.
Phases run one after the other in both designs (publish, then store). Goal: ours >= 3x faster.
``detect_only`` (the detector on the same frames, decoded beforehand) is work both designs must do, so
``seed / detect_only`` bounds any speed-up (Amdahl); ``phases`` splits each run into detect+publish, flush, store.
``ours_io`` / ``seed_io``: both designs again with the detector replaced by a replay of its results (same
boxes, no inference): what the design itself costs around the model (decode, publish, store).

Usage: ``source dev/env.sh && python bench/end_to_end.py [--backend yolov3-tiny] [--interval 10] [--frames 300]
[--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    import psycopg
    from confluent_kafka import Consumer, Producer
    from detect import make_detector, make_video
    from services import Scratch

    from crowd import storage
    from crowd.detection import Detector
    from crowd.ingest import drain
    from crowd.jobs import _Publisher
    from crowd.messages import build_message
    from crowd.pipeline import process_video

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="yolov3-tiny", help="a build_detector backend or yolov3-face-synthetic")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--frames", type=int, default=300, help="frames of the generated 1280x720 clip")
    parser.add_argument("--video", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("crowd", "airflow"):
        logging.getLogger(name).setLevel(logging.WARNING)

    scratch = Scratch()
    weights_dir = tempfile.TemporaryDirectory()
    detector = make_detector(args.backend, Path(weights_dir.name))  # also yolov3-face-synthetic

    def fresh() -> tuple[str, str]:
        return scratch.topic("bench-e2e"), scratch.schema("bench_e2e")

    def stored(schema: str) -> tuple[list, list]:
        """Every stored frame and face, in key order: the designs must store the same rows (the model name and
        source path differ by design: the seed loop writes its own)."""
        with psycopg.connect(scratch.dsn(schema)) as conn:
            frames = conn.execute(
                "SELECT video_id, frame_id, round(frame_ts_ms::numeric, 1), total_faces, frame_width, frame_height "
                "FROM frames ORDER BY video_id, frame_id"
            ).fetchall()
            faces = conn.execute(
                "SELECT video_id, frame_id, face_id, x, y, width, height, round(confidence::numeric, 3) FROM faces "
                "ORDER BY video_id, frame_id, face_id"
            ).fetchall()
        return frames, faces

    class Replay(Detector):
        """Replays ``detector``'s boxes for the sampled frames in order: the designs without inference."""

        def __init__(self, boxes: list) -> None:
            self.boxes, self.name, self.calls = boxes, detector.name, 0

        def detect(self, frame_bgr):  # noqa: ANN001, ANN202
            self.calls += 1
            return self.boxes[self.calls - 1]

    def ours(video: Path, det: Detector | None = None, key: str = "ours") -> tuple[float, tuple]:
        det = det or detector
        topic, schema = fresh()
        scratch.use_schema(schema)
        start = time.perf_counter()
        publisher = _Publisher.create("kafka_default", topic, timeout_s=30)
        summary = process_video(video, det, frame_interval=args.interval, on_message=publisher, video_id="v")
        t1 = time.perf_counter()
        publisher.tracker.wait(publisher.producer, timeout_s=60)
        t2 = time.perf_counter()
        result = drain("kafka_default", "crowd_postgres", topic, f"e2e-{topic}", batch_wait_s=0.2)
        elapsed = time.perf_counter() - start
        phases[key].append((round(t1 - start, 2), round(t2 - t1, 2), round(elapsed - (t2 - start), 2)))
        assert result.messages == summary.frames_processed and result.lag_left == 0, result
        return elapsed, stored(schema)

    def seed(video: Path, det: Detector | None = None, key: str = "seed") -> tuple[float, tuple]:
        det = det or detector
        topic, schema = fresh()
        dsn = scratch.dsn(schema)
        with psycopg.connect(dsn) as conn:
            storage.migrate(conn)
        start = time.perf_counter()
        producer = Producer({"bootstrap.servers": scratch.bootstrap, "acks": "all"})
        cap = cv2.VideoCapture(str(video))
        fps = cap.get(cv2.CAP_PROP_FPS)
        i = sent = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % args.interval == 0:
                msg = build_message("v", str(video), i, i * 1000.0 / fps, frame.shape, det.detect(frame), "m")
                producer.produce(topic, key=b"v", value=msg.to_json())
                producer.flush()
                sent += 1
            i += 1
        cap.release()
        t1 = time.perf_counter()
        consumer = Consumer(
            {"bootstrap.servers": scratch.bootstrap, "group.id": f"seed-{topic}", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([topic])
        done = 0
        with psycopg.connect(dsn) as conn:
            while done < sent:
                m = consumer.poll(1.0)
                if m is None or m.error():
                    continue
                d = json.loads(m.value())
                conn.execute(
                    "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, "
                    "frame_height, source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (d["video_id"], d["frame_id"], d["frame_ts_ms"], d["total_faces"], d["model"],
                     d["frame_width"], d["frame_height"], d["source"]),
                )  # fmt: skip
                for f in d["faces"]:
                    b = f["bounding_box"]
                    conn.execute(
                        "INSERT INTO faces VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (d["video_id"], d["frame_id"], f["face_id"], b["x"], b["y"], b["width"], b["height"],
                         f["confidence"]),
                    )  # fmt: skip
                conn.commit()
                done += 1
        consumer.close()
        elapsed = time.perf_counter() - start
        phases[key].append((round(t1 - start, 2), 0.0, round(elapsed - (t1 - start), 2)))
        return elapsed, stored(schema)

    runs: dict[str, list[float]] = {"ours": [], "seed": [], "ours_io": [], "seed_io": []}
    phases: dict[str, list] = {k: [] for k in runs}
    rows: dict[str, tuple] = {}  # design -> what its last repetition stored (each checked against "seed")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            video = Path(args.video) if args.video else make_video(Path(tmp) / "e2e.mp4", args.frames)
            detector.detect(_first(video))  # warm up (net allocation)
            from crowd.video import FrameReader

            frames = [f.image for f in FrameReader(video, frame_interval=args.interval)]
            boxes = [detector.detect(f) for f in frames]
            for _ in range(args.repeat):
                for name, fn in (("seed", seed), ("ours", ours)):
                    t, r = fn(video)
                    runs[name].append(t)
                    rows[name] = r
                assert rows["ours"] == rows["seed"], "ours and the seed design stored different rows"
                for name, fn in (("seed_io", seed), ("ours_io", ours)):
                    replay = Replay(boxes)
                    t, r = fn(video, replay, name)
                    assert replay.calls == len(boxes), (name, replay.calls, len(boxes))
                    runs[name].append(t)
                    rows[name] = r
                assert rows["ours_io"] == rows["seed_io"] == rows["seed"], "the replayed designs stored other rows"
                start = time.perf_counter()  # detection alone on pre-decoded frames: what neither design can skip
                for frame in frames:
                    detector.detect(frame)
                runs.setdefault("detect_only", []).append(time.perf_counter() - start)
    finally:
        scratch.close()
    frames_stored, faces_stored = len(rows["ours"][0]), len(rows["ours"][1])
    speedup = statistics.median(s / o for s, o in zip(runs["seed"], runs["ours"], strict=True))
    speedup_io = statistics.median(s / o for s, o in zip(runs["seed_io"], runs["ours_io"], strict=True))
    bound = statistics.median(s / d for s, d in zip(runs["seed"], runs["detect_only"], strict=True))
    report = {
        "model": detector.name, "interval": args.interval,
        "video": args.video or f"generated 1280x720 mp4v x{args.frames}",
        "frames_stored": frames_stored, "faces_stored": faces_stored, "repeat": args.repeat,
        "seconds": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "speedup_ours_vs_seed": round(speedup, 2), "goal": ">= 3",
        "bound_seed_over_detect_only": round(bound, 2),
        "speedup_without_inference": round(speedup_io, 2),
        "phases_s_detect_publish_flush_store": phases,
    }  # fmt: skip
    print(f"{'design':<12}{'seconds':>9}   frames/faces stored: {frames_stored}/{faces_stored} (identical rows)")
    for k, v in report["seconds"].items():
        print(f"{k:<12}{v:>9.3f}")
    print(
        f"ours vs seed: {report['speedup_ours_vs_seed']}x (goal >= 3x); bound (seed / detection alone): "
        f"{report['bound_seed_over_detect_only']}x; without inference (replayed boxes): "
        f"{report['speedup_without_inference']}x"
    )
    print(json.dumps(report))
    return 0


def _first(video: Path):
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read()
    cap.release()
    return frame


if __name__ == "__main__":
    sys.exit(main())
