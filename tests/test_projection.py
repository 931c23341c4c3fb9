"""Projection shortcuts inside one stream: torchvision's ResNets keep every block rewritten.

A downsampling block x_{l+1} = relu(P(x_l) + f(x_l)) (P: 1x1 convolution + BatchNorm) is a step
whose K_l = dr/dx_l is dense and changes the state's shape; the backward's scan applies K_l^T
as the shortcut's VJP, position by position. Oracle: tests/oracle_general.py's eager iteration
on a view of the same torchvision model (the shortcut inside the residual function, where the
oracle's scan takes K_l^T by autograd), float64, several k; and exact autograd at k >= L.
"""
import pytest
import torch
import torch.nn.functional as F

import zoo
from helpers import max_rel_err, worst_param
from oracle_general import highway_backward_general


def resnet_view(model, inputs):
    """(streams, head) of a torchvision ResNet (zoo.WithLoss) for highway_backward_general:
    one stream from the stem's output through every block (ResNet-50's first block projects
    the stem's 64 channels to 256)."""
    net, x, labels = model.model, inputs["x"], inputs["labels"]
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))

    def branch(b):
        def block(x):
            out = b.relu(b.bn1(b.conv1(x)))
            out = b.bn2(b.conv2(out))
            if hasattr(b, "conv3"):                              # Bottleneck
                out = b.bn3(b.conv3(b.relu(out)))
            return (out,)
        return block

    def residual(b):
        if b.downsample is None:
            return lambda x, z: torch.relu(x + z)
        return lambda x, z: torch.relu(z + b.downsample(x))

    def head(states):
        out = net.fc(torch.flatten(net.avgpool(states[0][-1]), 1))
        return F.cross_entropy(out, labels)

    return [(h, [(branch(b), residual(b)) for b in blocks])], head


def oracle(model, inputs, k):
    import copy

    m = copy.deepcopy(model)
    highway_backward_general(*resnet_view(m, inputs), k)
    return zoo.grads(m)


@pytest.mark.parametrize("name,L,k", [("tv_resnet18", 8, 1), ("tv_resnet18", 8, 3),
                                      pytest.param("tv_resnet50", 16, 2, marks=pytest.mark.slow)])
def test_resnet_matches_oracle(name, L, k):
    model, inputs = zoo.build(name)
    got, backend = zoo.compiled(model, inputs, k)
    (report,) = backend.reports
    (stream,) = report.streams
    assert stream.length == L and "projection" in stream.residual_kind, str(report)
    assert "dense K_l^T is the shortcut's VJP" in stream.scan, str(report)
    assert report.coverage == 1.0 and not report.skipped, str(report)
    want = oracle(model, inputs, k)
    assert max_rel_err(got, want) < 1e-10, worst_param(got, want)
    assert max_rel_err(got, zoo.exact(name, model, inputs), floor=1e-4) > 1e-6


def test_oracle_view_is_the_model():
    """The view computes the model's loss, and at k >= L the oracle is exact autograd."""
    model, inputs = zoo.build("tv_resnet18")
    streams, head = resnet_view(model, inputs)
    states = [[streams[0][0]]]
    for block, residual in streams[0][1]:
        states[0].append(residual(states[0][-1], *block(states[0][-1])))
    model2, _ = zoo.build("tv_resnet18")
    assert torch.allclose(head(states), model2(**inputs).loss, rtol=1e-12, atol=0)
    want = zoo.exact("tv_resnet18", model, inputs)
    assert max_rel_err(oracle(model, inputs, 8), want) < 1e-10
