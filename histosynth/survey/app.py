"""The readers' web app: one item at a time, answered real/synthetic with a confidence, resumable.

Routes (``TOKEN`` is a reader's secret; a wrong one gets 403 everywhere):
  GET  /r/TOKEN               the reader page
  GET  /r/TOKEN/state         {"reader", "total", "done", "position", "item"}: this reader's progress only
  GET  /r/TOKEN/items/ID.png  one study image, by id
  POST /r/TOKEN/answer        {"item", "answer", "confidence", "comment"} -> the next state
  GET  /static/NAME           the page's own CSS and JS (nothing is loaded from elsewhere)
Nothing else of the study folder is reachable: no route serves the key, the database or another reader's answers.
The current item is the first of the reader's own order they have not answered, so a reload resumes there.
"""
from __future__ import annotations

import re
import socket
import sqlite3
from pathlib import Path

from flask import Flask, Response, abort, g, jsonify, render_template, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, get_sockaddr, make_server, select_address_family

from histosynth.survey.study import (
    TRUTHS,
    Reader,
    answered_items,
    connect,
    open_study,
    reader_by_token,
    reader_order,
    record_answer,
)

MAX_COMMENT = 2000
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# The page needs nothing but its own files; forbidding the rest also guarantees no CDN sneaks in.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def create_app(study_root: Path | str) -> Flask:
    """The Flask app serving one study folder to its readers."""
    study = open_study(Path(study_root))
    known_items = frozenset(study.items)
    app = Flask(__name__)  # static/ and templates/ beside this module; the study folder is never a static root
    app.config["JSON_SORT_KEYS"] = False

    def db() -> sqlite3.Connection:
        if "db" not in g:
            g.db = connect(study)
        return g.db

    @app.teardown_appcontext
    def _close_db(_error: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    def reader_or_403(token: str) -> Reader:
        reader = reader_by_token(db(), token)
        if reader is None:
            abort(403)
        return reader

    def state(reader: Reader) -> dict:
        order = reader_order(study, reader)
        done = answered_items(db(), reader)
        position = next((i for i, item in enumerate(order) if item not in done), None)
        return {"reader": reader.name, "total": len(order), "done": len(done & known_items),
                "position": None if position is None else position + 1,
                "item": None if position is None else order[position]}

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Referrer-Policy"] = "no-referrer"  # the token is in the URL
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.endpoint != "static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(403)
    def _forbidden(_error: Exception) -> tuple[str, int, dict]:
        message = "This reader link is not valid. Ask the study organiser for yours.\n"
        return message, 403, {"Content-Type": "text/plain"}

    @app.errorhandler(404)
    def _not_found(_error: Exception) -> tuple[str, int, dict]:
        return "Not found.\n", 404, {"Content-Type": "text/plain"}

    @app.get("/")
    def index() -> tuple[str, int, dict]:
        return "Reader study: open the personal link you were given.\n", 200, {"Content-Type": "text/plain"}

    @app.get("/favicon.ico")
    def favicon() -> tuple[str, int]:
        return "", 204  # browsers ask for one; say "none" instead of logging a 404 per page

    @app.get("/r/<token>")
    def reader_page(token: str) -> str:
        reader = reader_or_403(token)
        return render_template("reader.html", reader=reader.name, token=token)

    @app.get("/r/<token>/state")
    def reader_state(token: str) -> Response:
        return jsonify(state(reader_or_403(token)))

    @app.get("/r/<token>/items/<item>.png")
    def item_image(token: str, item: str) -> Response:
        reader_or_403(token)
        if item not in known_items:  # ids only: a path never reaches the file system
            abort(404)
        return Response(study.image_path(item).read_bytes(), mimetype="image/png")

    @app.post("/r/<token>/answer")
    def answer(token: str) -> tuple[Response, int]:
        reader = reader_or_403(token)
        body = request.get_json(silent=True)  # JSON only: a cross-site form cannot post it without CORS
        if not isinstance(body, dict):
            return jsonify(error="expected a JSON object"), 400
        choice, confidence, comment = body.get("answer"), body.get("confidence"), body.get("comment", "")
        if choice not in TRUTHS:
            return jsonify(error="answer must be 'real' or 'synthetic'"), 400
        if isinstance(confidence, bool) or not isinstance(confidence, int) or not 1 <= confidence <= 5:
            return jsonify(error="confidence must be an integer from 1 to 5"), 400
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            return jsonify(error=f"comment must be text of at most {MAX_COMMENT} characters"), 400
        current = state(reader)
        if body.get("item") != current["item"]:
            # Another tab moved on, or a double submit: answers go to the item on screen only; resync.
            return jsonify(error="this item is not the current one", state=current), 409
        if not record_answer(db(), reader, current["item"], choice, confidence, comment.strip()):
            # A simultaneous answer to the same item (two tabs, a double click) was stored first: this one is not.
            return jsonify(error="this item was answered already", state=state(reader)), 409
        return jsonify(state(reader)), 200

    return app


_TOKEN_IN_PATH = re.compile(r"(/r/)[^/\s?#\"]+")


def redact_tokens(text: str) -> str:
    """``text`` with every reader token in a ``/r/TOKEN`` path replaced by ``…``."""
    return _TOKEN_IN_PATH.sub(r"\1…", text)


class _RedactingHandler(WSGIRequestHandler):
    """werkzeug's request log without readers' tokens: a log file must not hold the links that are their logins."""

    def log(self, type: str, message: str, *args: object) -> None:
        super().log(type, redact_tokens(message), *(redact_tokens(a) if isinstance(a, str) else a for a in args))


class _QuietHandler(WSGIRequestHandler):
    """A request handler that logs nothing (tests)."""

    def log_request(self, *args: object, **kwargs: object) -> None:
        pass


def make_study_server(study_root: Path | str, host: str = "127.0.0.1", port: int = 8000,
                      log_requests: bool = True) -> BaseWSGIServer:
    """A threaded WSGI server for the study (port 0 picks a free one, see ``.port``); call ``serve_forever`` to run it.

    Raises OSError if the address cannot be bound (werkzeug would print and exit instead).
    """
    app = create_app(study_root)
    family = select_address_family(host, port)
    # Bind here so a busy port is an exception the CLI turns into one line; werkzeug serves on a copy of the socket.
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(get_sockaddr(host, port, family))
        listener.listen(128)
        handler = _RedactingHandler if log_requests else _QuietHandler
        return make_server(host, port, app, threaded=True, request_handler=handler, fd=listener.fileno())
