"""Which decoding path loses no words on audio longer than one 30 s window: word error rate on real
speech (espeak-ng, over a minute) with the packaged Whisper base model, for faster-whisper's sequential
`WhisperModel.transcribe` and its `BatchedInferencePipeline`, with and without VAD, with and without
word timestamps, and the time each took.

    python -m tests.bench.stt_long [--threads N]
"""

from __future__ import annotations

import argparse
import difflib
import math
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from appliance import stt  # first: it sets the CPU runtime up as the gateway does, before ctranslate2 loads
from tests.real_speech import WATER_CYCLE, passage, speak, whisper_base, word_error_rate, words

TEMPERATURES = stt.FALLBACK_TEMPERATURES


def paths(model: Any) -> dict[str, Callable[[np.ndarray, bool], Iterable[Any]]]:
    """Each decoding path, as a function of (audio, word_timestamps) -> segments."""
    from faster_whisper import BatchedInferencePipeline

    batched = BatchedInferencePipeline(model)
    common = {"language": "en", "beam_size": stt.BEAM_SIZE}

    def sequential(vad: bool) -> Callable[[np.ndarray, bool], Iterable[Any]]:
        def run(audio: np.ndarray, words: bool) -> Iterable[Any]:
            return model.transcribe(
                audio, temperature=TEMPERATURES, vad_filter=vad, word_timestamps=words, **common
            )[0]

        return run

    def pipeline(vad: bool, timestamps: bool) -> Callable[[np.ndarray, bool], Iterable[Any]]:
        def run(audio: np.ndarray, words: bool) -> Iterable[Any]:
            duration = len(audio) / 16000
            return batched.transcribe(
                audio,
                temperature=0.0,
                batch_size=8,
                vad_filter=vad,
                clip_timestamps=None if vad else fixed_windows(duration),
                without_timestamps=not timestamps,
                word_timestamps=words,
                **common,
            )[0]

        return run

    return {
        "sequential, VAD off": sequential(False),
        "sequential, VAD on": sequential(True),
        "batched, VAD on, segment timestamps": pipeline(True, True),
        "batched, VAD off, segment timestamps": pipeline(False, True),
        "batched, VAD on, no timestamps": pipeline(True, False),
        "batched, VAD off, no timestamps": pipeline(False, False),
    }


def fixed_windows(duration: float) -> list[dict[str, float]]:
    """Consecutive 30 s clips covering the audio: the batched pipeline's input when VAD is off."""
    starts = range(math.ceil(duration / 30.0))
    return [{"start": i * 30.0, "end": min((i + 1) * 30.0, duration)} for i in starts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    reference = " ".join(WATER_CYCLE)
    clips = {
        "sentences 0.6 s apart": passage(WATER_CYCLE),
        "one breath (a single espeak-ng run)": speak(reference),
        "one breath, 190 words/min": speak(reference, words_per_minute=190),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = whisper_base(Path(tmp) / "base")
        model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=args.threads)
    print(
        f"Whisper base, int8, {args.threads} CPU threads, espeak-ng speech ({len(reference.split())} words)"
    )
    print("| clip | path | word timestamps | WER | seconds | words lost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for clip, audio in clips.items():
        for name, run in paths(model).items():
            for with_words in (False, True):
                started = time.perf_counter()
                text = " ".join(s.text for s in run(audio, with_words))
                took = time.perf_counter() - started
                wer = word_error_rate(reference, text)
                lost = " ".join(deleted(reference, text))[:60]
                print(
                    f"| {clip}, {len(audio) / 16000:.1f} s | {name} | {'on' if with_words else 'off'} "
                    f"| {wer:.1%} | {took:.1f} | {lost} |",
                    flush=True,
                )


def deleted(reference: str, hypothesis: str) -> list[str]:
    """Reference words the hypothesis leaves out (runs of two or more: a lost phrase, not a misspelling)."""
    ref, hyp = words(reference), words(hypothesis)
    lost: list[str] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False).get_opcodes():
        if op in ("delete", "replace") and (i2 - i1) - (j2 - j1) >= 2:
            lost.extend(ref[i1:i2])
    return lost


if __name__ == "__main__":
    main()
