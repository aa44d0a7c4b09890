"""Datasets: the embedded corpus, a folder of text, and prepared tfds datasets by name."""

import errno
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm.data import DataError, build_dataset
from lm.data.sources import SplitCorpus, open_corpus, prepared_corpus, unit_hash

from .conftest import data_config


def ids(corpus, split):
    source = corpus.source(split)
    return [r["id"].decode() for r in source.__getitems__(range(len(source)))]


def test_stdlib_builds_offline_with_a_stable_disjoint_split(data_dir, tmp_path):
    first = open_corpus(data_config(data_dir).data)
    second = open_corpus(data_config(tmp_path).data)  # a fresh build elsewhere
    train, held_out = ids(first, "train"), ids(first, "validation")
    assert first.name.startswith("lm_stdlib/py3.") and first.eval_split == "validation"
    assert not set(train) & set(held_out)
    assert all("test" not in key.split("/") and not key.startswith("site-packages") for key in train)
    assert 0.01 < len(held_out) / (len(train) + len(held_out)) < 0.05
    assert ids(second, "train") == train and ids(second, "validation") == held_out
    meta = first.builder.info.metadata
    assert meta["validation"]["documents"] == len(held_out) and meta["train"]["bytes"] > 5_000_000


def write_folder(root):
    root.mkdir()
    (root / "a.txt").write_text("first document, plain text\n" * 20)
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("второй документ\n" * 20)
    lines = [json.dumps({"text": f"json document {i} " * 10, "meta": i}) for i in range(60)]
    (root / "c.jsonl").write_text("\n".join(lines[:30]) + "\n\n" + "\n".join(lines[30:]) + "\n")
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.md").write_text("not a corpus file")


def test_folder_reads_txt_and_jsonl(tmp_path):
    write_folder(tmp_path / "text")
    c = data_config(tmp_path / "data", dataset="folder", text_dir=str(tmp_path / "text"))
    corpus = open_corpus(c.data)
    keys = ids(corpus, "train") + ids(corpus, "validation")
    assert sorted(keys) == sorted(["a.txt", "sub/b.txt"] + [f"c.jsonl:{n}" for n in
                                                            [*range(1, 31), *range(32, 62)]])
    assert ids(corpus, "validation")
    c.data.batch_size = 2
    ds = build_dataset(c)
    assert ds.info["train"]["documents"] + ds.info["eval"]["documents"] == 62
    texts = corpus.texts(corpus.source("train"), range(len(corpus.source("train"))))
    assert "второй документ\n".encode() * 20 in texts


def test_changed_folder_is_rebuilt(tmp_path):
    write_folder(tmp_path / "text")
    c = data_config(tmp_path / "data", dataset="folder", text_dir=str(tmp_path / "text"))
    before = open_corpus(c.data)
    (tmp_path / "text" / "d.txt").write_text("a new document\n")
    after = open_corpus(c.data)
    assert after.name != before.name
    assert "d.txt" in ids(after, "train") + ids(after, "validation")


