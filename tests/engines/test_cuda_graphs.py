"""Whole calls captured once per input signature and replayed from static buffers."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from crnet.engines.cuda_graphs import CapturedCalls, CaptureOnOwnThread
from tests.engines.test_runtimes import episode

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def scaled_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (2 * a + b).relu()


def recording_capture(captured: list):
    """A stand-in for a CUDA graph on the CPU: `replay` recomputes the output in place from the static inputs,
    as a graph's replay does; each capture is recorded with the values it saw."""

    def capture(function, inputs):
        captured.append([t.clone() for t in inputs])
        output = function(*inputs)
        return (lambda: output.copy_(function(*inputs))), output

    return capture


def test_one_capture_per_signature_and_replays_see_new_inputs() -> None:
    captured = []
    calls = CapturedCalls(scaled_sum, torch.device("cpu"), capture=recording_capture(captured))
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(calls(a, b), scaled_sum(a, b))
    for _ in range(3):  # same signature, new values: replays of the one capture, from the new values
        a, b = torch.randn(2, 3), torch.randn(2, 3)
        torch.testing.assert_close(calls(a, b), scaled_sum(a, b))
    assert len(captured) == 1
    calls(torch.randn(4, 3), torch.randn(4, 3))  # a new shape
    calls(a.double(), b.double())  # a new dtype
    calls(a.t().contiguous().t(), b)  # the same shape with other strides
    assert len(captured) == len(calls.graphs) == 4
    calls.release()
    calls(a, b)
    assert len(captured) == 5 and len(calls.graphs) == 1
    # The static buffers are the runtime's own: never the caller's tensors.
    buffers = [t.data_ptr() for entry in calls.graphs.values() for t in entry.inputs]
    assert not {a.data_ptr(), b.data_ptr()} & set(buffers)


def test_each_call_hands_back_a_tensor_of_its_own() -> None:
    """Each replay overwrites the graph's output: a call returns a copy (or what `finish` makes of it)."""
    calls = CapturedCalls(scaled_sum, torch.device("cpu"), capture=recording_capture([]))
    first = calls(torch.ones(2), torch.zeros(2))
    second = calls(torch.zeros(2), torch.ones(2))
    (graph,) = calls.graphs.values()
    assert second is not first and first.data_ptr() != graph.output.data_ptr()
    torch.testing.assert_close(first, torch.full((2,), 2.0))
    torch.testing.assert_close(second, torch.ones(2))
    halves = CapturedCalls(scaled_sum, torch.device("cpu"), recording_capture([]), finish=lambda t: t.half())
    assert halves(torch.ones(2), torch.zeros(2)).dtype == torch.float16


def test_calls_from_two_threads_take_turns() -> None:
    """Another thread's call between this call's copies in and its copy out gave this call that one's
    result (the static buffers are shared): a call now waits for the one under way."""
    other = {}

    def capture(function, inputs):
        output = function(*inputs)

        def replay():
            if "thread" not in other:  # the first replay: another thread calls meanwhile

                def call():
                    other["result"] = calls(torch.full((2,), 5.0), torch.zeros(2))

                other["thread"] = threading.Thread(target=call)
                other["thread"].start()
                other["thread"].join(timeout=0.5)  # taking turns, it waits for this call to end
            output.copy_(function(*inputs))

        return replay, output

    calls = CapturedCalls(scaled_sum, torch.device("cpu"), capture=capture)
    first = calls(torch.ones(2), torch.zeros(2))
    other["thread"].join()
    torch.testing.assert_close(first, torch.full((2,), 2.0))
    torch.testing.assert_close(other["result"], torch.full((2,), 10.0))


def test_the_least_recently_used_graph_makes_way() -> None:
    """Every new shape kept a graph and its memory pool until close(): now at most GRAPHS per function."""
    captured = []
    calls = CapturedCalls(scaled_sum, torch.device("cpu"), capture=recording_capture(captured))
    shapes = [(n, 3) for n in range(1, CapturedCalls.GRAPHS + 1)]
    for shape in shapes:
        calls(torch.randn(shape), torch.randn(shape))
    calls(torch.randn(1, 3), torch.randn(1, 3))  # used again: the (2, 3) graph is now the oldest
    calls(torch.randn(99, 3), torch.randn(99, 3))
    assert len(calls.graphs) == CapturedCalls.GRAPHS and len(captured) == CapturedCalls.GRAPHS + 1
    kept = {signature[0][0] for signature in calls.graphs}
    assert (2, 3) not in kept and (1, 3) in kept and (99, 3) in kept
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(calls(a, b), scaled_sum(a, b))  # captured again
    assert len(captured) == CapturedCalls.GRAPHS + 2


