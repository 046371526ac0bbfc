"""The memory bank M: the CM math as pure functions, and the bank's own portable file.

Notation follows the paper: Y' is the model's answer, Y the user's (true) label, and
M[k', k] = 1 iff some user sample had Y' = k' and Y = k. Row k' of M is the refined
candidate set for a new item the model answers k'. The bank keeps the counts behind M;
normalising them over Y' for each Y gives the empirical p(Y' | Y).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from runner._durable import write_atomic
from runner._storage import location
from runner.labels import LabelSet, free_text_key

BANK_FORMAT_VERSION = 1
EmptyRowPolicy = Literal["keep_initial", "abstain"]


class BankError(ValueError):
    """A memory bank file that cannot be used; the message names the file."""


# --- pure CM math -------------------------------------------------------------------------


def count_confusions(pairs: Iterable[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """Counts of (answer Y', truth Y) pairs from the user split."""
    return Counter(pairs)


def binary_matrix(counts: Counter[tuple[str, str]], labels: Sequence[str]) -> list[list[int]]:
    """M as a K x K 0/1 matrix, rows indexed by the answer k', columns by the truth k.

    Rows of free-text answers (answers that are no label) are not in it: ``MemoryBank.rows`` has them.
    """
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for (answer, truth), count in counts.items():
        if count > 0 and answer in index:
            matrix[index[answer]][index[truth]] = 1
    return matrix


def p_answer_given_truth(counts: Counter[tuple[str, str]], labels: Sequence[str]) -> list[list[float]]:
    """Empirical p(Y' = k' | Y = k) as a K x K matrix [k'][k]; a column with no samples is all 0.

    A truth's free-text answers count in its column's total but have no row here.
    """
    index = {label: i for i, label in enumerate(labels)}
    totals = Counter[str]()
    for (_, truth), count in counts.items():
        totals[truth] += count
    matrix = [[0.0] * len(labels) for _ in labels]
    for (answer, truth), count in counts.items():
        if answer in index:
            matrix[index[answer]][index[truth]] = count / totals[truth]
    return matrix


def candidate_set(counts: Counter[tuple[str, str]], labels: Sequence[str], answer: str) -> tuple[str, ...]:
    """Row ``answer`` of M: every truth ever seen behind that answer, in label order."""
    seen = {truth for (a, truth), count in counts.items() if a == answer and count > 0}
    return tuple(label for label in labels if label in seen)


@dataclass(frozen=True)
class Refinement:
    """What CM does with one first answer Y'.

    ``candidates`` is the refined set C. When ``decided`` is set no second call is needed
    (C is a single label, or the row was empty and the policy decided); otherwise ask the
    model again, choosing only from ``candidates``.
    """

    candidates: tuple[str, ...]
    decided: str | None
    needs_second_call: bool
    fallback: str | None = None
    neighbour_vote: str | None = None  # what X's nearest user samples say, where a variant looks


def refine(row: Sequence[str], answer: str, empty_row: EmptyRowPolicy = "keep_initial") -> Refinement:
    """Apply the candidate set ``row`` (row Y' of M) to the first answer ``answer``.

    An empty row means the user split never saw the model give this answer, so the bank
    has no evidence against it: ``keep_initial`` keeps it, ``abstain`` leaves the item
    unlabelled. Either way the item is marked ``fallback='empty_row'``.
    """
    if not row:
        decided = answer if empty_row == "keep_initial" else None
        candidates = (answer,) if empty_row == "keep_initial" else ()
        return Refinement(candidates, decided, needs_second_call=False, fallback="empty_row")
    if len(row) == 1:
        return Refinement(tuple(row), row[0], needs_second_call=False)
    return Refinement(tuple(row), None, needs_second_call=True)


# --- the bank file ------------------------------------------------------------------------


class Confusion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    answer: str = Field(description="The model's answer Y': a label name, or one of free_text_answers.")
    truth: str = Field(description="The user's label Y (a label name).")
    count: int = Field(gt=0, description="How many user samples had this (Y', Y) pair.")


class Sample(BaseModel):
    """One user sample as the estimate saw it; kept so instance-dependent variants can find neighbours."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    text: str
    answer: str | None = Field(
        description="The model's answer Y' (a label, or one of free_text_answers), or null if it mapped to none."
    )
    truth: str
    source: Literal["user_split", "correction"] = Field(
        default="user_split",
        description=(
            "user_split: drawn at random with the user split. correction: added later by a review or "
            "`cm-run bank update`, chosen by someone rather than at random, so it counts in the bank and the "
            "priors but never in the held-out samples that tau, the calibration and thresholds are fitted on."
        ),
    )


class UserSplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    fraction: float | None
    seed: int
    stratified: bool
    n_samples: int = Field(ge=0, description="User samples the bank was estimated on.")
    pool_label_counts: dict[str, int] | None = Field(
        default=None,
        description=(
            "Rows per label of the labelled file the split was drawn from (null: the whole file is the split, or "
            "a bank from before they were kept). A stratified draw over-represents rare labels; tau weights each "
            "drawn sample by its label's share of the pool over its share of the split, so the sets' coverage "
            "is the pool's (a split not drawn, or drawn uniformly, weighs every sample 1)."
        ),
    )


class MemoryBank(BaseModel):
    """A portable, human-readable memory bank: label names, provenance and counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = BANK_FORMAT_VERSION
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    dataset: str
    model: str = Field(description="The model G the bank was estimated with.")
    strategy: str = Field(description="The prompt strategy Z used for the estimate.")
    user_split: UserSplitInfo
    labels: list[str] = Field(description="The label set, in index order of the matrix M.")
    free_text_answers: list[str] = Field(
        default_factory=list,
        description=(
            "First answers that matched no label (strategy.first_answer free_text, or an imported bank), by "
            "their normalised text: the rows of M beyond the labels, each the truths seen behind that answer."
        ),
    )
    n_unparsed: int = Field(
        default=0,
        ge=0,
        description="User samples whose answer mapped to no label (left out of counts).",
    )
    confusions: list[Confusion] = Field(
        description="Every observed (answer, truth) pair with its count: M[answer, truth] = 1."
    )
    samples: list[Sample] | None = Field(
        default=None,
        description="The user samples behind the counts (text, answer, truth), for instance-dependent variants.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> MemoryBank:
        if self.format_version != BANK_FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is not supported (expected {BANK_FORMAT_VERSION})")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels are not unique")
        known = set(self.labels)
        free = set(self.free_text_answers)
        if len(free) != len(self.free_text_answers):
            raise ValueError("free_text_answers are not unique")
        if free & known:
            raise ValueError(f"free_text_answers {sorted(free & known)} are labels")
        answers = known | free
        seen: set[tuple[str, str]] = set()
        for entry in self.confusions:
            if entry.answer not in answers:
                raise ValueError(f"confusion answer {entry.answer!r} is not in labels (nor in free_text_answers)")
            if entry.truth not in known:
                raise ValueError(f"confusion truth {entry.truth!r} is not in labels")
            if (entry.answer, entry.truth) in seen:
                raise ValueError(f"confusion ({entry.answer!r}, {entry.truth!r}) is listed twice")
            seen.add((entry.answer, entry.truth))
        for sample in self.samples or ():
            if sample.truth not in known or (sample.answer is not None and sample.answer not in answers):
                raise ValueError(f"sample {sample.id!r} has a label that is not in labels")
        pool = self.user_split.pool_label_counts
        if pool is not None:
            if set(pool) - known or any(count < 0 for count in pool.values()):
                raise ValueError("user_split.pool_label_counts: non-negative counts of the bank's labels only")
            drawn = {s.truth for s in self.samples or () if s.source == "user_split"}
            if missing := sorted(label for label in drawn if pool.get(label, 0) == 0):
                raise ValueError(f"user_split.pool_label_counts: no pool rows of sampled label(s) {missing}")
        return self

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        return Counter({(c.answer, c.truth): c.count for c in self.confusions})

    @property
    def n_samples(self) -> int:
        return self.user_split.n_samples

    def row(self, answer: str) -> tuple[str, ...]:
        return candidate_set(self.counts, self.labels, answer)

    def rows(self) -> dict[str, tuple[str, ...]]:
        """Every answer's candidate set, labels' then free-text answers', computed once."""
        counts = self.counts
        return {answer: candidate_set(counts, self.labels, answer) for answer in self.answers}

    @property
    def answers(self) -> list[str]:
        """The rows of M: every label, then every free-text answer."""
        return [*self.labels, *self.free_text_answers]

    def matrix(self) -> list[list[int]]:
        return binary_matrix(self.counts, self.labels)

    def digest(self) -> str:
        """A content hash of what drives annotation (labels and counts), not of timestamps."""
        content: dict[str, object] = {"labels": self.labels, "confusions": [c.model_dump() for c in self.confusions]}
        if self.free_text_answers:  # absent otherwise, so banks without them keep the digest they had
            content["free_text_answers"] = self.free_text_answers
        payload = orjson.dumps(content)
        return hashlib.sha256(payload).hexdigest()


def estimate_bank(
    pairs: Iterable[tuple[str | None, str]],
    labels: Sequence[str],
    *,
    dataset: str,
    model: str,
    strategy: str,
    user_split: UserSplitInfo,
    samples: Sequence[Sample] | None = None,
) -> MemoryBank:
    """Build the bank from (answer, truth) pairs; answers that mapped to no label are None.

    An answer that is no label is a free-text answer's normalised text: it gets a row of its own.
    """
    pairs = list(pairs)
    parsed = [(answer, truth) for answer, truth in pairs if answer is not None]
    counts = count_confusions(parsed)
    known = set(labels)
    free = sorted({answer for answer, _ in parsed if answer not in known})
    return MemoryBank(
        dataset=dataset,
        model=model,
        strategy=strategy,
        user_split=user_split,
        labels=list(labels),
        free_text_answers=free,
        n_unparsed=len(pairs) - len(parsed),
        confusions=_ordered(counts, list(labels), free),
        samples=list(samples) if samples is not None else None,
    )


def save_bank(bank: MemoryBank, path: str | Path) -> None:
    """Write the bank as indented JSON, atomically (a crash never leaves half a file)."""
    path = location(path)
    body = orjson.dumps(bank.model_dump(), option=orjson.OPT_INDENT_2) + b"\n"
    write_atomic(path, body)


def load_bank(path: str | Path, *, labels: Sequence[str] | None = None) -> MemoryBank:
    """Read and validate a bank; with ``labels``, also check it was made for that label set."""
    path = location(path)
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise BankError(f"{path}: memory bank not found") from None
    except orjson.JSONDecodeError as error:
        raise BankError(f"{path}: memory bank is not valid JSON ({error})") from None
    try:
        bank = MemoryBank.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise BankError(f"{path}: invalid memory bank at {key}: {first['msg']}") from None
    if labels is not None and list(labels) != bank.labels:
        missing = sorted(set(labels) - set(bank.labels))
        extra = sorted(set(bank.labels) - set(labels))
        detail = f"missing {missing}, extra {extra}" if missing or extra else "same labels, other order"
        raise BankError(f"{path}: memory bank was made for another label set ({detail})")
    return bank


# --- bank lifecycle -----------------------------------------------------------------------


def update_bank(bank: MemoryBank, corrections: Sequence[Sample]) -> MemoryBank:
    """The bank with user-corrected examples added: each (model answer, corrected truth) counts once.

    No engine call is needed: the answers are the ones the model already gave (e.g. y_prime in
    annotations.parquet), the truths are what the user says they should have been. They are kept
    as ``source = correction`` samples: someone chose them, so they are not the random user split.
    """
    known = set(bank.labels)
    # a bank of free-text first answers takes a new free-text answer as a new row; a bank of labels has none
    answers = None if bank.free_text_answers else known
    for sample in corrections:
        if sample.truth not in known or (answers is not None and sample.answer not in answers | {None}):
            raise BankError(f"correction {sample.id!r} names a label that is not in the bank's labels")
    corrections = [s.model_copy(update={"source": "correction"}) for s in corrections]
    counts = bank.counts
    counts.update((s.answer, s.truth) for s in corrections if s.answer is not None)
    return _rebuilt(
        bank,
        counts,
        n_samples=bank.n_samples + len(corrections),
        n_unparsed=bank.n_unparsed + sum(s.answer is None for s in corrections),
        samples=[*(bank.samples or []), *corrections] if bank.samples is not None else None,
    )


def merge_banks(banks: Sequence[MemoryBank]) -> MemoryBank:
    """One bank holding the counts of several made for the same label set (e.g. two users' splits)."""
    if not banks:
        raise BankError("nothing to merge")
    first = banks[0]
    for other in banks[1:]:
        if other.labels != first.labels:
            raise BankError(f"cannot merge banks over different label sets ({other.dataset} vs {first.dataset})")
    counts: Counter[tuple[str, str]] = Counter()
    for bank in banks:
        counts.update(bank.counts)
    keep_samples = all(bank.samples is not None for bank in banks)

    def joined(values: Iterable[str]) -> str:
        return " + ".join(dict.fromkeys(values))

    merged = _rebuilt(
        first,
        counts,
        n_samples=sum(bank.n_samples for bank in banks),
        n_unparsed=sum(bank.n_unparsed for bank in banks),
        samples=[s for bank in banks for s in bank.samples or []] if keep_samples else None,
    )
    split = merged.user_split.model_copy(update={"path": joined(b.user_split.path for b in banks)})
    if any(b.user_split.pool_label_counts != first.user_split.pool_label_counts for b in banks):
        split = split.model_copy(update={"pool_label_counts": None})  # splits of different pools: no one weighting
    return merged.model_copy(
        update={
            "model": joined(b.model for b in banks),
            "strategy": joined(b.strategy for b in banks),
            "user_split": split,
        }
    )


def _rebuilt(
    bank: MemoryBank,
    counts: Counter[tuple[str, str]],
    *,
    n_samples: int,
    n_unparsed: int,
    samples: list[Sample] | None,
) -> MemoryBank:
    known = set(bank.labels)
    free = sorted({a for (a, _), n in counts.items() if n > 0 and a not in known})
    confusions = _ordered(counts, bank.labels, free)
    return MemoryBank.model_validate(
        {
            **bank.model_dump(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "free_text_answers": free,
            "confusions": [c.model_dump() for c in confusions],
            "n_unparsed": n_unparsed,
            "user_split": {**bank.user_split.model_dump(), "n_samples": n_samples},
            "samples": [s.model_dump() for s in samples] if samples is not None else None,
        }
    )


def _ordered(counts: Counter[tuple[str, str]], labels: Sequence[str], free: Sequence[str]) -> list[Confusion]:
    """The bank's confusions: label answers in label order, then free-text answers, truths in label order."""
    rows = {answer: i for i, answer in enumerate([*labels, *free])}
    columns = {label: i for i, label in enumerate(labels)}
    return [
        Confusion(answer=a, truth=t, count=n)
        for (a, t), n in sorted(counts.items(), key=lambda item: (rows[item[0][0]], columns[item[0][1]]))
        if n > 0
    ]


def import_answer_table(
    path: str | Path, labels: LabelSet | None = None, *, strip_suffix: str | None = None, model: str = "imported"
) -> MemoryBank:
    """A bank from the paper's authors' format: a JSON object ``{answer: [truth labels]}``.

    Each answer is a row: a label when its text matches one (``LabelSet.match_free_text``), a
    free-text row otherwise, keyed like our own free-text answers (``free_text_key``). The file keeps
    no counts, so every (answer, truth) pair counts once. With ``labels`` (a job's label set) every
    truth must match one of them; without, the truths as written are the label set.
    ``strip_suffix`` drops a suffix from every answer and truth first (the authors' StackExchange
    labels end in ``.txt``).
    """
    path = Path(path)
    try:
        raw = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise BankError(f"{path}: answer table not found") from None
    except orjson.JSONDecodeError as error:
        raise BankError(f"{path}: answer table is not valid JSON ({error})") from None
    if not isinstance(raw, dict) or not all(
        isinstance(truths, list) and all(isinstance(t, str) for t in truths) for truths in raw.values()
    ):
        raise BankError(f"{path}: an answer table is a JSON object mapping each answer to a list of label names")

    def cut(text: str) -> str:
        return text[: -len(strip_suffix)] if strip_suffix and text.endswith(strip_suffix) else text

    table = {cut(answer): [cut(truth) for truth in truths] for answer, truths in raw.items()}
    if labels is None:
        labels = LabelSet.build(sorted({truth for truths in table.values() for truth in truths}))
    pairs: dict[tuple[str | None, str], None] = {}  # a pair listed twice (two answers keyed alike) counts once
    for answer, truths in table.items():
        row = labels.match_free_text(answer) or free_text_key(answer) or None  # an empty answer: unparsed
        for truth in truths:
            label = labels.match_free_text(truth)
            if label is None:
                raise BankError(
                    f"{path}: answer {answer!r} lists truth {truth!r}, which is not one of the job's labels"
                )
            pairs[(row, label)] = None
    split = UserSplitInfo(path=str(path), fraction=None, seed=0, stratified=False, n_samples=len(pairs))
    return estimate_bank(pairs, labels.labels, dataset=path.stem, model=model, strategy="imported", user_split=split)
