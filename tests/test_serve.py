"""`distillad serve`: a real uvicorn server on 127.0.0.1, real HTTP requests, and a headless Chromium on its page."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import bottle_images

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

MAX_BYTES = 8_000_000     # per request: the six bottle PNGs together are about 3.2 MB


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(bottle_onnx):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "distillad.deploy.serve", "--model", str(bottle_onnx),
                                "--port", str(port), "--threads", "1", "--max-bytes", str(MAX_BYTES)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.stdout.read()}")
            time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, data, content_type in files:
        body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                   f"Content-Type: {content_type}\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    """POST with http.client: a server may answer 413 before reading a large body and close the connection, and
    the answer must still be read (as curl and browsers do)."""
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        try:
            connection.request("POST", parsed.path + (f"?{parsed.query}" if parsed.query else ""), body=body,
                               headers={"Content-Type": content_type})
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_health_metadata_and_no_torch_in_the_server(server, bottle_run):
    health = _get(f"{server}/health")
    assert health["status"] == "ok" and health["runtime"] == "onnxruntime"
    assert health["torch_imported"] is False
    metadata = _get(f"{server}/metadata")
    meta = json.loads((bottle_run / "meta.json").read_text())
    assert metadata["threshold"] == pytest.approx(meta["calibration"]["threshold"])
    assert metadata["image_size"] == 64 and metadata["limits"]["max_bytes"] == MAX_BYTES


def test_predict_good_and_defective_images_as_predict_does(server, bottle_run):
    import distillad
    from PIL import Image

    paths = bottle_images()
    body, content_type = _multipart([(p.name, p.read_bytes(), "image/png") for p in paths])
    status, answer = _post(f"{server}/predict?heatmap=true&mask=true", body, content_type)
    assert status == 200, answer
    reference = distillad.load(bottle_run).predict(paths)
    got = answer["predictions"]
    assert [g["label"] for g in got] == [r.label for r in reference]
    assert {"normal", "defective"} == {g["label"] for g in got}
    for item, expected in zip(got, reference):
        assert item["score"] == pytest.approx(expected.score, abs=1e-5)
        assert item["normalized_score"] == pytest.approx(expected.normalized_score, abs=1e-4)
        heatmap = Image.open(io.BytesIO(base64.b64decode(item["heatmap_png"])))
        mask = Image.open(io.BytesIO(base64.b64decode(item["mask_png"])))
        assert heatmap.size == mask.size == (item["width"], item["height"]) == (900, 900)


def test_bad_uploads_get_clear_4xx_and_the_server_lives_on(server):
    png = bottle_images()[0].read_bytes()
    cases = [
        ([("notes.png", b"this is not an image", "image/png")], 400, "not a readable image"),
        ([("cut.png", png[:2000], "image/png")], 400, "truncated or corrupt"),
        ([("notes.txt", b"hello", "text/plain")], 415, "not an image"),
        ([("big.png", b"\0" * (MAX_BYTES + 200_000), "image/png")], 413, "over the limit"),
        ([], 400, "no image in the request"),
    ]
    for files, status, message in cases:
        code, answer = _post(f"{server}/predict", *_multipart(files))
        assert code == status and message in answer["error"], (files[:1] and files[0][0], code, answer)
    code, answer = _post(f"{server}/predict", b"{}", "application/json")
    assert code == 415 and "multipart/form-data" in answer["error"]
    assert _get(f"{server}/health")["status"] == "ok"


def test_concurrent_requests_all_get_their_own_answer(server):
    paths = bottle_images()

    def one(path: Path) -> tuple[str, float]:
        code, answer = _post(f"{server}/predict", *_multipart([(path.name, path.read_bytes(), "image/png")]))
        assert code == 200, answer
        return answer["predictions"][0]["label"], answer["predictions"][0]["score"]

    alone = [one(p) for p in paths]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, paths * 3))
    for (label, score), (label_alone, score_alone) in zip(together, alone * 3):
        assert label == label_alone and score == pytest.approx(score_alone, abs=1e-6)


def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def test_the_page_shows_the_verdict_and_the_heatmap(server, tmp_path):
    pytest.importorskip("selenium")
    found = _browser()
    if found is None:
        pytest.skip("no chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(server + "/")
        defective = bottle_images()[2]
        driver.find_element(By.ID, "file").send_keys(str(defective))
        driver.find_element(By.ID, "submit").click()
        wait = WebDriverWait(driver, 30)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "verdict"), "Defective"))
        heatmap = driver.find_element(By.ID, "heatmap")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap))
        assert heatmap.is_displayed()
        assert driver.execute_script("return arguments[0].naturalWidth", heatmap) == 900
        assert "score" in driver.find_element(By.ID, "details").text
        assert "dskd" in driver.find_element(By.ID, "model").text
        screenshot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
