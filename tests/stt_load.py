"""Concurrent speech-to-text clients in a process of their own, so that what they cost the client side
(multipart encoding, response parsing, the GIL) does not show up in measurements taken beside them.

    python -m tests.stt_load BASE_URL CLIENTS SECONDS  ->  one JSON line: the transcripts' texts
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

from tests.harness import CLIENT_KEY
from tests.stt_audio import make_audio


def main(base_url: str, clients: int, seconds: float) -> list[str]:
    clip = make_audio("wav", seconds)
    client = openai.OpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=300)

    def transcribe(_: int) -> str:
        return client.audio.transcriptions.create(model="whisper-1", file=clip).text

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(transcribe, range(clients)))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
