"""The demo page (assets/demo.html, served at / by `sample.py --serve`) in a real headless Chromium, driven by
selenium, against the shipped shapes model: an uploaded scene is asked about, the boxes the page draws are the
API's for the same request, the attention map is drawn, a follow-up is a chat turn, a box dragged on the image
is an <object>, and bad input (a text file, an image over the pixel cap) is an error on the page while the
server keeps answering. One server and one browser for the whole file (a few seconds).

Needs Debian's chromium and chromium-driver (.ci/run installs them). Without them the file is skipped, except
where CI is set: there a missing browser is a failure, never a silent skip."""

import base64
import math
import os
import random
import shutil
import tempfile
import threading

import pytest
import requests
from conftest import load
from PIL import Image

import data
import sample
import shapes

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None
if not (CHROMIUM and CHROMEDRIVER and webdriver) and not os.environ.get("CI"):
    pytest.skip("needs chromium, chromium-driver (apt-get install chromium chromium-driver) and selenium",
                allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAT_RGB = (255, 40, 0)  # sample.draw_heat_map's colour, and the page's
MAX_PIXELS = 200_000  # the server's --max-image-pixels: every shipped example passes, a 600x600 PNG does not
SCENE = shapes.make_scene(random.Random(3))  # 220 x 165: a small red triangle, a big purple square, a yellow circle
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1000,700"]  # without the background-networking flags it hangs on a closed network


@pytest.fixture(scope="module")
def server():
    """`sample.py --serve --max-image-pixels 200000` on the shipped model, in a thread on a free loopback port."""
    model, tok = load(sample.DEFAULT_CKPT)
    httpd = sample.serve(model, tok, "shapes-model", "127.0.0.1", 0, max_image_pixels=MAX_PIXELS)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and CHROMEDRIVER and webdriver, (
        "CI is set, so the browser test must run: install chromium, chromium-driver and selenium (.ci/run does)")
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # both paths given: selenium never looks for (or downloads) a driver
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page itself 1000 x 700 (the screenshot)
                           {"width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    SCENE.draw().save(path)
    return str(path)


# ----------------------------------------------------------------------------- driving the page


def wait(driver, condition, seconds: float = 30):
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))


def open_page(driver, url):
    driver.get(url + "/")
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"))  # /demo/config.json came


def upload(driver, path):
    """A file given to the file input, as a user picking it; returns once the page has it."""
    driver.find_element(By.ID, "file").send_keys(path)
    wait(driver, lambda d: d.find_element(By.ID, "picture").get_attribute("data-name") == os.path.basename(path))


def ask(driver, question: str, clear: bool = True) -> str | None:
    """Types the question, asks, waits for the answer; returns it (None when the page shows an error)."""
    answers = len(driver.find_elements(By.CSS_SELECTOR, ".turn.assistant"))
    field = driver.find_element(By.ID, "question")
    if clear:
        field.clear()
    field.send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant")) > answers
         or d.find_element(By.ID, "error").is_displayed())
    wait(driver, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "idle")
    turns = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")
    return turns[-1].text if len(turns) > answers else None


def page_boxes(driver) -> list[list[float]]:
    """The boxes the page drew for the last answer, in pixels on the image (the list beside the canvas)."""
    return [[float(v) for v in li.get_attribute("data-box").split(",")]
            for li in driver.find_elements(By.CSS_SELECTOR, "#boxes li")]


def hottest_pixel(heat, width: int, height: int, scale: float) -> tuple[int, int]:
    """The canvas pixel at the centre of the map's hottest cell that lies on the image (not its padding)."""
    side, left, top = data.pad_offsets(width, height)
    cell = side / len(heat)
    centres = [(v, ((j + 0.5) * cell - left, (i + 0.5) * cell - top)) for i, row in enumerate(heat)
               for j, v in enumerate(row)]
    _, (x, y) = max((v, (x, y)) for v, (x, y) in centres if 0 <= x < width and 0 <= y < height)
    return int(x * scale), int(y * scale)


def canvas_rgb(driver, x: int, y: int) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.getElementById('canvas').getContext('2d').getImageData("
        "arguments[0], arguments[1], 1, 1).data.slice(0, 3))", x, y)


