"""Deterministic token fragments: the fake server's output is a sequence of these, one per token.

Every generated output token is one string fragment drawn from a vocabulary with a seeded
``random.Random``, so the number of output tokens of a response is exactly the number of fragments
it carries. Three vocabularies mimic what a real tokenizer does to three kinds of output:

- prose (text and thinking blocks): whole words with their leading space, a few split into
  sub-words, punctuation and paragraph breaks; about 4 to 4.5 characters per token;
- code (the command of a code-execution call): Python lines cut into keywords, identifiers,
  operators, indentation and newlines; about 3 to 3.5 characters per token;
- JSON (the input of a client tool call): an object of string fields cut into braces, quotes,
  keys and short value pieces; about 3 characters per token.

Two more stand in for text that is not English: CJK prose (Chinese characters and kana, mostly one
character per token, some two-character words, some rarer characters spelled in two tokens; about 1.1
characters per token), optionally with emoji (each spelled in two or three tokens).

The functions here are pure: same ``random.Random`` state in, same fragments out. They only write
text: how many tokens a text is, billed or counted, is :mod:`costwatch.testing.tokenizer`'s to say,
over :data:`VOCABULARY` (every multi-character piece), :data:`TWO_TOKEN_CHARACTERS` and
:data:`OPENING_PIECES`. The English, code and JSON pieces are chosen so that no two adjacent
fragments spell a longer one: read back, their text splits into the fragments it was made of, one
token each at the default scale (``tests/test_testing_tokenizer.py`` holds them to it).
"""

from __future__ import annotations

import json
import random

__all__ = [
    "OPENING_PIECES",
    "TWO_TOKEN_CHARACTERS",
    "VOCABULARY",
    "cjk_fragments",
    "code_fragments",
    "command_json_fragments",
    "json_object_fragments",
    "prose_fragments",
]

# One token each; several multi-piece words are listed as their pieces, which keeps the mean length
# near what a BPE tokenizer gives on English (about 4.2 characters per token).
_PROSE_WORDS: tuple[tuple[str, ...], ...] = (
    (" the",),
    (" a",),
    (" to",),
    (" of",),
    (" and",),
    (" in",),
    (" is",),
    (" it",),
    (" that",),
    (" for",),
    (" with",),
    (" this",),
    (" we",),
    (" can",),
    (" each",),
    (" not",),
    (" when",),
    (" then",),
    (" will",),
    (" from",),
    (" request",),
    (" stream",),
    (" retry",),
    (" token",),
    (" tokens",),
    (" model",),
    (" input",),
    (" output",),
    (" cost",),
    (" price",),
    (" usage",),
    (" cache",),
    (" server",),
    (" client",),
    (" attempt",),
    (" message",),
    (" response",),
    (" connection",),
    (" error",),
    (" billing",),
    (" function",),
    (" value",),
    (" result",),
    (" file",),
    (" table",),
    (" number",),
    (" should",),
    (" because",),
    (" before",),
    (" after",),
    (" first",),
    (" second",),
    (" again",),
    (" check",),
    (" update",),
    (" count",),
    (" total",),
    (" sent",),
    (" billed",),
    (" dropped",),
    (" partial",),
    (" whole",),
    (" large",),
    (" small",),
    (" long",),
    (" every",),
    (" which",),
    (" where",),
    (" there",),
    (" these",),
    (" here",),
    (" look",),
    (" into",),
    (" over",),
    (" only",),
    (" also",),
    (" between",),
    (" database",),
    (" latency",),
    (" timeout",),
    (" observ", "ability"),
    (" idem", "pot", "ent"),
    (" deterministic",),
    (" concurrency",),
    (" Anthropic",),
    (" JSON",),
    (" API",),
    (" Python",),
    (" SQL",),
    (" queue",),
    (" spend",),
    (" budget",),
    (" estimate",),
    (" waste",),
    (" wasted",),
    (" exactly",),
    (" probably",),
    (" carefully",),
    (" recon", "cile"),
    (" throughput",),
)
_FUNCTION_WORDS: tuple[str, ...] = (
    " the",
    " a",
    " to",
    " of",
    " and",
    " in",
    " is",
    " it",
    " I",
    " be",
    " an",
    " on",
    " at",
    " by",
    " or",
    " as",
    " so",
    " if",
    " do",
    " all",
    " are",
    " was",
    " has",
    " its",
    " our",
    " you",
    " one",
    " two",
    " out",
    " up",
    " but",
    " how",
    " why",
    " use",
    " that",
    " for",
    " with",
    " this",
    " we",
    " can",
    " not",
)
_SENTENCE_STARTS: tuple[str, ...] = (
    "The",
    "I",
    "We",
    "This",
    "Each",
    "Then",
    "Next",
    "So",
    "Now",
    "If",
    "When",
    "Let",
    "That",
    "First",
)
_CLAUSE_PUNCTUATION: tuple[str, ...] = (",", ",", ":", ";", " (")
_SENTENCE_END: tuple[str, ...] = (".", ".", ".", "?", ".\n\n", ".\n")

