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
