import polars as pl
import pytest

from runner.data import Corpus, DataError, load_user_split, sample_user_split
from runner.spec import CorpusSpec, DatasetSpec, UserSplitSpec

DATASET = DatasetSpec(name="toy")


def test_stratified_user_split_keeps_every_label(data_dir):
    split = load_user_split(data_dir / "banking77/train.jsonl", DATASET, UserSplitSpec(path="x", fraction=0.01, seed=0))
    assert len(split.labels) == 77
    assert set(split.rows["label"].unique()) == set(split.labels)  # 1% still covers all 77 intents
    assert 77 <= split.rows.height <= 160
    again = load_user_split(data_dir / "banking77/train.jsonl", DATASET, UserSplitSpec(path="x", fraction=0.01))
    assert again.rows["id"].to_list() == split.rows["id"].to_list()  # the seed makes it repeatable


def test_a_drawn_split_keeps_the_pools_label_counts_for_the_weights(write):
    rows = [f'{{"text": "t{i}", "label": "{"a" if i < 18 else "b"}"}}' for i in range(20)]
    path = write("pool.jsonl", "\n".join(rows) + "\n")
    drawn = load_user_split(path, DATASET, UserSplitSpec(path="pool.jsonl", fraction=0.1))
    assert drawn.pool_label_counts == {"a": 18, "b": 2}
    assert drawn.rows["label"].value_counts().sort("label")["count"].to_list() == [2, 1]  # round(0.2) -> 1
    whole = load_user_split(path, DATASET, UserSplitSpec(path="pool.jsonl", fraction=None))
    assert whole.pool_label_counts is None  # the file is the split, nothing was drawn: weights 1


def test_fraction_per_label_and_seed_changes_the_draw():
    pool = pl.DataFrame({"id": [str(i) for i in range(200)], "text": ["t"] * 200, "label": ["a"] * 100 + ["b"] * 100})
    first = sample_user_split(pool, 0.05, seed=0, stratified=True)
    assert first["label"].value_counts().sort("label")["count"].to_list() == [5, 5]
    other = sample_user_split(pool, 0.05, seed=1, stratified=True)
    assert first["id"].to_list() != other["id"].to_list()
    assert sample_user_split(pool, 0.05, seed=0, stratified=False).height == 10
    assert sample_user_split(pool, None, seed=0, stratified=True).height == 200


def test_corpus_limit_is_a_seeded_sample_in_file_order(data_dir):
    corpus = Corpus(
        data_dir / "massive/en-US/test.jsonl",
        DatasetSpec(name="m", id_column="id"),
        CorpusSpec(path="x", limit=50, limit_seed=3),
        labels=None,
    )
    assert corpus.height == 50 and corpus.has_gold
    rows = pl.concat([rows for _, rows in corpus.chunks(20)])
    assert [n for n, _ in corpus.chunks(20)] == [0, 1, 2]
    assert rows["id"].n_unique() == 50
    assert len({r["label"] for r in rows.iter_rows(named=True)}) > 3  # not one class from a sorted file


def test_rows_without_id_column_are_numbered(write):
    path = write("c.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    corpus = Corpus(path, DATASET, CorpusSpec(path="c.jsonl"), labels=["x", "y"])
    rows = next(corpus.chunks(10))[1]
    assert rows["id"].to_list() == ["0", "1"] and not corpus.has_gold


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"text": "a", "label": "x"}\n{"text": "", "label": "y"}\n', r"empty or null text, e.g. id \['1'\]"),
        ('{"text": "a", "label": "x"}\n{"text": null, "label": "y"}\n', "empty or null text"),
        (
            '{"id": "1", "text": "a", "label": "x"}\n{"id": "1", "text": "b", "label": "y"}\n',
            r"duplicate ids, e.g. \['1'\]",
        ),
        (
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "zzz"}\n',
            "row id 1 has label 'zzz', not in the label set",
        ),
        ('{"txt": "a", "label": "x"}\n', r"no column 'text' \(dataset.text_column\)"),
    ],
)
def test_bad_corpus_rows_are_named(write, body, message):
    path = write("c.jsonl", body)
    dataset = DatasetSpec(name="toy", id_column="id") if '"id"' in body else DATASET
    with pytest.raises(DataError, match=message) as error:
        Corpus(path, dataset, CorpusSpec(path="c.jsonl"), labels=["x", "y"])
    assert str(path) in str(error.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        Corpus(tmp_path / "none.jsonl", DATASET, CorpusSpec(path="x"), labels=None)
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        Corpus(tmp_path / "c.xlsx", DATASET, CorpusSpec(path="x"), labels=None)


def test_user_split_needs_labels(write):
    path = write("u.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match="row id 1 has no label"):
        load_user_split(path, DATASET, UserSplitSpec(path="u.jsonl"))


def test_csv_and_parquet_read_alike(tmp_path):
    table = pl.DataFrame({"q": ["hi", "yo", "hey"], "y": ["a", "b", "a"]})
    table.write_csv(tmp_path / "u.csv")
    table.write_parquet(tmp_path / "u.parquet")
    dataset = DatasetSpec(name="t", text_column="q", label_column="y")
    for name in ("u.csv", "u.parquet"):
        split = load_user_split(tmp_path / name, dataset, UserSplitSpec(path=name, fraction=None))
        assert split.labels == ("a", "b") and split.rows["text"].to_list() == ["hi", "yo", "hey"]
