"""The admin console in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
an admin signs in, reads the overview, creates a key that an app then uses with the openai SDK, sees
that request in the usage table and chart, rotates and revokes the key, and signs out. One browser for
the module; a screenshot of each page, checked to be a rendered page rather than a blank one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.console import ADMIN_KEY, console_settings, png_colours, wait_for, working_client
from tests.harness import REPO
from tests.sims.nvml import FAKE_DIR, write_config

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHAT_MODEL = "nvidia/nemotron-mini-4b-instruct"
WAIT = 30  # seconds any page or element may take on a slow, shared machine


@pytest.fixture(scope="module")
def chromium() -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), f"{path} is missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER), options=options
    )  # the system's driver: no download
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


class Admin:
    """What the admin does in the browser, with a screenshot of each page."""

    def __init__(self, driver: webdriver.Chrome, url: str, shots: Path) -> None:
        self.driver, self.url, self.shots = driver, url, shots
        shots.mkdir()

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def find(self, css: str):
        return WebDriverWait(self.driver, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def heading(self) -> str:
        wait = WebDriverWait(self.driver, WAIT, ignored_exceptions=(StaleElementReferenceException,))
        return wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text)

    def click(self, css: str, confirm: bool = False, navigates: bool = True) -> None:
        """Click, answer the page's confirmation if it asks, and wait for the next page to load."""
        page = self.driver.find_element(By.TAG_NAME, "html")
        self.find(css).click()
        if confirm:  # the page's script asks first; without scripts the form just posts
            WebDriverWait(self.driver, WAIT).until(lambda d: d.switch_to.alert).accept()
        if navigates:
            WebDriverWait(self.driver, WAIT).until(staleness_of(page))

    def row(self, table: str, name: str) -> list[str] | None:
        for row in self.driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
            cells = [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")]
            if cells and cells[0] == name:
                return cells
        return None

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        assert len(png_colours(path.read_bytes(), limit=8)) >= 8, f"{name}: a blank page"
        return path


def test_an_admin_signs_in_creates_a_key_sees_its_use_rotates_revokes_and_signs_out(
    chromium, start_gateway, local_llm, tmp_path
):
    nvml = write_config(tmp_path / "nvml.json", {"devices": [{"memory_used_mib": 20000}]})
    gw = start_gateway(
        APPLIANCE_LLM_URL=local_llm.base_url,
        PYTHONPATH=f"{FAKE_DIR}:{REPO}",
        FAKE_NVML_CONFIG=str(nvml),
        APPLIANCE_GPU_REFRESH_INTERVAL="0.5",
        **console_settings(),
    )
    admin = Admin(chromium, gw.url, tmp_path / "screenshots")

    # `/` leads to the sign-in form; the admin key opens the overview.
    admin.open("/")
    assert admin.heading() == "Sign in to the admin console"
    admin.screenshot("sign-in")
    # By keyboard alone: the key field has the focus, Enter signs in, Tab reaches the skip link first.
    assert chromium.switch_to.active_element.get_attribute("id") == "admin_key"
    sign_in_page = chromium.find_element(By.TAG_NAME, "html")
    chromium.switch_to.active_element.send_keys(ADMIN_KEY + Keys.ENTER)
    WebDriverWait(chromium, WAIT).until(staleness_of(sign_in_page))
    assert admin.heading() == "Overview"
    chromium.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert chromium.switch_to.active_element.text == "Skip to the content"
    wait_for(lambda: _overview_ready(admin), timeout=WAIT)
    services = admin.find("table.services").text
    assert "Chat (LLM engine) Ready" in services and "Speech-to-text Not ready" in services
    assert "NVIDIA H100 80GB HBM3" in admin.find("#main").text
    admin.screenshot("overview")

    # Create a key; its secret is shown once, with a copy button the script brings in.
    admin.click("a[href='/admin/keys']")
    admin.find("#new-name").send_keys("reading-app")
    admin.find("#new-school").send_keys("Lindenschule")
    admin.find("#new-group").send_keys("4b")
    Select(admin.find("#new-tier")).select_by_value("standard")
    admin.click("#create-key button[type=submit]")
    assert admin.heading() == "Key “reading-app” created"
    secret = admin.find("#secret").get_attribute("value")
    assert secret.startswith("sk-appliance-")
    admin.click("button.copy", navigates=False)
    WebDriverWait(chromium, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, ".copied").text)
    admin.screenshot("key-created")

    # An app uses it with the openai SDK; the request shows in the usage table and the chart.
    app = wait_for(lambda: working_client(gw, secret))
    answer = app.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hello"}])
    assert answer.choices[0].message.content
    row = wait_for(lambda: _usage_row(admin, "reading-app"), timeout=WAIT)
    assert row[1] == "1" and row[7] == "1"  # one request, served on the box
    today = date.today().isoformat()
    bars = admin.driver.find_elements(By.CSS_SELECTOR, "#chart-requests rect.bar.box title")
    assert [b.get_attribute("textContent") for b in bars] == [f"{today}: 1 requests on the box"]
    admin.open("/admin/usage?by=school")
    assert admin.row("usage-table", "Lindenschule") is not None
    admin.screenshot("usage")

    # Rotate: a new secret, the old one stops working.
    admin.open("/admin/keys")
    assert admin.row("keys-table", "reading-app")[2] == "standard"
    admin.screenshot("keys")
    admin.click("button[aria-label='Rotate reading-app']", confirm=True)
    assert admin.heading() == "Key “reading-app” rotated"
    rotated = admin.find("#secret").get_attribute("value")
    assert rotated != secret
    wait_for(lambda: working_client(gw, secret) is None)
    assert working_client(gw, rotated) is not None

    # Revoke: gone from the list, the secret refused; the audit list tells it all, without secrets.
    admin.open("/admin/keys")
    admin.click("button[aria-label='Revoke reading-app']", confirm=True)
    assert admin.heading() == "Client keys"
    assert admin.row("keys-table", "reading-app") is None
    wait_for(lambda: working_client(gw, rotated) is None)
    rows = chromium.find_elements(By.CSS_SELECTOR, "#audit-table tbody tr")
    actions = [row.find_elements(By.CSS_SELECTOR, "td")[2].text for row in rows]
    assert actions == ["revoke", "rotate", "create"]
    page = chromium.page_source
    assert secret not in page and rotated not in page

    admin.open("/admin/privacy")
    assert "kept for 365 days" in admin.find("#main").text
    admin.screenshot("privacy")

    # On a phone-sized screen no page is wider than the screen (wide tables scroll in their own box).
    chromium.set_window_size(390, 844)
    for path in ("/admin/", "/admin/usage", "/admin/keys", "/admin/privacy"):
        admin.open(path)
        overflow = chromium.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)
    admin.screenshot("phone-privacy")
    chromium.set_window_size(1280, 1000)

    # Sign out: back to the sign-in form, and the console is closed again.
    admin.open("/admin/")  # a page laid out afresh at the desktop size
    admin.click(".sign-out button")
    assert admin.heading() == "Sign in to the admin console"
    admin.open("/admin/keys")
    assert admin.heading() == "Sign in to the admin console"
    assert sorted(p.name for p in admin.shots.iterdir()) == [
        *("key-created.png", "keys.png", "overview.png", "phone-privacy.png", "privacy.png"),
        *("sign-in.png", "usage.png"),
    ]


def _overview_ready(admin: Admin) -> bool:
    """The overview once the GPU monitor and the engine poll have reported (reloading until then)."""
    admin.open("/admin/")
    text = admin.find("#main").text
    return "healthy" in text and "Chat (LLM engine) Ready" in text


def _usage_row(admin: Admin, name: str) -> list[str] | None:
    admin.open("/admin/usage")
    try:
        return admin.row("usage-table", name)
    except NoSuchElementException:
        return None
