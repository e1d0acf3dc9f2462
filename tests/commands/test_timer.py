"""The shared timing helpers: calls timed in turns, medians in milliseconds."""

from __future__ import annotations

import torch

from crnet.commands.timer import Timer, medians_in_turns


class ScriptedTimer(Timer):
    """Returns scripted (wall, GPU) seconds and records the order of the calls."""

    def __init__(self, times: dict[str, list[tuple[float, float | None]]]):
        super().__init__(torch.device("cpu"))
        self.times, self.order = times, []

    def __call__(self, work):
        name = work()
        self.order.append(name)
        return self.times[name].pop(0)


def test_calls_take_turns_and_medians_are_milliseconds():
    timer = ScriptedTimer({"a": [(0.001, None), (0.003, None), (0.002, None)], "b": [(0.010, 0.004)] * 3})
    medians = medians_in_turns({"a": lambda: "a", "b": lambda: "b"}, timer, 3)
    assert timer.order == ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 10.0}


def test_gpu_time_where_the_timer_has_it():
    timer = ScriptedTimer({"cpu": [(0.002, None)], "gpu": [(0.010, 0.004)]})
    medians = medians_in_turns({"cpu": lambda: "cpu", "gpu": lambda: "gpu"}, timer, 1, gpu=True)
    assert medians == {"cpu": 2.0, "gpu": 4.0}
