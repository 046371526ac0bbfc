"""The evaluation grid on a scripted engine: cells, caching across cells, transfer, tables, figures, CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import polars as pl
import pytest

from runner import cli
from runner.engines._cache import cache_key
from runner.eval_report import write_report
from runner.evaluate import GridSpec, load_grid, run_grid, strategy_label
from runner.spec import SpecError, StrategySpec
from tests.scripted_engine import ScriptedEngine

LABELS = ["alarm", "iot", "music", "news"]
CONFUSED = {"a": {"iot": "alarm"}, "b": {"music": "news"}}  # what each scripted model gets wrong at first


def _texts(kind: str, n: int) -> list[tuple[str, str]]:
    return [(f"{kind} {label} {i}", label) for label in LABELS for i in range(n)]


def scripted(model: str, n_labels: int = 4) -> ScriptedEngine:
    """A model that confuses one label on its first answer and gets everything right when asked again."""
    texts = _texts("user", 6) + _texts("test", 3)
    first = {text: CONFUSED[model].get(label, label) for text, label in texts}
    engine = ScriptedEngine(first, {text: label for text, label in texts}, n_labels=n_labels)
    engine.model_id = model
    return engine


def make_datasets(root: Path) -> Path:
    for name in ("toy-one", "toy-two"):
        (root / f"data/{name}").mkdir(parents=True)
        (root / f"data/{name}/train.jsonl").write_text("".join(_line(t, y) for t, y in _texts("user", 6)))
        (root / f"data/{name}/test.jsonl").write_text("".join(_line(t, y) for t, y in _texts("test", 3)))
        (root / "specs").mkdir(exist_ok=True)
        (root / f"specs/{name}.yaml").write_text(
            f"""
name: {name}
data_dir: {root / "data"}
dataset: {{name: {name}, labels: {LABELS}}}
user_split: {{path: {name}/train.jsonl}}
corpus: {{path: {name}/test.jsonl}}
output: {{dir: unused}}
"""
        )
    return root


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    return make_datasets(tmp_path)


def _line(text: str, label: str) -> str:
    return orjson.dumps({"text": text, "label": label}).decode() + "\n"


def grid_settings(root: Path, **overrides: object) -> dict:
    return {
        "name": "toy-grid",
        "datasets": ["specs/toy-one.yaml", "specs/toy-two.yaml"],
        "strategies": [{"name": "zero_shot"}, {"name": "few_shot", "k": 2, "selection": "random"}],
        "budgets": [0.5, 1.0],
        "seeds": [0, 1],
        "engines": [{"model": "a"}],
        "output_dir": str(root / "eval"),
        **overrides,
    }


def grid_file(root: Path, write, **overrides: object) -> Path:
    return write("grid.yaml", orjson.dumps(grid_settings(root, **overrides)).decode())


class Recorder:
    """Remembers every engine the grid made, to count what reached the model."""

    def __init__(self) -> None:
        self.engines: dict[str, ScriptedEngine] = {}

    def __call__(self, spec) -> ScriptedEngine:
        self.engines[spec.model] = scripted(spec.model)
        return self.engines[spec.model]


@pytest.fixture(scope="module")
def transfer_grid(tmp_path_factory) -> tuple[GridSpec, list, Recorder, list[str]]:
    """Two models x two datasets x two strategies x two budgets x two seeds; model b also uses a's banks."""
    root = make_datasets(tmp_path_factory.mktemp("grid"))
    path = root / "grid.yaml"
    path.write_text(orjson.dumps(grid_settings(root, engines=[{"model": "a"}, {"model": "b"}], transfer=True)).decode())
    grid = load_grid(path)
    made, lines = Recorder(), []
    results = asyncio.run(run_grid(grid, engine_factory=made, progress=lines.append))
    return grid, results, made, lines


