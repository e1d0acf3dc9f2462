"""The Python API's arguments: wrong kinds are one error naming the argument, not a traceback deep in a
convolution or a silently wrong result (found by a pass that used the API as a researcher would)."""

import copy
import warnings

import numpy as np
import pytest
import torch

from crnet.bundle import load_bundle
from crnet.checkpoint import load_model
from crnet.commands.evaluate import CRNetPredictor, evaluate
from crnet.commands.train import train
from crnet.config import TrainConfig
from crnet.engines import open_runtime
from crnet.errors import CRNetError, CRNetWarning, InputError, MaskError
from crnet.files import OutputError
from crnet.model.crnet import SupportPrompt
from tests.ddp_worker import MICRO

SIZE = MICRO.input_size


@pytest.fixture(scope="module")
def model(micro_checkpoint):
    return load_model(micro_checkpoint)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


def masks(b: int, k: int) -> torch.Tensor:
    mask = torch.zeros(b, k, SIZE, SIZE, dtype=torch.long)
    mask[..., 8:24, 8:24] = 1
    return mask


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (lambda: images(2).numpy(), "images must be a torch.Tensor, got ndarray"),
        (
            lambda: images(2).permute(0, 2, 3, 1),
            "images must be \\(N, 3, H, W\\) RGB images, got \\(2, 33, 33, 3\\)",
        ),
        (lambda: images(2)[0], "got \\(3, 33, 33\\)"),
        (
            lambda: (images(2) * 60 + 120).clamp(0, 255).to(torch.uint8),
            "torch.uint8: pass floating-point images",
        ),
        (lambda: images(2).double(), "images are torch.float64 and the model's weights torch.float32"),
    ],
)
def test_encode_names_images_of_the_wrong_kind(model, given, message) -> None:
    with pytest.raises(InputError, match=message):
        model.encode(given())


@torch.no_grad()
def test_prompt_checks_masks(model) -> None:
    features = model.encode(images(2)).unflatten(0, (1, 2))
    with pytest.raises(MaskError, match="support masks hold \\[2\\]"):  # a class-id label map
        model.prompt(features, masks(1, 2) * 2)
    with pytest.raises(InputError, match="must be \\(B, K, H, W\\) for supports of \\(B, K\\) = \\(1, 2\\)"):
        model.prompt(features, masks(1, 1))
    with pytest.warns(CRNetWarning, match="marks no object pixel .* of 0 and 255 must be divided by 255"):
        empty = model.prompt(features, masks(1, 2) * 255)  # was silently the prompt of an empty mask
    assert torch.equal(empty.prototype, torch.zeros_like(empty.prototype))


@torch.no_grad()
def test_prompt_warns_of_an_object_between_the_pooling_grid_points(model) -> None:
    """At stride 8 the pooling samples every 8th pixel: an object between those points kept its pixels at
    the input, passed every check, and gave a zero prompt in silence."""
    features = model.encode(images(1)).unflatten(0, (1, 1))
    between = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.long)
    between[..., 2:6, 2:7] = 1  # micro: 33x33 input, a 5x5 grid at pixels 0, 8, 16, 24, 32
    with pytest.warns(CRNetWarning, match="lies between the points .* 5x5 feature grid \\(one every 8 pix"):
        prompt = model.prompt(features, between)
    assert torch.equal(prompt.prototype, torch.zeros_like(prompt.prototype))
    on_a_point = torch.zeros_like(between)
    on_a_point[..., 8, 16] = 1  # one pixel, on a grid point: kept, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompt = model.prompt(features, on_a_point)
    assert prompt.prototype.abs().max() > 0
    with pytest.warns(CRNetWarning, match="5x5 feature grid"):  # the whole episode checks the same
        model(images(1), images(1)[:, None], between)


def test_runtimes_warn_of_an_object_between_the_pooling_grid_points(micro_checkpoint) -> None:
    between = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.long)
    between[..., 2:6, 2:7] = 1
    with open_runtime("torch:fp32", checkpoint=micro_checkpoint) as runtime:
        with pytest.warns(CRNetWarning, match="5x5 feature grid") as caught:
            runtime.episode(images(1), images(1)[:, None], between)
        assert caught[0].filename == __file__  # at the caller's line
        with pytest.warns(CRNetWarning, match="5x5 feature grid"):
            runtime.prompt(runtime.encode(images(1))[None], between)


@torch.no_grad()
def test_segment_checks_its_prompt_and_exit_fraction(model) -> None:
    features = model.encode(images(4))
    prompt = model.prompt(features[:3, None], masks(3, 1))  # three prompts
    with pytest.raises(InputError, match="does not fit 1 queries"):  # was broadcast: 3 logits for 1 query
        model.segment(features[3:], prompt)
    with pytest.raises(InputError, match="prompt must be the SupportPrompt .* got tuple"):
        model.segment(features[3:], (prompt.vector, prompt.prototype))
    with pytest.raises(InputError, match="does not fit 3 queries"):
        model.segment(features[:3], SupportPrompt(prompt.vector[:2], prompt.prototype))
    for fraction in (2.0, -1.0, float("nan")):  # 2.0 ran every query T times, -1 as 0
        with pytest.raises(InputError, match="exit_fraction must be from 0 to 1"):
            model.segment(features[:3], prompt, exit_fraction=fraction)
    # one prompt serves every query, as each query's own copy of it would
    one = SupportPrompt(prompt.vector[:1], prompt.prototype[:1])
    many = SupportPrompt(one.vector.expand(3, -1), one.prototype.expand(3, -1))
    torch.testing.assert_close(model.segment(features[:3], one), model.segment(features[:3], many))


