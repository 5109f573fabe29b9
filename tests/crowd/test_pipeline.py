from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crowd.detection import Detection, Detector, MtcnnDetector
from crowd.messages import FaceMessage
from crowd.pipeline import Progress, detect_faces, process_video
from crowd.video import NotAVideoError
from tests.crowd._helpers import CARPHONE, GRACE_HOPPER, bgr, write_numbered, write_video

ROOT = Path(__file__).resolve().parents[2]


class CountingDetector(Detector):
    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        self.calls += 1
        return [Detection(1, 1, 5, 5, 0.5)]


@pytest.fixture(scope="module")
def face_video(tmp_path_factory: pytest.TempPathFactory, lfw) -> Path:  # noqa: ANN001
    faces = lfw[0]

    def draw(i: int) -> np.ndarray:
        img = np.full((240, 320, 3), 120, np.uint8)
        for k in range(1 + i % 3):  # 1, 2, 3 faces
            img[40 : 40 + 80, 10 + k * 100 : 90 + k * 100] = bgr(cv2.resize(faces[k], (80, 80)))
        return img

    return write_video(tmp_path_factory.mktemp("fv") / "faces.mp4", 30, size=(320, 240), fps=10, draw=draw)


def test_process_video_messages_and_summary(face_video: Path, mtcnn: MtcnnDetector, tmp_path: Path) -> None:
    got: list[FaceMessage] = []
    summary = process_video(face_video, mtcnn, frame_interval=1, on_message=got.append, pictures_dir=tmp_path)
    assert [m.frame_id for m in got] == list(range(30))
    assert [m.total_faces for m in got] == [1 + i % 3 for i in range(30)]
    assert summary.frames_processed == 30 and summary.faces_total == 60 and summary.max_faces == 3
    assert summary.max_faces_frame_id == 2 and summary.max_faces_ts_ms == pytest.approx(200.0)
    assert not summary.stopped_early and summary.model == "mtcnn-onnx" == got[0].model
    assert got[0].video_id == summary.video_id and len(summary.video_id) == 32
    assert summary.pictures is not None and Path(summary.pictures["heatmap"]).is_file()