def api(url, messages, **extra) -> dict:
    """The same request straight to the API."""
    r = requests.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 64,
                                                          "temperature": 0, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def image_message(path, question):
    with open(path, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def api_boxes(answer: str, width: int, height: int) -> list[list[float]]:
    return [[round(v, 1) for v in data.box_to_pixels(b, width, height)] for b in data.parse_boxes(answer)]


# ----------------------------------------------------------------------------- the tests


def test_the_page_draws_the_apis_boxes_its_attention_map_and_follows_up(server, browser, scene_png, tmp_path):
    open_page(browser, server)
    upload(browser, scene_png)
    first = "Output the coordinate of the yellow circle"
    answer = ask(browser, first)
    messages = [image_message(scene_png, first)]
    expected = api(server, messages)["choices"][0]["message"]["content"]
    assert answer == expected and data.parse_boxes(answer), answer  # the shipped model answers with a box
    boxes = api_boxes(answer, SCENE.width, SCENE.height)
    assert page_boxes(browser) == [pytest.approx(b, abs=0.051) for b in boxes]
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-heat") == "off"
    heat = api(server, messages, attention="coords")["attention"]
    assert len(heat) == len(heat[0]) == 8 and max(map(max, heat)) == 1.0  # 112 px / 14 px patches
    hot = hottest_pixel(heat, SCENE.width, SCENE.height, int(canvas.get_attribute("width")) / SCENE.width)
    plain = canvas_rgb(browser, *hot)

    Select(browser.find_element(By.ID, "attention")).select_by_value("coords")  # asks for the map of the answer
    wait(browser, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-heat") == "drawn")
    wait(browser, lambda d: d.find_element(By.ID, "status").get_attribute("data-state") == "idle")
    assert browser.execute_script("return heat") == heat
    painted = canvas_rgb(browser, *hot)  # where the map is hottest: 70 % of the way to the map's red
    assert math.dist(painted, HEAT_RGB) < 0.5 * math.dist(plain, HEAT_RGB), (plain, painted)

    second = "Output the coordinate of the red triangle"
    follow_up = ask(browser, second)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": second}]
    assert follow_up == api(server, messages)["choices"][0]["message"]["content"]  # the chat went as history
    assert page_boxes(browser) == [pytest.approx(b, abs=0.051) for b in api_boxes(follow_up, SCENE.width,
                                                                                  SCENE.height)]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user")) == 2
    # the new answer's map; an answer without a box has none, and the page says why instead of keeping the old one
    # (the shipped model answers this follow-up with a box)
    has_box = bool(data.parse_boxes(follow_up))
    assert browser.find_element(By.ID, "canvas").get_attribute("data-heat") == ("drawn" if has_box else "off")
    note = browser.find_element(By.ID, "attention-note").text
    assert note == "" if has_box else note.startswith("no map"), note

    shot = tmp_path / "demo_page.png"  # DEMO_SCREENSHOT=1 refreshes the README's, assets/demo_page.png
    browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 900
        if os.environ.get("DEMO_SCREENSHOT"):
            image.convert("RGB").quantize(64).save(os.path.join(ROOT, "assets", "demo_page.png"), optimize=True)


def test_a_box_dragged_on_the_image_is_an_object_of_the_question(server, browser, scene_png):
    open_page(browser, server)
    upload(browser, scene_png)
    canvas = browser.find_element(By.ID, "canvas")
    width, height = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))
    scale = width / SCENE.width
    triangle = next(o for o in SCENE.objects if o.shape == "triangle")
    x1, y1, x2, y2 = (round(v * scale) for v in triangle.box)
    (ActionChains(browser).move_to_element_with_offset(canvas, x1 - width // 2, y1 - height // 2)
     .click_and_hold().move_by_offset(x2 - x1, y2 - y1).release().perform())
    assert browser.find_element(By.ID, "question").get_attribute("value") == "<object>"
    drawn = browser.execute_script("return pending")  # the page's boxes, normalized on the padded square
    assert drawn == [pytest.approx(data.pixels_to_box(triangle.box, SCENE.width, SCENE.height), abs=2 / 220)]

    Select(browser.find_element(By.ID, "attention")).select_by_value("object")
    question = "Output the coordinate of <object>"
    answer = ask(browser, question)
    reply = api(server, [image_message(scene_png, question)], objects=drawn, attention="object")
    assert answer == reply["choices"][0]["message"]["content"]  # the box went as the request's "objects"
    assert browser.find_element(By.ID, "canvas").get_attribute("data-heat") == "drawn"
    assert browser.execute_script("return heat") == reply["attention"]
    assert browser.execute_script("return objects") == drawn and browser.execute_script("return pending") == []
    # a marker without its box is caught on the page, before any request
    assert ask(browser, "Is <object> left of <object>?") is None
    assert "2 <object> marker(s) and you drew 0 new box(es)" in browser.find_element(By.ID, "error").text


def test_bad_input_is_an_error_on_the_page_and_the_server_keeps_serving(server, browser, tmp_path):
    open_page(browser, server)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    upload(browser, str(text))
    assert "cannot show it" in browser.find_element(By.ID, "picture").text
    assert ask(browser, "What is it?") is None
    error = browser.find_element(By.ID, "error").text
    assert "refused the request (400)" in error and "data URL" in error, error

    huge = tmp_path / "huge.png"
    Image.new("1", (600, 600)).save(huge)  # 360,000 pixels in a few hundred bytes
    upload(browser, str(huge))
    assert not browser.find_element(By.ID, "error").is_displayed()  # a new image clears the last error
    assert ask(browser, "Output the coordinate of the red circle") is None
    error = browser.find_element(By.ID, "error").text
    assert "refused the request (413)" in error and "over the limit of 200,000" in error, error

    browser.find_element(By.CSS_SELECTOR, "#examples button[data-example='shapes_demo.png']").click()
    wait(browser, lambda d: d.find_element(By.ID, "picture").get_attribute("data-name") == "shapes_demo.png")
    answer = ask(browser, "Output the coordinate of the red circle")  # still serving
    assert answer and data.parse_boxes(answer) and not browser.find_element(By.ID, "error").is_displayed()
    assert len(page_boxes(browser)) == len(data.parse_boxes(answer))
