"""The byte tokenizer: round trips, invalid UTF-8, streaming decode, the chat template."""

from __future__ import annotations

import pytest

from kleave.workers.tokenizer import (
    BOS,
    EOS,
    PAD,
    ByteTokenizer,
    ChatMessage,
    ChatTemplateError,
    IncrementalDecoder,
    parse_chat_messages,
)


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld", "日本語", "emoji 🙂!", "a\nb\tc\x00"])
def test_encode_decode_round_trips(text: str) -> None:
    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(text)
    assert tokens[0] == BOS
    assert tokens[1:] == list(text.encode())
    assert tokenizer.decode(tokens) == text
    assert tokenizer.encode(text, add_bos=False) == list(text.encode())


def test_invalid_utf8_and_unknown_ids_decode_without_raising() -> None:
    tokenizer = ByteTokenizer(vocab_size=320)
    assert tokenizer.decode([0xFF, ord("a")]) == "\ufffda"
    assert tokenizer.decode([0xE6, 0x97]) == "\ufffd"  # a truncated 3-byte character
    assert tokenizer.decode([ord("x"), 300, 319, ord("y")]) == "xy"
    assert tokenizer.decode([BOS, ord("o"), EOS, PAD]) == "o"
    assert tokenizer.decode([BOS, ord("o"), EOS], skip_special=False) == "<|bos|>o<|eos|>"
    assert tokenizer.encode("\ud800") == [BOS, ord("?")]  # a lone surrogate


def test_incremental_decoder_holds_back_partial_characters() -> None:
    decoder = IncrementalDecoder()
    pieces = [decoder.feed(byte) for byte in "é🙂".encode()]
    assert pieces == ["", "é", "", "", "", "🙂"]
    assert decoder.feed(0xF0) == ""
    assert decoder.flush() == "\ufffd"


def test_validate_names_the_field_and_index() -> None:
    tokenizer = ByteTokenizer(vocab_size=320)
    assert tokenizer.validate([1, 2, 319], "prompt") == [1, 2, 319]
    with pytest.raises(ValueError, match=r"prompt\[1\] = 320 is outside"):
        tokenizer.validate([1, 320], "prompt")
    with pytest.raises(ValueError, match=r"prompt\[0\] must be an integer"):
        tokenizer.validate(["a"], "prompt")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least 259"):
        ByteTokenizer(vocab_size=200)


def test_chat_template_layout() -> None:
    tokenizer = ByteTokenizer()
    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    tokens = tokenizer.apply_chat_template(messages)
    assert tokens[0] == BOS
    assert tokenizer.decode(tokens) == (
        "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    )
    with pytest.raises(ChatTemplateError):
        tokenizer.apply_chat_template([])


def test_parse_chat_messages_accepts_text_parts_and_names_bad_fields() -> None:
    parsed = parse_chat_messages(
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert parsed == [ChatMessage("user", "ab"), ChatMessage("assistant", "")]
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.role"):
        parse_chat_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\]\.content\[0\]"):
        parse_chat_messages([{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        parse_chat_messages([])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] must be an object"):
        parse_chat_messages(["hi"])
