"""Reference point for the benchmark: the plainest FastAPI route relaying to the upstream with aiohttp
(no auth, no checks, no routing, no logs). The gateway is measured against it in the same run, so its
numbers say what the appliance's own work costs on this machine.

Run: `UPSTREAM=http://127.0.0.1:PORT uvicorn tests.bench.bare_relay:app --loop uvloop --http httptools`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI, Request
from starlette.responses import Response

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8000")
HEADERS = {"Content-Type": "application/json"}
session: dict[str, aiohttp.ClientSession] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    session["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await session["http"].close()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    async with session["http"].post(f"{UPSTREAM}/v1/chat/completions", data=body, headers=HEADERS) as r:
        return Response(await r.read(), status_code=r.status, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b"{}", media_type="application/json")
