from lmpipe.data.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tÅngström — ok?"


def test_char_tokenizer_round_trips_and_has_one_token_per_character():
    tok = Tokenizer.build_char([TEXT])
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == len(set(TEXT)) + len(SPECIAL_TOKENS)


def test_bpe_round_trips_unseen_text_through_bytes():
    tok = Tokenizer.train_bpe([TEXT] * 20, vocab_size=300)
    unseen = "Zebra 🦓 quartz!"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert len(tok.encode(TEXT)) < len(TEXT)  # merges happened


def test_special_tokens_are_single_ids_and_skipped_when_decoding():
    tok = Tokenizer.build_char(["ab"])
    ids = tok.encode("a<|eos|>b")
    assert ids == [tok.encode("a")[0], tok.eos_id, tok.encode("b")[0]]
    assert tok.decode(ids) == "ab"
    assert len({tok.special_id(name) for name in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)


def test_hash_identifies_the_tokenizer(tmp_path):
    tok = Tokenizer.build_char(["abc"])
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).hash == tok.hash
    assert Tokenizer.load(tmp_path / "tokenizer.json").hash == tok.hash
    assert Tokenizer.build_char(["abd"]).hash != tok.hash


def test_build_tokenizer_from_a_local_hf_tokenizer_file(tmp_path):
    original = Tokenizer.train_bpe(["hello world"] * 10, vocab_size=280)
    original.save(tmp_path)
    loaded = build_tokenizer({"kind": "hf", "name": str(tmp_path)}, [])
    assert loaded.encode("hello world") == original.encode("hello world")


def test_iter_decode_streams_complete_characters_only():
    tok = Tokenizer.train_bpe(["héllo wörld"] * 10, vocab_size=270)
    pieces = list(tok.iter_decode(tok.encode("héllo wörld")))
    assert "".join(pieces) == "héllo wörld"
    assert all("\ufffd" not in p for p in pieces)
