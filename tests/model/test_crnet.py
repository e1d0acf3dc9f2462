"""The model: shapes, checkpoint-key compatibility, gradient flow, prompt/segment equivalence, empty masks."""

from unittest.mock import patch

import pytest
import torch

from crnet.config import R50, TINY, ModelConfig
from crnet.errors import CheckpointError, NoSupportError
from crnet.model.backbone import ResNetTrunk, load_torchvision_weights
from crnet.model.condition import masked_average_pool
from crnet.model.crnet import build_model
from crnet.model.refinement import Refinement

# Small enough for a fast CPU test, same architecture as the presets.
MICRO = TINY.replace(input_size=33, width=8, blocks=(1, 1, 1), channels=16)


def episode(config, batch=2, shots=1, seed=0, empty=False):
    generator = torch.Generator().manual_seed(seed)
    size = config.input_size
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = (torch.rand(batch, shots, size, size, generator=generator) > 0.6).long()
    masks[..., :2, :] = 255  # an ignore band, as on VOC borders
    if empty:
        masks[masks == 1] = 0
    query_masks = (torch.rand(batch, size, size, generator=generator) > 0.5).long()
    return query, supports, masks, query_masks


def torchvision_resnet50_keys(blocks=(3, 4, 6, 3)):
    """The state-dict keys of torchvision's resnet50, written out from its layout."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for layer, count in enumerate(blocks, start=1):
        for block in range(count):
            prefix = f"layer{layer}.{block}"
            for i in (1, 2, 3):
                keys += [f"{prefix}.conv{i}.weight"] + [f"{prefix}.bn{i}.{k}" for k in bn]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{k}" for k in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_trunk_keys_are_torchvision_resnet50_through_layer3():
    ours = set(ResNetTrunk(R50.width, R50.blocks).state_dict())
    expected = {k for k in torchvision_resnet50_keys() if not k.startswith(("layer4.", "fc."))}
    assert ours == expected


def test_a_weight_file_without_batchnorm_step_counters_loads(tmp_path):
    """Files saved before torch 0.4.1 have no num_batches_tracked (no weight: BatchNorm fills it in); they
    were refused as "keys missing"."""
    trunk = ResNetTrunk(8, (1, 1, 1))
    state = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet.pth")
    fresh = ResNetTrunk(8, (1, 1, 1))
    load_torchvision_weights(fresh, tmp_path / "resnet.pth")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_torchvision_weight_file_loads_and_drops_layer4(tmp_path):
    trunk = ResNetTrunk(8, (1, 1, 1))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in trunk.state_dict().items()}
    state["layer4.0.conv1.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "resnet.pth")
    fresh = ResNetTrunk(8, (1, 1, 1))
    load_torchvision_weights(fresh, tmp_path / "resnet.pth")
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in fresh.state_dict())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", "cannot read"),
        ("width", "not a ResNet-50 of this width: size mismatch for conv1.weight"),
        ("keys", "not a torchvision resnet50 state dict: [0-9]+ keys missing .*1 unexpected \\(such as head"),
        ("int keys", "does not hold a state dict \\(parameter names to tensors\\)"),  # was AttributeError
        ("non-tensor", "does not hold a state dict"),  # was "not a ResNet-50 of this width:" and no reason
        ("nan", "not finite \\(NaN or infinity\\) in bn1.running_var"),  # was a run that "diverged"
    ],
)
def test_bad_weight_files_raise_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "resnet.pth"
    if content == "width":  # a real file of the wrong width
        torch.save(ResNetTrunk(16, (1, 1, 1)).state_dict(), path)
    elif content == "keys":  # another model's weights: named by count and example, in one short line
        torch.save({"head": torch.zeros(1)}, path)
    elif content == "int keys":
        torch.save({1: torch.zeros(1)}, path)
    elif content in ("non-tensor", "nan"):
        state = ResNetTrunk(8, (1, 1, 1)).state_dict()
        if content == "nan":
            state["bn1.running_var"] = torch.full_like(state["bn1.running_var"], float("nan"))
        else:
            state["conv1.weight"] = 5
        torch.save(state, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_torchvision_weights(ResNetTrunk(8, (1, 1, 1)), path)
    assert len(str(error.value)) < 400 and "\n" not in str(error.value)


@pytest.mark.parametrize("config", [MICRO, MICRO.replace(input_size=40), TINY], ids=["33", "40", "tiny"])
def test_shapes(config):
    model = build_model(config).eval()
    query, supports, masks, query_masks = episode(config, batch=2, shots=2)
    with torch.no_grad():
        features = model.encode(query)
        prediction = model(query, supports, masks, query_masks)
    side = config.feature_size
    assert features.shape == (2, config.channels, side, side)
    assert prediction.query.shape == (2, 2, side, side)
    assert prediction.support.shape == (2, 2, 2, side, side)
    logits = model.segment(
        features,
        model.prompt(model.encode(supports.flatten(0, 1)).unflatten(0, (2, 2)), masks),
        output_size=(config.input_size, config.input_size),
    )
    assert logits.shape == (2, 2, config.input_size, config.input_size)


def test_r50_feature_shape_matches_the_paper():
    model = build_model(R50).eval()
    with torch.no_grad():
        features = model.encode(torch.randn(1, 3, 321, 321))
    assert features.shape == (1, 256, 41, 41) and R50.feature_size == 41


@pytest.mark.parametrize("shots", [1, 3])
def test_encode_prompt_segment_equals_forward_exactly(shots):
    model = build_model(MICRO).eval()
    query, supports, masks, _ = episode(MICRO, batch=2, shots=shots)
    with torch.no_grad():
        forward = model(query, supports, masks).query
        support_features = model.encode(supports.flatten(0, 1)).unflatten(0, supports.shape[:2])
        staged = model.segment(model.encode(query), model.prompt(support_features, masks))
    assert torch.equal(forward, staged)


def test_prompt_is_shared_by_many_queries():
    """A prompt computed once serves a batch of queries exactly as per-query episodes do."""
    model = build_model(MICRO).eval()
    query, supports, masks, _ = episode(MICRO, batch=3, shots=1)
    with torch.no_grad():
        support_features = model.encode(supports[:1].flatten(0, 1)).unflatten(0, (1, 1))
        prompt = model.prompt(support_features, masks[:1])
        expanded = type(prompt)(prompt.vector.expand(3, -1), prompt.prototype.expand(3, -1))
        many = model.segment(model.encode(query), expanded)
        one = model(query[1:2], supports[:1], masks[:1]).query
    torch.testing.assert_close(many[1:2], one, rtol=1e-5, atol=1e-5)  # batch size may change conv kernels


def test_prototype_commutes_with_channel_reweighting():
    """The deployment fact: prototype(F * c) == c * prototype(F), so the prompt can be cached."""
    features = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    masks = (torch.rand(2, 17, 17) > 0.5).long()
    common = torch.rand(2, 8, dtype=torch.float64)
    left = masked_average_pool(features * common[:, :, None, None], masks)
    torch.testing.assert_close(left, common * masked_average_pool(features, masks))


def test_empty_support_mask_gives_zero_prototype_and_finite_logits():
    model = build_model(MICRO).eval()
    query, supports, masks, _ = episode(MICRO, empty=True)
    assert not (masks == 1).any()
    with torch.no_grad():
        support_features = model.encode(supports.flatten(0, 1)).unflatten(0, supports.shape[:2])
        prompt = model.prompt(support_features, masks)
        logits = model(query, supports, masks).query
    assert torch.equal(prompt.prototype, torch.zeros_like(prompt.prototype))
    assert torch.isfinite(logits).all()


def test_zero_supports_raise():
    model = build_model(MICRO).eval()
    query, supports, masks, _ = episode(MICRO)
    with pytest.raises(NoSupportError):
        model(query, supports[:, :0], masks[:, :0])


def test_k_identical_shots_equal_one_shot():
    model = build_model(MICRO).eval()
    query, supports, masks, _ = episode(MICRO, batch=1)
    with torch.no_grad():
        one = model(query, supports, masks).query
        three = model(query, supports.expand(-1, 3, -1, -1, -1), masks.expand(-1, 3, -1, -1)).query
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)  # mean of equal terms, float rounding


def test_refinement_iterates_from_zeros():
    model = build_model(MICRO, fused=False).eval()  # the paper's loop, exactly (tests/ops: the native op)
    model.refinement.hoist = False
    x = torch.randn(1, MICRO.channels, 5, 5)
    y = torch.zeros(1, 2, 5, 5)
    with torch.no_grad():
        for _ in range(3):
            logits = model.refinement.step(x, y)
            y = torch.softmax(logits, dim=1)
        assert torch.equal(model.refinement(x, 3), logits)
        assert not torch.equal(model.refinement(x, 1), logits)
    with pytest.raises(ValueError):
        model.refinement(x, 0)


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_hoisted_inference_loop_is_the_papers_loop(iterations, seeded):
    """The inference loop computes the X half of the first feedback conv once and the image-pooling branch
    as a projection bias; in float64 it is the literal loop to rounding. Training runs the literal loop."""
    refinement = build_model(MICRO, fused=False).refinement.double().eval()
    x = torch.randn(2, MICRO.channels, 6, 5, dtype=torch.double)
    previous = torch.randn(2, 2, 6, 5, dtype=torch.double) if seeded else None  # negative too: ReLU'd
    with torch.no_grad():
        hoisted = refinement.run(x, iterations, previous)[0]
        refinement.hoist = False
        literal = refinement.run(x, iterations, previous)[0]
    torch.testing.assert_close(hoisted, literal, rtol=1e-12, atol=1e-12)  # float64 summation order only
    refinement.hoist = True
    with torch.no_grad(), patch.object(Refinement, "hoisted", side_effect=AssertionError("hoisted")):
        refinement.train()(x, iterations, previous)  # dropout acts in training: the literal loop
        refinement.eval()
        with torch.enable_grad():
            refinement.run(x.requires_grad_(), iterations, previous)[0].sum().backward()
    assert x.grad is not None


def test_gradients_flow_only_where_they_should():
    frozen = MICRO.replace(train_backbone=False)
    model = build_model(frozen).train()
    assert not model.encoder.trunk.training  # frozen trunk keeps BatchNorm in eval mode
    query, supports, masks, query_masks = episode(frozen)
    side = frozen.feature_size
    previous = torch.rand(2, 2, side, side, requires_grad=True)
    prediction = model(query, supports, masks, query_masks, iterations=1, query_previous=previous.detach())
    (prediction.query.sum() + prediction.support.sum()).backward()
    assert all(p.grad is None for p in model.encoder.trunk.parameters())
    for module in (model.encoder.neck, model.cross_reference, model.condition, model.refinement):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert previous.grad is None
    # BatchNorm statistics of a frozen trunk must not move in training mode.
    before = model.encoder.trunk.bn1.running_mean.clone()
    model(query, supports, masks, query_masks, iterations=1)
    assert torch.equal(before, model.encoder.trunk.bn1.running_mean)


def test_trainable_backbone_gets_gradients():
    model = build_model(MICRO).train()
    query, supports, masks, query_masks = episode(MICRO)
    model(query, supports, masks, query_masks, iterations=1).query.sum().backward()
    assert model.encoder.trunk.conv1.weight.grad is not None


@pytest.mark.parametrize("size", [33, 64, 97, 129, 321])
def test_feature_size_formula(size):
    trunk = ResNetTrunk(4, (1, 1, 1)).eval()
    with torch.no_grad():
        layer2, layer3 = trunk(torch.zeros(1, 3, size, size))
    assert layer3.shape[-1] == layer2.shape[-1] == R50.replace(input_size=size).feature_size


CANET = MICRO.replace(fusion_activation=True, fusion_dropout=0.5, condition_residual=False, head_dropout=0.5)


def test_canet_condition_is_relu_dropout_without_a_residual_block():
    """CaNet's layer55: the fusing conv, ReLU, Dropout2d(0.5); no residual block (no weights for one)."""
    model = build_model(CANET)
    assert model.condition.residual is None
    assert not any(name.startswith("condition.residual") for name in model.state_dict())
    features, prototype = torch.randn(2, MICRO.channels, 5, 5), torch.randn(2, MICRO.channels)
    fused = model.condition.fuse(torch.cat([features, prototype[:, :, None, None].expand_as(features)], 1))
    model.eval()
    assert torch.equal(model.condition(features, prototype), torch.relu(fused))  # dropout off in eval
    model.train()
    torch.manual_seed(0)
    dropped = model.condition(features, prototype)
    kept = dropped.flatten(2).abs().sum(-1) > 0  # Dropout2d zeroes whole channels, scales the rest by 2
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dropped[kept], 2 * torch.relu(fused)[kept])


