from collections import Counter

import orjson
import pytest

from runner.bank import (
    BankError,
    UserSplitInfo,
    binary_matrix,
    candidate_set,
    count_confusions,
    estimate_bank,
    load_bank,
    p_answer_given_truth,
    refine,
    save_bank,
)

LABELS = ["1", "2", "3", "4"]
SPLIT = UserSplitInfo(path="train.jsonl", fraction=0.05, seed=0, stratified=True, n_samples=4)


def make_bank(pairs, labels=LABELS):
    return estimate_bank(pairs, labels, dataset="toy", model="toy-model", strategy="zero_shot", user_split=SPLIT)


def test_paper_appendix_example():
    """Appendix 8.1: four user samples, LLM answers Y' = (4, 2, 4, 1) for truths Y = (1, 1, 3, 4).

    Each (Y', Y) pair sets M[Y', Y] = 1. (The matrix printed in the appendix also has ones on
    the diagonal and swaps rows 3 and 4; the definition in Section 3.1 gives this one.)
    """
    answers, truths = ["4", "2", "4", "1"], ["1", "1", "3", "4"]
    counts = count_confusions(zip(answers, truths, strict=True))
    assert binary_matrix(counts, LABELS) == [
        [0, 0, 0, 1],  # answered 1: the truth was 4
        [1, 0, 0, 0],  # answered 2: the truth was 1
        [0, 0, 0, 0],  # never answered 3
        [1, 0, 1, 0],  # answered 4: the truth was 1 or 3
    ]
    # "If the LLM generates response Y' = k, the candidate set is the k-th row of M."
    assert candidate_set(counts, LABELS, "1") == ("4",)
    assert candidate_set(counts, LABELS, "4") == ("1", "3")
    assert candidate_set(counts, LABELS, "3") == ()


def test_counts_give_empirical_p_answer_given_truth():
    counts = count_confusions([("a", "a"), ("a", "a"), ("b", "a"), ("b", "b")])
    p = p_answer_given_truth(counts, ["a", "b"])
    assert p == [[2 / 3, 0.0], [1 / 3, 1.0]]  # p[k'][k]; each truth's column sums to 1
    assert sum(row[0] for row in p) == pytest.approx(1.0)


def test_refine_single_candidate_needs_no_second_call():
    refined = refine(("b",), "a")
    assert refined.decided == "b" and not refined.needs_second_call and refined.fallback is None


def test_refine_several_candidates_asks_again():
    refined = refine(("a", "c"), "a")
    assert refined.needs_second_call and refined.decided is None and refined.candidates == ("a", "c")


def test_refine_empty_row_keeps_the_answer_or_abstains():
    kept = refine((), "a", "keep_initial")
    assert (kept.decided, kept.candidates, kept.fallback, kept.needs_second_call) == ("a", ("a",), "empty_row", False)
    abstained = refine((), "a", "abstain")
    assert (abstained.decided, abstained.candidates, abstained.fallback) == (None, (), "empty_row")


def test_estimate_bank_counts_and_leaves_out_unparsed_answers():
    bank = make_bank([("4", "1"), ("4", "1"), (None, "2"), ("2", "2")])
    assert bank.n_unparsed == 1
    assert bank.counts == Counter({("4", "1"): 2, ("2", "2"): 1})
    assert bank.rows()["4"] == ("1",)
    assert bank.matrix()[3][0] == 1


def test_bank_file_round_trip_is_readable(tmp_path):
    bank = make_bank([("4", "1"), ("2", "1"), ("4", "3"), ("1", "4")])
    path = tmp_path / "memory_bank.json"
    save_bank(bank, path)
    raw = orjson.loads(path.read_bytes())
    assert raw["labels"] == LABELS and raw["model"] == "toy-model" and raw["strategy"] == "zero_shot"
    assert {"answer": "4", "truth": "3", "count": 1} in raw["confusions"]
    assert raw["user_split"]["fraction"] == 0.05 and raw["format_version"] == 1 and raw["created_at"]
    loaded = load_bank(path, labels=LABELS)
    assert loaded == bank and loaded.digest() == bank.digest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw["confusions"].append({"answer": "9", "truth": "1", "count": 1}), "not in labels"),
        (lambda raw: raw["confusions"].append(dict(raw["confusions"][0])), "listed twice"),
        (lambda raw: raw.update(format_version=99), "format_version"),
        (lambda raw: raw["confusions"][0].update(count=0), "confusions.0.count"),
        (lambda raw: raw.pop("labels"), "labels"),
    ],
)
def test_invalid_bank_names_the_file_and_problem(tmp_path, mutate, message):
    path = tmp_path / "bank.json"
    save_bank(make_bank([("4", "1"), ("2", "2")]), path)
    raw = orjson.loads(path.read_bytes())
    mutate(raw)
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(BankError, match=message) as error:
        load_bank(path)
    assert str(path) in str(error.value)


