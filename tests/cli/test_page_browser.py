"""The tour's web page driven in a real headless Chromium (selenium + chromedriver).

Every interactive figure's script is a second implementation of crossent's formulas: each
slider is moved from the keyboard, the unit switched, and every number the page then shows is
compared with crossent's own result for the same inputs (the shown text to 6 significant
digits, the exact value the script keeps in ``data-value`` to 1e-12). The page must fit a
1280 px and a 360 px screen with no element wider than the viewport, print without its
controls, and keep its text readable (contrast).

Chromium and chromedriver come from Debian (``apt-get install chromium chromium-driver``,
installed here when missing and running as root); the tests skip, saying why, when that is
impossible.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import crossent as xe
from crossent.cli import html as html_mod
from crossent.cli import quiz as quiz_mod
from crossent.teaching import curves
from crossent.teaching.content import UNITS
from crossent.teaching.tour import build_tour

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
BASES = {name: u.base for name, u in UNITS.items()}

pytestmark = pytest.mark.timeout(600)  # the first run may install chromium


@pytest.fixture(scope="module")
def page_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "tour.html"
    html_mod.write(build_tour(UNITS["bits"]), path)
    return path


@pytest.fixture(scope="module")
def browser(chromium, chromedriver, tmp_path_factory) -> Iterator[webdriver.Chrome]:
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('profile')}")
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser, page_path: Path, width: int = 1280, height: int = 900) -> None:
    browser.set_window_size(width, height)
    browser.get(page_path.as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert browser.execute_script("return document.documentElement.className") == "js"


# --------------------------------------------------------------------------------------------
# Reading numbers and comparing them with the library's
# --------------------------------------------------------------------------------------------


def same_to_6_digits(shown: str, value: float) -> bool:
    """``shown`` (as the page prints it) equals ``value`` to 6 significant digits."""
    if math.isinf(value):
        return shown == "∞"
    x = float(shown)
    if value == 0:
        return x == 0
    half_unit = 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 5)
    return abs(x - value) <= half_unit * (1 + 1e-9)


READ = """
const w = document.getElementById(`widget-${arguments[0]}`);
const rows = [...w.querySelectorAll('output[data-out]')]
  .map(o => [o.dataset.out, o.textContent, o.dataset.value]);
const sliders = [...w.querySelectorAll('input[type=range]')]
  .map(i => [i.dataset.in, Number(i.value), Number(i.step), Number(i.min), Number(i.max)]);
const broken = [...w.querySelectorAll('svg *')].flatMap(e => [...e.attributes]
  .filter(a => /NaN|Infinity/.test(a.value)).map(a => `${e.tagName} ${a.name}=${a.value}`));
return [rows, sliders, broken];
"""


def read_widget(browser, widget: str):
    """The widget's outputs {key: (text, exact value)}, its sliders and any SVG attribute
    that is not a finite number."""
    rows, sliders, broken = browser.execute_script(READ, widget)
    return {key: (text, float(value)) for key, text, value in rows}, sliders, broken


def outputs(browser, widget: str) -> dict[str, tuple[str, float]]:
    return read_widget(browser, widget)[0]


def check(shown: dict[str, tuple[str, float]], expected: dict[str, float]) -> None:
    """Every expected number is on the page: its text to 6 digits, its value to 1e-12."""
    for key, value in expected.items():
        text, exact = shown[key]
        assert same_to_6_digits(text, value), (key, text, value)
        assert exact == pytest.approx(value, rel=1e-12, abs=1e-12), (key, exact, value)


def vec(shown, prefix: str, n: int = 3) -> list[float]:
    return [shown[f"{prefix}{i}"][1] for i in range(n)]


def named(prefix: str, values) -> dict[str, float]:
    return {f"{prefix}{i}": float(v) for i, v in enumerate(values)}


def expected(widget: str, shown, browser, base: float) -> dict[str, float]:
    """crossent's numbers for the inputs the page shows (read back from the page)."""
    if widget == "surprise":
        return {"s": float(xe.surprisal(shown["p"][1], base=base))}
    if widget == "entropy":
        p = vec(shown, "p")
        terms = curves.multiclass_breakdown(probs=p, target=p, base=base).terms
        return {**named("term", terms), "h": float(xe.entropy(p, base=base))}
    if widget == "cross-entropy":
        p, q = vec(shown, "p"), vec(shown, "q")
        b = curves.multiclass_breakdown(probs=q, target=p, base=base)
        return {**named("term", b.terms), "h": float(xe.entropy(p, base=base)),
                "c": float(xe.cross_entropy(p, q, base=base)),
                "kl": float(xe.kl_divergence(p, q, base=base))}
    if widget == "logits":
        k = int(browser.execute_script(
            "return document.querySelector('#widget-logits [data-in=class]:checked').value"))
        b = curves.multiclass_breakdown(logits=vec(shown, "a"), target=k, base=base)
        return {**named("q", b.probs), **named("term", b.terms), **named("grad", b.grad),
                "loss": b.loss}
    if widget == "smoothing":
        b = curves.multiclass_breakdown(probs=[0.1, 0.2, 0.7], target=2, base=base,
                                        label_smoothing=shown["alpha"][1])
        return {**named("t", b.used_target), **named("term", b.terms),
                **named("grad", b.grad), "loss": b.loss}
    if widget == "binary":
        cat = browser.find_element(By.ID, "w-binary-cat").is_selected()
        b = curves.label_breakdown(probs=[shown["q"][1]], target=[float(cat)], base=base)
        return {"pos": float(b.pos_terms[0]), "neg": float(b.neg_terms[0]),
                "grad": float(b.grad[0]), "loss": b.loss}
    if widget == "multilabel":
        t = [float(browser.find_element(By.ID, f"w-multilabel-t{j}").is_selected())
             for j in range(3)]
        b = curves.label_breakdown(probs=vec(shown, "q"), target=t, base=base,
                                   multilabel=True)
        return {**named("term", b.terms), "loss": b.loss}
    raise AssertionError(widget)


