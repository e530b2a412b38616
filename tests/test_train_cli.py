import json

from click.testing import CliRunner

from mlx_med.cli import cli
from mlx_med.train.plots import initial_val_loss

TEXT = "Diabetes mellitus requires regular monitoring of blood glucose. "


def write_pt(tmp_path, name, docs):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": TEXT * (2 + i % 2)}) + "\n" for i in range(docs)))
    return path


def test_cli_contract_forms(tmp_path, tiny_llama):
    train, valid = write_pt(tmp_path, "train.jsonl", 8), write_pt(tmp_path, "valid.jsonl", 2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"log_every: 1\neval:\n  every: 2\nlora:\n  rank: 16\ndata:\n  cache_dir: {tmp_path / 'cache'}\n")
    run = tmp_path / "run"
    args = ["train", "--phase", "pt", "--model", str(tiny_llama), "--data", str(train), "--valid", str(valid),
            "-o", str(run), "--iters", "4", "--batch-size", "2", "--max-seq-len", "32", "--lora-rank", "4",
            "--learning-rate", "1e-3", "-c", str(recipe), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("train_loss" in r for r in records)
    assert [("val_loss" in r) for r in records] == [False, True, False, True]
    assert (run / "loss_curve.png").stat().st_size > 1000
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 4  # the flag beats the recipe's 16
    run_yaml = (run / "run.yaml").read_text()
    assert "learning_rate: 0.001" in run_yaml and "log_every: 1" in run_yaml

    again = CliRunner().invoke(cli, args[:-1])  # same inputs: already done, nothing retrained
    assert again.exit_code == 0 and "already trained" in again.output
    other = CliRunner().invoke(cli, [*args[:-1], "--iters", "5"])
    assert other.exit_code == 2 and "already exists; pass --force" in other.output
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--iters", "5", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]

    (run / "loss_curve.png").unlink()
    plotted = CliRunner().invoke(cli, ["plot", str(run)])
    assert plotted.exit_code == 0 and (run / "loss_curve.png").is_file()
    # the curve's step-0 point: the validation loss before any update, kept across the resume
    before = json.loads((run / "done.json").read_text())["initial_val_loss"]
    assert before is not None and initial_val_loss(run) == before
    (run / "done.json").unlink()  # a run still in progress: read from its newest checkpoint
    assert initial_val_loss(run) == before


def test_json_log_prints_metrics_lines(tmp_path, tiny_qwen2, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default token cache lives there
    train = write_pt(tmp_path, "train.jsonl", 6)
    result = CliRunner().invoke(cli, ["train", "--model", str(tiny_qwen2), "--data", str(train), "-o",
                                      str(tmp_path / "run"), "--iters", "2", "--batch-size", "2",
                                      "--max-seq-len", "16", "--json-log"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1]["step"] == 2 and "tokens_per_sec" in lines[-1]


def test_bad_input_is_one_line_without_traceback(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    result = CliRunner().invoke(cli, ["train", "--phase", "pt", "--model", str(tiny_llama), "--data", str(bad),
                                      "-o", str(tmp_path / "run"), "--iters", "2"])
    assert result.exit_code == 2
    assert "bad.jsonl:2: invalid JSON" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["train", "--phase", "sft", "--model", str(tiny_llama), "-o",
                                       str(tmp_path / "run"), "--iters", "2"])
    assert missing.exit_code == 2 and "no training data: pass --data" in missing.output
    wrong = CliRunner().invoke(cli, ["train", "--phase", "pt", "--model", str(tiny_llama), "--data", str(bad),
                                     "-o", str(tmp_path / "run"), "--on-top-of", str(tmp_path)])
    assert wrong.exit_code == 2 and "needs --phase sft" in wrong.output
    assert not (tmp_path / "run").exists()