_IDENTIFIERS: tuple[str, ...] = (
    " total",
    " rows",
    " row",
    " cost",
    " usage",
    " tokens",
    " price",
    " data",
    " result",
    " records",
    " attempt",
    " path",
    " line",
    " count",
    " values",
    " name",
    " value",
    " items",
    " key",
    " df",
    " x",
    " i",
    " n",
)
_ATTRIBUTES: tuple[str, ...] = ("usage", "cost", "input", "output", "tokens", "id", "items", "split", "strip")
_CALLS: tuple[str, ...] = (" sum", " len", " print", " sorted", " open", " int", " float", " max", " min")
_NUMBERS: tuple[str, ...] = ("0", "1", "2", "10", "100", "1000", "0.5", "3")
_STRINGS: tuple[str, ...] = ("input", "output", "cost", "model", "usage", "name", "id", "total")

_JSON_KEYS: tuple[str, ...] = (
    "path",
    "query",
    "command",
    "file",
    "pattern",
    "content",
    "description",
    "name",
    "old_str",
    "new_str",
    "reason",
)
_JSON_VALUE_PIECES: tuple[str, ...] = (
    "src",
    "/",
    "cost",
    "watch",
    "pipe",
    "line",
    ".py",
    "test",
    "_",
    "re",
    "try",
    " of",
    " is",
    " to",
    "-",
    ".",
    "api",
    "log",
    "42",
    "7",
    "js",
    "on",
    " an",
    "id",
    " we",
    " use",
)
# (" a", " in" and " the" are not value pieces: followed by another piece they would spell " at",
# " int" or " there", one token where two were billed.)


def prose_fragments(rng: random.Random, count: int) -> list[str]:
    """``count`` prose tokens (sentences of words) for text and thinking blocks."""
    out: list[str] = []
    words_in_sentence = 0
    sentence_length = rng.randint(8, 22)
    while len(out) < count:
        if words_in_sentence == 0:
            out.append(rng.choice(_SENTENCE_STARTS))
            words_in_sentence = 1
            continue
        if words_in_sentence >= sentence_length:
            out.append(rng.choice(_SENTENCE_END))
            words_in_sentence = 0
            sentence_length = rng.randint(8, 22)
            # A sentence after a newline starts without a space; otherwise the start word needs one.
            if len(out) < count and not out[-1].endswith("\n"):
                out.append(" " + rng.choice(_SENTENCE_STARTS))
                words_in_sentence = 1
            continue
        if words_in_sentence > 3 and rng.random() < 0.06:
            out.append(rng.choice(_CLAUSE_PUNCTUATION))
        elif rng.random() < 0.6:
            out.append(rng.choice(_FUNCTION_WORDS))
        else:
            out.extend(rng.choice(_PROSE_WORDS))
        words_in_sentence += 1
    return out[:count]


