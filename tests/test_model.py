"""Models: output shapes for every encoder and decoder/head choice, sizes the encoders cannot take, parameter
counts against the earlier prototype, encoder weights from SegFormer-named files, and offline --pretrained."""
import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import run_script
from labels import UserError
from model import (ENCODERS, build_model, check_img_size, default_batch, load_encoder_weights, rename_mit_keys)

SIZE = 64
# DESIGN.md: feature strides and channels of the named encoders' pyramids
PYRAMIDS = {
    "convnext_tiny": ([4, 8, 16, 32], [96, 192, 384, 768]),
    "mit_b3": ([4, 8, 16, 32], [64, 128, 320, 512]),
    "maxvit_tiny": ([2, 4, 8, 16, 32], [64, 64, 128, 256, 512]),
    "swin_tiny": ([4, 8, 16, 32], [96, 192, 384, 768]),
    "coatnet_0": ([2, 4, 8, 16, 32], [64, 96, 192, 384, 768]),
}
HEAD_SHAPES = {"fine": 16, "coarse": 4, "binary": 2}


def run(model, height=SIZE, width=SIZE, batch=1):
    with torch.no_grad():
        return model.eval()(torch.randn(batch, 3, height, width))


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_every_named_encoder_gives_fine_logits_at_input_size(encoder):
    model = build_model(encoder, 16, img_size=SIZE)
    assert run(model).shape == (1, 16, SIZE, SIZE)
    if encoder in PYRAMIDS:
        info = model.encoder.feature_info
        assert (info.reduction(), info.channels()) == PYRAMIDS[encoder]


@pytest.mark.parametrize("decoder", ["unet", "upernet"])
@pytest.mark.parametrize("encoder", ["mit_b0", "coatnet_0"])  # a 4-level and a 5-level pyramid
def test_hierarchical_heads_give_three_maps_at_input_size(encoder, decoder):
    model = build_model(encoder, 16, decoder=decoder, heads="hierarchical", num_groups=4, img_size=SIZE)
    out = run(model, batch=2)
    assert {name: tuple(logits.shape) for name, logits in out.items()} == {
        name: (2, classes, SIZE, SIZE) for name, classes in HEAD_SHAPES.items()}


def test_head_sizes_follow_the_label_scheme_and_hierarchical_heads_need_its_groups():
    model = build_model("mit_b0", 5, heads="hierarchical", num_groups=3, img_size=SIZE)
    assert {name: tuple(logits.shape[1:2]) for name, logits in run(model).items()} == {
        "fine": (5,), "coarse": (3,), "binary": (2,)}
    assert run(build_model("mit_b0", 2, img_size=SIZE)).shape == (1, 2, SIZE, SIZE)
    with pytest.raises(UserError, match="--heads hierarchical: the label scheme has no coarse groups"):
        build_model("mit_b0", 5, heads="hierarchical", img_size=SIZE)


@pytest.mark.parametrize("encoder", ["mit_b0", "maxvit_tiny"])
def test_upernet_fine_head_gives_logits_at_input_size(encoder):
    assert run(build_model(encoder, 7, decoder="upernet", img_size=SIZE)).shape == (1, 7, SIZE, SIZE)


@pytest.mark.parametrize("decoder", ["unet", "upernet"])
@pytest.mark.parametrize("height, width", [(96, 96), (160, 160), (96, 160)])
def test_sizes_with_odd_deep_maps_come_back_at_exact_input_size(decoder, height, width):
    # 96 and 160 give 3x3 and 5x5 maps at stride 32
    model = build_model("convnext_tiny", 16, decoder=decoder, img_size=96)
    assert run(model, height, width).shape == (1, 16, height, width)


def test_any_timm_model_works_including_nhwc_features_and_built_in_sizes():
    assert run(build_model("resnet18", 16, img_size=SIZE)).shape == (1, 16, SIZE, SIZE)
    # swin by its timm name: NHWC features, and the crop size is needed at build time
    swin = build_model("swin_tiny_patch4_window7_224", 16, decoder="upernet", img_size=SIZE)
    assert run(swin).shape == (1, 16, SIZE, SIZE)


@pytest.mark.parametrize("encoder, expected", [("convnext_tiny", 33.1e6), ("mit_b3", 45e6), ("maxvit_tiny", 31e6)])
def test_unet_parameter_count_is_within_ten_percent_of_the_prototype(encoder, expected):
    model = build_model(encoder, 16, img_size=384)
    assert abs(sum(p.numel() for p in model.parameters()) / expected - 1) <= 0.10


def test_mit_b3_encoder_is_segformer_mit_by_parameter_count():
    model = build_model("mit_b3", 16, img_size=SIZE)
    assert sum(p.numel() for p in model.encoder.parameters()) == 44_072_128


