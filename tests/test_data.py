"""chargpt.data: tokenizer, split, batches and the cached, verified download."""

import io
import urllib.error

import pytest
import torch

from chargpt import ChargptError, data

from chargpt_helpers import require_corpus, small_text


def test_tokenizer_round_trip():
    text = "Hello, world!\nÀ bientôt — ça va? 🙂"
    tok = data.CharTokenizer.from_text(text)
    assert len(tok) == len(set(text))
    assert tok.vocab == "".join(sorted(set(text)))
    assert tok.decode(tok.encode(text)) == text
    assert data.CharTokenizer(tok.vocab).encode(text) == tok.encode(text)  # the stored vocab rebuilds it
    assert tok.unknown_chars("Hex!") == ["x"]


def test_tiny_shakespeare_split_sizes():
    text = data.load_text(require_corpus())
    ds = data.Dataset(text, block_size=256)
    assert len(ds.tokenizer) == 65
    assert (len(ds.train), len(ds.val)) == (1_003_854, 111_540)
    assert ds.tokenizer.decode(ds.val[:5].tolist()) == text[1_003_854:1_003_859]  # split by position


def test_batches_are_next_character_windows():
    ds = data.Dataset(small_text(), block_size=16)
    x, y = ds.batch("train", 8, seed=1, device=torch.device("cpu"))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = ds.batch("train", 8, seed=1, device=torch.device("cpu"))
    x3, _ = ds.batch("train", 8, seed=2, device=torch.device("cpu"))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    xv, _ = ds.batch("val", 8, seed=1, device=torch.device("cpu"))
    assert int(xv.max()) < len(ds.tokenizer)


def test_batch_seeds_are_distinct():
    seeds = {data.batch_seed(1337, split, it, rank) for split in range(2) for it in range(100) for rank in range(2)}
    assert len(seeds) == 400


@pytest.mark.parametrize("text, message", [("", "empty"), ("abc" * 20, "too short")])
def test_unusable_text_is_rejected(tmp_path, text, message):
    path = tmp_path / "input.txt"
    path.write_text(text)
    with pytest.raises(ChargptError, match=message):
        data.Dataset(data.load_text(path), block_size=16)


def test_download_is_verified_and_cached(tmp_path, monkeypatch):
    corpus = require_corpus().read_bytes()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_urlopen(url, timeout):
        calls.append(url)
        return io.BytesIO(corpus)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    path = data.tiny_shakespeare_path()
    assert path.read_bytes() == corpus and calls == [data.TINY_SHAKESPEARE_URL]
    assert data.tiny_shakespeare_path() == path and len(calls) == 1  # the second call reads the cache
    path.write_bytes(b"damaged")
    data.tiny_shakespeare_path()
    assert len(calls) == 2 and path.read_bytes() == corpus  # a damaged cache is fetched again


def test_offline_download_says_to_pass_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(ChargptError, match="pass --data"):
        data.load_text()
    assert not list(tmp_path.rglob("*.txt"))
