"""Fake AI provider endpoints for the vm tier, served from the test's fake internet (203.0.113.10:443).

One HTTPS server (a test CA, one certificate for every provider name) speaks just enough of each provider's API for
the agents' one-shot prompts: Anthropic messages (JSON or SSE), OpenAI responses and chat completions (SSE or JSON),
Gemini generateContent / streamGenerateContent. Every answer carries ANSWER; every request is logged as one JSON line
(path, headers, body) so a test can see which credential reached the provider.
"""

from __future__ import annotations

import json
from pathlib import Path

import pki

ADDRESS = "203.0.113.10"
ANSWER = "SANDBOX-ANSWER-4217"
REAL = {
    "ANTHROPIC_API_KEY": "sk-ant-api03-REALKEY-7f3a9c1e5b2d4f6a8c0e1a3b5d7f9a1c",
    "OPENAI_API_KEY": "sk-proj-REALKEY-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e",
    "GEMINI_API_KEY": "AIzaSyREALKEY-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c",
}
# Provider names, and the names agents look up at start (model lists, update checks): answered with 404 at once.
NAMES = ["api.anthropic.com", "api.openai.com", "chatgpt.com", "generativelanguage.googleapis.com", "models.dev",
         "opencode.ai", "statsig.anthropic.com"]

SERVER = r"""
import http.server, json, ssl, sys, time
ANSWER = sys.argv[4]
log = open(sys.argv[3], "a")

def sse(events):
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {name}\n" if name else "") + "data: " + text + "\n\n")
    return "".join(out).encode()

USAGE = {"input_tokens": 3, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

def anthropic(req, stream):
    model = req.get("model", "claude")
    msg = {"id": "msg_fake1", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": USAGE}
    if not stream:
        return "application/json", json.dumps({**msg, "content": [{"type": "text", "text": ANSWER}],
                                               "stop_reason": "end_turn"}).encode()
    return "text/event-stream", sse([
        ("message_start", {"type": "message_start", "message": msg}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": ANSWER}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"}),
    ])

def responses(req, stream):
    now = int(time.time())
    item = {"type": "message", "id": "msg_fake1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}
    usage = {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5}
    base = {"id": "resp_fake1", "object": "response", "created_at": now, "model": req.get("model", "gpt"),
            "status": "in_progress", "output": [], "usage": None}
    done = {**base, "status": "completed", "output": [item], "usage": usage}
    if not stream:
        return "application/json", json.dumps(done).encode()
    return "text/event-stream", sse([
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": base}),
        ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1, "response": base}),
        ("response.output_item.added", {"type": "response.output_item.added", "sequence_number": 2, "output_index": 0,
                                        "item": {**item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {"type": "response.content_part.added", "sequence_number": 3,
                                         "item_id": "msg_fake1", "output_index": 0, "content_index": 0,
                                         "part": {"type": "output_text", "text": "", "annotations": []}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_fake1",
                                        "output_index": 0, "content_index": 0, "delta": ANSWER}),
        ("response.output_text.done", {"type": "response.output_text.done", "sequence_number": 5, "item_id": "msg_fake1",
                                       "output_index": 0, "content_index": 0, "text": ANSWER}),
        ("response.content_part.done", {"type": "response.content_part.done", "sequence_number": 6,
                                        "item_id": "msg_fake1", "output_index": 0, "content_index": 0,
                                        "part": item["content"][0]}),
        ("response.output_item.done", {"type": "response.output_item.done", "sequence_number": 7, "output_index": 0,
                                       "item": item}),
        ("response.completed", {"type": "response.completed", "sequence_number": 8, "response": done}),
    ])

def chat(req, stream):
    now = int(time.time())
    head = {"id": "chatcmpl-fake1", "created": now, "model": req.get("model", "gpt")}
    if not stream:
        return "application/json", json.dumps({**head, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    chunk = {**head, "object": "chat.completion.chunk"}
    return "text/event-stream", sse([
        (None, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ANSWER},
                                      "finish_reason": None}]}),
        (None, {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
        (None, "[DONE]"),
    ])

def gemini(req, stream):
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": ANSWER}]}, "finishReason": "STOP",
                            "index": 0}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
            "modelVersion": "gemini-fake"}
    if stream:
        return "text/event-stream", sse([(None, body)])
    return "application/json", json.dumps(body).encode()

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                raw += self.rfile.read(size)
                self.rfile.readline()
        body = raw.decode(errors="replace")
        log.write(json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers),
                              "body": body[:4000]}) + "\n")
        log.flush()
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = {}
        host = (self.headers.get("Host") or "").split(":")[0]
        path = self.path.split("?")[0]
        stream = bool(req.get("stream")) if isinstance(req, dict) else False
        out = None
        if self.command == "POST" and path.endswith("/messages") and host == "api.anthropic.com":
            out = anthropic(req, stream)
        elif self.command == "POST" and path.endswith("/responses"):
            out = responses(req, stream)
        elif self.command == "POST" and path.endswith("/chat/completions"):
            out = chat(req, stream)
        elif self.command == "POST" and ":streamGenerateContent" in path:
            out = gemini(req, True)
        elif self.command == "POST" and ":generateContent" in path:
            out = gemini(req, False)
        elif self.command == "POST" and ":countTokens" in path:
            out = ("application/json", b'{"totalTokens": 3}')
        if out is None:
            data = b'{"error": {"type": "not_found", "message": "fake provider: no such endpoint"}}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
        else:
            ctype, data = out
            self.send_response(200)
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    do_GET = do_POST = do_PUT = do_DELETE = _any
    def log_message(self, *a): pass

srv = http.server.ThreadingHTTPServer((sys.argv[5], 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("listening", flush=True)
srv.serve_forever()
"""


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """A test CA and one leaf certificate for every name in NAMES: (ca, leaf, key)."""
    return pki.make_pki(d, NAMES, "ai-sandbox test provider CA")


def requests(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]


def proxy_env(ca: Path) -> dict[str, str]:
    """The host-side environment of `ai start`: real keys, provider names pinned to the fake host, its CA trusted."""
    return {**REAL, "AI_SANDBOX_PROXY_HOSTS": ",".join(f"{n}={ADDRESS}" for n in NAMES),
            "AI_SANDBOX_PROXY_UPSTREAM_CA": str(ca), "AI_SANDBOX_PROXY_ALLOWED_NETWORKS": "203.0.113.0/24"}
