"""`cm-run` as a user meets it: exit codes and messages that name what is wrong."""

import subprocess
import sys

import pytest

from runner.bank import UserSplitInfo, estimate_bank, save_bank
from runner.cli import EXIT_INPUT, main


def test_bad_spec_exits_2_naming_the_key(write, capsys):
    path = write("job.yaml", "name: x\nbogus: 1\n")
    assert main([str(path)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "bogus: unknown key" in err and "dataset: missing required key" in err and str(path) in err


def test_missing_data_file_exits_2_before_any_engine_starts(write, tmp_path, capsys):
    path = write(
        "job.yaml",
        f"name: x\ndata_dir: {tmp_path}\ndataset: {{name: x}}\nuser_split: {{path: nope.jsonl}}\n"
        f"corpus: {{path: nope.jsonl}}\noutput: {{dir: {tmp_path / 'out'}}}\n",
    )
    assert main([str(path)]) == EXIT_INPUT
    assert "nope.jsonl: data file not found" in capsys.readouterr().err


def test_bank_show_lists_top_confusions(tmp_path, capsys):
    split = UserSplitInfo(path="u", fraction=0.05, seed=0, stratified=True, n_samples=3)
    bank = estimate_bank(
        [("a", "a"), ("a", "b"), ("a", "b")], ["a", "b"], dataset="d", model="m", strategy="zero_shot", user_split=split
    )
    save_bank(bank, tmp_path / "bank.json")
    assert main(["bank", "show", str(tmp_path / "bank.json")]) == 0
    out = capsys.readouterr().out
    assert "answer 'a' -> truth b (2), a (1)" in out and "3 user samples" in out


def test_schemas_check_reports_stale_files(tmp_path, capsys):
    assert main(["schemas", "--dir", str(tmp_path)]) == 0
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "job-spec.schema.json").write_text("{}")
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 1
    assert "job-spec.schema.json is out of date" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_console_script_is_installed(args):
    done = subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, check=True)
    assert "cm-run" in done.stdout


def test_bank_update_and_merge_from_the_command_line(tmp_path, capsys):
    import polars as pl

    from runner.bank import load_bank

    split = UserSplitInfo(path="u", fraction=0.05, seed=0, stratified=True, n_samples=1)
    bank = estimate_bank([("a", "a")], ["a", "b"], dataset="d", model="m", strategy="zero_shot", user_split=split)
    save_bank(bank, tmp_path / "bank.json")
    pl.DataFrame({"id": ["1", "2"], "text": ["x", "y"], "y_prime": ["a", "b"], "corrected": ["b", None]}).write_parquet(
        tmp_path / "fixed.parquet"
    )
    assert main(["bank", "update", str(tmp_path / "bank.json"), str(tmp_path / "fixed.parquet")]) == 0
    assert load_bank(tmp_path / "bank.json").rows()["a"] == ("a", "b")  # the unlabelled row was skipped
    assert (
        main(
            ["bank", "merge", str(tmp_path / "bank.json"), str(tmp_path / "bank.json"), "-o", str(tmp_path / "m.json")]
        )
        == 0
    )
    assert load_bank(tmp_path / "m.json").n_samples == 4
    assert "1 corrections added" in capsys.readouterr().out


@pytest.mark.slow
def test_a_second_cm_run_on_a_locked_output_dir_exits_2_naming_the_holder(toy_job, tmp_path, capsys):
    toy_job([("u1", "a"), ("u2", "b")], [("c1", "a")])
    (tmp_path / "out").mkdir()
    hold = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "out/.cm-run.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert main([str(tmp_path / "job.yaml")]) == EXIT_INPUT
    finally:
        holder.kill()
        holder.wait(timeout=10)
    err = capsys.readouterr().err
    assert f"another cm-run (pid {holder.pid}) is writing to this output directory" in err
    assert not (tmp_path / "out/manifest.json").exists()  # refused before anything was written


def _dry_run_totals(toy_job, tmp_path, capsys, strategy: str) -> tuple[int, int, int]:
    import re

    user = [(f"user text number {i:02d} " + "x" * 20, "ab"[i % 2]) for i in range(6)]  # 40 characters each
    toy_job(user, [(f"corpus text {i}", "a") for i in range(5)], extra=f"strategy: {strategy}")
    assert main([str(tmp_path / "job.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "estimate 6 + annotate 5 first + up to 5 second" in out  # 16 answers
    found = re.search(
        r"at most ([\d,]+) requests, about ([\d,]+) prompt tokens.*?at most ([\d,]+) completion", out, re.S
    )
    assert found, out
    calls, prompt, completion = (int(group.replace(",", "")) for group in found.groups())
    assert not (tmp_path / "out").exists()
    return calls, prompt, completion


@pytest.mark.parametrize(
    ("strategy", "calls_per_answer", "completion_per_answer"),
    [
        ("{name: zero_shot}", 1, 32),  # one label answer of up to generation.max_tokens (32)
        ("{name: self_consistency, n_samples: 3}", 3, 3 * 32),
        ("{name: chain_of_thought, reasoning_max_tokens: 96}", 2, 96 + 32),  # reasoning, then the answer
        ("{name: self_refine, max_rounds: 2, reasoning_max_tokens: 96}", 5, 32 + 2 * (96 + 32)),  # draft + 2 rounds
        ("{name: self_consistency, n_samples: 3, sample_with: chain_of_thought}", 6, 3 * (96 + 32)),
    ],
)
def test_dry_run_prices_each_strategy_by_its_calls(
    toy_job, tmp_path, capsys, strategy, calls_per_answer, completion_per_answer
):
    calls, _, completion = _dry_run_totals(toy_job, tmp_path, capsys, strategy)
    assert calls == 16 * calls_per_answer and completion == 16 * completion_per_answer


def test_dry_run_counts_few_shot_examples_in_every_prompt(toy_job, tmp_path, capsys):
    _, zero_shot, _ = _dry_run_totals(toy_job, tmp_path, capsys, "{name: zero_shot}")
    _, few_shot, _ = _dry_run_totals(toy_job, tmp_path, capsys, "{name: few_shot, k: 4}")
    assert few_shot - zero_shot >= 16 * 4 * 40 / 4  # four 40-character user samples (10 tokens each) per answer


def test_cancel_refuses_while_a_run_holds_the_output_dir_naming_its_pid(write, tmp_path, capsys, monkeypatch):
    import hashlib
    import os

    from runner.checkpoint import Checkpoint
    from runner.spec import load_spec

    out = tmp_path / "out"
    path = write(
        "job.yaml",
        f"name: x\ndataset: {{name: x}}\nuser_split: {{path: u.jsonl}}\ncorpus: {{path: c.jsonl}}\n"
        "engine: {kind: openai, model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: CM_TEST_CANCEL_KEY, "
        f"batch: true}}\noutput: {{dir: {out}}}\n",
    )
    monkeypatch.setenv("CM_TEST_CANCEL_KEY", "sk-test")
    (out / "batch").mkdir(parents=True)
    (out / "batch/batches.json").write_text('{"batches": []}')

    def files() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}

    with Checkpoint(out, load_spec(path)).locked():  # a running job holds the directory, as run_job does
        before = files()
        assert main(["cancel", str(path)]) == EXIT_INPUT
        assert files() == before  # the running job's batch record untouched
    err = capsys.readouterr().err
    assert f"another cm-run (pid {os.getpid()}) is writing to this output directory" in err
    assert "stop it first" in err
    assert main(["cancel", str(path)]) == 0  # once it ended, cancel goes ahead
    assert "no batch of this job is running" in capsys.readouterr().out