def test_default_batches_and_size_check_follow_the_registry():
    expected = {"convnext_tiny": 96, "mit_b0": 64, "mit_b1": 64, "mit_b2": 48, "mit_b3": 32, "mit_b4": 16,
                "mit_b5": 16, "maxvit_tiny": 48, "swin_tiny": 48, "coatnet_0": 64, "resnet18": 32}
    assert {name: default_batch(name) for name in expected} == expected
    for name in expected:
        check_img_size(name, 32)
        with pytest.raises(UserError, match="multiple of 32"):
            check_img_size(name, 48)


@pytest.mark.parametrize("size, nearest", [(100, 96), (112, 128), (10, 32)])
def test_img_size_the_encoder_cannot_take_names_size_and_nearest_valid(size, nearest):
    for call in (lambda: check_img_size("convnext_tiny", size), lambda: build_model("mit_b0", 16, img_size=size)):
        with pytest.raises(UserError, match=rf"--img-size {size}\b.*\b{nearest}\b"):
            call()


def test_inputs_the_built_encoder_cannot_take_are_user_errors_naming_a_valid_size():
    with pytest.raises(UserError, match=r"100x100.*multiples of 32.*96x96"):
        run(build_model("mit_b0", 16, img_size=SIZE), 100, 100)
    # MaxViT's window is img_size/32, so it takes whole multiples of the crop
    maxvit = build_model("maxvit_tiny", 16, img_size=SIZE)
    assert run(maxvit, 128, 64).shape == (1, 16, 128, 64)
    with pytest.raises(UserError, match=r"96x96.*multiples of 64.*128x128"):
        run(maxvit, 96, 96)
    with pytest.raises(UserError, match=r"96x96.*--img-size.*64x64"):
        run(build_model("swin_tiny", 16, img_size=SIZE), 96, 96)


def test_unknown_encoder_and_bad_choices_are_user_errors():
    with pytest.raises(UserError, match=r"--encoder no_such_net.*convnext_tiny.*mit_b3.*coatnet_0"):
        build_model("no_such_net", 16)
    with pytest.raises(UserError, match="--encoder no_such_net"):
        default_batch("no_such_net")
    for kwargs, flag in ((dict(decoder="fpn"), "--decoder"), (dict(heads="all"), "--heads"),
                         (dict(norm="ln"), "--norm")):
        with pytest.raises(UserError, match=flag):
            build_model("mit_b0", 16, img_size=SIZE, **kwargs)


@pytest.mark.parametrize("decoder", ["unet", "upernet"])
def test_gn_decoder_has_no_batchnorm_and_each_sample_is_independent_of_its_batch(decoder):
    torch.manual_seed(0)
    model = build_model("convnext_tiny", 16, decoder=decoder, norm="gn", img_size=SIZE).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_logits():
    model = build_model("mit_b0", 16, decoder="upernet", img_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiles_into_one_graph_with_the_same_logits():
    # swin: the NHWC permute and the three-head dict are traced too
    model = build_model("swin_tiny", 16, heads="hierarchical", num_groups=4, img_size=SIZE).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
        eager = model(x)
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])


def segformer_name(key):
    """timm PVTv2 features_only name -> SegFormer/smp MiT name, written independently of model.py."""
    first, _, rest = key.partition(".")
    if first == "patch_embed":
        return "patch_embed1." + rest
    stage = int(first.removeprefix("stages_")) + 1
    kind, _, rest = rest.partition(".")
    if kind == "downsample":
        return f"patch_embed{stage}.{rest}"
    if kind == "norm":
        return f"norm{stage}.{rest}"
    assert kind == "blocks", key
    return f"block{stage}.{rest.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')}"


def encoder_features(model, x):
    with torch.no_grad():
        return model.eval().encoder(x)


