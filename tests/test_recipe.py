"""The training recipe as users rely on it: each parameter group's LR follows OneCycle at its own peak with its own
weight decay, the weight EMA is the average it claims and resumes exactly, flip TTA is the flipped average,
drop-path reaches the encoder, summary.csv and TensorBoard hold what metrics.jsonl holds, the header's GFLOPs."""
import csv
import json
import math
import sys
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.optim import param_groups_weight_decay

from conftest import run_script, sigterm_at_step
import checkpoint
import config
import data
from distributed import Run
import evaluation
import files
import logs
import optim
import predict
import preload
import runs
import step
from encoders import ENCODERS
from labels import UserError, artefact_scheme
from model import build_model
from test_train import tiny

CPU = torch.device("cpu")


def tiny_cfg(*flags, encoder="mit_b0"):
    args = config.parse_args(["--encoder", encoder, "--img-size", "64", "--norm", "gn", "--batch-size", "2", *flags])
    return config.resolve_config(args, 1, CPU)


def one_cycle_lr(peak, step, total, pct_start=0.3):
    """torch's OneCycleLR (cosine, two phases) written out: from peak/25 up to peak, then down to peak/25/1e4."""
    initial, final, warm_end = peak / 25, peak / 25 / 1e4, pct_start * total - 1
    if step <= warm_end:
        start, end, pct = initial, peak, step / warm_end
    else:
        start, end, pct = peak, final, (step - warm_end) / (total - 1 - warm_end)
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def mit_depth(name):
    """MiT-B0's stem (patch_embed) is depth 0, its four stages 1..4, by reading the names."""
    return 0 if name.startswith("patch_embed") else int(name.split(".")[0][len("stages_"):]) + 1


def resnet_depth(name):
    return 0 if name.startswith(("conv1", "bn1")) else int(name[len("layer")])


@pytest.mark.parametrize("encoder, depth_of", [("mit_b0", mit_depth), ("resnet10t", resnet_depth)])
def test_every_group_gets_its_own_one_cycle_lr_and_weight_decay(encoder, depth_of):
    cfg = tiny_cfg("--no-decay-norms", "--head-lr-mult", "10", "--layer-decay", "0.5", "--weight-decay", "0.05",
                   "--epochs", "2", encoder=encoder)
    torch.manual_seed(0)
    network = step.build_network(cfg, CPU, 1)
    parts = step.build_training(cfg, network, 1, CPU, steps_per_epoch=10)
    total = 20
    group_of = {id(p): g for g in parts.optimizer.param_groups for p in g["params"]}
    expected_peak, expected_decay = {}, {}
    for name, p in network.named_parameters():
        if name.startswith("encoder."):
            expected_peak[name] = cfg["lr"] * 0.5 ** (5 - depth_of(name[len("encoder."):]))
        else:
            expected_peak[name] = cfg["lr"] * 10
        expected_decay[name] = 0.0 if p.ndim == 1 else 0.05
    assert len({round(v, 12) for v in expected_peak.values()}) == 6, "five encoder depths and the decoder"
    for name, p in network.named_parameters():
        assert group_of[id(p)]["weight_decay"] == expected_decay[name], name

    # The first AdamW step with fresh moments moves each weight by lr * g / (|g| + eps) after decaying it by
    # lr * weight_decay: the LR and decay a parameter really got, read back from the weights.
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    grads = {n: torch.randn_like(p) for n, p in network.named_parameters()}
    for n, p in network.named_parameters():
        p.grad = grads[n].clone()
    parts.optimizer.step()
    for name, p in network.named_parameters():
        lr = one_cycle_lr(expected_peak[name], 0, total)
        moved = before[name] * (1 - lr * expected_decay[name]) - lr * grads[name] / (grads[name].abs() + 1e-8)
        torch.testing.assert_close(p.detach(), moved, rtol=1e-5, atol=1e-9, msg=name)
    parts.scheduler.step()
    for at in range(1, total):
        if at in (3, 5, 6, 12, 19):
            for name, p in network.named_parameters():
                assert group_of[id(p)]["lr"] == pytest.approx(one_cycle_lr(expected_peak[name], at, total),
                                                              rel=1e-9), (name, at)
        parts.optimizer.step()
        parts.scheduler.step()


