"""A tiny Whisper model with random weights, shaped like large-v3, for running faster-whisper for real.

Written with CTranslate2's own spec classes (no torch): 128 mel bins, the multilingual large-v3 vocabulary
layout (50,257 text tokens, then the special, language and timestamp tokens: 51,866 in all) and the files
faster-whisper loads: model.bin, config.json, vocabulary.json, tokenizer.json, preprocessor_config.json.
Its transcripts are meaningless; durations, formats, timestamps and errors are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ctranslate2.specs import common_spec, transformer_spec, whisper_spec
from faster_whisper.tokenizer import _LANGUAGE_CODES
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

N_MELS = 128
N_TEXT_TOKENS = 50257  # byte-level BPE text tokens, as in Whisper's multilingual tokenizer
N_AUDIO_CTX = 1500
N_TEXT_CTX = 448
SPECIAL_BEFORE_LANGUAGES = ["<|endoftext|>", "<|startoftranscript|>"]
SPECIAL_AFTER_LANGUAGES = [
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # <|0.00|> .. <|30.00|>


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies hold)."""
    return pre_tokenizers.ByteLevel.alphabet()


def text_tokens(english_only: bool = False) -> list[str]:
    """50,257 text tokens: every byte, then whole words (" w0", " w1", ...) so decoded text splits into
    words, then the empty token that multilingual Whisper vocabularies end with (CTranslate2 tells a
    multilingual model by it; English-only vocabularies lack it)."""
    alphabet = sorted(_byte_alphabet())
    space = "Ġ"  # the byte-level stand-in for " "
    words = [f"{space}w{i}" for i in range(N_TEXT_TOKENS - len(alphabet) - 1)]
    return [*alphabet, *words] if english_only else [*alphabet, *words, ""]


def special_tokens(english_only: bool = False) -> list[str]:
    # English-only models (`*.en`) come from before large-v3 added Cantonese: 99 language tokens.
    codes = [c for c in _LANGUAGE_CODES if not (english_only and c == "yue")]
    languages = [f"<|{code}|>" for code in codes]
    return SPECIAL_BEFORE_LANGUAGES + languages + SPECIAL_AFTER_LANGUAGES + TIMESTAMPS


