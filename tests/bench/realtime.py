"""Live dictation benchmark: sessions that speak in real time, through the gateway, with the real model.

Each session streams the same passage (two sentences and a pause, spoken by espeak-ng) at real-time
pace in 100 ms appends, with server VAD, through the openai SDK's realtime client. Reported per round
of N sessions at once:

- time from the end of a spoken word to the delta that carries it (median, p95): word ends come from
  an upload of the passage with word timestamps (same model), matched in order to the deltas' words;
- CPU seconds the gateway process used per second of audio streamed (all sessions together);
- how many sessions the box holds: the largest N whose p95 stays under the bound and none refused.

    python -m tests.bench.realtime [--sessions 1,2,4] [--bound 3.0] [--model DIR]

Without --model it uses the packaged Whisper base (the test kit's), int8 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tests.harness import Gateway
from tests.real_speech import silence, speak, wav_bytes, whisper_base, words
from tests.realtime_client import (
    COMPLETED,
    DELTA,
    PCM_RATE,
    Recorder,
    b64,
    chunks,
    ga_session,
    pcm16,
)
from tests.stt_gateway import start_stt_gateway

PASSAGE = ("Plants need sunlight and water to grow.", "Their roots take water from the soil.")
CHUNK_SECONDS = 0.1
VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def passage() -> np.ndarray:
    first, second = (speak(s, rate=PCM_RATE) for s in PASSAGE)
    return np.concatenate([first, silence(1.0, PCM_RATE), second, silence(1.2, PCM_RATE)])


def word_ends(gw: Gateway, audio: np.ndarray) -> list[tuple[str, float]]:
    """(word, end in seconds) for the passage, from the gateway's own upload route."""
    result = gw.client(timeout=300).audio.transcriptions.create(
        model="whisper-1",
        file=("passage.wav", wav_bytes(audio, PCM_RATE)),
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    return [(w, float(word.end)) for word in result.words for w in words(word.word)]


def latencies(deltas: list[tuple[float, str]], ends: list[tuple[str, float]], start: float) -> list[float]:
    """Seconds from each word's end (on the stream's clock) to the delta that brought it."""
    out: list[float] = []
    position = 0
    for arrived, text in deltas:
        for word in words(text):
            for j in range(position, min(position + 4, len(ends))):  # allow a misheard word or two
                if ends[j][0] == word:
                    out.append(arrived - (start + ends[j][1]))
                    position = j + 1
                    break
    return out


def session(gw: Gateway, pcm: bytes, results: list, refused: list) -> None:
    client = gw.client(timeout=300)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        events = Recorder(conn)
        conn.session.update(session=ga_session(turn_detection=VAD))
        try:
            events.wait_for("session.updated", timeout=30)
        except AssertionError:
            refused.append(1)
            return
        start = time.monotonic()
        for i, piece in enumerate(chunks(pcm, int(PCM_RATE * 2 * CHUNK_SECONDS))):
            time.sleep(max(0.0, start + (i + 1) * CHUNK_SECONDS - time.monotonic()))  # as it is spoken
            conn.input_audio_buffer.append(audio=b64(piece))
        completed = events.wait_for(COMPLETED, count=2, timeout=600)
        with events._changed:
            deltas = [(t, e) for t, e in events.events if e.type == DELTA]
        # Turns whose deltas add up to the completed text (the final pass kept every word sent).
        kept = sum(
            "".join(d.delta for _, d in deltas if d.item_id == c.item_id) == c.transcript for c in completed
        )
        results.append((start, [(t, d.delta) for t, d in deltas], kept, len(completed)))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(gw: Gateway, n: int, audio: np.ndarray, ends: list[tuple[str, float]]) -> dict[str, float]:
    pcm = pcm16(audio)
    results: list = []
    refused: list = []
    assert gw.proc is not None
    cpu_before = cpu_seconds(gw.proc.pid)
    threads = [threading.Thread(target=session, args=(gw, pcm, results, refused)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = cpu_seconds(gw.proc.pid) - cpu_before
    lat = sorted(x for start, deltas, _, _ in results for x in latencies(deltas, ends, start))
    audio_seconds = len(audio) / PCM_RATE * len(results)
    return {
        "sessions": n,
        "refused": len(refused),
        "words": len(lat),
        "median": statistics.median(lat) if lat else float("nan"),
        "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
        "cpu_per_audio_s": cpu / audio_seconds if audio_seconds else float("nan"),
        "kept": sum(r[2] for r in results),
        "turns": sum(r[3] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", default="1,2,4")
    parser.add_argument("--bound", type=float, default=3.0, help="p95 word-to-delta seconds a box must keep")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or whisper_base(tmp / "model")
        gw = start_stt_gateway(tmp, "bench", APPLIANCE_STT_MODEL=str(model))
        try:
            audio = passage()
            started = time.perf_counter()
            ends = word_ends(gw, audio)
            one_pass = time.perf_counter() - started
            rows = [run_round(gw, int(n), audio, ends) for n in args.sessions.split(",")]
        finally:
            gw.stop()
    seconds = len(audio) / PCM_RATE
    print(f"Live dictation, {seconds:.1f} s passage streamed in real time per session, server VAD,")
    print(f"model {model.name if args.model else 'Whisper base (int8, CPU)'}, {os.cpu_count()} CPU cores.\n")
    print(f"One pass (an upload of the passage, through the same engine) took {one_pass:.2f} s.\n")
    print(
        "| sessions | refused | words timed | word end -> delta median (s) | p95 (s) | CPU s per audio s "
        "| turns whose deltas = completed |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['sessions']} | {r['refused']} | {r['words']} | {r['median']:.2f} | {r['p95']:.2f} "
            f"| {r['cpu_per_audio_s']:.2f} | {r['kept']}/{r['turns']} |"
        )
    held = [r["sessions"] for r in rows if not r["refused"] and r["p95"] <= args.bound]
    print(f"\nSessions held with p95 <= {args.bound:g} s: {max(held) if held else 0}")


if __name__ == "__main__":
    main()