def test_defaults_keep_one_group_with_decay_on_everything_and_the_plain_schedule():
    cfg = tiny_cfg("--epochs", "3")
    network = step.build_network(cfg, CPU, 1)
    parts = step.build_training(cfg, network, 1, CPU, steps_per_epoch=4)
    (group,) = parts.optimizer.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in network.parameters()]
    assert group["weight_decay"] == cfg["weight_decay"] and group["lr_scale"] == 1
    reference = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=cfg["lr"])
    plain = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=cfg["lr"], total_steps=12, pct_start=0.3,
                                                anneal_strategy="cos")
    for _ in range(12):
        assert group["lr"] == reference.param_groups[0]["lr"]
        parts.optimizer.step(), parts.scheduler.step(), reference.step(), plain.step()


@pytest.mark.parametrize("encoder, img_size", [("mit_b0", 64), ("swin_tiny", 224), ("coatnet_0", 224)])
def test_no_decay_set_is_timms_for_the_whole_model(encoder, img_size):
    # timm's own rule on the full (not features_only) model: 1-d parameters and its no_weight_decay() names.
    spec = ENCODERS[encoder]
    full = timm.create_model(spec["timm"], **spec["kwargs"], **({"img_size": img_size} if spec["needs_img_size"]
                                                                 else {}))
    names = full.no_weight_decay() if hasattr(full, "no_weight_decay") else set()
    groups = param_groups_weight_decay(full, 0.01, no_weight_decay_list=names)
    without = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    canonical = lambda name: name.replace("_", ".")  # noqa: E731  features_only flattens "stages.0" to "stages_0"
    timm_names = {canonical(n) for n, p in full.named_parameters() if id(p) in without}
    encoder_net = build_model(encoder, 16, img_size=img_size).encoder
    ours = {canonical(n) for n, p in encoder_net.named_parameters()
            if not optim.decays(n, p, {"no_decay_norms": True})}
    assert ours == timm_names & {canonical(n) for n, _ in encoder_net.named_parameters()}
    assert any("relative" in n for n in ours) or encoder == "mit_b0"


def test_layer_decay_refuses_an_encoder_without_stages_it_can_read():
    encoder = build_model("resnet10t", 16, img_size=64).encoder
    encoder.feature_info.module_name = lambda: ["nothing.here"]
    with pytest.raises(UserError, match="--layer-decay: .*--layer-decay 1"):
        optim.encoder_depths(encoder)


def test_ema_is_the_hand_computed_average_of_the_weights_after_each_step(synthetic_root):
    cfg = tiny_cfg("--ema", "--ema-half-life", "0.25", "--epochs", "1", "--norm", "bn")
    torch.manual_seed(0)
    network = step.build_network(cfg, CPU, 1)
    parts = step.build_training(cfg, network, 1, CPU, steps_per_epoch=8)
    decay = 0.5 ** (1 / 2)  # half-life 0.25 x 8 steps = 2 steps
    assert parts.ema.decay == pytest.approx(decay, rel=1e-12)
    states = [{k: v.clone() for k, v in network.state_dict().items()}]
    batch = _batch(synthetic_root, cfg)
    for _ in range(3):
        step.train_step(parts, [batch], cfg, CPU)
        states.append({k: v.clone() for k, v in network.state_dict().items()})
    for key, averaged in parts.ema.model.state_dict().items():
        if not averaged.is_floating_point():
            assert torch.equal(averaged, states[-1][key]), key
            continue
        hand = decay ** 3 * states[0][key].double() + sum((1 - decay) * decay ** (3 - i) * states[i][key].double()
                                                          for i in range(1, 4))
        torch.testing.assert_close(averaged.double(), hand, rtol=1e-5, atol=1e-6, msg=key)
    assert any("running_mean" in k for k in states[0]), "BatchNorm statistics are averaged too"
    assert not torch.equal(parts.ema.model.state_dict()["decoder.blocks.0.0.0.weight"],
                           network.state_dict()["decoder.blocks.0.0.0.weight"])


def _batch(root, cfg):
    samples = files.list_samples(root)[:2]
    pre = preload.preload(samples, preload.RowFormat(64, artefact_scheme()), mode="disk")
    images, masks = next(iter(data.batches(pre, [0, 1], 2, pin=False)))
    return data.to_device_batch(images, masks, CPU, channels_last=cfg["channels_last"])


def test_model_from_checkpoint_and_predict_take_the_ema_weights(tmp_path):
    cfg = tiny_cfg("--ema")
    trained, averaged = (build_model("mit_b0", 16, img_size=64, norm="gn") for _ in range(2))
    state = {"model": trained.state_dict(), "ema": averaged.state_dict(), "config": cfg}
    checkpoint.save_checkpoint(tmp_path / "best.pt", state)
    loaded = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tmp_path / "best.pt"), tmp_path / "best.pt")
    predicted = predict.load_model(tmp_path / "best.pt", CPU)[0]
    for net in (loaded, predicted):
        for key, value in averaged.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key
    del state["ema"]
    checkpoint.save_checkpoint(tmp_path / "plain.pt", state)
    plain = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(tmp_path / "plain.pt"), tmp_path / "plain.pt")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in trained.state_dict().items())


