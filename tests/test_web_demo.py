"""The web demo (`app.py`): the page builds on a model folder offline, its handlers, and the page in a browser.

The browser test serves a tiny random model on a loopback port and drives headless Chromium (Debian's
`chromium` and `chromium-driver`, which .ci/run installs) through Selenium. Two variables serve a person who
wants to look at the page: CLIPSEG_WEB_DEMO_MODEL serves another model folder (e.g. `demo_output`), and
CLIPSEG_WEB_DEMO_SCREENSHOT copies the screenshot there (e.g. `docs/web_demo.png`).
"""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

gr = pytest.importorskip("gradio", reason="the web demo needs the [demo] extra: pip install -e '.[demo]'")

import app  # noqa: E402
from modeling_clipseg_custom import ClipSegCustomModel, make_processor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "shapes_1.jpg"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_clip_dir):
    """A tiny model of the demo's kind (a small CLIP with the demo's word tokenizer), saved with its processor
    and code like a trained one."""
    torch.manual_seed(5)
    model = ClipSegCustomModel.from_clip(
        str(tiny_clip_dir), image_size=64, reduce_dim=16, extract_layers=[0, 1], decoder_intermediate_size=32
    )
    with torch.no_grad():  # some pixels above the default threshold, some below
        model.decoder.transposed_convolution[-1].bias.fill_(-0.5)
    folder = tmp_path_factory.mktemp("web_demo_model")
    model.save_pretrained(folder)
    make_processor(AutoTokenizer.from_pretrained(tiny_clip_dir), image_size=64).save_pretrained(folder)
    return folder


def test_examples_are_small_pictures_that_exist():
    for name, prompts in app.EXAMPLES:
        path = REPO_ROOT / "examples" / name
        assert path.stat().st_size < 50_000 and Image.open(path).format == "JPEG"
        assert app.prompt_list(prompts)


def test_the_app_builds_offline_on_a_model_folder(model_folder):
    assert isinstance(app.build_app(model_folder), gr.Blocks)


def test_a_folder_that_is_not_a_model_ends_with_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        app.main(["--model", str(tmp_path)])
    assert stop.value.code == 2
    assert f"error: --model {tmp_path} could not be loaded" in capsys.readouterr().err


def test_segment_then_redraw_at_another_threshold_without_the_model(model_folder):
    segmenter = app.Segmenter(*app.load_model(str(model_folder)))
    image = Image.open(EXAMPLE)
    gallery, classes, state = segmenter.segment(
        image, "red circle, blue square", image.crop((0, 0, 64, 64)), 0.3
    )
    named = [caption.split(":")[0] for _, caption in gallery]
    assert named == [
        "red circle",
        "red circle",
        "blue square",
        "blue square",
        "example image",
        "example image",
    ]
    assert state["probs"].shape == (3, image.height, image.width)
    assert classes.width >= image.width and classes.height > image.height  # the legend below

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran again")

    segmenter.model.predict = no_model
    redrawn, _ = segmenter.redraw(state, 1.0)
    assert redrawn[1][1].endswith("above 1.00")
    assert np.array_equal(np.asarray(redrawn[1][0]), np.asarray(image.convert("RGB"))), "nothing above 1"
    with pytest.raises(gr.Error, match="Type a prompt"):
        segmenter.segment(image, " , ", None, 0.3)
    with pytest.raises(gr.Error, match="Pick an example picture"):
        segmenter.segment(None, "red circle", None, 0.3)


def test_a_space_loads_the_model_through_its_own_code(model_folder, monkeypatch):
    """A Space has no copy of the project's model code: the model folder's code is used (trust_remote_code)."""
    monkeypatch.setitem(sys.modules, "modeling_clipseg_custom", None)  # `import` now raises ImportError
    model, processor = app.load_model(str(model_folder))
    assert type(model).__module__.startswith("transformers_modules")
    maps = model.predict(Image.open(EXAMPLE), ["red circle"], processor=processor)
    assert tuple(maps[0].shape) == (1, *Image.open(EXAMPLE).size[::-1])


# ----------------------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py stopped:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url} within {timeout} s")


@pytest.fixture
def served(model_folder, tmp_path):
    """app.py serving the model on a free loopback port; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "OMP_NUM_THREADS": "1",
    }
    model = os.environ.get("CLIPSEG_WEB_DEMO_MODEL", str(model_folder))
    server = subprocess.Popen(
        [sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, ended whole
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.communicate(timeout=30)


@pytest.fixture
def browser():
    pytest.importorskip(
        "selenium", reason="the browser test needs the [test] extra: pip install -e '.[test]'"
    )
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def fetch_picture(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=np.float32)


def shown_images(driver, selector: str) -> list:
    """The <img> elements under `selector` that have finished loading."""
    from selenium.webdriver.common.by import By

    images = driver.find_elements(By.CSS_SELECTOR, f"{selector} img")
    loaded = [
        driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
        for i in images
    ]
    return images if images and all(loaded) else []


def captions(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#results img")]


def test_a_person_segments_an_example_picture_and_moves_the_threshold(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(served)
    example = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[data-testid='dataset-cell-0-0']"))
    example.click()  # the first example picture, with its prompts
    wait.until(lambda d: shown_images(d, "#picture"))
    prompts = browser.find_element(By.CSS_SELECTOR, "#prompts textarea")
    assert prompts.get_attribute("value") == app.EXAMPLES[0][1]
    prompts.clear()
    prompts.send_keys("red circle, black square")
    browser.find_element(By.CSS_SELECTOR, "#segment").click()

    results = wait.until(lambda d: len(shown_images(d, "#results")) == 4 and shown_images(d, "#results"))
    assert captions(browser)[0].startswith("red circle: max ") and captions(browser)[2].startswith(
        "black square"
    )
    picture = np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=np.float32)
    heat, overlaid = (fetch_picture(img.get_attribute("src")) for img in results[:2])
    assert heat.shape == overlaid.shape == picture.shape, "the results are at the picture's size"
    assert np.abs(heat - picture).mean() > 20, "the heat map is not the picture"
    class_map = wait.until(lambda d: shown_images(d, "#class-map"))[0].get_attribute("src")
    assert fetch_picture(class_map).shape[0] > picture.shape[0], "the multi-class map has its legend below"
    assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body"), "the page showed an error"

    screenshot = tmp_path / "web_demo.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("CLIPSEG_WEB_DEMO_SCREENSHOT"):  # a small copy for people to look at
        Image.open(screenshot).convert("RGB").quantize(256).save(
            os.environ["CLIPSEG_WEB_DEMO_SCREENSHOT"], optimize=True
        )

    # The threshold redraws the overlays and the multi-class map from the kept probabilities.
    number = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("0.95", Keys.ENTER)
    wait.until(lambda d: captions(d)[1:2] == [captions(d)[0].replace("heat map", "above 0.95")])
    redrawn = wait.until(lambda d: (shown := shown_images(d, "#class-map")) and shown[0].get_attribute("src"))
    assert redrawn != class_map