def test_local_corpora_leave_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """tfds makes an empty temp dir for each unprepared builder (its bucket lookup); ours skip it."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    write_folder(tmp_path / "text")
    c = data_config(tmp_path / "data", dataset="folder", text_dir=str(tmp_path / "text"))
    assert prepared_corpus(c.data) is None
    open_corpus(c.data)
    assert list(scratch.iterdir()) == []


def test_folder_errors(tmp_path):
    c = data_config(tmp_path / "data", dataset="folder", text_dir=str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"text_dir = '.*missing' is not a folder"):
        open_corpus(c.data)
    (tmp_path / "empty").mkdir()
    c.data.text_dir = str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"text_dir = '.*empty' has no .txt or .jsonl files"):
        open_corpus(c.data)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    c.data.text_dir = str(bad)
    with pytest.raises(DataError, match=r"bad/x.jsonl:2: not valid JSON"):
        open_corpus(c.data)
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad/x.jsonl:2: expected a JSON object with a string field 'text'"):
        open_corpus(c.data)
    (bad / "x.jsonl").unlink()
    (bad / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"bad/latin1.txt: not valid UTF-8 at byte 3"):
        open_corpus(c.data)


class LmTestSentences(SplitCorpus):
    """A tiny registered tfds dataset shaped like lm1b: a "sentence" feature, train and test splits."""

    name = "lm_test_sentences"

    def _documents(self):
        return ((f"s{i}", f"sentence number {i} of the test set. " * 4) for i in range(200))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"sentence": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._sentences(range(0, 180)), "test": self._sentences(range(180, 200))}

    def _sentences(self, numbers):
        for key, text in self._documents():
            if int(key[1:]) in numbers:
                yield key, {"sentence": text}


def test_prepared_tfds_dataset_by_name(tmp_path):
    LmTestSentences(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    c = data_config(tmp_path, dataset="lm_test_sentences:1.0.0", text_key="sentence")
    ds = build_dataset(c)
    assert ds.info["eval"]["split"] == "test" and ds.info["eval"]["documents"] == 20
    assert ds.info["train"]["documents"] == 180
    assert "sentence" in ds.tokenizer.decode(ds.train_batch(0).reshape(-1))
    c.data.text_key = "text"
    with pytest.raises(DataError, match=r"text_key = 'text' is not a feature .*\['sentence'\]"):
        build_dataset(c)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    c = data_config(tmp_path, dataset="lm1b")
    with pytest.raises(DataError) as e:
        build_dataset(c)
    message = str(e.value)
    assert "'lm1b' is not prepared in" in message and "\n" not in message
    assert f"`python -m lm.data.prepare --dataset=lm1b --data_dir={tmp_path}`" in message
    assert "pip install -e '.[prepare]'" in message and f"or copy {tmp_path / 'lm1b'} from" in message
    with pytest.raises(DataError, match=r"'no such/name!' is not a dataset name"):
        build_dataset(data_config(tmp_path, dataset="no such/name!"))


def test_prepare_says_what_to_install_without_tensorflow(tmp_path, monkeypatch):
    """tfds's lm1b builder reads its download with tf.io.gfile: without TensorFlow, one line that
    names the extra, before anything is downloaded."""
    from lm.data import sources

    monkeypatch.setattr(sources, "has_tensorflow", lambda: False)
    with pytest.raises(DataError) as e:
        sources.prepare("lm1b", tmp_path)
    assert "preparing 'lm1b' needs TensorFlow" in str(e.value) and "\n" not in str(e.value)
    assert "pip install -e '.[prepare]'" in str(e.value) and not any(tmp_path.iterdir())
    with pytest.raises(DataError, match="'no_such_dataset' is not a tfds dataset"):
        sources.prepare("no_such_dataset", tmp_path)


def test_prepare_builds_a_tfds_dataset_for_training(tmp_path, monkeypatch):
    from lm.data import sources

    monkeypatch.setattr(sources, "has_tensorflow", lambda: False)  # this builder does not need it
    sources.prepare("lm_test_sentences", tmp_path)
    ds = build_dataset(data_config(tmp_path, dataset="lm_test_sentences", text_key="sentence"))
    assert ds.info["train"]["documents"] == 180


def test_a_read_only_data_dir_is_one_data_error(tmp_path, monkeypatch):
    """Tests run as root, for whom permissions do not block writes: the refusal is simulated."""
    from lm.data import sources

    def read_only(path):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path) + ".lock")

    monkeypatch.setattr(sources, "file_lock", read_only)
    with pytest.raises(DataError) as e:
        build_dataset(data_config(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{tmp_path}/lm_stdlib.build.lock: Read-only file system (writing dataset "
                              "lm_stdlib/") and "must be a writable folder" in message, message


def test_small_folder_still_holds_out_a_document(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    keys = ["one.txt", "two.txt"]
    assert min(map(unit_hash, keys)) > 0.025  # the fallback rule, not the hash rule, applies
    for key in keys:
        (folder / key).write_text(f"{key} " * 200)
    corpus = open_corpus(data_config(tmp_path / "data", dataset="folder", text_dir=str(folder)).data)
    assert ids(corpus, "validation") == [min(keys, key=unit_hash)]
    assert np.array_equal(sorted(ids(corpus, "train")), [max(keys, key=unit_hash)])