class NotFlipInvariant(nn.Module):
    """16-class logits from a fixed 3x3 convolution plus a ramp along y and x per class: a flipped image gets
    other logits than the flipped logits of the image, so flip TTA changes the prediction."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator))
            self.conv.bias.copy_(torch.randn(16, generator=generator))
        self.ramp = nn.Parameter(torch.randn(2, 16, generator=generator) * 3)

    def forward(self, x):
        h, w = x.shape[-2:]
        y, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
        position = self.ramp[0][:, None, None] * y[:, None] + self.ramp[1][:, None, None] * xs[None, :]
        return self.conv(x) + position


class FlipAveraged(nn.Module):
    """log of the mean softmax over the identity and the three flips, each flipped back: what TTA computes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        probs = [self.model(x.flip(d) if d else x).softmax(1) for d in ((), (3,), (2,), (2, 3))]
        probs = [p.flip(d) if d else p for p, d in zip(probs, ((), (3,), (2,), (2, 3)))]
        return (sum(probs) / 4).log()


class Stored:
    """The part of preload's interface evaluate reads: images and masks by row."""

    def __init__(self, images, masks):
        self.images, self.masks, self.scheme = images, masks, artefact_scheme()

    def __len__(self):
        return len(self.images)

    def image(self, row):
        return self.images[row]

    def mask(self, row):
        return self.masks[row]


def test_flip_tta_evaluation_is_the_hand_flipped_average(tmp_path):
    rng = np.random.default_rng(0)
    # One tile (32 x 32), several tiles with overlap (odd sizes), and a strip narrower than a tile (padded).
    shapes = [(32, 32), (45, 70), (77, 33), (20, 50)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    masks = [rng.integers(0, 16, (h, w)).astype(np.uint8) for h, w in shapes]
    masks[1][:10] = 255
    # evaluate reads each image's displayed size from its file (to cut the preload's padding off).
    samples = []
    for k, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{k}.png")
        samples.append(files.Sample(str(k), tmp_path / f"{k}.png", None))
    part = data.Part(samples, Stored(images, masks), {})
    model = NotFlipInvariant().eval()
    cfg = dict(heads="fine", img_size=32, work_size=1024, micro_batch=4, precision="fp32", eval_tta="flip")
    tta = evaluation.evaluate(model, part, Run(cfg, CPU))["fine"]
    plain = evaluation.evaluate(model, part, Run(dict(cfg, eval_tta="none"), CPU))["fine"]
    averaged = evaluation.evaluate(FlipAveraged(model), part, Run(dict(cfg, eval_tta="none"), CPU))["fine"]
    assert torch.equal(tta, averaged)
    assert not torch.equal(tta, plain), "the model is not flip-invariant, so TTA must change something"
    # The single-tile image by hand, without the tiler: argmax of the four flipped-back softmaxes' mean.
    with torch.no_grad():
        x = data.normalize(torch.tensor(images[0])[None])
        hand = FlipAveraged(model)(x)[0].argmax(0)
    one = evaluation.evaluate(model, data.Part(samples[:1], Stored(images[:1], masks[:1]), {}), Run(cfg, CPU))["fine"]
    expected = torch.bincount(torch.from_numpy(masks[0].astype(np.int64)).flatten() * 16 + hand.flatten(),
                              minlength=256).reshape(16, 16)
    assert torch.equal(one, expected)


def test_drop_path_reaches_the_encoder_and_is_off_in_eval_mode():
    torch.manual_seed(0)
    plain = build_model("mit_b0", 16, img_size=64, norm="gn")
    dropped = build_model("mit_b0", 16, img_size=64, norm="gn", drop_path=0.1)
    dropped.load_state_dict(plain.state_dict())
    rates = [m.drop_prob for m in dropped.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x))
        assert not torch.equal(plain.train()(x), dropped.train()(x))
    with pytest.raises(UserError, match="--drop-path 0.1: timm's dla34 has no stochastic depth"):
        build_model("dla34", 16, img_size=64, drop_path=0.1)


def test_forward_gflops_counts_a_convolution_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    # multiply-adds x 2, per output pixel of a 32 x 32 crop
    assert logs.forward_gflops(net, 32, CPU) == pytest.approx(2 * 32 * 32 * (3 * 8 * 9 + 8 * 4) / 1e9)


