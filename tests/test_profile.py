"""profile_step.py / bench.py --profile: the step's FLOPs per part agree with a hand count of the network, and
the profile prints every part of the step."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from losses import build_loss
from model import build_model
from profile_step import step_flops


def conv_flops(cin, cout, kernel, side, batch=1):
    return 2 * cin * cout * kernel * kernel * side * side * batch


def unet_decoder_flops(size, classes):
    """ConvNeXt-T's UNet written out: (input + skip -> out) channels per block, two 3x3 convs each, the block at
    size / 16 .. size, then the 3x3 head."""
    blocks = [(768, 384, 256, 16), (256, 192, 128, 8), (128, 96, 64, 4), (64, 0, 32, 2), (32, 0, 16, 1)]
    decoder = sum(conv_flops(cin + skip, cout, 3, size // div) + conv_flops(cout, cout, 3, size // div)
                  for cin, skip, cout, div in blocks)
    return decoder, conv_flops(16, classes, 3, size)


@pytest.mark.parametrize("size,classes", [(64, 5), (96, 16)])
def test_decoder_backward_is_twice_its_forward_and_the_step_three_times_the_forward(size, classes):
    torch.manual_seed(0)
    model = build_model("convnext_tiny", classes, img_size=size).train()
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, classes, (2, size, size))
    flops = {key: value * 1e9 for key, value in step_flops(model, build_loss("dicefocal"), x, y).items()}
    decoder, head = unet_decoder_flops(size, classes)
    assert flops[("decoder", "forward")] == pytest.approx(decoder, rel=1e-9)
    assert flops[("heads", "forward")] == pytest.approx(head, rel=1e-9)
    # Every decoder and head convolution needs both gradients: input and weight, each one forward's work.
    assert flops[("decoder", "backward")] == pytest.approx(2 * decoder, rel=1e-9)
    assert flops[("heads", "backward")] == pytest.approx(2 * head, rel=1e-9)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    forward = counter.get_total_flops()
    assert sum(value for (_, phase), value in flops.items() if phase == "forward") == pytest.approx(forward, rel=1e-9)
    # The stem's input needs no gradient, so the step is a little under 3x the forward.
    assert 2.95 * forward < sum(flops.values()) <= 3 * forward


def test_bench_profile_prints_each_part_of_the_step_and_the_top_operators():
    done = subprocess.run([sys.executable, "bench.py", "--encoder", "mit_b0", "--img-size", "32", "--batch-size",
                           "2", "--bench-steps", "2", "--data", "synthetic", "--profile"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for part in ("step", "encoder", "decoder+heads", "loss", "optimizer", "sum of the parts", "all"):
        assert part in rows, part
    assert "aten::convolution_backward" in done.stdout and "Self CPU time total" in done.stdout
