"""The Triton model repository: layout, and configs whose tensors and ensemble wiring match the bundle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crnet.bundle import load_bundle
from crnet.errors import CRNetError
from crnet.export.triton import write_repository


def parse_pbtxt(text: str):
    """A minimal protobuf text-format reader: messages become dicts of lists, scalars stay strings/ints."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    position = 0

    def value(token):
        if token.startswith('"'):
            return token[1:-1]
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def message(end):
        nonlocal position
        fields: dict[str, list] = {}
        while tokens[position] != end:
            key = tokens[position]
            position += 1
            if tokens[position] == ":":
                position += 1
            fields.setdefault(key, []).extend(item())
        position += 1
        return fields

    def item():
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return [message("}")]
        if token == "[":
            items = []
            while tokens[position] != "]":
                if tokens[position] == ",":
                    position += 1
                    continue
                items.extend(item())
            position += 1
            return items  # a repeated field: `dims: [3, 33, 33]` reads like three `dims:` lines
        return [value(token)]

    tokens.append("<end>")
    return message("<end>")


@pytest.fixture(scope="module")
def repository(micro_bundle, tmp_path_factory):
    return write_repository(load_bundle(micro_bundle), tmp_path_factory.mktemp("triton") / "models")


def config(repository, name):
    return parse_pbtxt((repository / name / "config.pbtxt").read_text())


def tensors(entries):
    return {t["name"][0]: t["dims"] for t in entries}


def test_layout(repository) -> None:
    for name in ("crnet_encoder", "crnet_prompt", "crnet_head"):
        assert (repository / name / "1" / "model.onnx").is_file()
    assert (repository / "crnet_episode" / "1").is_dir()
    readme = (repository / "README.md").read_text()
    assert "crnet_prompt" in readme
    # what a client must do as crnet does; the bundle named wherever the repository is read from
    assert "(nearest)" in readme and "corners aligned" in readme and "model.plan" not in readme
    bundle = readme.split("from the bundle `")[1].split("`")[0]
    assert Path(bundle).is_absolute()


def test_model_configs_match_the_graphs(repository, micro_bundle) -> None:
    manifest = load_bundle(micro_bundle).manifest
    size, side, channels = manifest["input_size"], manifest["feature_size"], manifest["channels"]
    encoder = config(repository, "crnet_encoder")
    assert encoder["platform"] == ["onnxruntime_onnx"]
    assert encoder["max_batch_size"] == [manifest["batch"]["max"]]
    assert tensors(encoder["input"]) == {"images": [3, size, size]}
    assert tensors(encoder["output"]) == {"features": [channels, side, side]}
    assert "dynamic_batching" in encoder
    # a preferred size of 1 made Triton's batcher send batches of 1 however many requests were queued
    assert "preferred_batch_size" not in (repository / "crnet_encoder" / "config.pbtxt").read_text()
    head = config(repository, "crnet_head")
    assert tensors(head["input"]) == {
        "features": [channels, side, side],
        "vector": [channels],
        "prototype": [channels],
    }
    assert tensors(head["output"]) == {"logits": [2, size, size]}
    assert all(t["data_type"] == ["TYPE_FP32"] for t in head["input"] + head["output"])


def test_ensemble_is_wired(repository) -> None:
    ensemble = config(repository, "crnet_episode")
    assert ensemble["platform"] == ["ensemble"]
    available = set(tensors(ensemble["input"]))
    steps = ensemble["ensemble_scheduling"][0]["step"]
    assert len(steps) == 4
    for step in steps:  # each step reads only ensemble inputs or earlier steps' outputs
        model = config(repository, step["model_name"][0])
        inputs = {m["key"][0]: m["value"][0] for m in step["input_map"]}
        outputs = {m["key"][0]: m["value"][0] for m in step["output_map"]}
        assert set(inputs) == set(tensors(model["input"]))
        assert set(outputs) == set(tensors(model["output"]))
        assert set(inputs.values()) <= available, step
        available |= set(outputs.values())
    assert set(tensors(ensemble["output"])) <= available


def test_refuses_to_overwrite(repository, micro_bundle) -> None:
    with pytest.raises(CRNetError, match="already exists"):
        write_repository(load_bundle(micro_bundle), repository)


@pytest.mark.parametrize(
    "added",
    ["crnet_encoder/2/model.onnx", "crnet_head/NOTES.txt", "crnet_mine/notes.txt", "crnet_episode/1/x"],
)
def test_overwrite_refuses_a_repository_with_files_added(repository, micro_bundle, tmp_path, added) -> None:
    """--overwrite replaces a repository written here only as written: a model version, a note or a model
    folder the user added is not lost (the check once looked at the top-level names alone)."""
    import shutil

    from crnet.export.triton import is_repository

    copy = tmp_path / "models"
    shutil.copytree(repository, copy)
    assert is_repository(copy)
    write_repository(load_bundle(micro_bundle), copy, overwrite=True)  # as written: replaced
    (copy / added).parent.mkdir(parents=True, exist_ok=True)
    (copy / added).write_text("the user's")
    assert not is_repository(copy)
    with pytest.raises(CRNetError, match="--overwrite|holds|not"):
        write_repository(load_bundle(micro_bundle), copy, overwrite=True)
    assert (copy / added).read_text() == "the user's"
