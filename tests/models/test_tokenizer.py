"""Our GGUF tokenizer against transformers' reading of the same file, plus streaming decode."""

from __future__ import annotations

import jinja2
import pytest

from toolkit.models.random_init import byte_tokenizer
from toolkit.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world!",
    "What is the capital of France?",
    "  leading spaces   and    runs\n\n\n\ttabs\t\t end  ",
    "12345 + 678 = 1,234,567.89; pi=3.14159e-10, v1.0.0, 2024-06-01",
    "naïve café 日本語のテキスト Ελληνικά русский",
    "emoji 😀👍🏽 flag 🇫🇷 and zwj 👩‍💻",
    "def f(x):\n    return x**2  # square\n\nprint(f(3))\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_start|>b<|endoftext|>c",
    "<repo_name>foo/bar<file_sep>main.py",
    "don't I'll we've THEY'RE you'd",
    "¡Hola! ¿Qué tal? — «quotes» “smart” ‘single’ …",
    "",
    " ",
    "\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?\nExplain  briefly."}],
]


@pytest.fixture(scope="module")
def tok(gguf_ckpt) -> Tokenizer:
    return gguf_ckpt.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_hf(tok, hf_tokenizer, text):
    """Guards against a wrong pre-tokenizer regex, merge parsing or special-token handling:
    the model would then see ids it was never trained on."""
    assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok, text):
    """Guards against lossy decoding (byte-level decoder missing, spaces cleaned up)."""
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_tokens(tok):
    """Guards against control tokens being split into pieces or leaking into decoded text,
    and against wrong bos/eos ids from the metadata."""
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, [2], False)
    assert tok.encode("Hello", add_special_tokens=True) == tok.encode("Hello")  # file says no bos
    assert tok.vocab_size == 49152 and tok.token_to_id("<|im_end|>") == 2


def test_bos_added_only_when_asked(tok):
    """Guards against a double or missing bos when the model wants one."""
    with_bos = Tokenizer(tok.tok, bos_token_id=1, eos_token_ids=[2], add_bos_token=True)
    assert with_bos.encode("Hi", add_special_tokens=True) == [1, *tok.encode("Hi")]
    assert with_bos.encode("Hi") == tok.encode("Hi")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_hf(tok, hf_tokenizer, messages, add_generation_prompt):
    """Guards against template rendering differences (whitespace control, default system
    prompt) that would change the prompt the instruct model sees."""
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_template_raise_exception():
    """Guards against templates that validate roles crashing with an unrelated error."""
    t = Tokenizer(byte_tokenizer().tok, chat_template="{{ raise_exception('bad role') }}")
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        t.apply_chat_template([{"role": "x", "content": ""}])


def test_save_load(tok, tmp_path):
    """Guards against losing the chat template or bos/eos ids when saving a converted checkpoint."""
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert (back.chat_template, back.bos_token_id, back.eos_token_ids, back.add_bos_token) == (
        tok.chat_template, tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


@pytest.mark.parametrize("make", ["smol", "bytes"])
def test_incremental_detokenizer(tok, make):
    """Guards against streamed text differing from the full decode, and against emitting
    half a UTF-8 character (U+FFFD) when a character spans several tokens."""
    t = tok if make == "smol" else byte_tokenizer()
    prompt = t.encode("<|im_start|>assistant\n")
    text = "Sure! 日本語 😀👍🏽 café, x = 42\n  done"
    ids = t.encode(text) + [t.eos_token_ids[0]]
    detok = IncrementalDetokenizer(t, prompt_ids=prompt)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == detok.text == text
    assert not any("\ufffd" in p for p in pieces)
    if make == "bytes":  # 😀 is 4 byte tokens: three held back, then the whole character
        start = text.encode().index("😀".encode())
        assert pieces[start:start + 4] == ["", "", "", "😀"]


def test_incremental_detokenizer_flush():
    """Guards against silently dropping a truncated multi-byte character at the end of generation."""
    t = byte_tokenizer()
    detok = IncrementalDetokenizer(t)
    assert [detok.add(i) for i in "a😀".encode()[:3]] == ["a", "", ""]
    assert detok.flush() == "\ufffd"
