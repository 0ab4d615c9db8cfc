"""Convolutions whose kernel equals their stride (MiT's spatial reduction before attention, ConvNeXt's
downsampling, every 1x1 convolution: MaxViT's MBConv) computed on CPU as one matrix product over the image's
non-overlapping patches: the same function and the same parameters as nn.Conv2d, and faster where oneDNN's
convolution is slow, on small maps (BENCHMARKS.md, "Lever: kernel-equals-stride and 1x1 convolutions as a
matrix product").

Such a convolution reads each input pixel once, so it is a Linear layer over (kernel x kernel x channels) patches
(for a 1x1 kernel over a channels_last map, a view of the map itself). oneDNN's weight gradient for it is slow
when the output map is small (6.3 ms against 1.3 ms as a matrix product for MiT-B3's (4, 320, 8, 8) reduction,
batch 4, 2 threads), and its forward is slower on few-row maps; on large maps of few channels the convolution
wins, so the product runs only where it was measured faster.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from depthwise import swap_convs

# Where the matrix product was measured faster on a 2-core AVX-512 CPU, as (least input channels, most patch
# rows = batch x output pixels): in training up to 256 rows of any width and up to 4096 rows of 192 channels or
# more; in inference (no autograd) up to 64 rows of 64 channels or more and up to 256 rows of 256 or more.
TRAIN_RULE = ((0, 256), (192, 4096))
INFER_RULE = ((64, 64), (256, 256))


def _faster(in_channels, rows, training):
    return any(in_channels >= least and rows <= most for least, most in (TRAIN_RULE if training else INFER_RULE))


def _patch_product(x, weight, bias):
    """conv2d(x, weight, bias, stride=kernel) as patches @ weight: the patches are laid out in the weight's own
    memory order, so the weight is only viewed, never copied; the output keeps conv2d's memory format."""
    cout, cin, kh, kw = weight.shape
    n, _, h, w = x.shape
    ho, wo = h // kh, w // kw
    keep_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x = x[:, :, :ho * kh, :wo * kw]  # conv2d drops the rows and columns a last whole patch would not cover
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    if channels_last:
        planes = x.permute(0, 2, 3, 1).reshape(n, ho, kh, wo, kw, cin).permute(0, 1, 3, 2, 4, 5)
        matrix = weight.permute(0, 2, 3, 1).reshape(cout, -1)
    else:
        planes = x.reshape(n, cin, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5)
        matrix = weight.reshape(cout, -1)
    out = F.linear(planes.reshape(n * ho * wo, -1), matrix, bias).view(n, ho, wo, cout).permute(0, 3, 1, 2)
    if channels_last or keep_last:
        return out
    return out.contiguous()


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d with kernel == stride and no padding; float32 on CPU takes the matrix product where it is faster,
    everything else (GPUs, autocast, other shapes) runs nn.Conv2d's own."""

    def forward(self, x):
        if x.is_cpu and x.dtype == torch.float32 and x.dim() == 4 and not torch.is_autocast_enabled("cpu"):
            kh, kw = self.kernel_size
            rows = x.shape[0] * (x.shape[2] // kh) * (x.shape[3] // kw)
            if rows and _faster(self.in_channels, rows, torch.is_grad_enabled()):
                return _patch_product(x, self.weight, self.bias)
        return super().forward(x)


def _qualifies(conv):
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def use_patch_product(module):
    """module with every kernel-equals-stride nn.Conv2d, 1x1 included (no padding, dilation or groups), as a
    PatchConv2d; returns how many were swapped."""
    return swap_convs(module, _qualifies, PatchConv2d)
