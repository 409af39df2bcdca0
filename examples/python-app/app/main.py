"""A tiny web app: GET / answers with a TOML document (written by tomli_w, installed from PyPI)."""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import tomli_w


def body() -> bytes:
    return tomli_w.dumps({"greeting": "hello from a multi-stage build"}).encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/toml")
        self.end_headers()
        self.wfile.write(body())


if __name__ == "__main__":
    if "--self-test" in sys.argv:
        print(body().decode(), end="")
    else:
        HTTPServer(("", 8080), Handler).serve_forever()
