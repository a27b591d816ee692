"""benchmarks/encoders.py on a second encoder's tokenizer: running-text windows, padding, inputs.

A tokenizer built in code in the form all-mpnet-base-v2 ships (``<s>``/``</s>`` around the text,
``<pad>`` = 1, and padding/truncation to 128 switched on inside tokenizer.json, as both MiniLM's and
MPNet's files do).
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import encoders

tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


@pytest.fixture()
def folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {**SPECIAL, **{w: i + len(SPECIAL) for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.enable_padding(length=encoders.SEQ, pad_id=1, pad_token="<pad>")
    tok.enable_truncation(max_length=encoders.SEQ)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def _sentences(n, rng):
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def test_windows_are_running_text_without_padding(folder):
    rng = np.random.default_rng(0)
    sents = _sentences(200, rng)
    win = encoders.text_windows(folder, sents, 4)
    ids = win["input_ids"]
    assert ids.shape == (4, encoders.SEQ)
    assert (ids[:, 0] == SPECIAL["<s>"]).all() and (ids[:, -1] == SPECIAL["</s>"]).all()
    body = ids[:, 1:-1]
    assert not np.isin(body, list(SPECIAL.values())).any()  # no <pad>, no per-sentence <s>/</s>
    # the windows are the sentences' tokens in order
    stream = [WORDS.index(w) + len(SPECIAL) for s in sents for w in s.split()]
    assert body.ravel().tolist() == stream[: body.size]
    assert (win["attention_mask"] == 1).all()


def test_sentences_pad_with_the_tokenizers_own_pad_token(folder):
    rng = np.random.default_rng(1)
    sents = _sentences(5, rng)
    arr = encoders.sentence_arrays(folder, sents)
    for row, mask, s in zip(arr["input_ids"], arr["attention_mask"], sents):
        n = len(s.split()) + 2
        assert mask[:n].all() and not mask[n:].any()
        assert (row[n:] == SPECIAL["<pad>"]).all()
        assert row[0] == SPECIAL["<s>"] and row[n - 1] == SPECIAL["</s>"]


def test_feeds_keep_only_the_models_inputs(folder):
    arr = encoders.sentence_arrays(folder, ["w1 w2"])
    assert set(encoders._keep(arr, ["input_ids", "attention_mask"])) == {"input_ids", "attention_mask"}
    assert set(encoders._keep(arr, None)) == {"input_ids", "attention_mask", "token_type_ids"}
