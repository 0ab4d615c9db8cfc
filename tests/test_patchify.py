"""patchify.PatchConv2d computes what nn.Conv2d computes (value, gradients, memory format) for kernel-equals-stride
and 1x1 convolutions, takes the matrix product only where its rule says, and build_model's MiT and MaxViT keep
today's function and parameters with it."""
import copy

import pytest
import torch
import torch.nn as nn

import patchify
from model import build_model
from patchify import PatchConv2d, use_patch_product
from test_depthwise import as_plain, assert_compiled_matches, value_and_grads

CL = torch.channels_last


def layout(t):
    return "channels_last" if t.is_contiguous(memory_format=CL) and not t.is_contiguous() else "contiguous"


def strides(t):
    """The strides that address memory (a size-1 dimension's stride is never used)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)


def conv_pair(cin, cout, kernel, bias, seed, weight_last):
    torch.manual_seed(seed)
    plain = nn.Conv2d(cin, cout, kernel, stride=kernel, bias=bias)
    if weight_last:
        plain = plain.to(memory_format=CL)
    fast = copy.deepcopy(plain)
    fast.__class__ = PatchConv2d
    return plain, fast


@pytest.fixture
def products(monkeypatch):
    """How many forwards took the matrix product."""
    calls = []
    real = patchify._patch_product

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(patchify, "_patch_product", counted)
    return calls


@pytest.mark.parametrize("cin,cout,kernel,bias,shape,x_last,weight_last,seed", [
    (8, 5, (2, 2), True, (2, 9, 7), True, True, 0),        # odd sides: conv2d drops the last row and column
    (3, 6, (4, 4), False, (1, 13, 4), False, False, 1),    # batch 1, extreme aspect, a single patch wide, NCHW
    (6, 4, (2, 3), True, (3, 8, 9), True, False, 2),       # non-square kernel, channels_last input, NCHW weight
    (5, 7, (3, 3), True, (2, 7, 10), False, True, 3),      # NCHW input, channels_last weight
    (16, 32, (1, 1), True, (4, 3, 5), True, True, 4),      # 1x1 (MaxViT's MBConv): a view of the map
    (12, 3, (1, 1), False, (2, 1, 1), True, True, 5),      # 1x1 on a pooled map (squeeze-excite)
])
def test_value_gradients_and_memory_format_equal_nn_conv2d(cin, cout, kernel, bias, shape, x_last, weight_last,
                                                           seed, products):
    plain, fast = conv_pair(cin, cout, kernel, bias, seed, weight_last)
    batch, height, width = shape
    x = torch.randn(batch, cin, height, width)
    if x_last:
        x = x.contiguous(memory_format=CL)
    out = plain(x)
    grad_out = torch.randn_like(out)
    out, grad_x, grads = value_and_grads(plain, x, grad_out)
    fast_out, fast_grad_x, fast_grads = value_and_grads(fast, x, grad_out)
    assert len(products) == 1  # these few rows are inside the training rule
    assert fast_out.shape == out.shape and layout(fast_out) == layout(out)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad_x, grad_x, rtol=1e-5, atol=1e-5)
    assert layout(fast_grad_x) == layout(grad_x)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        assert strides(fast_grads[name]) == strides(grads[name])  # the layout fused AdamW and the state dict see
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,kernel,side,training,product", [
    (64, 8, 32, True, True),      # batch 4 x 4 x 4 patches = 64 rows: both rules
    (64, 8, 32, False, True),
    (64, 8, 128, True, False),    # 1024 rows of 64 channels: the convolution in training
    (320, 8, 128, True, True),    # ... and the product for 192 channels or more, up to 4096 rows
    (320, 1, 64, True, False),    # 16384 rows
    (320, 8, 64, False, True),    # inference: 256 rows of 256 channels or more
    (128, 8, 64, False, False),   # ... not of 128
    (3, 8, 64, False, False),     # a stem's 3 channels in inference
])
def test_the_product_runs_where_its_rule_says_and_the_result_is_the_same_either_way(cin, kernel, side, training,
                                                                                    product, products):
    plain, fast = conv_pair(cin, 8, (kernel, kernel), True, 0, True)
    x = torch.randn(4, cin, side, side).contiguous(memory_format=CL)
    with torch.set_grad_enabled(training):
        out, fast_out = plain(x), fast(x)
    assert len(products) == int(product)
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)


def test_only_kernel_equals_stride_unpadded_ungrouped_convs_are_swapped():
    convs = nn.Sequential(nn.Conv2d(4, 4, 2, stride=2),              # swapped
                          nn.Conv2d(4, 8, (2, 4), stride=(2, 4)),    # swapped
                          nn.Conv2d(4, 4, 1),                        # swapped
                          nn.Conv2d(4, 4, 2, stride=1),
                          nn.Conv2d(4, 4, 2, stride=2, padding=1),
                          nn.Conv2d(4, 4, 2, stride=2, groups=2),
                          nn.Conv2d(4, 4, 2, stride=2, dilation=2),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert use_patch_product(convs) == 3
    assert [type(c) is PatchConv2d for c in convs] == [True] * 3 + [False] * 5


def encoder_grads(net, x):
    features = net.encoder(x)
    sum(f.square().mean() for f in features).backward()
    return {k: p.grad.double() for k, p in net.encoder.named_parameters()}


# MiT-B0: the spatial reductions of its first three stages, 2 blocks each. MaxViT-T: per MBConv block its 1x1
# expansion and projection and squeeze-excite's two, 11 blocks, and the 1x1 shortcut of the three stages that
# change width.
@pytest.mark.parametrize("encoder,swapped,size,seed", [("mit_b0", 6, (96, 32), 42), ("mit_b0", 6, (32, 224), 3),
                                                       ("maxvit_tiny", 47, (64, 128), 7)])
def test_mit_and_maxvit_keep_their_parameters_logits_and_gradients(encoder, swapped, size, seed, products):
    torch.manual_seed(seed)
    # eval: batch norm over a 2x2 map of two images would make float32 rounding itself the largest difference
    model = build_model(encoder, 5, img_size=64).to(memory_format=CL).eval()
    assert sum(type(m) is PatchConv2d for m in model.modules()) == swapped
    plain = as_plain(model, PatchConv2d)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in plain.state_dict().items()]
    x = torch.randn(2, 3, *size).contiguous(memory_format=CL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    grads, fast_grads = encoder_grads(plain, x), encoder_grads(model, x)
    assert products  # the small maps of a 64 px input take the product, in inference and training
    # Gradients that are zero in exact arithmetic (a projection before a LayerNorm) are float32 rounding in both,
    # so each is held against float64: the product may not be less accurate than the convolution.
    exact = encoder_grads(copy.deepcopy(plain).double(), x.double())
    top = max(g.abs().max() for g in exact.values())
    for name, g in exact.items():
        assert (fast_grads[name] - g).abs().max() <= 2 * (grads[name] - g).abs().max() + 1e-7 * top, name


def test_autocast_and_other_dtypes_run_nn_conv2d_itself(products):
    plain, fast = conv_pair(4, 6, (2, 2), True, 0, True)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(x), plain(x))
    assert torch.equal(fast.double()(x.double()), plain.double()(x.double()))
    assert not products


def test_compiled_training_traces_it_in_one_graph_with_the_same_gradients():
    plain, fast = conv_pair(6, 5, (2, 2), True, 4, True)
    x = torch.randn(2, 6, 9, 7).contiguous(memory_format=CL)
    grad_out = torch.randn(2, 5, 4, 3)
    assert_compiled_matches(plain, fast, x, grad_out)
