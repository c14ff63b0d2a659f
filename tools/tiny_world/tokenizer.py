"""The real CLIP BPE tokenizer (49,408 tokens), rebuilt from the vocabulary file that open_clip_torch ships."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

__all__ = ["clip_bpe_path", "clip_vocab_and_merges", "write_clip_tokenizer", "VOCAB_SIZE"]

VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2  # as in CLIP / open_clip's SimpleTokenizer


def clip_bpe_path() -> Path:
    """The path of open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (installed with open_clip_torch)."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "building the tiny world's CLIP tokenizer needs the BPE file shipped by open_clip_torch: "
            "`pip install open_clip_torch`"
        ) from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable-unicode map (the same table as GPT-2 and open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merge lines) exactly as CLIP builds them: bytes, bytes+</w>, merges, then the 2 specials."""
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {VOCAB_SIZE} distinct tokens, built {len(vocab)}; is it the CLIP BPE file?")
    return vocab, merges


def write_clip_tokenizer(path: Path, model_max_length: int) -> None:
    """Save a transformers ``CLIPTokenizer`` (vocab.json, merges.txt, configs) padding to ``model_max_length``."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(path)
