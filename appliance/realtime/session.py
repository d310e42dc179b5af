"""One live transcription session: a WebSocket, its settings, its turns, and the passes over them.

Three tasks share the session: the receiver (client events, audio into turns), the engine loop (at most
one pass at a time: the final pass of each committed turn in order, else a partial pass over the open
turn whenever enough new audio has come in) and the sender (events out, in order). The first to end
ends the others. Every wait is bounded: the client's silence by the idle timeout, a send by the send
timeout, the events a client leaves unread by the send buffer. Audio and text live only in memory and
only as long as the turn does; nothing about what was said is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from appliance.audio.decode import SAMPLE_RATE, DecodedAudio
from appliance.config import Settings
from appliance.errors import APIError
from appliance.log import event
from appliance.middleware import RequestContext, request_context
from appliance.realtime.admission import Admission
from appliance.realtime.audio_input import Resampler, decode_append
from appliance.realtime.metrics import AUDIO_SECONDS, CLOSED, DIVERGED
from appliance.realtime.protocol import Dialect, Events, ProtocolError, SessionConfig, apply_update
from appliance.realtime.stable import StablePrefix
from appliance.realtime.turns import SpeechProbability, SpeechStarted, SpeechStopped, Turns
from appliance.state import AppState
from appliance.stt import SpeechEngine, TranscribeOptions

MIN_COMMIT_SECONDS = 0.1  # as OpenAI: a commit needs at least 100 ms of audio
UPDATE_EVENTS: dict[str, Dialect] = {"session.update": "ga", "transcription_session.update": "beta"}
# Close codes: policy violation (bad input, idle, not reading), try again later (busy), internal error.
CLOSE_POLICY, CLOSE_BUSY, CLOSE_ERROR = 1008, 1013, 1011
# The key's governance refusing a turn: the turns committed before it still get their transcripts.
GOVERNED = frozenset({"model_not_allowed", "rate_limit_exceeded", "insufficient_quota"})
FINISH_TURNS_SECONDS = 30.0


def refused(exc: APIError, code: str = "invalid_request", fatal: bool = False) -> ProtocolError:
    """The gateway's HTTP error as an `error` event: the same message, type, code and param."""
    return ProtocolError(exc.message, code=exc.code or code, param=exc.param, type=exc.type, fatal=fatal)


def not_reading() -> ProtocolError:
    message = "The client is not reading the session's events; closing the session."
    return ProtocolError(message, code="client_not_reading", fatal=True)


@dataclass
class Turn:
    item_id: str
    stable: StablePrefix = field(default_factory=StablePrefix)
    passed: int = 0  # samples of the turn the last partial pass heard


@dataclass
class Final:
    turn: Turn
    audio: np.ndarray


class ClientGone(Exception):
    """The client closed, stopped reading, or fell silent: end the session."""


