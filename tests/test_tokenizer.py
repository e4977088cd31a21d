from difflab.world.tokenizer import MAX_LENGTH, build_tokenizer, world_words


def test_every_world_word_is_one_token():
    tok = build_tokenizer()
    for w in world_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_unknown_text_falls_back_to_bytes_and_added_tokens_work():
    tok = build_tokenizer()
    assert tok.unk_token_id not in tok("a zebra!", add_special_tokens=False).input_ids
    tok.add_tokens(["<new1>"])
    assert tok.tokenize("a <new1> shape") == ["a</w>", "<new1>", "shape</w>"]


def test_tokenizer_round_trips(tmp_path):
    from transformers import CLIPTokenizer
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a small red striped star on a white background at the top left"
    assert again(text).input_ids == tok(text).input_ids
    assert again.model_max_length == MAX_LENGTH
