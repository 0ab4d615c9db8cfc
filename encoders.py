"""The encoder registry: each named encoder's timm model, default global batch and input rule.

Plain data without torch or timm, so config.py can list the names in `--help` before anything heavy loads;
model.py builds the encoders from it.
"""

# input_rule says which inputs the built encoder takes: "stride" any multiple of its deepest stride;
# "tiles" multiples of img_size (MaxViT's window is img_size/32, so its 1/32 map must hold whole windows);
# "exact" only img_size itself (Swin's patch embed is strict, CoAtNet's relative-position tables are fixed).
ENCODERS = {
    "convnext_tiny": dict(timm="convnext_tiny", kwargs={}, batch=96, needs_img_size=False, nhwc=False),
    # timm's PVTv2 with MLP ratio 4 in every stage is SegFormer's MiT (plain pvt_v2_bN uses 8,8,4,4)
    **{f"mit_b{i}": dict(timm=f"pvt_v2_b{i}", kwargs=dict(mlp_ratios=(4, 4, 4, 4)), batch=batch,
                         needs_img_size=False, nhwc=False)
       for i, batch in enumerate((64, 64, 48, 32, 16, 16))},
    "maxvit_tiny": dict(timm="maxvit_tiny_tf_384", kwargs={}, batch=48, needs_img_size=True, nhwc=False,
                        input_rule="tiles"),
    "swin_tiny": dict(timm="swin_tiny_patch4_window7_224", kwargs={}, batch=48, needs_img_size=True, nhwc=True,
                      input_rule="exact"),
    "coatnet_0": dict(timm="coatnet_0_rw_224", kwargs={}, batch=64, needs_img_size=True, nhwc=False,
                      input_rule="exact"),
}
