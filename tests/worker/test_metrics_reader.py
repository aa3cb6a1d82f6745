"""How a worker reads metrics from a program's own output (the ``metrics`` objective option)."""

from __future__ import annotations

import json
from pathlib import Path

from caviar.worker._program import MetricsReader, metric_names


def test_stdout_pairs_name_the_studys_metrics_and_take_the_step_from_the_line() -> None:
    reader = MetricsReader({"format": "stdout"}, ["val_acc"])
    assert reader.parse_line("epoch 3 train_loss 0.41 val_acc=0.91") == (3, {"val_acc": 0.91})
    assert reader.parse_line("step=7, val_acc: 1e-2") == (7, {"val_acc": 0.01})
    assert reader.parse_line("val_acc = -0.5") == (None, {"val_acc": -0.5})
    assert reader.parse_line("train_val_acc=0.3 my.val_acc=0.2") is None  # another metric's name
    assert reader.parse_line("val_acc=0.91x") is None
    assert reader.parse_line("nothing here") is None


def test_a_regex_reads_value_and_step_groups() -> None:
    reader = MetricsReader(
        {"format": "regex", "pattern": r"epoch (?P<step>\d+) .*val_acc (?P<value>\S+)"}, ["m"]
    )
    assert reader.parse_line("epoch 2 loss 0.1 val_acc 0.75") == (2, {"m": 0.75})
    assert reader.parse_line("epoch 2 loss 0.1 val_acc n/a") is None  # not a number: not a report
    no_step = MetricsReader({"format": "regex", "pattern": r"acc=(?P<value>[0-9.]+)"}, ["m"])
    assert no_step.parse_line("acc=0.5") == (None, {"m": 0.5})


def test_no_option_reads_nothing_and_says_what_it_expects() -> None:
    reader = MetricsReader(None, ["value"])
    assert reader.parse_line("value=3") is None
    assert "set objective.metrics" in reader.expected()
    assert "`val_acc=X`" in MetricsReader({}, ["val_acc"]).expected()


def test_json_lines_left_by_an_earlier_trial_are_not_read_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "acc": 0.1}) + "\n")
    appending = MetricsReader({"format": "jsonl"}, ["acc"])
    appending.start(tmp_path)
    assert appending.read_file() == []
    with path.open("a") as handle:
        handle.write(json.dumps({"step": 1, "acc": 0.2}) + "\n" + '{"step": 2, "acc"')
    assert appending.read_file() == [(1, {"acc": 0.2})]  # the partial line waits for its end
    with path.open("a") as handle:
        handle.write(": 0.3}\n")
    assert appending.read_file() == [(2, {"acc": 0.3})]
    rewriting = MetricsReader({"format": "jsonl"}, ["acc"])
    rewriting.start(tmp_path)
    path.write_text("".join(json.dumps({"step": s, "acc": 0.5 + s}) + "\n" for s in range(4)))
    assert rewriting.read_file() == [(s, {"acc": 0.5 + s}) for s in range(4)]


def test_metric_names_follow_the_definition() -> None:
    assert metric_names({"metric": "val_acc"}) == ["val_acc"]
    assert metric_names({"metric": ["a", "b"]}) == ["a", "b"]
    assert metric_names({}) == ["value"]
    assert metric_names({"directions": ["maximize", "minimize"]}) == ["value_0", "value_1"]
