"""The reader study in a real browser: two readers answer with the keyboard, one reloads and resumes; the report
counts what they answered."""
import json
import threading

import pytest

from cli_runner import cli  # noqa: F401  (fixture)
from headless import chromium
from test_survey_study import make_images

from histosynth.survey.app import make_study_server
from histosynth.survey.study import KEY_FILE, all_answers, open_study, reader_by_name, reader_order

TIMEOUT_MS = 30_000  # a hang guard, not a speed target: a loaded CI machine may be slow


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture
def server(tmp_path, cli):
    real = make_images(tmp_path / "real", 3, "R", 0, kinds=("jpg", "png"))
    synthetic = make_images(tmp_path / "synthetic", 3, "S", 1)
    study = tmp_path / "study"
    assert cli(["survey", "create", "--real", real, "--synthetic", synthetic, "--size", 64, "--out", study])[0] == 0
    httpd = make_study_server(study, "127.0.0.1", 0, log_requests=False)  # port 0: a free one
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield study, f"http://127.0.0.1:{httpd.port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _current_item(page) -> str:
    return page.get_attribute("#tile", "src").rsplit("/", 1)[1].removesuffix(".png")


def _answer(page, key: str, confidence: int, comment: str = "") -> None:
    """Answer the item on screen with the keyboard only."""
    page.keyboard.press(key)
    page.keyboard.press(str(confidence))
    if comment:
        page.keyboard.press("c")  # into the comment field; Enter there submits
        page.keyboard.type(comment)
    page.keyboard.press("Enter")


def test_two_readers_answer_reload_resume_and_report(server, browser, cli):
    from playwright.sync_api import expect

    study, url = server
    links = {}
    for name in ("ann", "ben"):
        code, out = cli(["survey", "add-reader", study, name, "--url", url])
        assert code == 0, out
        links[name] = out.strip()
    opened = open_study(study)
    orders = {name: reader_order(opened, reader_by_name(opened, name)) for name in links}
    total = len(opened.items)
    given: dict[str, list[tuple[str, str, int, str]]] = {"ann": [], "ben": []}

    def answer_next(page, name: str, i: int) -> None:
        expect(page.locator("#position")).to_have_text(f"{i + 1} / {total}", timeout=TIMEOUT_MS)
        item = _current_item(page)
        assert item == orders[name][i]  # the reader's own order
        choice = "synthetic" if (i + (name == "ben")) % 2 == 0 else "real"  # the readers disagree on every item
        confidence = (i % 5) + 1
        comment = f"{name} note {i}" if i == 1 else ""
        _answer(page, "S" if choice == "synthetic" else "r", confidence, comment)
        given[name].append((item, choice, confidence, comment))

    ann = browser.new_context().new_page()
    ann.set_default_timeout(TIMEOUT_MS)
    ann.goto(links["ann"])
    expect(ann.locator("#position")).to_have_text(f"1 / {total}")
    # Enter without a choice does not advance; it says what is missing.
    ann.keyboard.press("Enter")
    expect(ann.locator("#message")).to_contain_text("Choose real or synthetic")
    # Full resolution from the keyboard: one image pixel per screen pixel.
    ann.keyboard.press("z")
    expect(ann.locator("#zoom-level")).to_have_text("100 %")
    for i in range(3):
        answer_next(ann, "ann", i)
    expect(ann.locator("#position")).to_have_text(f"4 / {total}")

    # Ben, in his own browser, answers everything meanwhile.
    ben = browser.new_context().new_page()
    ben.set_default_timeout(TIMEOUT_MS)
    ben.goto(links["ben"])
    for i in range(total):
        answer_next(ben, "ben", i)
    expect(ben.locator("#done")).to_be_visible()
    expect(ben.locator("#progress")).to_have_attribute("aria-valuenow", str(total))

    # Ann closes her browser and comes back: she is at her 4th item, with 3 done.
    ann.context.close()
    ann = browser.new_context().new_page()
    ann.set_default_timeout(TIMEOUT_MS)
    ann.goto(links["ann"])
    expect(ann.locator("#position")).to_have_text(f"4 / {total}")
    expect(ann.locator("#progress")).to_have_attribute("aria-valuenow", "3")
    assert _current_item(ann) == orders["ann"][3]
    answer_next(ann, "ann", 3)
    # The page moves on once the server has stored the answer; a reload before that would cancel the request.
    expect(ann.locator("#position")).to_have_text(f"5 / {total}")
    ann.reload()  # a plain reload mid-way resumes too
    answer_next(ann, "ann", 4)
    expect(ann.locator("#position")).to_have_text(f"6 / {total}")

    # What the server stored is exactly what was typed.
    stored = {(a.reader, a.item): (a.answer, a.confidence, a.comment) for a in all_answers(opened)}
    expected = {(name, item): (choice, conf, comment)
                for name, rows in given.items() for item, choice, conf, comment in rows}
    assert stored == expected

    code, out = cli(["survey", "report", study])
    assert code == 0, out
    report = json.loads((study / "report" / "report.json").read_text())
    key = {item: v["truth"] for item, v in json.loads((study / KEY_FILE).read_text())["items"].items()}
    for reader in report["readers"]:
        rows = given[reader["reader"]]
        assert reader["n_answers"] == len(rows)
        assert reader["n_correct"] == sum(key[item] == choice for item, choice, _, _ in rows)
        assert reader["confusion"]["fp"] == sum(key[i] == "real" and c == "synthetic" for i, c, _, _ in rows)
        assert reader["complete"] == (len(rows) == total)
    assert report["pooled"]["n_answers"] == len(given["ann"]) + len(given["ben"])
    assert report["agreement"]["n_items"] == len(given["ann"])


def test_a_zoom_chosen_before_the_image_arrives_is_kept(server, browser, cli):
    from playwright.sync_api import expect

    study, url = server
    code, link = cli(["survey", "add-reader", study, "cat", "--url", url])
    assert code == 0, link
    page = browser.new_context(viewport={"width": 1200, "height": 900}, bypass_csp=True).new_page()  # for wait_for_function
    page.set_default_timeout(TIMEOUT_MS)
    held = []  # the item's image request, answered only after the reader has zoomed
    page.route("**/items/*.png", lambda route: held.append(route))
    page.goto(link.strip())
    page.wait_for_function("document.getElementById('position').textContent.includes('/')")
    page.keyboard.press("z")
    expect(page.locator("#zoom-level")).to_have_text("100 %")
    page.wait_for_timeout(200)  # let the held request reach the route handler
    assert held, "the image request was not held"
    for route in held:
        route.continue_()
    page.wait_for_function("document.getElementById('tile').complete && document.getElementById('tile').naturalWidth > 0")
    expect(page.locator("#zoom-level")).to_have_text("100 %")  # not snapped back to fit
    page.keyboard.press("f")
    expect(page.locator("#zoom-level")).not_to_have_text("100 %")  # fit is the reader's choice too