def check_widget(browser, widget: str, unit: str) -> dict[str, tuple[str, float]]:
    """crossent's numbers on the page; each slider stands where the value it feeds is (to
    half a step, inside its range); the drawing has no NaN or infinite coordinate."""
    shown, sliders, broken = read_widget(browser, widget)
    assert broken == [], broken[:3]
    assert not any("NaN" in text for text, _ in shown.values()), shown
    check(shown, expected(widget, shown, browser, BASES[unit]))
    for key, position, step, lo, hi in sliders:
        value = shown[key][1]
        assert lo <= value <= hi and abs(position - value) <= step / 2 + 1e-12, (key, value)
    return shown


def press(browser, ident: str, key: str, times: int) -> None:
    """Move a slider from the keyboard (focus it, press a key ``times`` times)."""
    element = browser.find_element(By.ID, ident)
    element.send_keys(*([key] * times))


def set_unit(browser, unit: str) -> None:
    browser.find_element(By.CSS_SELECTOR, f'input[name="unit"][value="{unit}"]').click()
    assert browser.execute_script("return document.documentElement.dataset.unit") == unit


# Each slider, the key pressed and how often (from the keyboard). Home and End reach the ends
# of each range (p = 1: no surprise; a probability pushed to 1 leaves the others 0, or at their
# slider's minimum; smoothing 0 and 1; logits -5 and 5); Page Up/Down move a tenth of the range.
MOVES = {
    "surprise": [("w-surprise-p", Keys.END, 1), ("w-surprise-p", Keys.HOME, 1),
                 ("w-surprise-p", Keys.PAGE_UP, 3), ("w-surprise-p", Keys.ARROW_RIGHT, 7)],
    "entropy": [("w-entropy-p0", Keys.PAGE_UP, 3), ("w-entropy-p2", Keys.ARROW_LEFT, 6),
                ("w-entropy-p1", Keys.END, 1), ("w-entropy-p1", Keys.PAGE_DOWN, 4),
                ("w-entropy-p0", Keys.ARROW_RIGHT, 25)],
    "cross-entropy": [("w-cross-entropy-p1", Keys.ARROW_RIGHT, 4),
                      ("w-cross-entropy-p0", Keys.HOME, 1),
                      ("w-cross-entropy-p2", Keys.PAGE_DOWN, 2),
                      ("w-cross-entropy-q0", Keys.END, 1),
                      ("w-cross-entropy-q2", Keys.END, 1),
                      ("w-cross-entropy-q1", Keys.PAGE_UP, 2),
                      ("w-cross-entropy-q2", Keys.ARROW_LEFT, 30)],
    "logits": [("w-logits-a0", Keys.HOME, 1), ("w-logits-a1", Keys.PAGE_UP, 2),
               ("w-logits-a2", Keys.END, 1), ("w-logits-a2", Keys.ARROW_LEFT, 3)],
    "smoothing": [("w-smoothing-alpha", Keys.END, 1), ("w-smoothing-alpha", Keys.HOME, 1),
                  ("w-smoothing-alpha", Keys.ARROW_RIGHT, 23)],
    "binary": [("w-binary-q", Keys.HOME, 1), ("w-binary-q", Keys.END, 1),
               ("w-binary-q", Keys.PAGE_DOWN, 5)],
    "multilabel": [("w-multilabel-q0", Keys.HOME, 1), ("w-multilabel-q1", Keys.END, 1),
                   ("w-multilabel-q2", Keys.ARROW_LEFT, 5)],
}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_every_widget_has_moves():
    assert set(MOVES) == set(html_mod.WIDGETS)


