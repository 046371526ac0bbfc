"""Free-text first answers (strategy.first_answer: free_text), as the paper's authors ran CM, and
their {answer: [labels]} banks imported (cm-run bank import)."""

import hashlib

import orjson
import polars as pl
import pytest

from runner import load_bank, run_job
from runner.bank import BankError, MemoryBank, UserSplitInfo, estimate_bank, import_answer_table, save_bank
from runner.cli import main
from runner.labels import LabelSet, free_text_key
from runner.spec import SpecError, StrategySpec
from tests.scripted_engine import ScriptedEngine

LABELS = LabelSet.build(["card_arrival", "Refund_not_showing_up", "academia.stackexchange.com", "get_weather"])


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("card_arrival", "card_arrival"),  # the raw name
        ("  Card Arrival. ", "card_arrival"),  # case, spaces, punctuation
        ("card-arrival!", "card_arrival"),
        ("refund not showing up", "Refund_not_showing_up"),
        ("academia", "academia.stackexchange.com"),  # the shown form (site suffix dropped)
        ("academia.stackexchange.com", "academia.stackexchange.com"),
        ("{'get weather'}", "get_weather"),  # the authors' set format: the first quoted value
        ('["card_arrival", "get_weather"]', "card_arrival"),
        ("get weather\nBecause the user asks about rain.", "get_weather"),  # the first line only
        ("the intent is card arrival", None),  # containing a label is not naming it (as the authors parse)
        ("card", None),  # nor is a prefix of one
        ("weather", None),
        ("", None),
    ],
)
def test_free_text_answers_match_a_label_only_by_their_normalised_text(answer, label):
    assert LABELS.match_free_text(answer) == label


def test_descriptions_count_as_a_label_s_text():
    labels = LabelSet.build(["a1", "b2"], {"a1": "Card has not arrived"})
    assert labels.match_free_text("card has NOT arrived.") == "a1"
    assert (
        labels.match_free_text("a1") == "a1"
        and labels.match_free_text("B2.") == "b2"
        and labels.match_free_text("b 2") is None
    )


def test_unmatched_answers_are_keyed_by_their_normalised_text():
    assert free_text_key("  How it  ") == "how it"
    assert free_text_key("{'Delivery_Status.'}") == "delivery status"
    assert (
        free_text_key("I can't tell: it's about 'music'") == "i can t tell it s about music"
    )  # prose keeps its quotes
    assert free_text_key("Report\nmore text") == "report"


def test_free_text_first_answers_are_for_zero_shot():
    assert StrategySpec(first_answer="free_text").first_answer == "free_text"
    with pytest.raises(ValueError, match="first_answer free_text is for zero_shot"):
        StrategySpec(name="chain_of_thought", first_answer="free_text")


SPLIT = UserSplitInfo(path="user.jsonl", fraction=None, seed=0, stratified=False, n_samples=4)


def free_bank() -> MemoryBank:
    pairs = [("alarm", "alarm"), ("wake up", "alarm"), ("wake up", "iot"), ("how it", "music"), (None, "iot")]
    return estimate_bank(
        pairs, ["alarm", "iot", "music"], dataset="toy", model="m", strategy="zero_shot", user_split=SPLIT
    )


def test_bank_rows_beyond_the_labels_survive_save_and_load(tmp_path):
    bank = free_bank()
    assert bank.free_text_answers == ["how it", "wake up"]
    assert bank.rows() == {
        "alarm": ("alarm",),
        "iot": (),
        "music": (),
        "how it": ("music",),
        "wake up": ("alarm", "iot"),
    }
    assert bank.n_unparsed == 1 and bank.matrix() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]  # M over labels only
    save_bank(bank, tmp_path / "bank.json")
    loaded = load_bank(tmp_path / "bank.json", labels=["alarm", "iot", "music"])
    assert loaded == bank and loaded.digest() == bank.digest()
    # a bank without free-text rows keeps the digest banks had before them (so jobs resume on it)
    without = estimate_bank([("alarm", "alarm")], ["alarm"], dataset="t", model="m", strategy="z", user_split=SPLIT)
    before = orjson.dumps({"labels": ["alarm"], "confusions": [{"answer": "alarm", "truth": "alarm", "count": 1}]})
    assert without.digest() == hashlib.sha256(before).hexdigest()
    assert bank.model_copy(update={"free_text_answers": ["how it", "wake up", "x"]}).digest() != bank.digest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw["free_text_answers"].append("alarm"), "are labels"),
        (lambda raw: raw["free_text_answers"].remove("how it"), "'how it' is not in labels"),
        (lambda raw: raw["free_text_answers"].append("wake up"), "not unique"),
    ],
)
def test_free_text_rows_are_checked_on_load(tmp_path, mutate, message):
    raw = free_bank().model_dump()
    mutate(raw)
    path = tmp_path / "bank.json"
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(BankError, match=message):
        load_bank(path)