_CODE_SYNTAX: tuple[str, ...] = (
    "    ",
    " =",
    "(",
    ")",
    "for",
    " in",
    ":",
    " +=",
    ".",
    "print",
    '(f"',
    "={",
    '}")',
    " [",
    "[",
    '"',
    '"]',
    "]",
    "if",
    " >",
    "import",
    " json",
    "return",
    "\n",
)
"""The fixed pieces of :func:`_code_line` (its identifiers, calls, attributes, numbers and strings are
drawn from the tuples above)."""


def _code_line(rng: random.Random, indent: int) -> list[str]:
    pad = ["    "] * indent
    ident = rng.choice(_IDENTIFIERS)
    other = rng.choice(_IDENTIFIERS)
    shape = rng.randrange(7)
    if shape == 0:
        body = [ident.lstrip(), " =", rng.choice(_CALLS), "(", other.lstrip(), ")"]
    elif shape == 1:
        body = ["for", ident, " in", other, ":"]
    elif shape == 2:
        body = [ident.lstrip(), " +=", other, ".", rng.choice(_ATTRIBUTES)]
    elif shape == 3:
        body = ["print", '(f"', rng.choice(_STRINGS), "={", ident.lstrip(), '}")']
    elif shape == 4:
        body = [ident.lstrip(), " =", " [", other.lstrip(), "[", '"', rng.choice(_STRINGS), '"]', "]"]
    elif shape == 5:
        body = ["if", ident, " >", " " + rng.choice(_NUMBERS), ":"]
    else:
        body = ["import", " json"] if indent == 0 else ["return", ident]
    return [*pad, *body, "\n"]


def code_fragments(rng: random.Random, count: int) -> list[str]:
    """``count`` code tokens: Python lines, indented under ``for``/``if`` the way a script is."""
    out: list[str] = []
    indent = 0
    while len(out) < count:
        line = _code_line(rng, indent)
        out.extend(line)
        if line[-2] == ":":
            indent = min(indent + 1, 3)
        elif indent and rng.random() < 0.3:
            indent -= 1
    return out[:count]


def json_object_fragments(rng: random.Random, count: int) -> list[str]:
    """``count`` tokens that concatenate to one JSON object of string fields (a client tool's input)."""
    if count <= 0:
        return []
    if count == 1:
        return ["{}"]
    if count == 2:
        return ["{ ", "}"]  # "{" then "}" would read back as the single token "{}"
    if count == 3:
        return ['{"', rng.choice(_JSON_KEYS), '":0}']
    out = ['{"', rng.choice(_JSON_KEYS), '": "']
    remaining = count - 4
    pieces_in_value = 0
    while remaining > 0:
        if pieces_in_value >= 3 and remaining > 4 and rng.random() < 0.2:
            out.extend(['",', ' "', rng.choice(_JSON_KEYS), '": "'])
            remaining -= 4
            pieces_in_value = 0
        else:
            out.append(rng.choice(_JSON_VALUE_PIECES))
            remaining -= 1
            pieces_in_value += 1
    out.append('"}')
    return out


def command_json_fragments(rng: random.Random, count: int, key: str) -> list[str]:
    """``count`` tokens of ``{"<key>": "<python code>"}``: a code-execution call's input.

    The code tokens come from :func:`code_fragments` and are JSON-escaped one by one, so each
    fragment is still one token and the concatenation is valid JSON.
    """
    if count < 4:
        return json_object_fragments(rng, count)
    code = code_fragments(rng, count - 4)
    return ['{"', key, '": "', *(json.dumps(piece)[1:-1] for piece in code), '"}']


