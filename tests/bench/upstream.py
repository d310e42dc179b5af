"""A minimal, fast OpenAI-shaped upstream for benchmarks (raw asyncio on uvloop).

It answers every POST with a fixed chat completion, or, when the body asks for `"stream": true`,
with `--chunks` SSE events `--interval` seconds apart. Being far faster than the gateway, it makes
the gateway's own cost visible. Run: `python -m tests.bench.upstream PORT [--chunks N] [--interval S]`.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Well done!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
)
MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [
            {
                "id": "nvidia/NVIDIA-Nemotron-3-Nano-4B-FP8",
                "object": "model",
                "created": 0,
                "owned_by": "bench",
            }
        ],
    }
)
CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": "word "}, "logprobs": None, "finish_reason": None}],
        }
    )
    + b"\n\n"
)


def response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class Upstream(asyncio.Protocol):
    chunks = 20
    interval = 0.05

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end > 0 else len(head)])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            body, self.buffer = self.buffer[head_end + 4 : end], self.buffer[end:]
            if head.startswith(b"get /v1/models"):
                self.transport.write(response(MODELS))
            elif b'"stream":true' in body:
                asyncio.get_running_loop().create_task(self.stream())
            else:
                self.transport.write(response(COMPLETION))

    async def stream(self) -> None:
        write = self.transport.write
        write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(self.chunks):
            await asyncio.sleep(self.interval)
            if self.transport.is_closing():
                return
            write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
        done = b"data: [DONE]\n\n"
        write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=Upstream.chunks)
    parser.add_argument("--interval", type=float, default=Upstream.interval)
    args = parser.parse_args()
    Upstream.chunks, Upstream.interval = args.chunks, args.interval
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
