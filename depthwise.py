"""Large-kernel depthwise convolutions whose CPU backward runs as two forward convolutions: the same function and
the same parameters as nn.Conv2d, with ConvNeXt's 7x7 backward 1.15-4.5x faster on CPU (BENCHMARKS.md, "Where a
CPU training step goes").

PyTorch's CPU weight gradient of a depthwise convolution (oneDNN, channels_last) is one of the slowest kernels
of a ConvNeXt step: 54 ms for a 7x7 kernel over a (4, 768, 4, 4) input, 0.2 GFLOP/s. Here both gradients are
forward convolutions, which oneDNN runs well: the input gradient is the depthwise convolution of the output
gradient with the flipped kernel, and the weight gradient is the correlation of each (sample, channel) plane of
the padded input with the same plane of the output gradient, one group per plane, summed over the batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# Measured faster at 7x7 (ConvNeXt: 1.15-4.5x per layer, the larger gains on the deeper, smaller maps) and
# slower at 3x3 (MiT's Mix-FFN, MBConv: 0.2-0.34x, PyTorch's own 3x3 kernel is good), so only 7x7 and up.
MIN_KERNEL = 7


class _DepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        (ph, pw), channels = ctx.padding, weight.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad_out, weight.flip(-2, -1), padding=(ph, pw), groups=channels)
        if ctx.needs_input_grad[1]:
            n, _, h, w = x.shape
            planes = F.pad(x, (pw, pw, ph, ph)).reshape(1, n * channels, h + 2 * ph, w + 2 * pw)
            kernels = grad_out.reshape(n * channels, 1, h, w)
            grad_w = F.conv2d(planes, kernels, groups=n * channels).reshape(n, channels, 1, *weight.shape[-2:])
            grad_w = grad_w.sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d for a stride-1, 'same'-padded depthwise convolution (any odd kernel); float32 CPU training takes the faster
    backward, everything else (GPUs, autocast, inference) runs nn.Conv2d's own."""

    def forward(self, x):
        if x.is_cpu and torch.is_grad_enabled() and x.dtype == torch.float32 \
                and not torch.is_autocast_enabled("cpu"):
            return _DepthwiseConv.apply(x, self.weight, self.bias, self.padding)
        return super().forward(x)


def _qualifies(conv):
    if type(conv) is not nn.Conv2d:
        return False
    kernel = conv.kernel_size
    return (conv.groups == conv.in_channels == conv.out_channels > 1
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and all(k % 2 for k in kernel) and conv.padding == (kernel[0] // 2, kernel[1] // 2)
            and min(kernel) >= MIN_KERNEL)


def swap_convs(module, qualifies, fast):
    """Every convolution of module that qualifies becomes the nn.Conv2d subclass fast, holding the same parameters
    (names, shapes and values unchanged); returns how many were swapped."""
    swapped = 0
    for conv in module.modules():
        if qualifies(conv):
            conv.__class__ = fast
            swapped += 1
    return swapped


def use_depthwise(module):
    """module with every stride-1 'same'-padded depthwise nn.Conv2d of a kernel of MIN_KERNEL or more as a
    DepthwiseConv2d; returns how many were swapped."""
    return swap_convs(module, _qualifies, DepthwiseConv2d)
