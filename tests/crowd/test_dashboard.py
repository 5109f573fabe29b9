"""The dashboard and the API docs page in headless Chromium, served by the Airflow app (plugins loaded) over real
HTTP.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``) and the pip package ``playwright`` (only its
driver: ``playwright install`` is never run). Skips with the reason when either is missing. The screenshot
goes to ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.crowd.api_fixtures import *  # noqa: F403 - the fixtures
from tests.crowd.api_fixtures import PASSWORDS, SEED_COUNTS, SEED_VIDEO, seed_results

pytestmark = [pytest.mark.services, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = os.environ.get("CROWD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _browser_or_skip() -> Any:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"headless Chromium not installed at {CHROMIUM} (Debian: apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright pip package is not installed (pip install playwright; no browser download needed)")
    return sync_playwright


def test_dashboard_shows_the_seeded_video(live_server: str, faces_topic: str, results_dir: Path) -> None:
    from crowd import storage
    from crowd.alerts import AlertRule

    sync_playwright = _browser_or_skip()
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
    # 3 faces or more: alerts at frames 20, 40-50 and 90 of the seed's counts
    seed_results(faces_topic, results_dir, alert_rule=AlertRule(threshold=3, min_duration_s=0))
    ARTIFACTS.mkdir(exist_ok=True)
    with _dashboard(sync_playwright, live_server) as (page, errors):
        page.wait_for_selector("#chart svg polyline", timeout=15_000)
        page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        row = page.locator(f'#videos tbody tr[data-id="{SEED_VIDEO}"]')
        assert row.count() == 1
        assert row.locator("td").nth(2).inner_text() == str(len(SEED_COUNTS))
        points = page.locator("#chart svg polyline").get_attribute("points").split()
        assert len(points) == len(SEED_COUNTS)
        assert page.locator("#chart svg circle").count() == 1, "peak marker missing"
        assert page.locator("#chart svg rect.alert").count() == 3, "alert bands missing"
        alerts = page.locator("#alerts li").all_inner_texts()
        assert len(alerts) == 3 and alerts[1].startswith("4.0 s – 5.0 s (frames 40–50): peak 5 faces at frame 40")
        names = sorted(page.locator("#pictures img").evaluate_all("(imgs) => imgs.map((i) => i.alt)"))
        assert names == ["annotated.jpg", "heatmap.png"]
        assert "Kafka ok" in page.locator("#health").inner_text()
        assert errors == [] and page.locator("#error").inner_text() == ""
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_draws_a_long_video_whole(live_server: str) -> None:
    """It drew the first 20,000 frames of a video (later alerts clamped to the chart's edge, a later peak
    dropped); the chart now comes from the timeline of all its frames."""
    from crowd import storage

    sync_playwright = _browser_or_skip()
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
        conn.execute(
            "INSERT INTO frames (video_id, frame_id, frame_ts_ms, total_faces, model, frame_width, frame_height, source)"
            " SELECT 'longdashvideo', f, f * 33.3, CASE WHEN f = 80001 THEN 9 ELSE 1 END, 'm', 10, 10, 's'"
            " FROM generate_series(0, 89997, 3) f"
        )
        conn.commit()
    with _dashboard(sync_playwright, live_server) as (page, errors):
        page.locator('#videos tbody tr[data-id="longdashvideo"]').click()
        page.wait_for_function(  # this video's chart (more points than any other's), not the first video's
            "() => (document.querySelector('#chart svg polyline')?.getAttribute('points') || '').split(' ').length > 100",
            timeout=15_000,
        )
        points = page.locator("#chart svg polyline").get_attribute("points").split()
        labels = page.locator("#chart svg text").all_text_contents()
        peak = page.locator("#chart svg circle title").text_content()
        assert errors == []
    assert 700 <= len(points) <= 800  # 30,000 frames, summarised
    assert f"{89_997 * 33.3 / 1000:.1f} s" in labels  # drawn to its last frame (frame 60,000 was the end)
    assert peak == f"peak: 9 faces at {80_001 * 33.3 / 1000:.1f} s"  # past frame 60,000: it was dropped


def test_dashboard_pages_neither_repeat_nor_skip_videos_while_new_ones_arrive(live_server: str) -> None:
    """Pages of 200 by offset, newest first: a video registered while one read the first page pushed its last video
    onto the second page too. "older" now continues after the last video shown, "newer" goes back."""
    from crowd import storage

    sync_playwright = _browser_or_skip()

    def register(ids: list[str], at: str) -> None:
        with storage.connect("crowd_postgres") as conn:
            storage.migrate(conn)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO videos (id, path, status, created_at) VALUES (%s, %s, 'done', %s::timestamptz)",
                    [(v, f"/videos/{v}.mp4", at) for v in ids],
                )
            conn.commit()

    register([f"pagevideo{i:03d}" for i in range(250)], "2026-01-01 00:00:00+00")

    def shown(page: Any) -> list[str]:
        return page.locator("#videos tbody tr").evaluate_all("(rows) => rows.map((r) => r.dataset.id)")

    with _dashboard(sync_playwright, live_server) as (page, errors):
        page.wait_for_selector('#videos tbody tr[data-id="pagevideo000"]', timeout=15_000)
        first = shown(page)
        assert page.locator("#videos-shown").inner_text() == "videos 1–200 of 250, newest first"
        register(["pagevideonew"], "2026-06-01 00:00:00+00")  # a newer video, while the first page is read
        page.locator("#older").click()
        page.wait_for_selector('#videos tbody tr[data-id="pagevideo249"]', timeout=15_000)
        second = shown(page)
        assert page.locator("#videos-shown").inner_text() == "videos 201–250 of 251, newest first"
        assert page.locator("#older").is_disabled()
        page.locator("#newer").click()
        page.wait_for_selector('#videos tbody tr[data-id="pagevideonew"]', timeout=15_000)
        assert page.locator("#newer").is_disabled()
        assert errors == []
    assert first + second == [f"pagevideo{i:03d}" for i in range(250)]


def test_the_dashboard_runs_its_own_code_only(client: Any) -> None:
    """Its Content-Security-Policy names the page's inline script and style by hash and nothing else: a value that
    slipped past the escaping (an <img onerror>, an injected <script>) would not run, and the page is framed by the
    Airflow UI's origin only. Every crowd answer says nosniff and same-origin referrers."""
    import base64
    import hashlib
    import re

    from tests.crowd.api_fixtures import auth

    headers = auth(client, "viewer")
    page = client.get("/crowd/dashboard", headers=headers)
    assert page.status_code == 200
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'", policy
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'self'", policy
    assert "unsafe" not in page.headers["content-security-policy"]
    for response in (page, client.get("/crowd/videos", headers=headers), client.get("/crowd/videos"),
                     client.get("/crowd/videos/x/images/a.png", headers=headers)):  # fmt: skip
        assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert response.headers["referrer-policy"] == "same-origin", response.url