class Session:
    def __init__(
        self,
        ws: WebSocket,
        state: AppState,
        engine: SpeechEngine,
        admission: Admission,
        probability: SpeechProbability,
    ) -> None:
        self.ws = ws
        self.state = state
        self.settings: Settings = state.settings
        self.engine = engine
        self.admission = admission
        self.ctx = request_context(ws.scope)
        beta = any(k == b"openai-beta" and b"realtime=v1" in v for k, v in ws.scope["headers"])
        self.events = Events("beta" if beta else "ga")
        self.session_id = "sess_" + self.ctx.request_id
        self.config = SessionConfig()
        self.resampler = Resampler(self.config.format)
        self.turns = Turns(self.config.turn_detection, probability, self.settings.realtime_max_turn_seconds)
        self.open: Turn | None = None
        self.last_item: str | None = None
        self.finals: deque[Final] = deque()
        self.wake = asyncio.Event()
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.unsent = 0
        self.audio_seconds = 0.0
        self.turn_count = 0
        self.close_reason = "client_closed"

    # The session's life.

    async def run(self) -> None:
        started = time.perf_counter()
        await self.ws.accept(subprotocol=_subprotocol(self.ws.scope.get("subprotocols", ())))
        try:
            try:
                self.state.governance.admit_session(self.ctx)
            except APIError as exc:  # the key is over its audio rate or quota
                await self._last_word(refused(exc), CLOSE_POLICY)
                return
            try:
                self.engine.require_ready()
                self.admission.admit()
            except ProtocolError as exc:
                await self._last_word(exc, CLOSE_BUSY)
                return
            except APIError as exc:
                await self._last_word(refused(exc, "unavailable"), CLOSE_ERROR)
                return
            try:
                await self._serve()
            finally:
                self.admission.leave(id(self))
        finally:
            self._log(started)

    async def _serve(self) -> None:
        self.emit(self.events.session(self.config, self.session_id, created=True))
        tasks = [
            asyncio.create_task(self._sender(), name="realtime-send"),
            asyncio.create_task(self._receiver(), name="realtime-receive"),
            asyncio.create_task(self._engine_loop(), name="realtime-engine"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        except ProtocolError as exc:
            self.close_reason = exc.code
            await self._fail(exc, tasks)
        except ClientGone as exc:
            self.close_reason = str(exc)
        except Exception:
            event("realtime_error", level=logging.ERROR, request_id=self.ctx.request_id, exc_info=True)
            self.close_reason = "internal_error"
            await self._fail(
                ProtocolError(
                    "Internal error in live transcription.", code="internal_error", type="server_error"
                ),
                tasks,
                CLOSE_ERROR,
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Drop what the session held at once: audio, text, unsent events.
            self.finals.clear()
            self.turns.clear()
            self.open = None
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:
                    self.outbox.get_nowait()

    async def _fail(
        self, exc: ProtocolError, tasks: list[asyncio.Task[Any]], code: int = CLOSE_POLICY
    ) -> None:
        """Tell the client why, as the last event, and close."""
        sender, receiver, engine = tasks
        if exc.code in GOVERNED:
            receiver.cancel()
            await self._finish_turns(engine)
        for task in (receiver, engine):
            task.cancel()
        if sender.done() or exc.code == "client_not_reading":
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await self._last_word(exc, code)
            return
        self.emit(self.events.error(exc), force=True)
        self.outbox.put_nowait(None)  # the sender ends after the error event
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender, self.settings.realtime_send_timeout)
        await self._close(code, exc.message)

    async def _finish_turns(self, engine: asyncio.Task[Any]) -> None:
        """The turns committed before a refusal were admitted and charged: their transcripts go out
        before the error (within a bound; a polled wait, as it happens once, at the session's end)."""
        self.open = None  # no more partial passes
        deadline = time.monotonic() + FINISH_TURNS_SECONDS
        while self.finals and not engine.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _last_word(self, exc: ProtocolError, code: int) -> None:
        """The error event and the close, sent directly, each with a bound: the client may not read."""
        self.close_reason = exc.code
        with contextlib.suppress(Exception):
            event = orjson.dumps(self.events.error(exc)).decode()
            await asyncio.wait_for(self.ws.send_text(event), self.settings.realtime_send_timeout)
        await self._close(code, exc.message)

    async def _close(self, code: int, reason: str) -> None:
        # Waited on past the server's own close timeout (websockets: 10 s), after which it fails the
        # connection of a client that never takes the close frame; cut shorter, it would not.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason.encode()[:120].decode(errors="ignore")), 12)

    def _log(self, started: float) -> None:
        CLOSED.labels(self.close_reason).inc()
        AUDIO_SECONDS.inc(self.audio_seconds)
        event(
            "realtime_session",
            request_id=self.ctx.request_id,
            key_id=self.ctx.key_id,
            path=self.ws.scope["path"],
            seconds=round(time.perf_counter() - started, 3),
            audio_seconds=round(self.audio_seconds, 3),
            turns=self.turn_count,
            close=self.close_reason,
        )

    # Sending.

    def emit(self, body: dict[str, Any], force: bool = False) -> None:
        data = orjson.dumps(body)
        if not force and self.unsent + len(data) > self.settings.realtime_send_buffer_bytes:
            raise not_reading()
        self.unsent += len(data)
        self.outbox.put_nowait(data)

    async def _sender(self) -> None:
        while (data := await self.outbox.get()) is not None:
            try:
                # Events go out as text frames, as OpenAI sends them (orjson gives UTF-8 bytes).
                await asyncio.wait_for(self.ws.send_text(data.decode()), self.settings.realtime_send_timeout)
            except TimeoutError:
                raise not_reading() from None
            except (WebSocketDisconnect, RuntimeError, OSError):
                raise ClientGone("client_closed") from None
            self.unsent -= len(data)

    # Receiving.

    async def _receiver(self) -> None:
        deadline = time.monotonic() + self.settings.realtime_max_session_seconds
        while True:
            timeout = min(self.settings.realtime_idle_timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(self.ws.receive(), max(timeout, 0))
            except TimeoutError:
                if self.finals and time.monotonic() < deadline:
                    continue  # the client waits for us: idle is only a client with nothing pending
                if time.monotonic() >= deadline:
                    raise ProtocolError(
                        f"The session reached its limit of {self.settings.realtime_max_session_seconds:g} s; "
                        "open a new one.",
                        code="session_expired",
                    ) from None
                raise ProtocolError(
                    f"No event from the client for {self.settings.realtime_idle_timeout:g} s; closing it.",
                    code="idle_timeout",
                ) from None
            if message["type"] == "websocket.disconnect":
                raise ClientGone("client_closed")
            text = message.get("text")
            if text is None:
                self._error(ProtocolError("Send client events as JSON text messages.", code="invalid_event"))
                continue
            try:
                self._handle(text)
            except ProtocolError as exc:
                if exc.fatal:
                    raise
                self._error(exc)

    def _error(self, exc: ProtocolError) -> None:
        self.emit(self.events.error(exc))

    def _handle(self, text: str) -> None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ProtocolError("The event is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ProtocolError("An event must be a JSON object with a 'type'.", code="invalid_event")
        kind = body.get("type")
        try:
            if kind == "input_audio_buffer.append":
                self._append(body.get("audio"))
            elif kind in UPDATE_EVENTS:
                self._update(body, UPDATE_EVENTS[kind])
            elif kind == "input_audio_buffer.commit":
                self._commit()
            elif kind == "input_audio_buffer.clear":
                self._clear()
            else:
                raise ProtocolError(
                    f"Event type '{kind}' is not available in a transcription session.",
                    code="invalid_event",
                    param="type",
                )
        except ProtocolError as exc:
            event_id = body.get("event_id")
            exc.event_id = event_id if isinstance(event_id, str) else None
            raise

    def _update(self, body: dict[str, Any], dialect: Dialect) -> None:
        config = apply_update(self.config, body, dialect)
        try:
            route = self.state.require_route(config.model, "stt")
            self.engine.check(TranscribeOptions(language=config.language))  # an English-only model
        except APIError as exc:
            raise refused(exc) from None
        try:
            self.state.governance.require_model(self.ctx.principal, route)
        except APIError as exc:  # the key may not transcribe with it: the session ends, as an upload fails
            raise refused(exc, fatal=True) from None
        if config.format != self.config.format:
            self.resampler = Resampler(config.format)
        self.turns.vad = config.turn_detection
        self.config = config
        self.events.dialect = dialect
        self.emit(self.events.session(config, self.session_id, created=False))

    def _append(self, audio: Any) -> None:
        pcm = decode_append(audio, self.config.format, self.settings.realtime_max_append_bytes)
        self.audio_seconds += len(pcm) / self.resampler.rate
        self._feed(self.resampler.feed(pcm))

    def _feed(self, samples: np.ndarray) -> None:
        if self.turns.vad is None and self.open is None and len(samples):
            self.open = Turn(self.events.new_item_id())
        for signal in self.turns.feed(samples):
            if isinstance(signal, SpeechStarted):
                self.open = Turn(self.events.new_item_id())
                self.emit(
                    self.events.event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=signal.audio_start_ms,
                        item_id=self.open.item_id,
                    )
                )
            elif isinstance(signal, SpeechStopped) and self.open is not None:
                self.emit(
                    self.events.event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=signal.audio_end_ms,
                        item_id=self.open.item_id,
                    )
                )
                self._committed(signal.audio)
        if self.turns.vad is None and self.turns.turn_samples >= self.turns.max_turn:
            self._committed(self.turns.take())  # Whisper's window is full: commit it as a turn
        self.admission.buffered[id(self)] = self.turns.buffered_bytes
        if self.open is not None:
            self.wake.set()

    def _commit(self) -> None:
        if self.turns.vad is None:
            self._feed(self.resampler.flush())  # the filter's last samples belong to this turn
        if self.open is None or self.turns.turn_samples < MIN_COMMIT_SECONDS * SAMPLE_RATE:
            raise ProtocolError(
                f"The input audio buffer holds less than {MIN_COMMIT_SECONDS * 1000:g} ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        self._committed(self.turns.take())

    def _committed(self, audio: np.ndarray) -> None:
        self._charge(len(audio) / SAMPLE_RATE)
        turn, self.open = self.open, None
        assert turn is not None
        previous, self.last_item = self.last_item, turn.item_id
        self.emit(
            self.events.event("input_audio_buffer.committed", previous_item_id=previous, item_id=turn.item_id)
        )
        self.emit(self.events.item_added(turn.item_id, previous))
        self.finals.append(Final(turn, audio))
        self.admission.buffered[id(self)] = self.turns.buffered_bytes + sum(
            f.audio.nbytes for f in self.finals
        )
        self.turn_count += 1
        self.wake.set()

    def _charge(self, seconds: float) -> None:
        """A committed turn is the key's transcription of `seconds` of audio, as an upload is: admitted
        by the key's model, audio rate and quotas, charged to its buckets and counted in the usage
        ledger when committed (the session itself counted one request when it opened). Refused, the
        session ends with the HTTP path's error code: a turn's audio is never dropped silently."""
        governance = self.state.governance
        ctx = RequestContext(self.ctx.request_id)
        ctx.principal, ctx.key_id = self.ctx.principal, self.ctx.key_id
        try:
            route = self.state.require_route(self.config.model, "stt")
            ctx.model, ctx.target = route.name, "local"
            governance.admit(ctx, route, audio_seconds=seconds, requests=0)
        except APIError as exc:
            governance.finish(ctx, exc.status)
            raise refused(exc, fatal=True) from None
        ctx.audio_seconds = seconds
        governance.finish(ctx, 200)

    def _clear(self) -> None:
        self.turns.clear()
        self.resampler.flush()
        self.open = None
        self.admission.buffered[id(self)] = sum(f.audio.nbytes for f in self.finals)
        self.emit(self.events.event("input_audio_buffer.cleared"))

    # Passes over the audio.

    def _options(self) -> TranscribeOptions:
        # As an upload answered in json: the text only, no segment timestamps.
        config = self.config
        return TranscribeOptions(language=config.language, prompt=config.prompt, segment_timestamps=False)

    def _partial_due(self) -> bool:
        turn = self.open
        step = self.settings.realtime_partial_interval * SAMPLE_RATE
        return turn is not None and self.turns.turn_samples - turn.passed >= step

    async def _engine_loop(self) -> None:
        while True:
            if self.finals:
                await self._final(self.finals[0])
                self.finals.popleft()
                self.admission.buffered[id(self)] = self.turns.buffered_bytes + sum(
                    f.audio.nbytes for f in self.finals
                )
            elif self._partial_due():
                await self._partial()
            else:
                self.wake.clear()
                await self.wake.wait()

    async def _transcribe(self, audio: np.ndarray, final: bool) -> str:
        async with self.admission.slot(final):
            transcript = await self.engine.transcribe_audio(DecodedAudio.from_samples(audio), self._options())
        return transcript.text

    async def _partial(self) -> None:
        turn = self.open
        assert turn is not None
        turn.passed = self.turns.turn_samples
        try:
            text = await self._transcribe(self.turns.audio(), final=False)
        except APIError:
            return  # the final pass will report the engine's failure
        delta = turn.stable.update(text)
        if delta:
            self.emit(self._delta(turn, delta))

    async def _final(self, final: Final) -> None:
        turn = final.turn
        try:
            text = await self._transcribe(final.audio, final=True)
        except APIError as exc:
            error = {"type": exc.type, "code": exc.code, "message": exc.message, "param": None}
            self.emit(
                self.events.event(
                    "conversation.item.input_audio_transcription.failed",
                    item_id=turn.item_id,
                    content_index=0,
                    error=error,
                )
            )
            return
        rest = turn.stable.finish(text)
        if rest is None:
            DIVERGED.inc()
        elif rest:
            self.emit(self._delta(turn, rest))
        seconds = round(len(final.audio) / SAMPLE_RATE, 3)
        self.emit(
            self.events.event(
                "conversation.item.input_audio_transcription.completed",
                item_id=turn.item_id,
                content_index=0,
                transcript=text,
                usage={"type": "duration", "seconds": seconds},
            )
        )
        done = self.events.item_done(turn.item_id, text)
        if done is not None:
            self.emit(done)

    def _delta(self, turn: Turn, delta: str) -> dict[str, Any]:
        return self.events.event(
            "conversation.item.input_audio_transcription.delta",
            item_id=turn.item_id,
            content_index=0,
            delta=delta,
        )


def _subprotocol(offered: Any) -> str | None:
    """The subprotocol to answer with: browsers insist on one of those offered, never the key's."""
    for protocol in offered:
        if protocol == "realtime":
            return protocol
    return None
