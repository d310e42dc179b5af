"""Live dictation: OpenAI's Realtime transcription sessions (`GET /v1/realtime?intent=transcription`)
over WebSocket, served by the in-process speech-to-text engine.

One module per concern: `protocol` (settings and events, both dialects), `audio_input` (appended audio
to Whisper's input), `turns` (server VAD and commits), `stable` (early text that is never taken back),
`admission` (fair passes, refusing sessions past capacity), `session` (one WebSocket's life).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from starlette.websockets import WebSocket

from appliance.errors import APIError
from appliance.middleware import deny_websocket
from appliance.realtime.admission import Admission
from appliance.realtime.session import Session
from appliance.realtime.turns import SpeechProbability
from appliance.state import AppState

PATH = "/v1/realtime"


def install(app: FastAPI, state: AppState) -> None:
    engine = state.services["stt"]
    settings = state.settings
    admission = Admission(settings.realtime_max_sessions, settings.realtime_max_lag, settings.stt_workers)
    probability = SpeechProbability()
    state.readiness["realtime"] = admission.status

    async def load_vad() -> None:
        await asyncio.get_running_loop().run_in_executor(None, probability.load)

    state.startup.append(load_vad)

    async def realtime(ws: WebSocket) -> None:
        intent = ws.query_params.get("intent")
        if intent != "transcription":
            error = APIError(
                400,
                "This appliance serves Realtime transcription sessions only: "
                "connect to /v1/realtime?intent=transcription.",
                param="intent",
                code="unsupported_intent",
            )
            await deny_websocket(ws.scope, ws.receive, ws.send, error)
            return
        await Session(ws, state, engine, admission, probability).run()

    app.router.add_websocket_route(PATH, realtime)
