"""Models by name: parameter counts against independently derived figures, shapes, errors, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from best_minibatch.data.cifar import ImageDataset
from best_minibatch.data.images import to_model_input
from best_minibatch.training.models import MODEL_PARAMETER, MODELS, build_model, count_parameters

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_model.md"

# The published figure for ResNet-18 in its CIFAR form (3x3 stem, no max pool), 10 classes.
RESNET18_CIFAR_PARAMETERS = 11_173_962
# Derived by hand in docs/adding_a_model.md, stage by stage.
DPN92_CIFAR_PARAMETERS = 34_236_634


# --------------------------------------------------------------------------- counting by formula
# These formulas know the architectures only from their published descriptions,
# not from best_minibatch.training.models: layer by layer, weights plus biases.


def conv(in_channels: int, out_channels: int, kernel: int, groups: int = 1) -> int:
    return (in_channels // groups) * out_channels * kernel * kernel  # no conv bias (BN follows)


def bn(channels: int) -> int:
    return 2 * channels  # scale and shift; running statistics are buffers


def linear(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def small_cnn_formula(num_classes: int, width: int = 16) -> int:
    c1, c2, c3 = width, 2 * width, 4 * width
    return (
        conv(3, c1, 3) + bn(c1)
        + conv(c1, c2, 3) + bn(c2)
        + conv(c2, c3, 3) + bn(c3)
        + conv(c3, c3, 3) + bn(c3)
        + linear(c3, num_classes)
    )  # fmt: skip


def resnet18_cifar_formula(num_classes: int) -> int:
    total = conv(3, 64, 3) + bn(64)
    in_planes = 64
    for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block_stride in (stride, 1):
            total += conv(in_planes, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if block_stride != 1 or in_planes != planes:
                total += conv(in_planes, planes, 1) + bn(planes)  # projection shortcut
            in_planes = planes
    return total + linear(512, num_classes)


def dpn92_cifar_formula(num_classes: int) -> int:
    groups = 32
    total = conv(3, 64, 3) + bn(64)
    channels = 64
    stages = [(96, 256, 3, 16), (192, 512, 4, 32), (384, 1024, 20, 24), (768, 2048, 3, 128)]
    for bottleneck, out_planes, blocks, dense in stages:
        produced = out_planes + dense
        for i in range(blocks):
            total += conv(channels, bottleneck, 1) + bn(bottleneck)
            total += conv(bottleneck, bottleneck, 3, groups=groups) + bn(bottleneck)
            total += conv(bottleneck, produced, 1) + bn(produced)
            if i == 0:
                total += conv(channels, produced, 1) + bn(produced)  # projection shortcut
                channels = out_planes + 2 * dense
            else:
                channels += dense  # residual width stays; the dense path grows
    assert channels == 2560
    return total + linear(channels, num_classes)


# --------------------------------------------------------------------------- parameter counts


def test_small_cnn_parameter_count_matches_layer_formula() -> None:
    assert small_cnn_formula(10) == 61_338
    assert count_parameters(build_model("small_cnn")) == small_cnn_formula(10)


def test_small_cnn_width_option_changes_count_as_formula_says() -> None:
    model = build_model("small_cnn", num_classes=7, width=8)
    assert count_parameters(model) == small_cnn_formula(7, width=8)


def test_resnet18_parameter_count_matches_formula_and_published_figure() -> None:
    assert resnet18_cifar_formula(10) == RESNET18_CIFAR_PARAMETERS
    assert count_parameters(build_model("resnet18")) == RESNET18_CIFAR_PARAMETERS


def test_resnet18_head_follows_num_classes() -> None:
    model = build_model("resnet18", num_classes=100)
    assert count_parameters(model) == resnet18_cifar_formula(100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_dpn92_parameter_count_matches_derivation() -> None:
    assert dpn92_cifar_formula(10) == DPN92_CIFAR_PARAMETERS
    assert count_parameters(build_model("dpn92")) == DPN92_CIFAR_PARAMETERS


def test_documented_counts_match_the_derived_figures() -> None:
    text = DOC.read_text()
    for figure in (small_cnn_formula(10), RESNET18_CIFAR_PARAMETERS, DPN92_CIFAR_PARAMETERS):
        assert f"{figure:,}" in text, f"{figure:,} is not stated in {DOC.name}"


def test_count_parameters_skips_frozen_parameters() -> None:
    model = build_model("small_cnn")
    head = model[-1]
    assert isinstance(head, nn.Linear)
    head.requires_grad_(False)
    assert count_parameters(model) == small_cnn_formula(10) - linear(64, 10)


# --------------------------------------------------------------------------- forward, structure


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_gives_logits_per_image(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    model.train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_batchnorm(name: str) -> None:
    # The gradient probe runs BN in training mode and the training loop copies its buffers.
    model = build_model(name)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet18_has_cifar_stem() -> None:
    model = build_model("resnet18")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_dpn92_blocks_and_final_width() -> None:
    model = build_model("dpn92")
    assert [len(stage) for stage in model.stages] == [3, 4, 20, 3]
    assert model.classifier.in_features == 2560
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 30 and all(m.groups == 32 for m in grouped)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_builds_identical_parameters(name: str) -> None:
    torch.manual_seed(123)
    first = build_model(name).state_dict()
    torch.manual_seed(123)
    second = build_model(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    torch.manual_seed(124)
    other = build_model(name).state_dict()
    assert not all(torch.equal(first[key], other[key]) for key in first)


# --------------------------------------------------------------------------- errors


def test_unknown_name_names_model_known_names_and_parameter() -> None:
    with pytest.raises(ValueError) as error:
        build_model("alexnet")
    message = str(error.value)
    assert "'alexnet'" in message
    assert all(name in message for name in MODELS)
    assert "gradient_training.model.name" in message
    assert MODEL_PARAMETER == "gradient_training.model.name"


def test_unknown_option_names_option_and_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"depth.*width"):
        build_model("small_cnn", depth=3)
    with pytest.raises(ValueError, match="no options"):
        build_model("resnet18", width=3)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_num_classes_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_cnn", num_classes=bad)  # type: ignore[arg-type]


def test_bad_small_cnn_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="width"):
        build_model("small_cnn", width=0)


# --------------------------------------------------------------------------- it learns


def test_small_cnn_learns_the_sample_above_chance(sample_dataset: ImageDataset) -> None:
    """Two quick epochs on 2,000 real training images beat chance (10%) clearly on the test split."""
    index = sample_dataset.index

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = index[index["split"] == name].sort_values("row")
        images = sample_dataset.images[name][torch.tensor(rows["row"].to_numpy())]
        return to_model_input(images), torch.tensor(rows["label"].to_numpy())

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    torch.manual_seed(0)
    subset = torch.randperm(len(train_y))[:2000]
    train_x, train_y = train_x[subset], train_y[subset]
    model = build_model("small_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(2):
        for start in range(0, len(train_y), 100):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                model(train_x[start : start + 100]), train_y[start : start + 100]
            )
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"small_cnn test accuracy after 2 epochs on 2,000 images: {accuracy:.3f}")
    assert accuracy > 0.25, f"test accuracy {accuracy:.3f} after 2 epochs"
