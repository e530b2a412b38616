import pytest

from mlx_med.pipeline.stages import Stage, StageRunner


def make_stages(tmp_path, calls, setting="a"):
    def writer(name):
        def run():
            calls.append(name)
            (tmp_path / f"{name}.out").write_text(name)
        return run

    return [
        Stage("convert", writer("convert"), {"gguf": "x"}, [tmp_path / "convert.out"]),
        Stage("train", writer("train"), {"lr": setting}, [tmp_path / "train.out"], after=["convert"]),
        Stage("eval", writer("eval"), {}, [tmp_path / "eval.out"], after=["train"]),
    ]


def test_second_run_skips_everything(tmp_path):
    calls = []
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    outcomes = StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    assert calls == ["convert", "train", "eval"]
    assert all(o.skipped for o in outcomes)


def test_changed_input_reruns_stage_and_downstream_only(tmp_path):
    calls = []
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    calls.clear()
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls, setting="b"))
    assert calls == ["train", "eval"]


def test_missing_output_reruns(tmp_path):
    calls = []
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    (tmp_path / "eval.out").unlink()
    calls.clear()
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    assert calls == ["eval"]


def test_interrupted_stage_is_not_recorded(tmp_path):
    calls = []
    stages = make_stages(tmp_path, calls)

    def boom():
        raise KeyboardInterrupt

    stages[1].run = boom
    with pytest.raises(KeyboardInterrupt):
        StageRunner(tmp_path / "state", echo=lambda s: None).run(stages)
    calls.clear()
    StageRunner(tmp_path / "state", echo=lambda s: None).run(make_stages(tmp_path, calls))
    assert calls == ["train", "eval"]  # convert was recorded before the interruption