class PreparingDetector(CountingDetector):
    """Records which frames arrived prepared: ``prepare`` returns the frame's mean."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[float | None] = []

    def prepare(self, frame_bgr: np.ndarray) -> float:
        return float(frame_bgr.mean())

    def detect_prepared(self, frame_bgr: np.ndarray, prepared: object) -> list[Detection]:
        assert prepared == pytest.approx(float(frame_bgr.mean()))  # prepared from this very frame
        self.prepared.append(prepared)  # type: ignore[arg-type]
        return self.detect(frame_bgr)


def test_pipeline_hands_prepared_inputs_to_the_detector(face_video: Path) -> None:
    det = PreparingDetector()
    summary = process_video(face_video, det, frame_interval=3)
    assert summary.frames_processed == det.calls == len(det.prepared) == 10
    assert all(p is not None for p in det.prepared)


def test_default_interval_and_range(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", 90, fps=30)
    det = CountingDetector()
    ids: list[int] = []
    s = process_video(video, det, frame_range=(25, 61), on_message=lambda m: ids.append(m.frame_id))
    assert ids == [30, 40, 50, 60] and det.calls == 4 and s.frames_expected == 4


def test_progress_reported(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", 20)
    seen: list[Progress] = []
    process_video(video, CountingDetector(), frame_interval=1, progress=seen.append, progress_every_s=0.0)
    assert len(seen) == 20 and seen[-1].done == 20 and seen[-1].total == 20
    assert str(seen[4]).startswith("frame 5/20 (25%)")


def test_corrupt_video_publishes_good_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write_video(tmp_path / "g.avi", 60, fourcc="MJPG").read_bytes()
    bad = tmp_path / "bad.avi"
    bad.write_bytes(good[: len(good) // 2])
    got: list[FaceMessage] = []
    with caplog.at_level(logging.WARNING, logger="crowd"):
        s = process_video(bad, CountingDetector(), frame_interval=1, on_message=got.append)
    assert s.stopped_early and s.error_reason == "corrupt" and len(got) == s.frames_processed > 10
    assert "decoding stopped" in caplog.text


def test_not_a_video_raises(tmp_path: Path) -> None:
    p = tmp_path / "x.mp4"
    p.write_text("nope")
    with pytest.raises(NotAVideoError):
        process_video(p, CountingDetector())


def test_detect_faces_seed_compatible(mtcnn: MtcnnDetector) -> None:
    out = detect_faces(GRACE_HOPPER, mtcnn)
    assert out["frame_id"] == 0 and out["total_faces"] == 1 and set(out["faces"][0]) == {
        "face_id", "bounding_box", "confidence"
    }  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin", "CROWD_DETECTOR": "mtcnn"}
    return subprocess.run([sys.executable, "-m", "crowd", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli_detect_video(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    proc = _cli("detect", str(CARPHONE), "--frame-interval", "30", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [FaceMessage.from_json(line) for line in out.read_text().splitlines()]
    assert [m.frame_id for m in lines] == [0, 30, 60, 90] and all(m.total_faces == 1 for m in lines)
    assert '"frames_processed": 4' in proc.stderr


def test_cli_image_and_errors(tmp_path: Path) -> None:
    proc = _cli("detect", str(GRACE_HOPPER))
    assert proc.returncode == 0 and json.loads(proc.stdout)["total_faces"] == 1
    proc = _cli("detect", str(tmp_path / "missing.mp4"))
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_cli_refuses_bad_options_and_unwritable_places_before_the_work(tmp_path: Path) -> None:
    """Before: a --pictures path under a file failed with a traceback after every frame was detected, --out in a
    missing folder with a traceback, and --max-frames 0 still processed a frame."""
    (tmp_path / "afile").write_text("x")
    for option, value, says in [
        ("--pictures", str(tmp_path / "afile" / "pics"), "cannot make folder"),
        ("--max-frames", "0", "not a positive whole number"),
        ("--frame-interval", "-3", "not a positive whole number"),
        ("--target-fps", "nan", "not a positive finite number"),  # was "cannot convert float NaN to integer"
        ("--target-fps", "inf", "not a positive finite number"),  # was taken: every frame
        ("--target-fps", "0", "not a positive finite number"),
        ("--input-size", "100000", "not a multiple of 32 from 32 to 2048"),  # was killed for memory (24 GB)
        ("--input-size", "100", "not a multiple of 32"),
        ("--start", "-3", "not a frame id"),  # was exit 1, "frame_range=(-3, None) must satisfy ..."
        ("--stop", "-1", "not a frame id"),
    ]:
        proc = _cli("detect", str(CARPHONE), option, value)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stdout == ""
    proc = _cli("detect", str(CARPHONE), "--start", "5", "--stop", "3")
    assert proc.returncode == 2 and "--stop 3 is before --start 5" in proc.stderr, proc.stderr
    proc = _cli("detect", str(CARPHONE), "--start", "100000")  # was "frame_range=(100000, None) must satisfy ..."
    assert proc.returncode == 1 and "starts past the video's" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("detect", str(CARPHONE), "--out", str(tmp_path / "missing" / "r.jsonl"))
    assert proc.returncode == 1 and "\nerror: [Errno 2]" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="max_frames=0"):
        process_video(CARPHONE, MtcnnDetector(), max_frames=0)


def test_cli_fails_a_range_with_no_frame_in_it(tmp_path: Path) -> None:
    """A fragmented MP4's frame count is an estimate, so a range past it is only found empty by reading: the CLI
    exited 0 with no message and no warning. Now it fails saying so and leaves an earlier --out file as it was."""
    path = write_numbered(tmp_path / "frag.mp4", [round(i * 1000 / 30) for i in range(90)], movflags="frag_keyframe")
    out = tmp_path / "r.jsonl"
    out.write_text("earlier results\n")
    for args, asked in (
        (["--start", "200"], "--start 200"),
        (["--start", "95", "--stop", "120"], "--start 95 --stop 120"),
    ):
        proc = _cli("detect", str(path), *args, "--frame-interval", "1", "--out", str(out))
        assert (
            proc.returncode == 1
            and f"error: no frame to process in {asked} (the video's frame count: 90)" in proc.stderr
        ), proc.stderr
        assert out.read_text() == "earlier results\n"
    proc = _cli("detect", str(path), "--start", "85", "--frame-interval", "10")  # every 10th: frame 90 is past the end
    assert (
        proc.returncode == 1
        and "no frame to process in --start 85 (every 10-th frame, the video's frame count: 90)" in proc.stderr
    )
    proc = _cli("detect", str(path), "--start", "80", "--frame-interval", "10")  # inside: still works
    assert proc.returncode == 0 and [json.loads(line)["frame_id"] for line in proc.stdout.splitlines()] == [80]


def test_cli_leaves_an_earlier_out_file_as_it_was_when_it_fails(tmp_path: Path) -> None:
    """``--out`` was opened (emptied) before the source was checked: a typo in the video's name lost the results
    of an earlier run. They are replaced only by a run that ends without an error; a special file is written."""
    out = tmp_path / "r.jsonl"
    out.write_text("earlier results\n")
    proc = _cli("detect", str(tmp_path / "missing.mp4"), "--out", str(out))
    assert proc.returncode == 1 and "no such file" in proc.stderr
    assert out.read_text() == "earlier results\n" and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]
    proc = _cli("detect", str(CARPHONE), "--frame-interval", "60", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [FaceMessage.from_json(line).frame_id for line in out.read_text().splitlines()] == [0, 60]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as open() makes it, not 0600
    proc = _cli("detect", str(CARPHONE), "--frame-interval", "60", "--out", "/dev/stdout")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2, proc.stderr
    redirected = tmp_path / "redirected.jsonl"  # /dev/stdout leading to a file: written there, /dev left alone
    with redirected.open("w") as stdout:
        env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin", "CROWD_DETECTOR": "mtcnn"}
        command = [sys.executable, "-m", "crowd", "detect", str(CARPHONE), "--frame-interval", "60", "--out"]
        code = subprocess.run([*command, "/dev/stdout"], stdout=stdout, env=env, cwd=ROOT).returncode
    assert code == 0 and len(redirected.read_text().splitlines()) == 2
    assert Path("/dev/stdout").is_symlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data.jsonl").write_text("old\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real" / "data.jsonl")  # the link's target gets the results
    assert (
        _cli("detect", str(CARPHONE), "--frame-interval", "60", "--out", str(tmp_path / "link.jsonl")).returncode == 0
    )
    assert (tmp_path / "link.jsonl").is_symlink() and len(
        (tmp_path / "real" / "data.jsonl").read_text().splitlines()
    ) == 2


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_cli_stops_quietly_when_the_reader_of_its_output_goes(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin", "CROWD_DETECTOR": "mtcnn"}
    command = f"{sys.executable} -m crowd detect {CARPHONE} --frame-interval 1 -q | head -c 1"
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.stdout == "{" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("signum", [2, 15], ids=["ctrl-c", "sigterm"])
def test_cli_stopped_by_a_signal_keeps_what_it_detected(tmp_path: Path, signum: int) -> None:
    """Ctrl-C, the usual end of a camera's run, raised KeyboardInterrupt: the temporary output was deleted (every
    result lost) and a traceback printed; SIGTERM left it under a hidden name. The first signal now ends the run
    after its frame, as at the end of a range: results, summary and pictures written, exit 128 + the signal."""
    import time

    video = write_video(tmp_path / "long.mp4", 6000)
    out, pictures = tmp_path / "r.jsonl", tmp_path / "pics"
    env = {"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin", "CROWD_DETECTOR": "mtcnn"}
    command = [sys.executable, "-m", "crowd", "detect", str(video), "--frame-interval", "1", "--out", str(out)]
    proc = subprocess.Popen(
        [*command, "--pictures", str(pictures)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(p.read_text().count("\n") >= 3 for p in tmp_path.glob(".r.jsonl.*.part")):
            assert proc.poll() is None and time.monotonic() < deadline, "no results came"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    lines = [FaceMessage.from_json(line) for line in out.read_text().splitlines()]
    assert 3 <= len(lines) < 6000 and [m.frame_id for m in lines] == list(range(len(lines)))
    assert f'"frames_processed": {len(lines)}' in stderr and "Traceback" not in stderr
    assert not list(tmp_path.glob(".r.jsonl.*")), "a temporary output left behind"
    assert (pictures / "annotated.jpg").is_file() and (pictures / "faces_over_time.png").is_file()


def test_cli_keeps_the_mode_of_the_out_file_it_replaces(tmp_path: Path) -> None:
    """The replacement took the mode a new file gets: a 0600 output (faces of private footage) became 0644."""
    out = tmp_path / "private.jsonl"
    out.write_text("earlier\n")
    out.chmod(0o600)
    assert _cli("detect", str(CARPHONE), "--frame-interval", "60", "--out", str(out)).returncode == 0
    assert len(out.read_text().splitlines()) == 2 and oct(out.stat().st_mode & 0o777) == oct(0o600)


def test_cli_on_an_image_draws_its_picture_and_refuses_video_options(tmp_path: Path) -> None:
    """--pictures and the range options were ignored for an image without a word."""
    proc = _cli("detect", str(GRACE_HOPPER), "--pictures", str(tmp_path / "pics"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["total_faces"] == 1, proc.stderr
    assert cv2.imread(str(tmp_path / "pics" / "annotated.jpg")).shape == cv2.imread(str(GRACE_HOPPER)).shape
    proc = _cli("detect", str(GRACE_HOPPER), "--start", "3", "--max-frames", "5")
    assert proc.returncode == 2 and "--start, --max-frames: for a video, not an image" in proc.stderr


def test_a_second_signal_stops_the_cli_even_where_errors_are_caught() -> None:
    """The second Ctrl-C raised an Exception: where it landed in an ``except Exception`` (logging's emit writing to a
    slow stderr), it was swallowed and the run went on."""
    import signal
    import time

    from crowd.cli import _stop_on_signals, _Stopped

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(_Stopped), _stop_on_signals() as (stop, received):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.is_set() and received == [signal.SIGINT]
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        except Exception:  # noqa: BLE001 - what logging's emit does
            pass
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
