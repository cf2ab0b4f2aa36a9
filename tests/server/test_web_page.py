"""The web page in real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
search by text and by an uploaded image, the generate panel and the chat view."""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import COLORS, png_bytes, serve_in_thread
from mmrag.encoders.base import EncoderSpec
from mmrag.memory.memory import Memory
from mmrag.server import Capabilities, create_app
from mmrag.server.capabilities import ChatReply, ChatTurn, GenerationOptions, ImageGeneration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "web-test-token-0123456789"
POEM = "a poem about the quiet sea at night"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
)


class FakeModels:
    """A stand-in generator and chat model, wired exactly as RA-CM3 / FROMAGe will be."""

    def __init__(self, retriever: Any) -> None:
        self.retriever = retriever

    def generate_image(self, prompt: str, options: GenerationOptions) -> ImageGeneration:
        evidence = self.retriever.search(text=prompt, k=options.k)
        return ImageGeneration(Image.new("RGB", (96, 96), (230, 20, 20)), evidence)

    def chat(self, turns: Sequence[ChatTurn], options: GenerationOptions) -> ChatReply:
        evidence = self.retriever.search(text="a blue square", k=2)
        parts = ["Here is a blue square from the memory:", evidence[0], "and one I drew:"]
        return ChatReply([*parts, Image.new("RGB", (48, 48), (20, 200, 40))], evidence)


def screenshot_dir(tmp_path: Path) -> Path:
    """$MMRAG_SCREENSHOTS when set (to keep them), else the test's temporary folder."""
    folder = Path(os.environ.get("MMRAG_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def seed(base: str) -> None:
    docs: list[dict[str, Any]] = [
        {
            "text": f"a {name} square",
            "image_base64": base64.b64encode(png_bytes(rgb, size=64)).decode(),
            "metadata": {"color": name},
        }
        for name, rgb in COLORS.items()
    ]
    docs.append({"text": POEM, "metadata": {"kind": "poem"}})
    r = httpx.post(
        f"{base}/documents",
        json={"documents": docs},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["added"] == 7, r.text


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def site(memory_path: Path, **kwargs: Any) -> Iterator[str]:
    app = create_app(memory_path, token=TOKEN, encoder=EncoderSpec(name="hashing"), **kwargs)
    base, stop = serve_in_thread(app)
    try:
        seed(base)
        yield base
    finally:
        stop()


@pytest.fixture
def plain_site(memory_path: Path) -> Iterator[str]:
    yield from site(memory_path)


@pytest.fixture
def wired_site(memory_path: Path) -> Iterator[str]:
    def wire(memory: Memory, retriever: Any) -> Capabilities:
        fake = FakeModels(retriever)
        return Capabilities(image_generator=fake, chat=fake)

    yield from site(memory_path, capabilities=wire)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 15) -> Any:
    return WebDriverWait(driver, timeout).until(condition)


def captions(driver: WebDriver, list_id: str = "results") -> list[str]:
    """The cards' captions, read in one script call (the list may be re-rendered meanwhile)."""
    found: list[str] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent);",
        f"#{list_id} .caption",
    )
    return found


