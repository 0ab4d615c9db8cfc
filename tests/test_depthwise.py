"""depthwise.DepthwiseConv2d computes what nn.Conv2d computes, value and gradients, and build_model's ConvNeXt
keeps today's function and parameters with it (MiT's and MaxViT's 3x3 depthwise convolutions are left alone)."""
import copy

import pytest
import torch
import torch.nn as nn

from depthwise import DepthwiseConv2d, use_depthwise
from model import build_model


def conv_pair(channels, kernel, bias, seed):
    torch.manual_seed(seed)
    plain = nn.Conv2d(channels, channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=channels,
                      bias=bias)
    fast = copy.deepcopy(plain)
    fast.__class__ = DepthwiseConv2d  # any odd kernel, also those use_depthwise leaves to nn.Conv2d
    return plain, fast


def value_and_grads(conv, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    out.backward(grad_out)
    return out, x.grad, {name: p.grad for name, p in conv.named_parameters()}


@pytest.mark.parametrize("channels,kernel,bias,shape,channels_last,seed", [
    (8, (7, 7), True, (2, 5, 9), True, 0),      # odd sides smaller than the kernel
    (6, (3, 3), False, (3, 13, 4), False, 1),   # extreme aspect, NCHW
    (5, (3, 5), True, (1, 8, 8), True, 2),      # non-square kernel, batch 1
    (16, (7, 7), True, (4, 4, 4), True, 3),     # ConvNeXt's deepest stage: a 4x4 map under a 7x7 kernel
])
def test_value_and_gradients_equal_nn_conv2d(channels, kernel, bias, shape, channels_last, seed):
    plain, fast = conv_pair(channels, kernel, bias, seed)
    batch, height, width = shape
    x = torch.randn(batch, channels, height, width)
    grad_out = torch.randn(batch, channels, height, width)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    out, grad_x, grads = value_and_grads(plain, x, grad_out)
    fast_out, fast_grad_x, fast_grads = value_and_grads(fast, x, grad_out)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad_x, grad_x, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-4)


def test_only_stride_one_same_padded_depthwise_convs_of_7x7_and_up_are_swapped():
    convs = nn.Sequential(nn.Conv2d(4, 4, 7, padding=3, groups=4),   # swapped
                          nn.Conv2d(4, 4, (9, 7), padding=(4, 3), groups=4),   # swapped
                          nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.Conv2d(4, 4, 7, padding=3, groups=4, stride=2),
                          nn.Conv2d(4, 4, 7, padding=0, groups=4),
                          nn.Conv2d(4, 8, 7, padding=3, groups=4),
                          nn.Conv2d(4, 4, 7, padding=3),
                          nn.Conv2d(4, 4, 7, padding=6, dilation=2, groups=4))
    assert use_depthwise(convs) == 2
    assert [type(c) is DepthwiseConv2d for c in convs] == [True, True] + [False] * 6


def assert_compiled_matches(plain, fast, x, grad_out):
    """fast compiled in one graph (fullgraph) computes plain's value and gradients."""
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    out, grad_x, grads = value_and_grads(plain, x, grad_out)
    fast_out, fast_grad_x, fast_grads = value_and_grads(compiled, x, grad_out)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad_x, grad_x, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(fast_grads["_orig_mod." + name], grads[name], rtol=1e-4, atol=1e-4)


def as_plain(model, fast=DepthwiseConv2d):
    """A copy of model with every convolution of the class fast back to nn.Conv2d: today's network."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is fast:
            module.__class__ = nn.Conv2d
    return plain


@pytest.mark.parametrize("seed", [42, 7])
def test_convnext_keeps_its_parameters_logits_and_gradients(seed):
    torch.manual_seed(seed)
    model = build_model("convnext_tiny", 5, img_size=64).to(memory_format=torch.channels_last).train()
    assert sum(type(m) is DepthwiseConv2d for m in model.modules()) == 18  # every block's 7x7
    plain = as_plain(model)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in plain.state_dict().items()]
    x = torch.randn(2, 3, 64, 96 if seed == 42 else 32).contiguous(memory_format=torch.channels_last)
    outputs = []
    for net in (plain, model):
        logits = net(x)
        (logits.square().mean() + logits[:, 1].mean()).backward()
        outputs.append((logits, {k: p.grad for k, p in net.named_parameters()}))
    (logits, grads), (fast_logits, fast_grads) = outputs
    torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(fast_grads[name] / scale, grad / scale, rtol=1e-4, atol=1e-4)


def test_autocast_and_inference_run_nn_conv2d_itself():
    plain, fast = conv_pair(4, (3, 3), True, 0)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), plain(x))
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_compiled_training_traces_it_in_one_graph_with_the_same_gradients():
    plain, fast = conv_pair(6, (7, 7), True, 4)
    x = torch.randn(2, 6, 9, 7)
    grad_out = torch.randn(2, 6, 9, 7)
    assert_compiled_matches(plain, fast, x, grad_out)