@pytest.mark.parametrize("layout", ["segformer.pth", "wrapped.pth", "segformer.safetensors", "own_checkpoint.pt"])
def test_encoder_weights_from_a_file_reproduce_the_encoder(tmp_path, layout):
    torch.manual_seed(1)
    source = build_model("mit_b0", 16, img_size=SIZE)
    segformer = {segformer_name(k): v.clone() for k, v in source.encoder.state_dict().items()}
    # names as in SegFormer's MixVisionTransformer (smp's mix_transformer.py)
    assert {"patch_embed4.proj.weight", "block1.0.attn.kv.weight", "block4.1.mlp.dwconv.dwconv.weight",
            "norm4.weight"} <= set(segformer)
    segformer |= {"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}
    path = tmp_path / layout
    if layout == "segformer.safetensors":
        save_file(segformer, path)
    elif layout == "wrapped.pth":
        torch.save({"state_dict": {"module." + k: v for k, v in segformer.items()}, "epoch": 3}, path)
    elif layout == "own_checkpoint.pt":
        torch.save({"model": source.state_dict(), "epoch": 1, "config": {"encoder": "mit_b0"}}, path)
    else:
        torch.save(segformer, path)
    torch.manual_seed(2)
    target = build_model("mit_b0", 16, img_size=SIZE, weights=path if layout == "own_checkpoint.pt" else None)
    x = torch.randn(1, 3, SIZE, SIZE)
    if layout != "own_checkpoint.pt":
        assert not torch.equal(encoder_features(target, x)[-1], encoder_features(source, x)[-1])
        load_encoder_weights(target, path)
    for got, expected in zip(encoder_features(target, x), encoder_features(source, x)):
        assert torch.equal(got, expected)


def test_timm_named_weights_load_as_they_are(tmp_path):
    full = timm.create_model("convnext_tiny")  # the whole classifier, named "stem.0", "stages.0", ...
    torch.save(full.state_dict(), tmp_path / "convnext_tiny.pth")
    model = build_model("convnext_tiny", 16, img_size=SIZE, weights=tmp_path / "convnext_tiny.pth")
    expected = full.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, expected[key.replace("stem_", "stem.").replace("stages_", "stages.")]), key


def test_rename_mit_keys_gives_the_timm_names_and_drops_the_classifier():
    encoder = build_model("mit_b1", 16, img_size=SIZE).encoder
    segformer = {segformer_name(k): v for k, v in encoder.state_dict().items()} | {"head.weight": torch.zeros(1)}
    renamed = rename_mit_keys({"state_dict": {"encoder." + k: v for k, v in segformer.items()}})
    assert set(renamed) == set(encoder.state_dict())


def test_weights_that_do_not_fit_are_user_errors(tmp_path):
    model = build_model("mit_b0", 16, img_size=SIZE)
    with pytest.raises(UserError, match=r"--weights .*missing\.pth: no such file"):
        load_encoder_weights(model, tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"--weights .*junk\.pth: cannot be read"):
        load_encoder_weights(model, tmp_path / "junk.pth")
    wider = build_model("mit_b1", 16, img_size=SIZE).encoder.state_dict()
    torch.save(wider, tmp_path / "b1.pth")
    with pytest.raises(UserError, match=r"does not fit encoder mit_b0: .*other shapes"):
        load_encoder_weights(model, tmp_path / "b1.pth")
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"does not fit encoder mit_b0: \d+ missing"):
        load_encoder_weights(model, tmp_path / "other.safetensors")


@pytest.mark.parametrize("encoder", ["convnext_tiny", "mit_b0"])  # timm's hub; SegFormer's MiT weights
def test_pretrained_without_network_says_how_to_proceed(monkeypatch, tmp_path, encoder):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"--pretrained.*network.*--weights FILE.*drop --pretrained"):
        build_model(encoder, 16, pretrained=True, img_size=SIZE)


def plant_in_hub_cache(cache, repo, state):
    """A Hugging Face cache holding repo's model.safetensors, laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state, folder / "snapshots" / commit / "model.safetensors")


def test_pretrained_weights_in_the_local_hub_cache_load_without_network(monkeypatch, tmp_path, capsys):
    import timm
    torch.manual_seed(3)
    planted = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    plant_in_hub_cache(tmp_path, "timm/resnet10t.c3_in1k", planted)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    encoder = build_model("resnet10t", 16, pretrained=True, img_size=SIZE).encoder.state_dict()
    assert encoder and all(torch.equal(value, planted[key]) for key, value in encoder.items())
    err = capsys.readouterr().err
    assert f"loaded {len(encoder)} pretrained encoder tensors for resnet10t" in err and "resnet10t.c3_in1k" in err


def test_pretrained_with_the_hub_unreachable_fails_at_once_before_any_preload(synthetic_root, tmp_path):
    # A closed local port stands in for a node without network: no HF_HUB_OFFLINE, no cached weights.
    result = run_script("train.py", "--encoder", "resnet10t", "--pretrained", "--data", synthetic_root, "--img-size",
                        "64", "--batch-size", "4", "--epochs", "1", "--run-dir", tmp_path / "run",
                        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache")})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --pretrained: could not fetch ImageNet weights for resnet10t")
    assert "127.0.0.1:9 not reachable" in lines[0] and "--weights FILE" in lines[0]


def test_weights_of_a_deeper_mit_are_refused_not_half_loaded(tmp_path):
    # mit_b2 has mit_b1's widths and more blocks: every b1 tensor is found, b2's extra blocks would be dropped.
    torch.save(build_model("mit_b2", 16, img_size=SIZE).encoder.state_dict(), tmp_path / "b2.pth")
    with pytest.raises(UserError, match=r"holds \d+ encoder tensors that mit_b1 lacks .*stages_.*larger model"):
        load_encoder_weights(build_model("mit_b1", 16, img_size=SIZE), tmp_path / "b2.pth")