def images_loaded(driver: WebDriver, selector: str) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def console_errors(driver: WebDriver) -> list[str]:
    """SEVERE browser log entries, less the expected 501 answers of unwired endpoints."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "status of 501" not in e["message"]
    ]


def test_search_by_text_then_by_uploaded_image(
    browser: WebDriver, plain_site: str, tmp_path: Path
) -> None:
    shots = screenshot_dir(tmp_path)
    browser.get(plain_site + "/")
    wait_for(browser, lambda d: "7 documents" in d.find_element(By.ID, "memory-info").text)
    assert "encoder hashing" in browser.find_element(By.ID, "memory-info").text

    box = browser.find_element(By.ID, "q")
    box.send_keys("poem about the quiet sea", Keys.ENTER)
    wait_for(browser, lambda d: len(captions(d)) == 7)
    assert captions(browser)[0] == POEM
    status = browser.find_element(By.ID, "search-status").text
    assert "7 results" in status and "among 7 documents" in status
    wait_for(browser, lambda d: images_loaded(d, "#results img.thumb"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results img.thumb")) == 6
    browser.save_screenshot(str(shots / "web_page_text_search.png"))

    query = tmp_path / "blue.png"
    query.write_bytes(png_bytes(COLORS["blue"], size=64))
    box.clear()
    browser.find_element(By.ID, "image").send_keys(str(query))
    wait_for(browser, lambda d: d.find_element(By.ID, "image-preview").is_displayed())
    assert browser.find_element(By.ID, "image-name").text == "blue.png"
    browser.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
    wait_for(browser, lambda d: captions(d) and captions(d)[0] == "a blue square")
    assert "the image" in browser.find_element(By.ID, "search-status").text
    wait_for(browser, lambda d: images_loaded(d, "#results img.thumb"))
    browser.save_screenshot(str(shots / "web_page_image_search.png"))
    assert (shots / "web_page_image_search.png").stat().st_size > 10_000

    filters = browser.find_element(By.CSS_SELECTOR, "#search-form details summary")
    filters.click()
    browser.find_element(By.ID, "filters").send_keys("color=green")
    browser.find_element(By.ID, "image-clear").click()
    box.send_keys("a square", Keys.ENTER)
    wait_for(browser, lambda d: captions(d) == ["a green square"])
    assert console_errors(browser) == []


def test_tabs_and_unbuilt_capabilities_answer_501(browser: WebDriver, plain_site: str) -> None:
    browser.get(plain_site + "/")
    wait_for(browser, lambda d: "7 documents" in d.find_element(By.ID, "memory-info").text)
    search_tab = browser.find_element(By.ID, "tab-search")
    search_tab.send_keys(Keys.ARROW_RIGHT)  # keyboard navigation between tabs
    generate_tab = browser.find_element(By.ID, "tab-generate")
    assert generate_tab.get_attribute("aria-selected") == "true"
    assert browser.switch_to.active_element == generate_tab
    notice = browser.find_element(By.ID, "generate-capability")
    assert notice.is_displayed() and "501" in notice.text
    browser.find_element(By.ID, "prompt").send_keys("a red square")
    browser.find_element(By.CSS_SELECTOR, "#generate-form button[type=submit]").click()
    status = browser.find_element(By.ID, "generate-status")
    wait_for(browser, lambda d: "Not available yet" in status.text)
    assert "RA-CM3" in status.text and not browser.find_element(By.ID, "generation").is_displayed()

    browser.find_element(By.ID, "tab-chat").click()
    browser.find_element(By.ID, "chat-input").send_keys("show me something blue", Keys.ENTER)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .message.system"))
    notice_text = browser.find_element(By.CSS_SELECTOR, "#chat-log .message.system").text
    assert "FROMAGe / GILL" in notice_text
    assert console_errors(browser) == []


def test_generation_beside_evidence_and_interleaved_chat(
    browser: WebDriver, wired_site: str, tmp_path: Path
) -> None:
    shots = screenshot_dir(tmp_path)
    browser.get(wired_site + "/")
    wait_for(browser, lambda d: "7 documents" in d.find_element(By.ID, "memory-info").text)
    browser.find_element(By.ID, "tab-generate").click()
    assert not browser.find_element(By.ID, "generate-capability").is_displayed()
    browser.find_element(By.ID, "prompt").send_keys("a red square")
    browser.find_element(By.ID, "evidence-k").send_keys("4")
    browser.find_element(By.CSS_SELECTOR, "#generate-form button[type=submit]").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "generation").is_displayed())
    wait_for(browser, lambda d: images_loaded(d, "#generation img"))
    output = browser.find_element(By.CSS_SELECTOR, "#generation-output img")
    assert output.get_attribute("naturalWidth") == "96"
    assert len(captions(browser, "evidence")) == 4
    out_box, evidence_box = (
        browser.find_element(By.ID, i).rect for i in ("generation-output", "evidence")
    )
    assert evidence_box["x"] > out_box["x"] + out_box["width"] - 1  # side by side
    browser.save_screenshot(str(shots / "web_page_generate.png"))

    browser.find_element(By.ID, "tab-chat").click()
    attachment = tmp_path / "yellow.png"
    attachment.write_bytes(png_bytes(COLORS["yellow"], size=64))
    browser.find_element(By.ID, "chat-image").send_keys(str(attachment))
    browser.find_element(By.ID, "chat-input").send_keys("anything blue?", Keys.ENTER)
    reply = wait_for(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .message.assistant")
    )[0]
    wait_for(browser, lambda d: images_loaded(d, "#chat-log img"))
    kinds = [
        e.tag_name
        for e in reply.find_elements(By.CSS_SELECTOR, ":scope > p:not(.who), :scope > img")
    ]
    assert kinds == ["p", "img", "p", "img"]
    evidence = reply.find_element(By.TAG_NAME, "details")
    assert evidence.text == "Evidence (2 documents)"
    evidence.click()
    assert captions(browser, "chat-log")[0] == "a blue square"  # the retrieved part's document
    user = browser.find_element(By.CSS_SELECTOR, "#chat-log .message.user")
    assert user.find_element(By.TAG_NAME, "img").get_attribute("alt") == "yellow.png"
    browser.save_screenshot(str(shots / "web_page_chat.png"))
    assert console_errors(browser) == []