def test_grid_runs_every_cell_and_never_pays_twice(transfer_grid):
    _, results, made, lines = transfer_grid

    # per dataset, budget, seed and strategy: model a runs CM+Z and Z, model b also CM+Z with a's bank
    assert len(results) == 2 * 2 * 2 * 2 * (2 + 3) and len(lines) == len(results) and "[80/80]" in lines[-1]
    for engine in made.engines.values():
        keys = [cache_key(r) for r in engine.requests]
        assert len(keys) == len(set(keys)), "an identical request reached the engine twice"
    z_cells = [r for r in results if r.cell.method == "Z"]
    assert all(r.engine_requests > 0 and r.cache_hits == r.engine_requests for r in z_cells)  # Z: first calls of CM+Z

    frame = pl.DataFrame([r.record() for r in results])
    own = frame.filter(pl.col("method") == "CM+Z").filter(pl.col("bank_model") == pl.col("model"))
    assert (own["accuracy"] == 1.0).all() and (own["accuracy_first_answer"] == 0.75).all()  # CM undoes the confusion
    assert (frame.filter(pl.col("method") == "Z")["accuracy"] == 0.75).all()
    transferred = frame.filter(pl.col("bank_model") == "a").filter(pl.col("model") == "b")
    # a's bank knows nothing of b's confusion (music -> news): news is its own single candidate, music stays lost
    assert transferred.height == 16 and (transferred["accuracy"] == 0.75).all()
    assert (frame["calls_per_item"] > 0).all() and (frame["n_items"] == 12).all()


def test_report_has_the_papers_tables_and_figures(transfer_grid):
    grid, results, _, _ = transfer_grid
    report = write_report(results, Path(grid.output_dir), "toy")

    markdown = report.markdown.read_text()
    assert "| CM (50%) + zero_shot | **100.00% ± 0.00%** | **100.00% ± 0.00%** |" in markdown
    assert "| zero_shot | 75.00% ± 0.00% | 75.00% ± 0.00% |" in markdown
    assert "| a | CM (100%) + few_shot (random, k=2) | +25.00 | +25.00 |" in markdown
    assert "CM_a (50%) + zero_shot (b)" in markdown and "## Cost per cell" in markdown
    summary = pl.read_csv(report.summary_csv)
    assert summary.height == 2 * 2 * 2 * 5 and set(summary["n_seeds"]) == {2}
    assert pl.read_csv(report.cells_csv).height == len(results)
    names = {f.name for f in report.figures}
    assert {
        "accuracy-a-50pct.png",
        "accuracy-b-100pct.png",
        "discrepancy-toy-one-a.png",
        "discrepancy-toy-two-b.png",
        "risk-coverage-toy-one-a.png",  # the CM cell's own plot: accepted rows' accuracy against their share
        "risk-coverage-toy-two-b.png",
    } <= names
    page = report.page.read_text()
    assert all(f"figures/{name}" in page for name in names) and "<table>" in page
    assert all(f.stat().st_size > 10_000 and f.read_bytes()[:4] == b"\x89PNG" for f in report.figures)


async def test_a_finished_grid_is_read_back_not_redone(datasets, write):
    grid = load_grid(grid_file(datasets, write, strategies=[{"name": "zero_shot"}], seeds=[0]))
    await run_grid(grid, engine_factory=Recorder())
    again = Recorder()
    results = await run_grid(grid, engine_factory=again)
    assert again.engines["a"].requests == [] and len(results) == 8
    assert not again.engines["a"].started  # nothing to ask: the model is never loaded


