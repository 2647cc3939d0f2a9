"""Time-left estimates (fairjax.progress): the arithmetic, on rates set by hand."""

import pytest

from fairjax import progress


def test_format_seconds():
    assert progress.format_seconds(4.4) == "4 s"
    assert progress.format_seconds(185) == "3 min 05 s"
    assert progress.format_seconds(3720) == "1 h 02 min"
    assert progress.format_seconds(-3) == "0 s"


def test_rate_left_is_the_average_time_per_item_times_the_items_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    r = progress.Rate(400)
    assert r.left(0) is None and r.line(0, "images") == "0/400 images"
    now[0] = 110.0  # 100 items in 10 s -> 300 left take 30 s
    assert r.left(100) == pytest.approx(30.0)
    assert r.line(100, "images") == "100/400 images (~30 s left)"
    assert r.line(400, "images") == "400/400 images"


def test_stage_plan_uses_the_rate_of_each_kind_and_skips_reused_stages():
    plan = progress.StagePlan([("prefs", "sample", 1000), ("train_a", "train", 3000), ("train_b", "train", 600),
                               ("evaluate", "sample", 4000)])
    assert plan.estimates() == {} and plan.line() == ""  # nothing measured yet
    plan.done("prefs", 10.0)  # sampling: 100 units/s; training not measured: the rate of all stages so far
    assert plan.estimates() == pytest.approx({"train_a": 30.0, "train_b": 6.0, "evaluate": 40.0})
    plan.done("train_a", 60.0)  # training: 50 units/s
    assert plan.estimates() == pytest.approx({"train_b": 12.0, "evaluate": 40.0})
    assert plan.line().endswith("train_b ~12 s, evaluate ~40 s; total ~52 s")
    plan.skip("train_b")  # its output existed: no work left
    assert plan.estimates() == pytest.approx({"evaluate": 40.0})