def test_each_slider_moved_from_the_keyboard_shows_crossents_numbers(browser, page_path):
    open_page(browser, page_path)
    for widget, moves in MOVES.items():
        before = check_widget(browser, widget, "bits")  # the page's first state
        for ident, key, times in moves:
            old = float(browser.find_element(By.ID, ident).get_attribute("value"))
            press(browser, ident, key, times)
            new = float(browser.find_element(By.ID, ident).get_attribute("value"))
            assert new != old, ident  # the keyboard moved the slider
            check_widget(browser, widget, "bits")
        after = outputs(browser, widget)
        assert after != before, widget
    # the distributions still sum to 1, and the sliders not touched kept their ratio
    shown = outputs(browser, "entropy")
    assert sum(vec(shown, "p")) == pytest.approx(1.0, abs=1e-12)
    q = vec(outputs(browser, "cross-entropy"), "q")
    assert sum(q) == pytest.approx(1.0, abs=1e-12)


def test_checkboxes_and_the_true_class_change_the_loss(browser, page_path):
    open_page(browser, page_path)
    before = outputs(browser, "binary")["loss"][1]
    browser.find_element(By.ID, "w-binary-cat").send_keys(Keys.SPACE)  # not a cat any more
    shown = check_widget(browser, "binary", "bits")
    assert shown["loss"][1] == pytest.approx(math.log2(1 / 0.3)) and before != shown["loss"][1]
    browser.find_element(By.ID, "w-multilabel-t1").send_keys(Keys.SPACE)
    check_widget(browser, "multilabel", "bits")
    # from the keyboard (a click could land on the sticky unit bar, wherever the page is)
    browser.find_element(By.CSS_SELECTOR, '#widget-logits [data-in="class"][value="2"]'
                         ).send_keys(Keys.SPACE)
    shown = check_widget(browser, "logits", "bits")
    assert shown["grad2"][1] < 0 < shown["grad0"][1]


@pytest.mark.parametrize("unit", ["nats", "hartleys", "bits"])
def test_the_unit_switch_changes_every_number(browser, page_path, unit):
    open_page(browser, page_path)
    press(browser, "w-surprise-p", Keys.ARROW_RIGHT, 9)
    set_unit(browser, unit)
    for widget in MOVES:
        check_widget(browser, widget, unit)
    tour = build_tour(UNITS[unit])
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".worked .value")
             if e.is_displayed()]
    want = [f"{w.value:.6f} {unit}" for s in tour.sections for w in s.worked]
    assert shown == want
    names = {e.text for e in browser.find_elements(By.CLASS_NAME, "unit-name")
             if e.is_displayed()}
    assert names == {unit}


def test_quiz_checks_answers_in_the_page(browser, page_path):
    open_page(browser, page_path)
    qs = quiz_mod.questions(html_mod.QUIZ_SEED)
    numeric = [i for i, q in enumerate(qs, 1) if q.nats is not None]
    assert len(numeric) >= 3

    def answer(i: int, text: str) -> str:
        box = browser.find_element(By.ID, f"answer-{i}")
        box.clear()
        box.send_keys(text)
        browser.find_element(By.CSS_SELECTOR, f"#question-{i} button").send_keys(Keys.ENTER)
        return browser.find_element(By.CSS_SELECTOR, f"#question-{i} .verdict").text

    q4 = qs[3]
    assert q4.nats == pytest.approx(math.log(1 / 0.7), rel=1e-12)
    assert answer(4, f"{q4.nats:.3f}") == "Correct!"
    assert answer(4, f"{q4.bits:.4f}") == "Correct!"  # bits accepted
    assert answer(4, f"{q4.nats:.3f} nats") == "Correct!"
    assert answer(4, f"{q4.nats:.3f}".replace(".", ",")) == "Correct!"  # a decimal comma
    assert answer(4, f"{q4.bits:.3f}bits") == "Correct!"
    assert answer(4, f"{q4.bits:.3f} nats").startswith("Not quite")  # bits called nats
    assert answer(4, "nats").startswith("“nats” is not a number")
    working = browser.find_element(By.CSS_SELECTOR, "#question-4 details")
    assert working.get_attribute("open") is not None and q4.working in working.text
    i = numeric[-1]
    q = qs[i - 1]
    wrong = answer(i, f"{q.nats + 0.05:.4f}")
    shown = wrong.removeprefix("Not quite: the answer is ").split()
    assert same_to_6_digits(shown[0], q.nats) and shown[1] == "nats"
    assert same_to_6_digits(shown[2].lstrip("("), q.bits)
    assert "is not a number" in answer(i, "abc")
    for box in browser.find_elements(By.CSS_SELECTOR, ".quiz input, .quiz textarea"):
        assert browser.execute_script("return arguments[0].labels.length", box) == 1


