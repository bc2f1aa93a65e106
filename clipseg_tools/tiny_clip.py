"""A small CLIP and its tokenizer, made locally: what the offline demo and the tests run on.

No CLIP weights can be downloaded without network access, so the demo builds a CLIP from a config and a
CLIP tokenizer (the real byte-level BPE format: vocab.json + merges.txt) whose vocabulary holds the words
of the synthetic phrases as single tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank, as the tokenizer does: always the lowest-ranked adjacent pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges under which each word is one token.

    Each new merge is appended after all earlier ones, so it fires only once the earlier merges are done:
    words already made whole stay whole, and every word ends as one token.
    """
    byte_chars = _bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        chars = [byte_chars[b] for b in word.encode("utf-8")]
        symbols = chars[:-1] + [chars[-1] + "</w>"]
        while len(symbols := _bpe(symbols, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
    return sorted(ranks, key=ranks.get)


def build_word_tokenizer(words: Iterable[str], save_dir: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary has every byte and every given (lower-case) word as one token."""
    words = sorted({w.lower() for w in words if w.strip()})
    merges = word_merges(words)
    vocab: dict[str, int] = {}
    for char in _bytes_to_unicode().values():
        vocab.setdefault(char, len(vocab))
    for char in _bytes_to_unicode().values():
        vocab.setdefault(char + "</w>", len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab.setdefault(START, len(vocab))
    vocab.setdefault(END, len(vocab))
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (save_dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(save_dir / "vocab.json"),
        merges=str(save_dir / "merges.txt"),
        model_max_length=max_length,
        pad_token=END,
    )


def tiny_clip_configs(
    tokenizer: CLIPTokenizer,
    width: int = 64,
    layers: int = 4,
    heads: int = 4,
    patch_size: int = 8,
    pretrain_image_size: int = 64,
    max_positions: int = 32,
) -> dict[str, Any]:
    """Text and vision configs of a small CLIP matching `tokenizer` (keyword arguments for the model config)."""
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.convert_tokens_to_ids(START),
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.convert_tokens_to_ids(END),
    )
    vision_config = dict(
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=pretrain_image_size,
        patch_size=patch_size,
    )
    return {"text_config": text_config, "vision_config": vision_config, "projection_dim": width}


__all__ = ["build_word_tokenizer", "tiny_clip_configs", "word_merges"]
