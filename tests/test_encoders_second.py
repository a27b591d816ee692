"""benchmarks/encoders.py on a second encoder's tokenizer: running-text windows, padding, inputs.

A tokenizer.json written here in the form all-mpnet-base-v2 ships it (``<s>``/``</s>`` around the
text, ``<pad>`` = 1, and padding/truncation to 128 switched on inside the file, as both MiniLM's and
MPNet's files do: the windows were 79% ``<pad>`` when the benchmark kept that padding).

Each test runs on the ``tokenizers`` package when it is installed (a dev tool: it is not in the
``test`` extra, since it pulls in huggingface_hub and a dozen more packages), and always on
:class:`StandInTokenizer`, a stand-in of the few ``tokenizers.Tokenizer`` calls the benchmark makes
(word-level vocabulary, whitespace split, ``<s>``/``</s>`` around each text, the file's padding and
truncation until switched off), so that CI guards the padding bug without the package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from benchmarks import encoders

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}

#: tokenizer.json as ``tokenizers`` 0.23 saves a WordLevel tokenizer with RobertaProcessing and
#: fixed padding/truncation to ``encoders.SEQ`` (checked against the package when it is installed)
TOKENIZER_JSON = {
    "version": "1.0",
    "truncation": {"direction": "Right", "max_length": encoders.SEQ, "strategy": "LongestFirst", "stride": 0},
    "padding": {"strategy": {"Fixed": encoders.SEQ}, "direction": "Right", "pad_to_multiple_of": None,
                "pad_id": SPECIAL["<pad>"], "pad_type_id": 0, "pad_token": "<pad>"},
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "WhitespaceSplit"},
    "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", SPECIAL["</s>"]], "cls": ["<s>", SPECIAL["<s>"]],
                       "trim_offsets": True, "add_prefix_space": True},
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": {**SPECIAL, **{w: i + len(SPECIAL) for i, w in enumerate(WORDS)}},
              "unk_token": "<unk>"},
}


@dataclasses.dataclass
class _Encoding:
    ids: list[int]
    attention_mask: list[int]
    type_ids: list[int]


class StandInTokenizer:
    """The calls of ``tokenizers.Tokenizer`` that benchmarks/encoders.py makes, on a file of the
    form of :data:`TOKENIZER_JSON` (anything else is refused, not guessed)."""

    def __init__(self, spec: dict) -> None:
        assert spec["model"]["type"] == "WordLevel" and spec["pre_tokenizer"] == {"type": "WhitespaceSplit"}
        assert spec["post_processor"]["type"] == "RobertaProcessing"
        self.vocab = spec["model"]["vocab"]
        self.unk = self.vocab[spec["model"]["unk_token"]]
        self.cls = spec["post_processor"]["cls"][1]
        self.sep = spec["post_processor"]["sep"][1]
        pad = spec.get("padding")
        self.padding = None if pad is None else {"length": pad["strategy"]["Fixed"], "pad_id": pad["pad_id"],
                                                 "pad_token": pad["pad_token"], "pad_type_id": pad["pad_type_id"]}
        trunc = spec.get("truncation")
        self.truncation = None if trunc is None else {"max_length": trunc["max_length"]}

    @classmethod
    def from_file(cls, path: str) -> StandInTokenizer:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    def enable_padding(self, *, length: int, pad_id: int, pad_token: str) -> None:
        self.padding = {"length": length, "pad_id": pad_id, "pad_token": pad_token, "pad_type_id": 0}

    def no_padding(self) -> None:
        self.padding = None

    def enable_truncation(self, max_length: int) -> None:
        self.truncation = {"max_length": max_length}

    def no_truncation(self) -> None:
        self.truncation = None

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        ids = [self.vocab.get(w, self.unk) for w in text.split()]
        extra = 2 if add_special_tokens else 0
        if self.truncation is not None:
            ids = ids[: self.truncation["max_length"] - extra]
        if add_special_tokens:
            ids = [self.cls, *ids, self.sep]
        mask = [1] * len(ids)
        if self.padding is not None and len(ids) < self.padding["length"]:
            pad = self.padding["length"] - len(ids)
            ids, mask = ids + [self.padding["pad_id"]] * pad, mask + [0] * pad
        return _Encoding(ids, mask, [0] * len(ids))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[_Encoding]:
        return [self.encode(t, add_special_tokens) for t in texts]


BACKENDS = [pytest.param("tokenizers", marks=pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                                                  reason="the tokenizers package is not installed")),
            "stand-in"]


@pytest.fixture(params=BACKENDS)
def folder(request, tmp_path, monkeypatch):
    """A folder with tokenizer.json, read by the real package or (``stand-in``) by
    :class:`StandInTokenizer` in its place."""
    (tmp_path / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON), encoding="utf-8")
    if request.param == "stand-in":
        monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=StandInTokenizer))
    return tmp_path


def _sentences(n, rng):
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def test_the_file_pads_every_text_until_told_not_to(folder):
    """What the bug fed on: read as it is, the file pads each sentence to 128 tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.padding["pad_id"] == SPECIAL["<pad>"] and tok.padding["pad_token"] == "<pad>"
    (enc,) = tok.encode_batch(["w1 w2"], add_special_tokens=False)
    assert len(enc.ids) == encoders.SEQ and enc.ids[:3] == [5, 6, SPECIAL["<pad>"]] and sum(enc.attention_mask) == 2
    assert tok.encode("w1").ids[:4] == [SPECIAL["<s>"], 5, SPECIAL["</s>"], SPECIAL["<pad>"]]


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
    assert arr["input_ids"].shape == (5, encoders.SEQ)
    for row, mask, s in zip(arr["input_ids"], arr["attention_mask"], sents):
        n = len(s.split()) + 2
        assert mask[:n].all() and not mask[n:].any()
        assert (row[n:] == SPECIAL["<pad>"]).all()
        assert row[0] == SPECIAL["<s>"] and row[n - 1] == SPECIAL["</s>"]


def test_feeds_keep_only_the_models_inputs(folder):
    arr = encoders.sentence_arrays(folder, ["w1 w2"])
    assert set(encoders._keep(arr, ["input_ids", "attention_mask"])) == {"input_ids", "attention_mask"}
    assert set(encoders._keep(arr, None)) == {"input_ids", "attention_mask", "token_type_ids"}
    assert encoders._keep(arr, ["input_ids"])["input_ids"] is arr["input_ids"]