WIDTH_CHECK = """
const vw = document.documentElement.clientWidth, out = [];
for (const e of document.querySelectorAll('body *')) {
  const r = e.getBoundingClientRect();
  if (r.width > 0 && (r.right > vw + 0.5 || r.left < -0.5))
    out.push(`${e.tagName}#${e.id}.${e.className} ${r.left.toFixed(1)}..${r.right.toFixed(1)}`);
}
return [vw, document.documentElement.scrollWidth, out];
"""


@pytest.mark.parametrize("width", [1280, 360])
def test_page_fits_the_screen(browser, page_path, width, tmp_path):
    open_page(browser, page_path, width)
    for unit in ("hartleys", "bits"):  # other numbers and figures per unit
        set_unit(browser, unit)
        vw, scroll_width, too_wide = browser.execute_script(WIDTH_CHECK)
        assert too_wide == [] and scroll_width <= vw, (unit, too_wide[:10])
    # a section reached from the contents is not hidden under the sticky unit bar
    browser.find_element(By.CSS_SELECTOR, 'nav a[href="#entropy"]').send_keys(Keys.ENTER)
    bar, heading = browser.execute_script(
        "return [document.querySelector('.unitbar').getBoundingClientRect().bottom,"
        " document.querySelector('#entropy h2').getBoundingClientRect().top]")
    assert bar <= heading < bar + 200, (bar, heading)
    images = browser.execute_script(
        "return [...document.images].filter(i => i.getBoundingClientRect().width > 0)"
        ".map(i => [i.naturalWidth, i.getBoundingClientRect().width])")
    assert images and all(n == 640 and 0 < w <= width for n, w in images)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(height + 200, 20000))
    shot = tmp_path / f"page-{width}.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("CROSSENT_SCREENSHOTS"):  # keep them for a reader
        shutil.copy(shot, Path(os.environ["CROSSENT_SCREENSHOTS"]) / shot.name)


def test_sliders_and_controls_are_labelled_and_reachable(browser, page_path):
    open_page(browser, page_path)
    controls = browser.execute_script(
        "return [...document.querySelectorAll('input, textarea, button')]"
        ".map(e => [e.id || e.name, e.type, e.labels ? e.labels.length : -1, e.tabIndex,"
        " e.type !== 'radio' || !!e.closest('fieldset')?.querySelector('legend')])")
    ranges = [c for c in controls if c[1] == "range"]
    assert len(ranges) == len({m[0] for ms in MOVES.values() for m in ms})  # each one moved
    for ident, kind, labels, tab, legend in controls:
        assert tab >= 0 and legend, ident
        if kind != "button":
            assert labels >= 1, ident


CONTRAST = """
function rgb(s) { const m = s.match(/[\\d.]+/g).map(Number); return m.length > 3 ? m : [...m, 1]; }
function lum(c) { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92
                                     : Math.pow((v + 0.055) / 1.055, 2.4); };
                  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); }
function background(e) { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e)
    .backgroundColor); if (c[3] > 0) return c; } return [255, 255, 255, 1]; }
const worst = [];
for (const e of document.querySelectorAll('body *')) {
  if (!e.checkVisibility() || ![...e.childNodes].some(n => n.nodeType === 3 && n.data.trim()))
    continue;
  const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  if (ratio < 4.5) worst.push([e.tagName, e.className, ratio]);
}
return worst;
"""


def test_text_contrast_is_at_least_4_5(browser, page_path):
    open_page(browser, page_path)
    assert browser.execute_script(CONTRAST) == []