def build_tokenizer(english_only: bool = False) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(text_tokens(english_only))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_tokens(english_only)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def _random(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _linear(spec: common_spec.LinearSpec, rng: np.random.Generator, out_dim: int, in_dim: int) -> None:
    spec.weight = _random(rng, out_dim, in_dim)
    spec.bias = np.zeros(out_dim, dtype=np.float32)


def _layer_norm(spec: common_spec.LayerNormSpec, dim: int) -> None:
    spec.gamma = np.ones(dim, dtype=np.float32)
    spec.beta = np.zeros(dim, dtype=np.float32)


def _ffn(spec: transformer_spec.FeedForwardSpec, rng: np.random.Generator, dim: int) -> None:
    _layer_norm(spec.layer_norm, dim)
    _linear(spec.linear_0, rng, 4 * dim, dim)
    _linear(spec.linear_1, rng, dim, 4 * dim)


def _self_attention(spec, rng: np.random.Generator, dim: int) -> None:
    _layer_norm(spec.layer_norm, dim)
    _linear(spec.linear[0], rng, 3 * dim, dim)  # fused q, k, v
    _linear(spec.linear[1], rng, dim, dim)


def _cross_attention(spec, rng: np.random.Generator, dim: int) -> None:
    _layer_norm(spec.layer_norm, dim)
    _linear(spec.linear[0], rng, dim, dim)  # q
    _linear(spec.linear[1], rng, 2 * dim, dim)  # fused k, v over the encoder output
    _linear(spec.linear[2], rng, dim, dim)


def build_spec(dim: int, heads: int, layers: int, seed: int, vocab_size: int) -> whisper_spec.WhisperSpec:
    rng = np.random.default_rng(seed)
    spec = whisper_spec.WhisperSpec(layers, heads, layers, heads)

    enc = spec.encoder
    enc.conv1.weight = _random(rng, dim, N_MELS, 3)
    enc.conv1.bias = np.zeros(dim, dtype=np.float32)
    enc.conv2.weight = _random(rng, dim, dim, 3)
    enc.conv2.bias = np.zeros(dim, dtype=np.float32)
    enc.position_encodings.encodings = _random(rng, N_AUDIO_CTX, dim)
    _layer_norm(enc.layer_norm, dim)
    for layer in enc.layer:
        _self_attention(layer.self_attention, rng, dim)
        _ffn(layer.ffn, rng, dim)

    dec = spec.decoder
    dec.embeddings.weight = _random(rng, vocab_size, dim)
    dec.position_encodings.encodings = _random(rng, N_TEXT_CTX, dim)
    _layer_norm(dec.layer_norm, dim)
    dec.projection.weight = _random(rng, vocab_size, dim)
    for layer in dec.layer:
        _self_attention(layer.self_attention, rng, dim)
        _cross_attention(layer.attention, rng, dim)
        _ffn(layer.ffn, rng, dim)
    return spec


WORDS = 1  # how many different words the model says


def _steer_decoder(spec: whisper_spec.WhisperSpec, tokenizer: Tokenizer) -> None:
    """Make every decode short, like a real model's on a short utterance: `<|0.00|> word <|endoftext|>`.

    Pure random weights make a Whisper decoder ramble to its length limit, at every fallback temperature,
    which takes seconds per window on a CPU. Two embedding directions mark what the last token was (a
    word, or anything else), and the output projection maps each to what comes next. Everything else
    stays random; the decoder still attends to the audio, so alignment and word timings are computed for
    real.
    """
    dec = spec.decoder
    eot = tokenizer.token_to_id("<|endoftext|>")
    first_timestamp = tokenizer.token_to_id("<|0.00|>")
    words = [tokenizer.token_to_id(f"Ġw{i}") for i in range(WORDS)]
    after_other, after_word = 0, 1  # embedding dimensions
    dec.embeddings.weight[:eot, after_word] = 10.0
    dec.embeddings.weight[eot:, after_other] = 10.0
    # The final layer norm turns a unit direction into about sqrt(dim); divide the logits by it.
    scale = 1 / np.sqrt(dec.embeddings.weight.shape[1] - 1)
    proj = dec.projection.weight
    proj[:, after_other] = 0.0
    proj[words, after_other] = 40 * scale
    proj[eot, after_other] = 24 * scale
    proj[first_timestamp, after_other] = 20 * scale
    proj[:, after_word] = 0.0
    proj[eot, after_word] = 40 * scale


def build_tiny_whisper(
    out_dir: Path,
    *,
    dim: int = 64,
    heads: int = 2,
    layers: int = 2,
    seed: int = 0,
    english_only: bool = False,
) -> Path:
    """Write a complete faster-whisper model directory to `out_dir` and return it; `english_only` makes
    it a `*.en` model (a vocabulary CTranslate2 tells from a multilingual one by its size)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(english_only)
    vocabulary = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]

    spec = build_spec(dim, heads, layers, seed, len(vocabulary))
    _steer_decoder(spec, tokenizer)
    spec.register_vocabulary(vocabulary)
    config = spec.config
    eot = tokenizer.token_to_id("<|endoftext|>")
    config.suppress_ids = []
    config.suppress_ids_begin = [tokenizer.token_to_id("Ġ"), eot]
    languages = (tokenizer.token_to_id(f"<|{code}|>") for code in _LANGUAGE_CODES)
    config.lang_ids = [i for i in languages if i is not None]
    config.alignment_heads = [[layer, head] for layer in range(layers // 2, layers) for head in range(heads)]
    spec.validate()
    spec.optimize(quantization=None)
    spec.save(str(out_dir))

    tokenizer.save(str(out_dir / "tokenizer.json"))
    preprocessor = {
        "chunk_length": 30,
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": N_MELS,
        "hop_length": 160,
        "n_fft": 400,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "WhisperProcessor",
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out_dir