USER = [  # (text, truth, the model's free-text first answer)
    ("u1", "alarm", "Alarm"),
    ("u2", "iot", "wake up"),  # matches no label: a row of its own
    ("u3", "alarm", "{'wake up'}"),  # ... the same row, written as the authors' set
    ("u4", "music", "music."),
]
CORPUS = [  # (text, gold, free-text first answer, constrained second answer)
    ("c1", "iot", "Wake up!", "iot"),  # the bank saw 'wake up': asked again among {alarm, iot}
    ("c2", "music", "play something", None),  # never seen: empty row, no label to keep
    ("c3", "alarm", "alarm", None),  # a label: its row {alarm}
]


@pytest.fixture
def free_job(toy_job):
    def make(extra: str = ""):
        spec = toy_job(
            [(t, y) for t, y, _ in USER],
            [(t, y) for t, y, *_ in CORPUS],
            labels=["alarm", "iot", "music"],
            extra="strategy: {name: zero_shot, first_answer: free_text}\n" + extra,
        )
        free = {t: a for t, _, a in USER} | {t: a for t, _, a, _ in CORPUS}
        engine = ScriptedEngine({}, {t: s for t, _, _, s in CORPUS if s}, n_labels=3, free_text=free)
        return spec, engine

    return make


async def test_unmatched_answers_go_through_estimate_and_annotate(free_job, tmp_path):
    spec, engine = free_job()
    await run_job(spec, engine=engine)
    bank = load_bank(tmp_path / "out/memory_bank.json")
    assert bank.free_text_answers == ["wake up"]
    assert bank.rows() == {"alarm": ("alarm",), "iot": (), "music": ("music",), "wake up": ("alarm", "iot")}
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table["y_prime"].to_list() == ["wake up", "play something", "alarm"]
    assert table["candidates"].to_list() == [["alarm", "iot"], [], ["alarm"]]
    assert table["y_hat"].to_list() == ["iot", None, "alarm"]
    assert table["fallback"].to_list() == [None, "empty_row", None]
    assert table["calls"].to_list() == [2, 1, 1]
    firsts = [r for r in engine.requests if not r.choices]
    seconds = [r for r in engine.requests if r.choices]
    assert len(firsts) == 4 + 3 and firsts[0].max_tokens == spec.generation.max_tokens
    assert [r.choices for r in seconds] == [("alarm", "iot")]  # the second call stays constrained to C


async def test_a_free_text_job_annotates_with_a_saved_bank_and_without_cm(free_job, tmp_path):
    spec, engine = free_job()
    await run_job(spec, engine=engine)
    saved = tmp_path / "saved.json"
    save_bank(load_bank(tmp_path / "out/memory_bank.json"), saved)
    (tmp_path / "out").rename(tmp_path / "first")
    spec, engine = free_job(f"cm: {{bank: {saved}}}")
    await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table["y_hat"].to_list() == ["iot", None, "alarm"] and len(engine.requests) == 3 + 1  # no estimate
    (tmp_path / "out").rename(tmp_path / "second")
    spec, engine = free_job("cm: {enabled: false, accept: null}")
    await run_job(spec, engine=engine)
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table["y_prime"].to_list() == ["wake up", "play something", "alarm"]
    assert table["y_hat"].to_list() == [None, None, "alarm"]  # plain: an answer naming no label is wrong


async def test_abstain_and_posterior_variants_take_free_text_answers(free_job, tmp_path):
    spec, engine = free_job("cm: {variant: counts, second_call: never, tau: 0.5, accept: null}")
    await run_job(spec, engine=engine)  # p(Y'|Y) is over labels: a free-text answer says nothing
    table = pl.read_parquet(tmp_path / "out/annotations.parquet").sort("id")
    assert table["y_prime"].to_list()[0] == "wake up" and table["y_hat"].to_list()[2] == "alarm"