def test_cli_eval_prints_the_tables_and_where_the_report_is(datasets, write, monkeypatch, capsys):
    monkeypatch.setattr("runner.evaluate.make_engine", Recorder())
    path = grid_file(datasets, write, strategies=[{"name": "zero_shot"}], seeds=[0], budgets=[0.5])
    assert cli.main(["eval", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "## Accuracy, a" in out and "| CM (50%) + zero_shot | **100.00%** | **100.00%** |" in out
    assert f"report: {datasets / 'eval' / 'report.html'}" in out


def test_grid_spec_errors_name_the_key(datasets, write):
    with pytest.raises(SpecError, match="transfer needs at least two engines"):
        load_grid(grid_file(datasets, write, transfer=True))
    with pytest.raises(SpecError, match="same strategy"):
        load_grid(grid_file(datasets, write, strategies=[{"name": "zero_shot"}, {"name": "zero_shot"}]))
    with pytest.raises(SpecError, match=r"budgets\.0"):
        load_grid(grid_file(datasets, write, budgets=[2]))
    with pytest.raises(SpecError, match=r"strategies\.0\.nme"):
        load_grid(grid_file(datasets, write, strategies=[{"nme": "zero_shot"}]))
    # its report is local files: an s3:// output_dir would have been taken as a folder named 's3:'
    with pytest.raises(SpecError, match=r"output_dir.*s3://b/grid: an evaluation grid's output_dir must be a local"):
        load_grid(grid_file(datasets, write, output_dir="s3://b/grid"))


def test_grid_paths_are_relative_to_the_grid_file(datasets, write):
    grid = load_grid(grid_file(datasets, write))
    assert grid.datasets == [str(datasets / "specs/toy-one.yaml"), str(datasets / "specs/toy-two.yaml")]
    assert grid.engines[0].kind == "vllm"


def test_strategy_labels_tell_settings_apart():
    assert strategy_label(StrategySpec(name="few_shot", k=3, selection="random")) == "few_shot (random, k=3)"
    assert strategy_label(StrategySpec(name="self_consistency", n_samples=3, temperature=0.7)) == (
        "self_consistency (n=3, T=0.7)"
    )
    assert strategy_label(StrategySpec(name="self_refine", max_rounds=2)) == "self_refine (rounds<=2)"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "jobs/eval").glob("*.yml")), ids=str)
def test_shipped_grids_load_as_written(path):
    import yaml

    raw = yaml.safe_load(path.read_text())  # read independently of load_grid; absent keys take the documented defaults
    grid = load_grid(path)
    assert grid.datasets == [str((path.parent / d).resolve()) for d in raw["datasets"]]
    assert all(Path(d).is_file() for d in grid.datasets)
    assert [s.name for s in grid.strategies] == [s["name"] for s in raw.get("strategies", [{"name": "zero_shot"}])]
    assert grid.budgets == raw.get("budgets", [0.01, 0.05]) and grid.seeds == raw.get("seeds", [0, 1])
    assert [e.model for e in grid.engines] == [
        e.get("model", "smollm2-135m-instruct") for e in raw.get("engines", [{}])
    ]


def test_report_only_reads_finished_cells_and_refuses_unfinished_ones(datasets, write, monkeypatch, capsys):
    path = grid_file(datasets, write, strategies=[{"name": "zero_shot"}], seeds=[0], budgets=[0.5])
    assert cli.main(["eval", str(path), "--report-only"]) == cli.EXIT_ENGINE  # nothing ran yet: no engine to ask
    assert "is not finished" in capsys.readouterr().err
    monkeypatch.setattr("runner.evaluate.make_engine", Recorder())
    assert cli.main(["eval", str(path), "--quiet"]) == 0
    (datasets / "eval" / "results.md").unlink()
    assert cli.main(["eval", str(path), "--report-only", "--quiet"]) == 0
    assert "| CM (50%) + zero_shot | **100.00%** | **100.00%** |" in (datasets / "eval" / "results.md").read_text()


async def test_a_grid_runs_its_cm_cells_with_the_variant_it_names(datasets, write):
    grid = load_grid(
        grid_file(
            datasets,
            write,
            strategies=[{"name": "zero_shot"}],
            seeds=[0],
            budgets=[1.0],
            # w = 0.25 is chosen; posteriors: row alarm {alarm .37, iot .37, ...}, row music {music .48, ...}
            cm={"variant": "counts", "second_call": "never", "tau": 0.45},
        )
    )
    results = await run_grid(grid, engine_factory=Recorder())
    cm_cells = [r for r in results if r.cell.method == "CM+Z"]
    assert len(cm_cells) == 2 and all(r.calls_per_item == 1.0 for r in cm_cells)  # decided without a second call
    manifest = orjson.loads((Path(cm_cells[0].output_dir) / "manifest.json").read_bytes())
    assert manifest["spec"]["cm.variant"] == "counts" and manifest["spec"]["cm.second_call"] == "never"
    # the model says alarm for alarm and iot alike: that row's set is {alarm} or {alarm, iot} (randomised sets:
    # iot joins by the row's own draw), the others one label each, and without a second call the tie goes to
    # alarm, so accuracy stays the first answer's
    assert [(r.coverage, r.accuracy) for r in cm_cells] == [(1.0, 0.75)] * 2
    assert all(1.0 <= r.candidate_set_mean <= 1.5 for r in cm_cells)
