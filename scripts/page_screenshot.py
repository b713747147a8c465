"""The README's screenshot of the demo page: pixelllm-serve on a checkpoint, driven by headless
Chromium (Debian's chromium + chromium-driver, as tests/test_serve_page.py).

  python scripts/page_screenshot.py --checkpoint=runs/demo \\
      --image=data/world/images/world_test_003201.png --task=trace --hover=2 \\
      --out=docs/images/serve_demo.png

Uploads the image, draws --box (image pixels) for a region task or types --expression, runs,
hovers word number --hover, and saves the page as a 256-colour PNG (small enough to commit).
"""
import argparse
import os
import re
import subprocess
import sys

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--image", required=True)
  p.add_argument("--task", default="trace")
  p.add_argument("--box", default=None, help="x0,y0,x1,y1 in image pixels (region tasks)")
  p.add_argument("--expression", default=None)
  p.add_argument("--hover", type=int, default=0, help="the word to highlight")
  p.add_argument("--out", default=os.path.join(REPO, "docs", "images", "serve_demo.png"))
  p.add_argument("--window", default="1100,640")
  args = p.parse_args()
  server = subprocess.Popen([sys.executable, "-m", "pixelllm_jax.serve",
                             f"--checkpoint={args.checkpoint}", "--port=0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  options = webdriver.ChromeOptions()
  options.binary_location = "/usr/bin/chromium"
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   f"--window-size={args.window}", "--hide-scrollbars"):
    options.add_argument(argument)
  driver = None
  try:
    for line in server.stdout:
      found = re.search(r"on (http://\S+/)", line)
      if found:
        break
    else:
      raise SystemExit("the server did not start")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.get(found.group(1))
    wait = WebDriverWait(driver, 300)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#task option"))
    driver.find_element(By.ID, "image-file").send_keys(os.path.abspath(args.image))
    wait.until(lambda d: d.execute_script("return document.getElementById('photo').naturalWidth"))
    Select(driver.find_element(By.ID, "task")).select_by_value(args.task)
    if args.box:
      x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
      overlay = driver.find_element(By.ID, "overlay")
      width = driver.execute_script("return document.getElementById('photo').naturalWidth")
      scale = overlay.size["width"] / width
      centre = overlay.size["width"] / 2, overlay.size["height"] / 2
      (ActionChains(driver)
       .move_to_element_with_offset(overlay, int(x0 * scale - centre[0]),
                                    int(y0 * scale - centre[1]))
       .click_and_hold().move_by_offset(int((x1 - x0) * scale), int((y1 - y0) * scale))
       .release().perform())
    if args.expression:
      driver.find_element(By.ID, "expression").send_keys(args.expression)
    driver.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#words li")
               or d.find_element(By.ID, "error").text)
    items = driver.find_elements(By.CSS_SELECTOR, "#words li")
    if items:
      ActionChains(driver).move_to_element(items[min(args.hover, len(items) - 1)]).perform()
    driver.save_screenshot(args.out)
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    server.wait(timeout=30)
  Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
  print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
  main()
