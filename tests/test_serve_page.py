"""The demo page (pixelllm_jax/serve.py + static/index.html) end to end in headless Chromium.

`python -m pixelllm_jax.serve` runs on a tiny model dir (tests/infer_fixtures.py); Selenium
drives Debian's `chromium` through its `chromium-driver` (browser builds cannot be
downloaded: the system browser is named explicitly, so Selenium never fetches one). The test
uploads an image, draws a box, runs location-conditioned captioning, and checks what the page
shows: the words listed, one marker per word at the word's point, the JSON, the drawn box in
the JSON in image pixels, hovering a word highlighting its marker; then a clicked point, and a
typed expression whose referred box is drawn.

scripts/test.sh installs chromium and chromium-driver where they are missing. Without them
the test fails, unless PIXELLLM_SKIP_BROWSER_TESTS=1 says to skip it.
"""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

import infer_fixtures
from xla_env import xla_flags

try:
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # named by _need_browser
  webdriver = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SKIP_ENV = "PIXELLLM_SKIP_BROWSER_TESTS"
WAIT_SECONDS = 180  # the first answer compiles the model


def _need_browser():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
  if webdriver is None:
    missing.append("selenium (pip install -e '.[test]')")
  if not missing:
    return
  message = (f"the page test needs {missing}: install Debian's chromium and chromium-driver "
             f"(bash scripts/test.sh does), or set {SKIP_ENV}=1 to skip it")
  if os.environ.get(SKIP_ENV) == "1":
    pytest.skip(message)
  pytest.fail(message)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  _need_browser()
  root = tmp_path_factory.mktemp("serve")
  paths = infer_fixtures.make_run(str(root))
  image = os.path.join(paths["images"], sorted(os.listdir(paths["images"]))[0])
  env = {**os.environ, "XLA_FLAGS": xla_flags(1),
         "PYTHONUNBUFFERED": "1"}
  server = subprocess.Popen([sys.executable, "-m", "pixelllm_jax.serve",
                             f"--checkpoint={paths['model_dir']}", "--port=0"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    lines = []
    for line in server.stdout:
      lines.append(line)
      found = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
      if found:
        break
    else:
      pytest.fail("the server did not start:\n" + "".join(lines)[-3000:])
    yield {"url": found.group(1), "image": image, "root": root}
  finally:
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(served):
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--window-size=1200,900"):
    options.add_argument(argument)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    yield driver
  finally:
    driver.quit()


def _run_and_wait(driver):
  """Clicks Run; returns the JSON the page shows (fails with the page's error, if any)."""
  driver.execute_script("document.getElementById('json').textContent = '';")
  driver.find_element(By.ID, "run").click()
  WebDriverWait(driver, WAIT_SECONDS).until(
      lambda d: d.find_element(By.ID, "json").text or d.find_element(By.ID, "error").text)
  assert driver.find_element(By.ID, "error").text == ""
  return json.loads(driver.find_element(By.ID, "json").text)


def _shown_words(driver, answer):
  """The words list and the markers agree with the JSON's words, one marker per word."""
  items = driver.find_elements(By.CSS_SELECTOR, "#words li")
  markers = driver.find_elements(By.CSS_SELECTOR, "circle.marker")
  labels = driver.find_elements(By.CSS_SELECTOR, "text.label")
  assert len(answer["words"]) > 0
  assert [i.text for i in items] == [w["text"] for w in answer["words"]]
  assert [t.text for t in labels] == [w["text"] for w in answer["words"]]
  assert len(markers) == len(answer["words"])
  for marker, word in zip(markers, answer["words"]):
    assert abs(float(marker.get_attribute("cx")) - word["point"][0]) < 1e-6
    assert abs(float(marker.get_attribute("cy")) - word["point"][1]) < 1e-6
  # The page shows the text as HTML renders it: runs of spaces collapsed.
  assert driver.find_element(By.ID, "answer-text").text == " ".join(answer["text"].split())
  return items, markers


def test_page_answers_a_drawn_box_a_point_and_an_expression(served, browser):
  driver = browser
  driver.get(served["url"])
  wait = WebDriverWait(driver, 30)
  wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#task option"))
  options = {o.get_attribute("value"): o.is_enabled()
             for o in driver.find_elements(By.CSS_SELECTOR, "#task option")}
  assert options["loca"] and options["refer"] and options["caption"]
  assert options["densecap"]  # the demo's tiny model has the box decoder

  driver.find_element(By.ID, "image-file").send_keys(served["image"])
  wait.until(lambda d: d.execute_script("return document.getElementById('photo').naturalWidth"))
  width, height = Image.open(served["image"]).size
  overlay = driver.find_element(By.ID, "overlay")
  shown = overlay.size
  assert shown["width"] >= 512  # the 64 px world image is shown enlarged
  per_px = width / shown["width"]  # image pixels per screen pixel

  # A box: drag from 100 screen px up-left of the centre, 120 right and 80 down.
  Select(driver.find_element(By.ID, "task")).select_by_value("loca")
  (ActionChains(driver).move_to_element_with_offset(overlay, -100, -100).click_and_hold()
   .move_by_offset(60, 40).move_by_offset(60, 40).release().perform())
  assert driver.find_elements(By.ID, "prompt-box")
  answer = _run_and_wait(driver)
  assert answer["task"] == "loca" and answer["image_size"] == [width, height]
  expected = [width / 2 - 100 * per_px, height / 2 - 100 * per_px,
              width / 2 + 20 * per_px, height / 2 - 20 * per_px]
  # Where the pointer lands is rounded to whole screen pixels by the browser.
  assert all(abs(a - e) <= 2 * per_px for a, e in zip(answer["prompt"]["box"], expected)), (
      answer["prompt"], expected)
  items, markers = _shown_words(driver, answer)
  ActionChains(driver).move_to_element(items[0]).perform()
  assert "active" in markers[0].get_attribute("class")
  assert "active" not in markers[-1].get_attribute("class") or len(markers) == 1
  ActionChains(driver).move_to_element(driver.find_element(By.ID, "answer-text")).perform()
  assert "active" not in markers[0].get_attribute("class")
  driver.save_screenshot(str(served["root"] / "page_box.png"))

  # A point: a click without travel.
  ActionChains(driver).move_to_element_with_offset(overlay, 40, -60).click().perform()
  assert driver.find_elements(By.ID, "prompt-point") and not driver.find_elements(
      By.ID, "prompt-box")
  answer = _run_and_wait(driver)
  assert list(answer["prompt"]) == ["point"]
  point = answer["prompt"]["point"]
  assert abs(point[0] - (width / 2 + 40 * per_px)) <= 2 * per_px
  assert abs(point[1] - (height / 2 - 60 * per_px)) <= 2 * per_px
  _shown_words(driver, answer)

  # An expression: the referred box is drawn where the JSON says.
  Select(driver.find_element(By.ID, "task")).select_by_value("refer")
  driver.find_element(By.ID, "expression").send_keys("the green circle")
  answer = _run_and_wait(driver)
  assert answer["task"] == "refer" and answer["prompt"] == {"expression": "the green circle"}
  _shown_words(driver, answer)
  drawn = driver.find_element(By.ID, "answer-box")
  x0, y0, x1, y1 = answer["box"]
  for name, value in (("x", x0), ("y", y0), ("width", x1 - x0), ("height", y1 - y0)):
    assert abs(float(drawn.get_attribute(name)) - value) < 1e-6

  # Dense captioning: every region of the answer is drawn where the JSON says.
  Select(driver.find_element(By.ID, "task")).select_by_value("densecap")
  answer = _run_and_wait(driver)
  assert answer["task"] == "densecap" and answer["prompt"] == {}
  drawn = driver.find_elements(By.CSS_SELECTOR, "rect.region-box")
  assert len(drawn) == len(answer["regions"]) > 0
  for rect, region in zip(drawn, answer["regions"]):
    x0, y0, x1, y1 = region["box"]
    assert abs(float(rect.get_attribute("x")) - x0) < 1e-6
    assert abs(float(rect.get_attribute("width")) - (x1 - x0)) < 1e-6
  _shown_words(driver, answer)
