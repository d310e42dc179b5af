"""The real-speech test kit itself: the packaged model joins into a folder faster-whisper loads, and the
speech espeak-ng makes is what Whisper hears."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel

from tests.real_speech import silence, speak, word_error_rate


def test_word_error_rate_counts_edits_over_reference_words():
    assert word_error_rate("the cat sat", "the cat sat") == 0.0
    assert word_error_rate("the cat sat", "the hat sat down") == 2 / 3
    assert word_error_rate("One, two.", "one two") == 0.0


def test_packaged_whisper_base_hears_espeak_speech(real_whisper_dir: Path):
    text = "Plants need sunlight and water to grow."
    audio = np.concatenate([speak(text), silence(0.5)])
    model = WhisperModel(str(real_whisper_dir), device="cpu", compute_type="int8", cpu_threads=1)
    segments, info = model.transcribe(audio, beam_size=1)
    assert info.language == "en"
    assert word_error_rate(text, " ".join(s.text for s in segments)) <= 0.3