def test_print_hides_the_controls_and_keeps_the_figures(browser, page_path):
    open_page(browser, page_path)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        shown = browser.execute_script(
            "const vis = (s) => [...document.querySelectorAll(s)].filter(e => e.checkVisibility());"
            "return [vis('.widget').length, vis('.unitbar').length, vis('img').length,"
            " vis('.worked').length]")
        assert shown[0] == 0 and shown[1] == 0 and shown[2] >= 6 and shown[3] > 10
        quiz = browser.execute_script(
            "const q = document.getElementById('question-4');"
            "return [q.querySelector('.working').checkVisibility(),"
            " q.querySelector('label').checkVisibility(),"
            " [...document.querySelectorAll('.js-only')].some(e => e.checkVisibility())]")
        assert quiz == [True, False, False]  # answers printed; no label of a missing box
        pdf = browser.execute_cdp_cmd("Page.printToPDF", {})["data"]
        assert len(pdf) > 50_000
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})


SET_LOGITS = """
const [values, k] = arguments;
values.forEach((v, i) => {
  const s = document.getElementById(`w-logits-a${i}`);
  s.min = -1000; s.max = 1000; s.value = String(v);   // beyond the sliders' range
  s.dispatchEvent(new Event('input', {bubbles: true}));
});
const radio = document.querySelector(`#widget-logits [data-in=class][value="${k}"]`);
radio.checked = true;
radio.dispatchEvent(new Event('change', {bubbles: true}));
"""


def check_large_logits(browser) -> None:
    """Logits far beyond exp's range: the script's log-sum-exp must be the stable one."""
    for logits, k in (([1000, 0, -1000], 2), ([-800, 750, 700], 0)):
        browser.execute_script(SET_LOGITS, logits, k)
        shown = check_widget(browser, "logits", "bits")
        assert shown["loss"][1] == pytest.approx(  # -log2 softmax(a)_k, by hand
            (max(logits) - logits[k]) / math.log(2), rel=1e-12)


@pytest.fixture(scope="module")
def plain_page(tmp_path_factory) -> Path:
    """The page without its static figures: the same script, quicker to load."""
    path = tmp_path_factory.mktemp("plain") / "tour.html"
    html_mod.write(build_tour(UNITS["bits"]), path, with_figures=False)
    return path


# A drift of the page's script (what it replaces, by what) that the comparison must catch.
DRIFTS = {
    "none": ("", ""),
    "unit": ("bits: Math.LN2", "bits: 0.6931"),
    "unstable log-sum-exp": ("const m = Math.max(...z);", "const m = 0;"),
    "smoothing": ("alpha / t.length", "alpha / (t.length - 1)"),
    "binary negative term": ("-(1 - t) * Math.max", "-(1 - t) / 2 * Math.max"),
    "display": ("x.toFixed(6)", "x.toFixed(5)"),
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_the_check_fails_when_the_script_drifts(browser, plain_page, tmp_path, drift):
    """Each drift of the script's formulas makes the comparison fail (and no drift passes)."""
    old, new = DRIFTS[drift]
    text = plain_page.read_text(encoding="utf-8")
    if old:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    page = tmp_path / "drifted.html"
    page.write_text(text, encoding="utf-8")
    open_page(browser, page)

    def check_all() -> None:
        for widget in MOVES:
            check_widget(browser, widget, "bits")
        browser.find_element(By.ID, "w-multilabel-t1").send_keys(Keys.SPACE)  # dog present
        check_widget(browser, "multilabel", "bits")
        check_large_logits(browser)

    if drift == "none":
        check_all()
    else:
        with pytest.raises(AssertionError):
            check_all()


def test_without_scripts_the_static_page_remains(browser, page_path):
    """Script execution disabled: no controls, every static figure and number still shown."""
    browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": True})
    try:
        browser.set_window_size(1280, 900)
        browser.get(page_path.as_uri())
        state = browser.execute_script(
            "const vis = (s) => [...document.querySelectorAll(s)].filter(e => e.checkVisibility());"
            "return [document.documentElement.className, vis('.widget').length,"
            " vis('.unitbar').length, vis('img').length, vis('.worked .value').length]")
    finally:
        browser.execute_cdp_cmd("Emulation.setScriptExecutionDisabled", {"value": False})
    tour = build_tour(UNITS["bits"])
    assert state[0] == "no-js" and state[1] == 0 and state[2] == 0
    assert state[3] == len(html_mod.plots.FIGURES)  # one copy of each, in bits
    assert state[4] == sum(len(s.worked) for s in tour.sections)