AUTHORS = {  # their format: {answer: [truths]}, answers lower-cased free text or labels
    "alarm": ["alarm", "iot"],
    "how it": ["music"],
    "Wake Up": ["alarm"],
    "music": ["music"],
}


def test_import_reads_the_authors_table(tmp_path):
    path = tmp_path / "Memory_Masking_toy_0.05_0.7_1.json"
    path.write_bytes(orjson.dumps(AUTHORS))
    bank = import_answer_table(path, LabelSet.build(["alarm", "iot", "music", "news"]))
    assert bank.labels == ["alarm", "iot", "music", "news"] and bank.free_text_answers == ["how it", "wake up"]
    assert bank.rows()["alarm"] == ("alarm", "iot") and bank.rows()["wake up"] == ("alarm",)
    assert bank.counts[("alarm", "iot")] == 1 and bank.n_samples == 5 and bank.strategy == "imported"
    alone = import_answer_table(path)  # without a job: the truths as written are the labels
    assert alone.labels == ["alarm", "iot", "music"]


def test_import_names_the_answer_and_label_that_fit_no_job_label(tmp_path):
    path = tmp_path / "authors.json"
    path.write_bytes(orjson.dumps({"alarm": ["alarm"], "weather": ["weather_query"]}))
    with pytest.raises(BankError, match="answer 'weather' lists truth 'weather_query', which is not one"):
        import_answer_table(path, LabelSet.build(["alarm", "iot"]))
    path.write_bytes(orjson.dumps({"alarm": "alarm"}))
    with pytest.raises(BankError, match="mapping each answer to a list of label names"):
        import_answer_table(path)
    path.write_bytes(b"{")
    with pytest.raises(BankError, match="not valid JSON"):
        import_answer_table(path)


def test_import_strips_the_authors_file_suffix(tmp_path):
    path = tmp_path / "stack.json"
    path.write_bytes(orjson.dumps({"academia.stackexchange.com.txt": ["academia.stackexchange.com.txt"]}))
    bank = import_answer_table(path, LabelSet.build(["academia.stackexchange.com"]), strip_suffix=".txt")
    assert bank.rows() == {"academia.stackexchange.com": ("academia.stackexchange.com",)}


def test_cli_imports_checks_against_a_spec_and_shows_free_text_rows_apart(toy_job, tmp_path, capsys):
    spec = toy_job([("u1", "alarm"), ("u2", "iot"), ("u3", "music")], [("c1", "alarm")])
    spec_path = tmp_path / "job.yaml"
    table = tmp_path / "authors.json"
    table.write_bytes(orjson.dumps(AUTHORS))
    bank_path = tmp_path / "imported.json"
    assert main(["bank", "import", str(table), "-o", str(bank_path), "--spec", str(spec_path)]) == 0
    assert load_bank(bank_path, labels=list(spec.dataset.labels or ["alarm", "iot", "music"])).free_text_answers
    capsys.readouterr()
    assert main(["bank", "show", str(bank_path)]) == 0
    out = capsys.readouterr().out
    head, free = out.split("free-text answers matching no label: 2 rows, 2 samples")
    assert "answer 'alarm' -> truth alarm (1), iot (1)" in head and "how it" not in head
    assert "answer 'how it' -> truth music (1)" in free and "answer 'wake up' -> truth alarm (1)" in free
    table.write_bytes(orjson.dumps({"alarm": ["news"]}))
    assert main(["bank", "import", str(table), "-o", str(bank_path), "--spec", str(spec_path)]) == 2
    assert "answer 'alarm' lists truth 'news'" in capsys.readouterr().err


def test_spec_error_is_raised_for_free_text_with_another_strategy(write):
    from runner import load_spec

    path = write(
        "bad.yaml",
        "name: x\ndataset: {name: t}\nuser_split: {path: u.jsonl}\ncorpus: {path: c.jsonl}\n"
        "output: {dir: o}\nstrategy: {name: few_shot, first_answer: free_text}\n",
    )
    with pytest.raises(SpecError, match="first_answer free_text is for zero_shot"):
        load_spec(path)
