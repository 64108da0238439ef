"""A stand-in `llama-server` for the bench's peer adapter: a real HTTP server on loopback speaking
llama-server's `/health` and streaming `/completion` (server-sent events, one token an event, a last
event with `stop: true` and the server's `timings`), started with llama-server's own flags.

Run as `python tests/support/fake_llama_server.py -m FILE --host 127.0.0.1 --port N ...`. It answers
`/health` with 503 ("loading") for its first few polls, as the real one does while it maps the model,
and appends every `/completion` body it receives, as a JSON line, to the file `FAKE_LLAMA_LOG` names.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("-m", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-t", type=int, required=True)
    p.add_argument("-tb", type=int)
    p.add_argument("-c", type=int)
    p.add_argument("-np", type=int)
    p.add_argument("--no-webui", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(args.m):
        raise SystemExit(f"error: failed to load model '{args.m}'")
    polls = {"health": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404)
                return
            polls["health"] += 1
            ready = polls["health"] > 2
            body = json.dumps(
                {"status": "ok"} if ready else {"error": {"code": 503, "message": "Loading model"}}
            )
            self.send_response(200 if ready else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def do_POST(self) -> None:
            if self.path != "/completion":
                self.send_error(404)
                return
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with open(os.environ["FAKE_LLAMA_LOG"], "a") as log:
                log.write(json.dumps(request) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            n = int(request["n_predict"])
            time.sleep(0.01)  # "reading the prompt"
            for i in range(n):
                event = {"index": 0, "content": "" if i % 2 else "tok", "tokens": [1000 + i], "stop": False}
                event.update(id_slot=0, tokens_predicted=i + 1, tokens_evaluated=len(request["prompt"]))
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.002)
            timings = {"prompt_n": len(request["prompt"]), "prompt_ms": 10.0, "prompt_per_second": 25600.0}
            final = {"content": "", "tokens": [], "stop": True, "tokens_predicted": n, "timings": timings}
            self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
            self.wfile.flush()
            self.close_connection = True

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