_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"
    "里后小么心多天而能好都然没日于起还发成事只作当想看文无开手用主行方又如前所本见经头面公同已老从动"
    "两长知民样现分将外但身些与高意进把法此实回理美点月明其种声全工己话者向情部正名定问力机给等几很业"
    "最间新什打便位因重被走电第门相次东政海口使教西再平真听世气信北少关并内加化由却代产入先山太水万市"
)
_KANA = "のはにをがとでたしてるいうかなれですまもっ"
_CJK_WORDS = ("我们", "这个", "时间", "问题", "可以", "因为", "所以", "已经", "数据", "请求", "模型", "成本")
_CJK_PUNCTUATION = ("，", "，", "。", "、", "：", "！", "？", "。\n")  # noqa: RUF001 (full-width, as written)
_EMOJI = ("😀", "😂", "🤔", "👍", "🚀", "🔥", "✨", "🎉", "💡", "✅", "👀", "🙏", "😅", "📈", "❤️", "⚠️")
_RARE_HANZI = "鑫龘麤饕餮魑魅魍魉瓒璨琰婕嫣蓁蕤靥缱绻翊曦湛珩祎璟骞"
"""Rarer characters, which a byte-level tokenizer spells in two tokens (none of them is in _HANZI)."""


def _vocabulary() -> frozenset[str]:
    prose = [
        *(piece for word in _PROSE_WORDS for piece in word),
        *_FUNCTION_WORDS,
        *_SENTENCE_STARTS,
        *(" " + start for start in _SENTENCE_STARTS),
        *_CLAUSE_PUNCTUATION,
        *_SENTENCE_END,
    ]
    code = [
        *_CODE_SYNTAX,
        *_IDENTIFIERS,
        *(name.lstrip() for name in _IDENTIFIERS),
        *_CALLS,
        *_ATTRIBUTES,
        *(" " + number for number in _NUMBERS),
        *_STRINGS,
    ]
    json_pieces = ["{}", "{ ", "}", '{"', '":0}', '": "', '",', ' "', '"}', *_JSON_KEYS, *_JSON_VALUE_PIECES]
    json_pieces.append("code")  # the key of a code_execution call's input (bash_code_execution's: "command")
    escaped_code = [json.dumps(piece)[1:-1] for piece in code]  # a code-execution call's input
    cjk = [*_CJK_WORDS, *(p for p in _CJK_PUNCTUATION if len(p) > 1)]
    return frozenset([*prose, *code, *json_pieces, *escaped_code, *cjk])


VOCABULARY: frozenset[str] = _vocabulary()
"""Every fragment the generators here emit (and the CJK words): the fake tokenizer's vocabulary."""

TWO_TOKEN_CHARACTERS: frozenset[str] = frozenset(_RARE_HANZI) | frozenset(e[0] for e in _EMOJI)
"""Characters the fake tokenizer spells in two tokens, as a byte-level tokenizer does a rarer one."""

OPENING_PIECES: frozenset[str] = frozenset([*_SENTENCE_STARTS, *_CJK_WORDS])
"""Pieces the generators start a block with, which the tokenizer never merges into the token before
them (with every piece that starts with ``{``): so blocks joined count as their sum."""


def cjk_fragments(rng: random.Random, count: int, *, emoji_share: float = 0.0) -> list[str]:
    """About ``count`` tokens of CJK prose (Chinese with some kana), starting with a word;
    ``emoji_share`` is the chance that the next thing written is an emoji rather than a character."""
    out: list[str] = [rng.choice(_CJK_WORDS)] if count > 0 else []
    since_punctuation = 0
    while len(out) < count:
        roll = rng.random()
        if roll < emoji_share:
            out.append(rng.choice(_EMOJI))
            continue
        if since_punctuation > rng.randint(6, 18):
            out.append(rng.choice(_CJK_PUNCTUATION))
            since_punctuation = 0
            continue
        since_punctuation += 1
        roll = rng.random()
        if roll < 0.15:
            out.append(rng.choice(_CJK_WORDS))
        elif roll < 0.30:
            out.append(rng.choice(_RARE_HANZI))
        elif roll < 0.42:
            out.append(rng.choice(_KANA))
        else:
            out.append(rng.choice(_HANZI))
    return out[:count]
