"""Command line: ``python -m crowd detect VIDEO|IMAGE|CAMERA_INDEX|URL [options]`` and ``python -m crowd schema``.

Results go to ``--out`` as JSON lines (one message per processed frame) or to stdout; progress and the
summary go to stderr. Exit code 0 = all fine, 1 = bad input, missing model, a file that cannot be written or a
reader of stdout gone, 2 = bad options, 3 = decoding stopped early (the frames before it were written),
128 + the signal = stopped by Ctrl-C (SIGINT) or SIGTERM (what was detected until then is written, ``--out`` too).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import IO

from crowd.detection import BACKENDS, MAX_INPUT_SIZE, build_detector
from crowd.messages import FaceMessage, write_schema
from crowd.models import ModelError
from crowd.pipeline import detect_image, process_video
from crowd.video import VideoError, is_image_path

EXIT_STOPPED_EARLY = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def _frame_id(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a frame id (0 or more)")
    return value


def _input_size(text: str) -> int:
    value = int(text)
    if not 32 <= value <= MAX_INPUT_SIZE or value % 32:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 32 from 32 to {MAX_INPUT_SIZE}")
    return value


def _positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number of frames per second")
    return value


def _writable_folder(text: str) -> Path:
    """The ``--pictures`` folder, made if missing, checked before any frame is processed."""
    folder = Path(text)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make folder {text!r}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"folder {text!r} is not writable")
    return folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crowd", description="crowd face detection")
    sub = parser.add_subparsers(dest="command", required=True)
    det = sub.add_parser("detect", help="detect faces in a video, image, camera index or stream URL")
    det.add_argument("source", help="video or image path, camera index (0) or URL (rtsp://...)")
    det.add_argument(
        "--frame-interval", type=_positive_int, default=None, help="process every N-th frame (default fps/3)"
    )
    det.add_argument(
        "--target-fps", type=_positive_rate, default=None, help="alternative: about this many frames per second"
    )
    det.add_argument("--start", type=_frame_id, default=0, help="first frame id of the range")
    det.add_argument("--stop", type=_frame_id, default=None, help="frame id after the range (exclusive)")
    det.add_argument("--max-frames", type=_positive_int, default=None, help="stop after this many processed frames")
    det.add_argument(
        "--out",
        default=None,
        help="write JSON lines here (default: stdout); replaced when the run ends, kept as it was after an error",
    )
    det.add_argument("--backend", choices=BACKENDS, default=None, help="detector (default: CROWD_DETECTOR or auto)")
    det.add_argument(
        "--input-size",
        type=_input_size,
        default=416,
        help=f"YOLO network input size (multiple of 32, <= {MAX_INPUT_SIZE})",
    )
    det.add_argument("--tiles", action="store_true", help="also detect on overlapping tiles (small faces)")
    det.add_argument(
        "--pictures", type=_writable_folder, default=None, help="folder for annotated frame, heatmap and timeline"
    )
    det.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    sch = sub.add_parser("schema", help="write include/schema/faces-message.schema.json")
    sch.add_argument("--path", default=None)
    return parser


@contextmanager
def _output_file(path: str) -> Iterator[IO[str]]:
    """``path`` opened for writing, replaced only when the run ends without an error: results go to a temporary
    file beside the file ``path`` leads to (an error, a missing video, left an earlier file emptied). Written
    directly, as ``open`` would, when that cannot be done: a path that is or leads to something other than a
    regular file (``/dev/stdout``, a pipe, a terminal), or a folder where no other file can be made."""
    target = Path(os.path.realpath(path))  # a symlink's target is replaced, not the link
    # /dev/stdout leads through /proc/self/fd to whatever the shell redirected to: that is written, never replaced
    devices = any(p.startswith(("/dev/", "/proc/")) for p in (os.path.abspath(path), str(target)))
    try:
        direct = devices or not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        direct = devices
    handle = None
    if not direct:
        try:
            handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
                "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
            )
        except PermissionError:  # a file that may be written in a folder that may not: as open() would
            handle = None
    if handle is None:
        with open(path, "w", encoding="utf-8") as out:
            yield out
        return
    try:
        with handle:
            _take_mode_of(handle.name, target)
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _take_mode_of(path: str, target: Path) -> None:
    """Give ``path`` the mode (and owner, where allowed) ``target`` has, as writing into it would keep them; for a
    new file, what ``open()`` would make (not the temporary file's 0600). A 0600 output became world-readable."""
    try:
        now = os.stat(target)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
        return
    os.chmod(path, stat.S_IMODE(now.st_mode))
    with suppress(PermissionError):  # only root may give a file away; a file of one's own keeps its owner anyway
        os.chown(path, now.st_uid, now.st_gid)


class _Stopped(BaseException):  # as KeyboardInterrupt: an ``except Exception`` (logging's emit) cannot swallow it
    """A second Ctrl-C or SIGTERM: stop at once (the first lets the frame being processed finish)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[tuple[threading.Event, list[int]]]:
    """The first SIGINT or SIGTERM sets the event (the run ends after its frame, as at the end of a range: the
    results, summary and pictures are written, ``--out`` replaced) and is listed; a second raises :class:`_Stopped`.
    Ctrl-C, the usual end of a camera's run, deleted every result, and SIGTERM left the output under a hidden
    temporary name."""
    event, received = threading.Event(), []

    def stop(signum: int, _frame: object) -> None:
        if event.is_set():
            raise _Stopped(signum)
        received.append(signum)
        event.set()
        # os.write: a print interrupting a print to stderr would raise "reentrant call"
        os.write(2, f"{signal.Signals(signum).name}: stopping after this frame (again to stop at once)\n".encode())

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield event, received
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event, received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "detect" and args.stop is not None and args.stop < args.start:
        parser.error(f"--stop {args.stop} is before --start {args.start}")
    if args.command == "schema":
        print(write_schema(args.path) if args.path else write_schema())
        return 0
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "detect" and is_image_path(args.source):
        video_only = {"--start": args.start, "--stop": args.stop, "--max-frames": args.max_frames,
                      "--frame-interval": args.frame_interval, "--target-fps": args.target_fps}  # fmt: skip
        if given := [option for option, value in video_only.items() if value]:
            parser.error(f"{', '.join(given)}: for a video, not an image ({args.source})")
    written = 0
    try:
        detector = build_detector(args.backend, input_size=args.input_size, tiles=args.tiles)
        with ExitStack() as stack:
            out: IO[str] = stack.enter_context(_output_file(args.out)) if args.out else sys.stdout

            def emit(message: FaceMessage) -> None:
                nonlocal written
                out.write(message.to_json().decode() + "\n")
                written += 1

            if is_image_path(args.source):
                emit(detect_image(args.source, detector, pictures_dir=args.pictures))
                return 0
            try:
                with _stop_on_signals() as (stop, signals):
                    summary = process_video(
                        args.source,
                        detector,
                        frame_interval=args.frame_interval,
                        target_fps=args.target_fps,
                        frame_range=(args.start, args.stop) if args.start or args.stop is not None else None,
                        on_message=emit,
                        pictures_dir=args.pictures,
                        max_frames=args.max_frames,
                        stop=stop,
                    )
            except _Stopped as stopped:  # a stop, not an error: what was written stays (--out is replaced)
                print(json.dumps({"stopped_by": str(stopped), "messages_written": written}), file=sys.stderr)
                return 128 + stopped.signum
            ranged = args.start or args.stop is not None
            if ranged and not summary.frames_processed and summary.error is None and not signals:
                # e.g. past the end of a video whose length was estimated (no MP4 index): nothing read, and exit 0
                asked = f"--start {args.start}" + (f" --stop {args.stop}" if args.stop is not None else "")
                count = "unknown" if summary.frame_count is None else summary.frame_count
                every = f"every {summary.frame_interval}-th frame, " if summary.frame_interval > 1 else ""
                raise ValueError(f"no frame to process in {asked} ({every}the video's frame count: {count})")
        print(json.dumps(summary.to_dict()), file=sys.stderr)
        if signals:
            return 128 + signals[0]
        return EXIT_STOPPED_EARLY if summary.stopped_early else 0
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 1
    except (VideoError, ModelError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
