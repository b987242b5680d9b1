"""Hub datasets pinned to a revision: `--dataset_revision` reaches `datasets.load_dataset`, and the
token cache keeps one entry per revision (so a run never reads another revision's tokens). The hub
is not reachable here: a fake `load_dataset` stands in for it and records what it was asked."""
import pytest

from config import ConfigError, TrainConfig
from data import load_texts, load_tokens


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced: every call recorded, each revision's documents different."""
    import datasets

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        revision = kwargs.get("revision") or "main"
        return datasets.Dataset.from_dict({"text": [f"revision {revision} document {i}" for i in range(50)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_dataset_revision_reaches_load_dataset_and_keys_the_token_cache(tmp_path, fake_hub):
    def hub(revision, **extra):
        return TrainConfig(dataset="someone/corpus", dataset_revision=revision, cache_dir=str(tmp_path), **extra)

    tokens_v1, _ = load_tokens(hub("v1"))
    assert [(c["path"], c["revision"], c["streaming"]) for c in fake_hub] == [("someone/corpus", "v1", True)]
    tokens_v2, _ = load_tokens(hub("v2"))
    assert fake_hub[-1]["revision"] == "v2"
    assert list(tokens_v1) != list(tokens_v2)  # the fake's revisions hold different text
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2  # one cache entry per revision

    calls = len(fake_hub)
    again, _ = load_tokens(hub("v1"))  # from the cache: the hub is not asked again
    assert len(fake_hub) == calls and list(again) == list(tokens_v1)

    load_tokens(hub(None))  # no revision: the newest, a third cache entry
    assert fake_hub[-1]["revision"] is None and len(list(tmp_path.glob("tokens-*.npy"))) == 3


def test_trust_remote_code_is_not_passed_to_datasets(fake_hub):
    """datasets 5 dropped loading scripts: given trust_remote_code=True it only logs an error.
    The option is for hub tokenizers; the dataset call never carries it."""
    load_texts(TrainConfig(dataset="someone/corpus", trust_remote_code=True))
    assert "trust_remote_code" not in fake_hub[-1]


def test_a_revision_for_a_local_dataset_is_refused(tmp_path, fake_hub):
    corpus = tmp_path / "small.txt"
    corpus.write_text("some text\n")
    with pytest.raises(ConfigError, match="only hub datasets have revisions"):
        load_texts(TrainConfig(dataset=str(corpus), dataset_revision="v1"))
    assert fake_hub == []
