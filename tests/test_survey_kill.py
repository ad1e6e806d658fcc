"""The study server is killed with SIGKILL between answers and restarted: no answer is lost or duplicated."""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cli_runner import cli  # noqa: F401  (fixture)
from test_survey_study import make_images

from histosynth.survey.study import DB_FILE, open_study, reader_by_name, reader_order

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(study, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "histosynth", "survey", "serve", str(study), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60  # a hang guard: starting Python on a loaded machine can take seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited early: {server.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise AssertionError("server did not answer within 60 s")


def _request(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _stored(study) -> list[tuple]:
    conn = sqlite3.connect(study / DB_FILE)
    try:
        return conn.execute("SELECT reader_id, item, answer, confidence FROM answers ORDER BY rowid").fetchall()
    finally:
        conn.close()


def test_sigkill_between_answers_loses_and_duplicates_nothing(tmp_path, cli):
    real = make_images(tmp_path / "real", 3, "R", 0)
    synthetic = make_images(tmp_path / "synthetic", 3, "S", 1)
    study = tmp_path / "study"
    code, out = cli(["survey", "create", "--real", real, "--synthetic", synthetic, "--n", 3, "--size", 16,
                     "--out", study])
    assert code == 0, out

    port = _free_port()
    server = _serve(study, port)
    try:
        code, link = cli(["survey", "add-reader", study, "ann", "--url", f"http://127.0.0.1:{port}"])
        assert code == 0, link
        base = link.strip()
        order = reader_order(open_study(study), reader_by_name(open_study(study), "ann"))
        given = []
        for i in range(2):
            status, state = _request(f"{base}/state")
            assert status == 200 and state["item"] == order[i]
            status, state = _request(f"{base}/answer", {"item": order[i], "answer": "real", "confidence": i + 1})
            assert status == 200 and state["done"] == i + 1
            given.append(order[i])
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=5)
    assert server.returncode == -signal.SIGKILL

    server = _serve(study, port)  # same study, same port
    try:
        status, state = _request(f"{base}/state")
        assert status == 200 and state["done"] == 2 and state["position"] == 3 and state["item"] == order[2]
        # A browser re-sending an answer it sent before the kill is refused, not stored twice.
        status, resync = _request(f"{base}/answer", {"item": given[1], "answer": "synthetic", "confidence": 5})
        assert status == 409 and resync["state"]["item"] == order[2]
        status, state = _request(f"{base}/answer", {"item": order[2], "answer": "synthetic", "confidence": 3})
        assert status == 200 and state["done"] == 3
        # ... and so is a repeat of the answer just given after the restart.
        status, _ = _request(f"{base}/answer", {"item": order[2], "answer": "real", "confidence": 1})
        assert status == 409
        status, state = _request(f"{base}/state")
        assert state["done"] == 3 and state["position"] == 4 and state["item"] == order[3]
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=5)

    rows = _stored(study)
    assert [row[1] for row in rows] == order[:3]  # exactly three, one per item, none lost, none twice
    assert [(row[2], row[3]) for row in rows] == [("real", 1), ("real", 2), ("synthetic", 3)]  # the first answers kept
    assert len({row[0] for row in rows}) == 1
    # A fresh server (and the report's path) sees the same: Ann resumes at her 4th item.
    from histosynth.survey.app import create_app
    state = create_app(study).test_client().get(f"/r/{base.rsplit('/r/', 1)[1]}/state").get_json()
    assert state["done"] == 3 and state["position"] == 4 and state["item"] == order[3]