def test_dashboard_without_login_shows_no_data(live_server: str) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{live_server}/crowd/dashboard", timeout=10)
    assert excinfo.value.code == 401


def test_api_docs_page_shows_every_route_without_the_internet(live_server: str) -> None:
    """Swagger UI came from cdn.jsdelivr.net: without the internet the page stayed blank. It now loads its files from
    the crowd app (the fastapi-offline package) and renders the crowd OpenAPI 3.1 document."""
    from crowd import storage

    sync_playwright = _browser_or_skip()
    with storage.connect("crowd_postgres") as conn:
        storage.migrate(conn)
    with _dashboard(sync_playwright, live_server, path="/crowd/docs") as (page, errors):
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.reload(wait_until="domcontentloaded")
        page.wait_for_selector(".opblock-summary-path", timeout=20_000)
        paths = page.locator(".opblock-summary-path").evaluate_all("(els) => els.map((e) => e.dataset.path)")
        title = page.locator(".info .title").inner_text()
        videos = page.locator('.opblock-get:has(.opblock-summary-path[data-path="/videos"])')  # tried out from the page
        videos.locator(".opblock-summary").click()
        videos.locator("button.try-out__btn").click()
        videos.locator("button.execute").click()
        videos.locator(".live-responses-table tbody .response-col_status").first.wait_for(timeout=20_000)
        status = videos.locator(".live-responses-table tbody .response-col_status").first.inner_text()
        assert errors == []
    assert status.strip() == "200"
    assert {"/send", "/receive", "/videos", "/videos/{video_id}/frames", "/dashboard"} <= set(paths), paths
    assert title.startswith("crowd API")
    assert requested and all(url.startswith(live_server) for url in requested), requested


@contextlib.contextmanager
def _dashboard(
    sync_playwright: Any, live_server: str, user: str = "viewer", path: str = "/crowd/dashboard"
) -> Iterator[tuple[Any, list[str]]]:
    """The dashboard (or the crowd page at ``path``) open in headless Chromium for ``user``, and the page's script
    errors as they come."""
    # A token as the Airflow UI holds it: the "_token" cookie, sent by the iframe and its fetch() calls.
    jwt = _login(live_server, user)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 900})
            context.add_cookies([{"name": "_token", "value": jwt, "url": live_server}])
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # what the page's Content-Security-Policy blocks (a script or style it no longer names, say)
            page.add_init_script(
                "window.__blocked = []; document.addEventListener('securitypolicyviolation', "
                "(e) => window.__blocked.push(`${e.violatedDirective} ${e.blockedURI}`));"
            )
            page.goto(f"{live_server}{path}", wait_until="domcontentloaded")
            yield page, errors
            assert page.evaluate("window.__blocked") == [], "the page's own policy blocked part of it"
        finally:
            browser.close()


def _login(base_url: str, username: str) -> str:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{base_url}/auth/token",
        data=json.dumps({"username": username, "password": PASSWORDS[username]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["access_token"]