def test_a_capture_thread_captures_on_one_thread_of_its_own() -> None:
    """Every capture on the same thread, not the caller's, inside the setting it was given and in the
    caller's modes; the replays on the caller's thread; a failed capture raises to the caller and stores
    nothing; after close() the next capture starts a new thread."""
    setting, seen, captured = {"on": False}, [], []
    recording = recording_capture(captured)

    @contextlib.contextmanager
    def switched_on():
        setting["on"] = True
        try:
            yield
        finally:
            setting["on"] = False

    def capture(function, inputs):
        seen.append((threading.get_ident(), setting["on"], torch.is_inference_mode_enabled()))
        if inputs[0].shape[0] == 3:
            raise ValueError("this shape cannot be captured")
        return recording(function, inputs)

    thread = CaptureOnOwnThread(switched_on, capture)
    calls = CapturedCalls(scaled_sum, torch.device("cpu"), capture=thread)
    with torch.inference_mode():
        for shape in [(2, 4), (2, 4), (5, 4)]:
            a, b = torch.randn(shape), torch.randn(shape)
            torch.testing.assert_close(calls(a, b), scaled_sum(a, b))
        with pytest.raises(ValueError, match="cannot be captured"):
            calls(torch.randn(3, 4), torch.randn(3, 4))
    assert len(seen) == 3 and len(captured) == len(calls.graphs) == 2  # one capture per shape
    idents = {ident for ident, _, _ in seen}
    assert len(idents) == 1 and threading.get_ident() not in idents
    assert all(on and inference for _, on, inference in seen) and not setting["on"]
    calls(torch.randn(7, 4), torch.randn(7, 4))  # outside inference mode: so is its capture
    assert seen[-1][2] is False and seen[-1][0] in idents
    thread.close()
    calls(torch.randn(8, 4), torch.randn(8, 4))
    assert seen[-1][0] != threading.get_ident() and len(calls.graphs) == 4
    thread.close()


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replays_match_eager_calls() -> None:
    calls = CapturedCalls(scaled_sum, torch.device("cuda"))
    for shape in [(2, 3), (2, 3), (5, 7), (2, 3)]:
        a, b = torch.randn(shape), torch.randn(shape)  # host inputs: copied into the device's buffers
        torch.testing.assert_close(calls(a, b), scaled_sum(a, b).cuda())
    assert len(calls.graphs) == 2


@pytest.mark.cuda
@needs_cuda
def test_cuda_graphs_captured_on_a_thread_of_their_own_replay_on_the_callers() -> None:
    thread = CaptureOnOwnThread(contextlib.nullcontext)
    calls = CapturedCalls(scaled_sum, torch.device("cuda"), capture=thread)
    with torch.inference_mode():
        for shape in [(2, 3), (2, 3), (5, 7), (2, 3)]:
            a, b = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
            torch.testing.assert_close(calls(a, b), scaled_sum(a, b))
    assert len(calls.graphs) == 2
    thread.close()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("text", ["torch:fp16+channels-last+cuda-graphs", "torch:fp16+compile+cuda-graphs"])
def test_a_runtime_captures_each_episode_shape_once(text, micro_checkpoint) -> None:
    from crnet.engines import RuntimeSpec, open_runtime

    def opened(spec: str):
        return open_runtime(RuntimeSpec.parse(spec), checkpoint=micro_checkpoint, device="cuda")

    with opened(text) as graphs:
        with opened("torch:fp16") as eager:
            for batch in (1, 2, 1, 2):
                query, supports, masks = episode(1, batch)
                logits = graphs.episode(query.cuda(), supports.cuda(), masks.cuda())
                again = graphs.episode(query.cuda(), supports.cuda(), masks.cuda())
                torch.testing.assert_close(logits, again)  # a kept result is the caller's, not the graph's
                expected = eager.episode(query.cuda(), supports.cuda(), masks.cuda())
                torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)
        captured = graphs._episode
        assert len(captured.graphs) == 2
    assert not captured.graphs  # closing released them
    assert graphs._episode is None and graphs.model is None  # and the runtime holds no weights