def test_head_dropout_acts_in_training_only_and_keeps_the_native_op():
    """Dropout in the ASPP has no weights: inference (eager or the native op) is the model without it."""
    plain, dropped = (
        build_model(MICRO, fused=False).eval(),
        build_model(MICRO.replace(head_dropout=0.5)).eval(),
    )
    dropped.load_state_dict(plain.state_dict())  # same keys, same weights
    x = torch.randn(2, MICRO.channels, 5, 5)
    with torch.no_grad():
        expected = plain.refinement(x, 3)
        torch.testing.assert_close(dropped.refinement(x, 3), expected, rtol=1e-4, atol=1e-4)
    dropped.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(dropped.refinement.run(x, 1, fused=False)[0], plain.refinement(x, 1))


def test_old_configs_load_as_crnet_was():
    """Checkpoints written before the CaNet options keep their model: ours is the default of each."""
    stored = {k: v for k, v in MICRO.to_dict().items() if k not in ("fusion_activation", "head_dropout")}
    config = ModelConfig.from_dict(stored)
    assert (
        config.fusion_activation,
        config.fusion_dropout,
        config.condition_residual,
        config.head_dropout,
    ) == (
        False,
        0.0,
        True,
        0.0,
    )


@pytest.mark.parametrize("config", [MICRO, MICRO.replace(train_backbone=False)])
def test_folded_batchnorm_computes_the_same_features(config):
    """Inference with BatchNorm folded into the convolutions: no BatchNorm left, the same features up to
    float32 rounding (the fold itself is computed in float64)."""
    from crnet.model.fold import fold_batchnorm

    torch.manual_seed(0)
    model = build_model(config).eval()
    for module in model.modules():  # non-trivial statistics, as a trained trunk has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    images = torch.randn(3, 3, MICRO.input_size, MICRO.input_size)
    with torch.no_grad():
        expected = model.encode(images)
        fold_batchnorm(model)
        folded = model.encode(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(build_model(config).train())
