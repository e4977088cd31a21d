"""A real CLIP byte-level BPE tokenizer, built offline with a small vocabulary.

The shipped model's tokenizer is a genuine `transformers.CLIPTokenizer`: any text tokenizes (unknown words
fall back to byte symbols), added tokens such as "<new1>" work, and diffusers saves and loads it. The vocabulary
holds the 512 byte symbols, every word of the world as one token, a few rare words that Custom Diffusion
initialises modifier tokens from ("ktn", "pll", "ucd", "sks"), and the two specials.
"""
from __future__ import annotations

from functools import lru_cache

from difflab.world.draw import FACTORS, values

MAX_LENGTH = 32   # longest caption is ~16 tokens; 32 leaves room for modifier tokens and "zoomed in"

EXTRA_WORDS = ("a an the on at in of with and background shape photo picture image far away zoomed close up "
               "very ktn pll ucd sks object thing").split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def world_words() -> list[str]:
    words = set(EXTRA_WORDS)
    for f in FACTORS:
        for v in values(f):
            words.update(v.split())
    return sorted(words)


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges: each word becomes one token through a left-to-right chain of merges."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in world_words():
        _chain(list(word[:-1]) + [word[-1] + "</w>"], vocab, merges)
    return vocab, merges


def _chain(parts: list[str], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Append the merges that join `parts` left to right, and their products to the vocabulary."""
    cur = parts[0]
    for nxt in parts[1:]:
        if (cur, nxt) not in merges:
            merges.append((cur, nxt))
        cur = cur + nxt
        vocab.setdefault(cur, len(vocab))


def _make(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from transformers import CLIPTokenizer
    full = dict(vocab)
    full["<|startoftext|>"] = len(full)
    full["<|endoftext|>"] = len(full)
    return CLIPTokenizer(vocab=full, merges=merges, model_max_length=MAX_LENGTH)


def build_tokenizer():
    """The tokenizer, with every world word a single token. A word's own merge chain can be cut short by an
    earlier-ranked merge of another word ("re" of "red" inside "green"); such words get a second chain over the
    pieces they were left in, ranked last, so BPE joins them once nothing else applies."""
    vocab, merges = build_vocab()
    for _ in range(8):
        tok = _make(vocab, merges)
        stuck = [tok.tokenize(w) for w in world_words()]
        stuck = [p for p in stuck if len(p) > 1]
        if not stuck:
            return tok
        for parts in stuck:
            _chain(parts, vocab, merges)
    raise RuntimeError(f"could not make single tokens of {stuck}")
