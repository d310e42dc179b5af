"""The admin API under `/admin/api/`: usage, keys and health, for the admin key only (the gateway
layer checks it; client keys get 403). Database reads run on a worker thread."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from appliance.errors import bad_request
from appliance.governance.store import UsageFilter
from appliance.state import AppState


def install(app: FastAPI, state: AppState) -> None:
    store = state.governance.store

    @app.get("/admin/api/usage", include_in_schema=False)
    async def usage(request: Request) -> JSONResponse:
        query = request.query_params
        unknown = set(query) - {"since", "until", "key", "school", "group", "by"}
        if unknown:
            raise bad_request(f"Unknown query parameter '{sorted(unknown)[0]}'.", param=sorted(unknown)[0])
        try:
            where = UsageFilter(**{name: query.get(name) for name in query})
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return JSONResponse(await asyncio.to_thread(store.usage_report, where))

    @app.get("/admin/api/keys", include_in_schema=False)
    async def keys() -> JSONResponse:
        records = await asyncio.to_thread(store.keys, True)
        return JSONResponse([record.public() for record in records])

    @app.get("/admin/api/health", include_in_schema=False)
    async def health() -> JSONResponse:
        return JSONResponse({name: check() for name, check in state.readiness.items()})