def test_the_step_line_shows_times_per_step_since_the_previous_line(capsys):
    cfg = {"batch_size": 4}
    parts = step.Training(*[None] * 2, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5), *[None] * 5)
    timing = {"data": 0.3, "step": 1.5, "steps": 3, "logged": time.time() - 2.0, "epoch_steps": 10}
    logs.progress_line(Run(cfg, CPU), parts, 0, 7, torch.tensor(14.0), timing)
    line = capsys.readouterr().out
    assert "loss 2.0000 lr 5.00e-01 " in line and " data 100 ms/step step 500 ms/step " in line, line
    assert (timing["data"], timing["step"], timing["steps"]) == (0.0, 0.0, 0), "the next line starts afresh"


def test_summary_csv_of_a_select_last_run_leaves_eval_blank(tmp_path):
    records = [{"epoch": 1, "train_loss": 1.25, "lr": 1e-3}, {"epoch": 2, "train_loss": 0.5, "lr": 2e-4},
               {"test": {"miou": 0.5}, "selected_epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs.write_summary_csv(tmp_path)
    assert (tmp_path / "summary.csv").read_text() == ("epoch,train_loss,eval_miou,eval_binary_iou,lr\n"
                                                      "1,1.25,,,0.001\n2,0.5,,,0.0002\n")


def test_tensorboard_missing_is_one_note_and_no_writer(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert runs.tensorboard_writer({"tensorboard": True}, tmp_path, 0, 0) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: --tensorboard: the tensorboard package is not installed" in err
    assert not (tmp_path / "tensorboard").exists()


RECIPE = ("--ema", "--eval-tta", "flip", "--no-decay-norms", "--head-lr-mult", "2", "--layer-decay", "0.9",
          "--drop-path", "0.1")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_the_recipe_logs_it_everywhere(synthetic_root, tmp_path):
    done = run_script(*tiny(synthetic_root, tmp_path, *RECIPE, "--tensorboard", "--log-every", "1"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "M parameters, " in out and "GFLOPs per 64 px crop forward" in out
    assert "group decoder+heads: peak lr" in out and "(x2)" in out and "weight EMA: half-life" in out
    assert "  [20" in out and " ms/step " in out and " peak " in out and " lr " in out
    epochs = [r for r in records(tmp_path) if "epoch" in r]
    test = [r for r in records(tmp_path) if "test" in r][0]
    for scored in [r["val"] for r in epochs] + [test["test"]]:
        assert (scored["tta"], scored["weights"]) == ("flip", "ema")
    assert json.loads((tmp_path / "config.json").read_text())["eval_tta"] == "flip"
    assert "ema" in torch.load(tmp_path / "best.pt", weights_only=True)
    # summary.csv parses and holds metrics.jsonl's numbers, one row per epoch
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(int(r["epoch"]), float(r["train_loss"]), float(r["eval_miou"]), float(r["eval_binary_iou"]),
             float(r["lr"])) for r in rows] == \
        [(r["epoch"], r["train_loss"], r["val"]["miou"], r["val"]["binary_iou"], r["lr"]) for r in epochs]
    # TensorBoard scalars at each epoch equal the records
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/miou")] == \
        [(r["epoch"], pytest.approx(r["val"]["miou"], rel=1e-6)) for r in epochs]
    assert events.Scalars("test/miou")[0].value == pytest.approx(test["test"]["miou"], rel=1e-6)
    # --eval-only scores the EMA weights with the TTA it is given, as the run's own test did
    again = run_script("train.py", "--eval-only", "--checkpoint", tmp_path / "best.pt", "--data", synthetic_root,
                       "--eval-tta", "flip")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout[again.stdout.index("{"):])["test"] == test["test"]
    assert (tmp_path / "eval-test-tta.json").is_file()


def test_ema_and_drop_path_resume_mid_epoch_exactly(synthetic_root, tmp_path):
    flags = ("--batch-size", "2", "--epochs", "1", "--ema", "--drop-path", "0.2")
    straight = run_script(*tiny(synthetic_root, tmp_path / "straight", *flags))
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "preempted"
    stopped = sigterm_at_step(tiny(synthetic_root, run_dir, *flags, "--log-every", "1"))
    assert stopped.returncode == 0 and "SIGTERM: saved" in stopped.stdout, stopped.stderr
    assert 2 <= torch.load(run_dir / "last.pt", weights_only=True)["step"] < 7
    resumed = run_script(*tiny(synthetic_root, run_dir, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "straight", run_dir))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [r for r in records(run_dir) if "test" in r] == [r for r in records(tmp_path / "straight") if "test" in r]