@pytest.mark.parametrize("name", ["torch:fp32", "onnxruntime:fp32"])
def test_runtimes_check_images_and_take_one_prompt_for_every_query(
    name, micro_checkpoint, micro_bundle, model
) -> None:
    if name.startswith("onnxruntime"):
        pytest.importorskip("onnxruntime")
    with open_runtime(name, checkpoint=micro_checkpoint, bundle=micro_bundle) as runtime:
        with pytest.raises(InputError, match="torch.uint8"):  # was read as normalised: IoU 0.7 -> 0.0
            runtime.encode((images(2) * 60 + 120).clamp(0, 255).to(torch.uint8))
        with pytest.raises(
            InputError, match="are 40x40; this runtime takes 33x33"
        ):  # torch gave 33x33 logits
            runtime.encode(torch.randn(1, 3, 40, 40))
        with pytest.raises(InputError, match="support masks are 17x17"):
            runtime.prompt(runtime.encode(images(1))[None], torch.ones(1, 1, 17, 17, dtype=torch.long))
        features = runtime.encode(images(4))
        prompt = runtime.prompt(features[:1, None], masks(1, 1))
        logits = runtime.segment(features[1:], prompt)  # ONNX Runtime refused a prompt of batch 1
        assert logits.shape == (3, 2, SIZE, SIZE)
        with torch.no_grad():
            reference = model.segment(
                features[1:], model.prompt(features[:1, None], masks(1, 1)), output_size=(SIZE, SIZE)
            )
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_open_runtime_refuses_another_t_for_a_bundle(micro_bundle) -> None:
    pytest.importorskip("onnxruntime")
    exported = load_bundle(micro_bundle).iterations
    with pytest.raises(CRNetError, match=f"the bundle runs T = {exported} .* asked for 2"):
        open_runtime("onnxruntime:fp32", bundle=micro_bundle, iterations=2)  # was ignored in silence


def test_train_refuses_its_data_as_output_and_swapped_configs(bench_root, tmp_path) -> None:
    with pytest.raises(OutputError, match="is inside the input"):  # only the CLI checked it
        train(MICRO, TrainConfig(steps=1), bench_root, bench_root / "run", progress=False)
    assert not (bench_root / "run").exists()
    with pytest.raises(InputError, match="takes a ModelConfig .* got TrainConfig and ModelConfig"):
        train(TrainConfig(steps=1), MICRO, bench_root, tmp_path / "run", progress=False)


def test_evaluate_resizes_to_the_models_input_size_by_default(model, bench_root) -> None:
    predictor = CRNetPredictor(model, torch.device("cpu"))
    given = evaluate(predictor, bench_root, fold=0, input_size=SIZE, episodes=4, progress=False, workers=0)
    notices = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the protocol's zero-prompt episodes are counted, not warned of
        default = evaluate(predictor, bench_root, fold=0, episodes=4, progress=False, workers=0,
                           notice=notices.append)  # fmt: skip
    assert np.isclose(given["miou"], default["miou"])
    # at micro's 33x33 input the 5x5 grid misses some of these supports' objects
    assert default["zero_prompt_episodes"] == given["zero_prompt_episodes"] > 0
    said = f"{default['zero_prompt_episodes']} of 4 episodes have a support object between the points"
    assert notices[-1].startswith(said) and "5x5 feature grid, so a zero prompt: kept" in notices[-1]


@pytest.mark.parametrize("name", ["torch:fp32", "onnxruntime:fp32"])
def test_an_empty_support_mask_is_said_once_at_the_callers_line(name, micro_checkpoint, micro_bundle) -> None:
    """An eager episode checked its masks three times: three warnings, at crnet's own lines (and Python then
    kept quiet about the next empty mask at those lines)."""
    import warnings

    if name.startswith("onnxruntime"):
        pytest.importorskip("onnxruntime")
    runtime = open_runtime(name, checkpoint=micro_checkpoint, bundle=micro_bundle)
    with runtime, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime.episode(images(1), images(1)[:, None], masks(1, 1) * 0)
    said = [w for w in caught if issubclass(w.category, CRNetWarning)]
    assert len(said) == 1 and said[0].filename == __file__


def test_open_runtime_takes_a_bundles_folder_not_one_of_its_files(micro_bundle) -> None:
    graph = next(micro_bundle.glob("*.fp32.onnx"))  # its precision would quarrel with the spec's
    with pytest.raises(CRNetError, match="give the bundle's folder"):
        open_runtime("onnxruntime:fp16", bundle=graph)


def test_a_dtype_mismatch_on_the_meta_device_is_one_error(model) -> None:
    with pytest.raises(InputError, match="torch.float16 and the model's weights torch.float32"):
        copy.deepcopy(model).to("meta").encode(torch.randn(1, 3, SIZE, SIZE, device="meta", dtype=torch.half))
