"""Audio decode (speech-to-text input) and encode (text-to-speech output) with PyAV, in memory."""
