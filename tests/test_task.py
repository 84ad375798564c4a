"""The task framework: names, subtasks, shared metadata, timers, configs."""

from __future__ import annotations

import time

import pytest

from core.config import KernelConfig, SubtractionConfig
from core.task import Task


def test_names_and_subtasks():
    top = Task(name="top")
    sub = top.make_subtask("sub")
    leaf = sub.make_subtask("leaf")
    assert top.get_name() == "top" and sub.get_name() == "sub"
    assert leaf.get_full_name() == "top.sub.leaf"
    assert set(top.get_task_dict()) == {"top", "top.sub", "top.sub.leaf"}
    assert top.sub is sub and sub.leaf is leaf


def test_full_metadata_keys_and_emptying():
    top = Task(name="top")
    sub = top.make_subtask("sub")
    top.metadata["a"] = 1
    sub.metadata["b"] = 2
    sub.add_metadata("c", 3)
    sub.add_metadata("c", 4)
    meta = top.get_full_metadata()
    assert meta["top.a"] == 1 and meta["top:sub.b"] == 2 and meta["top:sub.c"] == [3, 4]
    top.empty_metadata()
    assert top.get_full_metadata() == {}


def test_timer_records_start_end_and_duration():
    task = Task(name="t")
    with task.timer("run"):
        time.sleep(0.05)
    meta = task.metadata
    assert meta["runEndCpuTime"] >= meta["runStartCpuTime"]
    assert meta["runStartUtc"] < meta["runEndUtc"]
    assert 0.04 < meta["runDuration"] < 1.0
    assert task.durations() == {"t.run": meta["runDuration"]}


def test_timer_records_even_when_the_block_raises():
    task = Task(name="t")
    with pytest.raises(RuntimeError), task.timer("boom"):
        raise RuntimeError("x")
    assert "boomDuration" in task.metadata


def test_config_defaults_round_trip_and_validation():
    config = SubtractionConfig()
    assert config.kernel.spatial_kernel_order == 1 and config.kernel.spatial_bg_order == 2
    assert config.sources.min_kernel_sources == 3
    again = SubtractionConfig.model_validate_json(config.model_dump_json())
    assert again == config
    for field in SubtractionConfig.model_fields.values():
        assert field.description
    with pytest.raises(ValueError, match="odd"):
        KernelConfig(kernel_size=20)
    with pytest.raises(ValueError, match="alard_deg_gauss"):
        KernelConfig(alard_deg_gauss=[4, 2])
    with pytest.raises(ValueError):
        SubtractionConfig(mode="sideways")
    with pytest.raises(ValueError):
        SubtractionConfig.model_validate({"kernel": {"no_such_field": 1}})
