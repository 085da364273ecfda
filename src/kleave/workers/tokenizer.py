"""A byte-level tokenizer for the bundled models: ids 0-255 are bytes, then BOS, EOS and PAD.

The bundled models have random (or locally trained) weights and no vocabulary of their own, so
bytes are the only tokenization that round-trips every string without a vocabulary file and
needs nothing downloaded. Ids past PAD exist in the model's vocabulary (it is padded to a round
size) but mean nothing; a randomly initialised model still samples them, so decoding skips them
instead of failing. Text is decoded incrementally, because one UTF-8 character may span several
tokens of a stream: a partial character is held back until its last byte arrives, and bytes that
can never form a character come out as U+FFFD instead of raising.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

BYTE_TOKENS = 256
BOS = 256
EOS = 257
PAD = 258
SPECIAL_TOKENS = {"<|bos|>": BOS, "<|eos|>": EOS, "<|pad|>": PAD}
MIN_VOCAB = 259

CHAT_ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(ValueError):
    """A chat message the template cannot render; the message names the offending field."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class IncrementalDecoder:
    """Turns a token stream into text pieces without splitting a multi-byte character."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """The text completed by `token` ("" while a character is still partial)."""
        if 0 <= token < BYTE_TOKENS:
            return str(self._utf8.decode(bytes((token,))))
        return ""

    def flush(self) -> str:
        """What is left at the end of the stream: a dangling partial character as U+FFFD."""
        return str(self._utf8.decode(b"", final=True))


class ByteTokenizer:
    """UTF-8 bytes as tokens; `vocab_size` is the model's, which may exceed the tokenizer's."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = PAD

    def __init__(self, vocab_size: int = MIN_VOCAB) -> None:
        if vocab_size < MIN_VOCAB:
            raise ValueError(
                f"a byte tokenizer needs a vocabulary of at least {MIN_VOCAB} ids "
                f"(256 bytes + BOS, EOS, PAD); the model has {vocab_size}"
            )
        self.vocab_size = vocab_size

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; lone surrogates (unencodable in UTF-8) become U+FFFD."""
        data = text.encode("utf-8", errors="replace")
        return ([BOS] if add_bos else []) + list(data)

    def decode(self, tokens: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of `tokens`; invalid UTF-8 becomes U+FFFD, ids past PAD are dropped."""
        parts: list[str] = []
        decoder = IncrementalDecoder()
        names = {value: name for name, value in SPECIAL_TOKENS.items()}
        for token in tokens:
            if not skip_special and token in names:
                parts.append(decoder.flush())
                parts.append(names[token])
                continue
            parts.append(decoder.feed(token))
        parts.append(decoder.flush())
        return "".join(parts)

    def validate(self, tokens: Sequence[int], field: str) -> list[int]:
        """Check caller-supplied token ids against the model's vocabulary."""
        out: list[int] = []
        for index, token in enumerate(tokens):
            if isinstance(token, bool) or not isinstance(token, int):
                raise ValueError(f"{field}[{index}] must be an integer token id, not {token!r}")
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"{field}[{index}] = {token} is outside the vocabulary [0, {self.vocab_size})"
                )
            out.append(token)
        return out

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """BOS, then ``<|role|>\\ncontent<|end|>\\n`` per message, then ``<|assistant|>\\n``.

        A plain-text template: the byte vocabulary has no role tokens, and a fixed, readable
        layout is all a model trained (or randomly initialised) on bytes can rely on.
        """
        if not messages:
            raise ChatTemplateError("messages must contain at least one message")
        text = "".join(f"<|{m.role}|>\n{m.content}<|end|>\n" for m in messages)
        return self.encode(text + "<|assistant|>\n")


def parse_chat_messages(raw: object) -> list[ChatMessage]:
    """OpenAI chat `messages` (string content or a list of text parts) as ChatMessages."""
    if not isinstance(raw, list) or not raw:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    messages: list[ChatMessage] = []
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, Mapping):
            raise ChatTemplateError(f"{where} must be an object with role and content")
        role = item.get("role")
        if role not in CHAT_ROLES:
            raise ChatTemplateError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}")
        messages.append(ChatMessage(str(role), _content_text(item.get("content"), where)))
    return messages


def _content_text(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for index, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise ChatTemplateError(
                    f"{where}.content[{index}] must be a text part "
                    '({"type": "text", "text": ...}): the bundled models read text only'
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ChatTemplateError(f"{where}.content must be a string or a list of text parts")