def test_a_bank_from_before_pool_counts_loads_with_none_and_bad_counts_are_named(tmp_path):
    path = tmp_path / "bank.json"
    save_bank(make_bank([("4", "1")]), path)
    raw = orjson.loads(path.read_bytes())
    raw["user_split"].pop("pool_label_counts")  # as banks were written before the field
    path.write_bytes(orjson.dumps(raw))
    assert load_bank(path).user_split.pool_label_counts is None  # tau then weighs every sample 1
    raw["user_split"]["pool_label_counts"] = {"1": 40, "9": 2}
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(BankError, match="pool_label_counts") as error:
        load_bank(path)
    assert str(path) in str(error.value)
    raw["user_split"]["pool_label_counts"] = {"1": 40}
    raw["samples"] = [{"id": "a", "text": "t", "answer": "4", "truth": "2"}]  # drawn from a pool without label 2
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(BankError, match=r"no pool rows of sampled label\(s\) \['2'\]"):
        load_bank(path)


def test_merging_splits_of_different_pools_drops_the_pool_counts():
    from runner.bank import merge_banks

    counted = make_bank([("1", "1")]).model_copy(
        update={"user_split": SPLIT.model_copy(update={"pool_label_counts": {"1": 40, "2": 2}})}
    )
    assert merge_banks([counted, counted]).user_split.pool_label_counts == {"1": 40, "2": 2}
    assert merge_banks([counted, make_bank([("1", "1")])]).user_split.pool_label_counts is None


def test_corrupt_or_mismatched_bank(tmp_path):
    path = tmp_path / "bank.json"
    path.write_bytes(b'{"labels": [')
    with pytest.raises(BankError, match="not valid JSON"):
        load_bank(path)
    save_bank(make_bank([("1", "1")]), path)
    with pytest.raises(BankError, match=r"another label set \(missing \['5'\]"):
        load_bank(path, labels=[*LABELS, "5"])


def test_update_adds_corrections_without_re_estimating():
    from runner.bank import Sample, update_bank

    bank = make_bank([("4", "1"), ("2", "2")])
    corrections = [Sample(id="c1", text="x", answer="4", truth="3"), Sample(id="c2", text="y", answer=None, truth="1")]
    updated = update_bank(bank, corrections)
    assert updated.rows()["4"] == ("1", "3") and updated.n_samples == SPLIT.n_samples + 2 and updated.n_unparsed == 1
    assert bank.rows()["4"] == ("1",)  # the original is untouched
    with pytest.raises(BankError, match="correction 'c3' names a label"):
        update_bank(bank, [Sample(id="c3", text="z", answer="9", truth="1")])


def test_corrections_stay_marked_as_such_through_the_bank_file(tmp_path):
    # The fit holds out only samples of the random split; a correction is someone's choice (runner.fit).
    from runner.bank import Sample, update_bank

    drawn = [Sample(id="u1", text="a", answer="4", truth="1"), Sample(id="u2", text="b", answer="2", truth="2")]
    bank = estimate_bank(
        [(s.answer, s.truth) for s in drawn],
        LABELS,
        dataset="toy",
        model="m",
        strategy="z",
        user_split=SPLIT,
        samples=drawn,
    )
    updated = update_bank(bank, [Sample(id="c1", text="x", answer="4", truth="3")])  # given as user_split
    save_bank(updated, tmp_path / "bank.json")
    sources = [(s.id, s.source) for s in load_bank(tmp_path / "bank.json").samples]
    assert sources == [("u1", "user_split"), ("u2", "user_split"), ("c1", "correction")]


def test_merge_sums_counts_and_refuses_other_label_sets():
    from runner.bank import merge_banks

    merged = merge_banks([make_bank([("4", "1"), ("2", "2")]), make_bank([("4", "1"), ("1", "1")])])
    assert merged.counts == Counter({("4", "1"): 2, ("2", "2"): 1, ("1", "1"): 1})
    assert merged.n_samples == 2 * SPLIT.n_samples and merged.model == "toy-model"
    with pytest.raises(BankError, match="different label sets"):
        merge_banks([make_bank([("1", "1")]), make_bank([("a", "a")], labels=["a", "b"])])
