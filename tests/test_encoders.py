"""encoders.py: parity with transformers' CLIP / DINOv2 towers (the numerical reference), preprocessing
parity with their image processors, loading errors, object crops, and the multi-scale encoder."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from data import pad_offsets
from encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_COLOR,
    ImageProcessor,
    MultiScaleEncoder,
    VisionConfig,
    VisionTower,
    crop_object,
    load_vision_tower,
    pad_to_square,
    resize_position_table,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=16, patch_size=4)  # 4x4 patches
TINY_DINO = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                 image_size=20, patch_size=4)  # native 5x5 patches


def randomize(model):
    """Perturb every parameter (LayerNorm gains, LayerScale, biases too) so that a swapped or dropped
    tensor shows up in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random checkpoints as the Hub lays them out, and the transformers towers that wrote them."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    vision = randomize(CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)))
    vision.save_pretrained(root / "clip_vision")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=99, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    full = randomize(CLIPModel(CLIPConfig(vision_config=TINY_CLIP, text_config=text, projection_dim=16)))
    full.save_pretrained(root / "clip_full", max_shard_size="20KB")  # sharded, text tower included
    dino = randomize(Dinov2Model(Dinov2Config(**TINY_DINO)))
    dino.save_pretrained(root / "dinov2")
    # a .bin-only checkpoint as transformers 4 wrote CLIPVisionModel: `vision_model.` prefix, position_ids
    os.makedirs(root / "clip_bin")
    shutil.copy(root / "clip_vision" / "config.json", root / "clip_bin")
    state = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    torch.save(state, root / "clip_bin" / "pytorch_model.bin")
    refs = {"clip_vision": vision, "clip_full": full.vision_model, "dinov2": dino, "clip_bin": vision}
    return root, refs


def reference_states(ref, pixels, interpolate=False):
    kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
    with torch.no_grad():
        return ref(pixels, output_hidden_states=True, **kwargs).hidden_states


@pytest.mark.parametrize("name,image_size", [("clip_vision", None), ("clip_full", None), ("clip_bin", None),
                                             ("clip_vision", 24), ("dinov2", None), ("dinov2", 28),
                                             ("dinov2", 12)])
def test_parity_with_transformers(checkpoints, name, image_size):
    root, refs = checkpoints
    tower = load_vision_tower(str(root / name), image_size=image_size, feature_layer=-1)  # every block
    size = tower.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    # transformers' DINOv2 interpolates on its own; its CLIP only when asked
    states = reference_states(refs[name], pixels, interpolate=image_size is not None)
    assert len(states) == tower.config.num_layers + 1
    with torch.no_grad():
        for layer in (0, 1, 2, -2, -1):
            ours = tower(pixels, layer)
            assert ours.shape == (2, tower.config.num_patches, 32)
            torch.testing.assert_close(ours, states[layer][:, 1:], atol=1e-5, rtol=0, msg=f"layer {layer}")
    tower = load_vision_tower(str(root / name), image_size=image_size)  # the default feature layer, -2
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), states[-2][:, 1:], atol=1e-5, rtol=0)


def test_checkpoint_layouts_are_what_they_claim(checkpoints):
    root, _ = checkpoints
    shards = [f for f in os.listdir(root / "clip_full") if f.endswith(".safetensors")]
    assert os.path.isfile(root / "clip_full" / "model.safetensors.index.json") and len(shards) > 1
    assert not os.path.exists(root / "clip_bin" / "model.safetensors")
    weight_map = json.loads((root / "clip_full" / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("text_model.") for k in weight_map)


def test_only_needed_blocks_are_built_loaded_and_run(checkpoints):
    root, _ = checkpoints
    tower = load_vision_tower(str(root / "dinov2"))  # default feature_layer -2 of 3 blocks: 2 blocks
    assert len(tower.blocks) == 2 and not any(k.startswith("blocks.2.") for k in tower.state_dict())
    calls = []
    for block in tower.blocks:
        block.register_forward_hook(lambda *_: calls.append(1))
    tower(torch.randn(1, 3, 20, 20))
    assert len(calls) == 2
    calls.clear()
    tower(torch.randn(1, 3, 20, 20), layer=0)
    assert not calls
    for layer in (4, -1):  # outside the checkpoint, or past the feature layer
        with pytest.raises(ValueError, match=f"layer={layer} .*holds 2 of the 3 blocks"):
            tower(torch.randn(1, 3, 20, 20), layer=layer)
    with pytest.raises(ValueError, match="expected"):
        tower(torch.randn(1, 3, 24, 24))
    assert len(load_vision_tower(str(root / "dinov2"), feature_layer=0).blocks) == 0


def test_bf16_tower_off_its_native_size_follows_its_table(checkpoints):
    root, refs = checkpoints
    tower = load_vision_tower(str(root / "dinov2"), dtype=torch.bfloat16, image_size=28)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters()) and not list(tower.buffers())
    assert tower.positions().dtype == torch.bfloat16 and tower.positions().shape == (50, 32)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = tower(pixels).float()
    torch.testing.assert_close(out, reference_states(refs["dinov2"], pixels)[-2][:, 1:], atol=0.1, rtol=0.05)
    # new weights through load_state_dict: the resized table follows
    tower.load_state_dict({k: v + 1 for k, v in tower.state_dict().items()})
    assert torch.equal(tower.positions(), resize_position_table(tower.position_embedding, 7))
    # FSDP2's mixed precision casts the parameters to bf16 but leaves the input's dtype to the module: an fp32
    # table (or a cached fp32 buffer) added to bf16 patches gave fp32 activations that CLIP's pre_norm refused
    clip = load_vision_tower(str(root / "clip_vision"), image_size=24)
    for p in clip.parameters():  # as FSDP2 casts: parameters only
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        assert clip(torch.randn(1, 3, 24, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_position_table_trains_at_non_native_size():
    config = VisionConfig(kind="dinov2", hidden_size=16, num_layers=1, num_heads=2, mlp_size=32, patch_size=4,
                          image_size=12, native_image_size=8)
    tower = VisionTower(config)
    tower(torch.randn(1, 3, 12, 12)).sum().backward()
    assert tower.position_embedding.grad is not None and tower.position_embedding.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- loading errors


@pytest.fixture
def dino_copy(checkpoints, tmp_path):
    root, _ = checkpoints
    shutil.copytree(root / "dinov2", tmp_path / "dinov2")
    return tmp_path / "dinov2"


def edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_key_is_named(dino_copy):
    edit_weights(dino_copy, lambda s: s.pop("encoder.layer.1.mlp.fc1.weight"))
    with pytest.raises(ValueError, match=r"missing tensors, in none of .*model\.safetensors'\]: "
                                         r"\['encoder\.layer\.1\.mlp\.fc1\.weight'\]"):
        load_vision_tower(str(dino_copy))


def test_unexpected_key_is_named_with_its_file(dino_copy):
    edit_weights(dino_copy, lambda s: s.update({"encoder.layer.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensors") as err:
        load_vision_tower(str(dino_copy))
    assert "encoder.layer.0.adapter.weight" in str(err.value)
    assert str(dino_copy / "model.safetensors") in str(err.value)


def test_wrong_shape_is_named(dino_copy):
    edit_weights(dino_copy, lambda s: s.update({"embeddings.patch_embeddings.projection.weight":
                                                torch.zeros(32, 3, 2, 2)}))
    expected = r"projection\.weight in .*: \[32, 3, 2, 2\] torch.float32, expected \[32, 3, 4, 4\]"
    with pytest.raises(ValueError, match=expected):
        load_vision_tower(str(dino_copy))


def test_missing_files(dino_copy):
    os.remove(dino_copy / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="expected model.safetensors.*pytorch_model.bin"):
        load_vision_tower(str(dino_copy))
    os.remove(dino_copy / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_vision_tower(str(dino_copy))


def test_missing_shard_is_named(checkpoints, tmp_path):
    root, _ = checkpoints
    shutil.copytree(root / "clip_full", tmp_path / "clip")
    shard = sorted(f for f in os.listdir(tmp_path / "clip") if f.startswith("model-"))[0]
    os.remove(tmp_path / "clip" / shard)
    with pytest.raises(FileNotFoundError, match=f"shards listed in .*index.json not found: .*{shard}"):
        load_vision_tower(str(tmp_path / "clip"))


def test_damaged_config_and_refused_weights_are_named(dino_copy):
    config = json.loads((dino_copy / "config.json").read_text())
    for text, message in [('{"model_type": "dinov2", ', "config.json: not a JSON config"),
                          ("[1, 2]", "config.json: a JSON config is an object"),
                          (json.dumps({**config, "hidden_size": "32"}),
                           "config.json: VisionConfig.hidden_size must be int, got '32'")]:
        (dino_copy / "config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_vision_tower(str(dino_copy))
    (dino_copy / "config.json").write_text(json.dumps(config))
    marker = dino_copy / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    os.remove(dino_copy / "model.safetensors")  # a pytorch_model.bin that carries code, as a mirror might
    torch.save({"embeddings.cls_token": Payload()}, dino_copy / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a PyTorch file of plain tensors") as err:
        load_vision_tower(str(dino_copy))
    assert not marker.exists() and "weights_only=False" not in str(err.value)


def test_other_model_type(dino_copy):
    (dino_copy / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a vision tower"):
        load_vision_tower(str(dino_copy))


# ----------------------------------------------------------------------------- images


def tiny_configs(size=28, clip_width=24, dino_width=40, patch=14):
    clip = VisionConfig(kind="clip", hidden_size=clip_width, num_layers=2, num_heads=4, mlp_size=48,
                        patch_size=patch, image_size=size)
    dino = VisionConfig(kind="dinov2", hidden_size=dino_width, num_layers=2, num_heads=4, mlp_size=80,
                        patch_size=patch, image_size=size)
    return [clip, dino]


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_pad_to_square_uses_data_offsets():
    img = noise_image(37, 23)
    square = pad_to_square(img)
    side, left, top = pad_offsets(37, 23)
    assert square.size == (side, side)
    assert square.getpixel((0, 0)) == PAD_COLOR and square.getpixel((side - 1, side - 1)) == PAD_COLOR
    assert np.array_equal(np.asarray(square)[top:top + 23, left:left + 37], np.asarray(img))


def test_preprocessing_matches_transformers_processors():
    """Tolerance 1e-5: both sides run the same PIL bicubic resize on the same uint8 square, so they differ
    only in float32 rounding of rescale/normalize (values |x| < 3, a few ulp ~ 1e-6); one uint8 level of
    disagreement would show as 1/255/0.27 ~ 0.015."""
    size = 28
    img = noise_image(37, 23)
    ours = ImageProcessor(tiny_configs(size))(img)  # [2, 3, S, S]
    square = pad_to_square(img)
    # CLIP's processor: shortest edge S then centre crop S, which on a square is exactly an S x S resize
    clip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # DINOv2's processor is a BitImageProcessor (resize 256, crop 224, ImageNet stats); aligned to S x S
    dino = BitImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    for t, processor in enumerate((clip, dino)):
        ref = processor(square, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(ours[t], ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])  # each tower its own mean/std


def test_crop_object_hand_computed():
    # 100 x 60 image: padded square side 100, pasted at top = 20. Distinct colour per pixel for checking.
    xs, ys = np.meshgrid(np.arange(100), np.arange(60))
    img = Image.fromarray(np.stack([xs, ys, np.full_like(xs, 7)], -1).astype(np.uint8))
    # box -> pixels x 20..50, y 30..60; margin 0.1 of a 30 px box = 3 px a side -> (17, 27, 53, 63)
    crop = crop_object(img, [0.2, 0.3, 0.5, 0.6], margin=0.1)
    assert crop.size == (36, 36)
    assert crop.getpixel((0, 0)) == (17, 27 - 20, 7)  # square y 27 is image row 7
    assert crop.getpixel((35, 35)) == (52, 62 - 20, 7)
    # fractional edges round outward: x 21.3..50 -> 18.43..52.87, y 30.5..60 -> 27.55..62.95
    assert crop_object(img, [0.213, 0.305, 0.5, 0.6], margin=0.1).size == (53 - 18, 63 - 27)
    # a box in the top-left corner: the margin is clipped at 0 and the crop holds the pad colour
    corner = crop_object(img, [0.0, 0.0, 0.1, 0.1], margin=0.1)
    assert corner.size == (11, 11) and corner.getpixel((0, 0)) == PAD_COLOR
    assert crop_object(img, [0.5, 0.5, 0.5, 0.5], margin=0.0).size == (1, 1)  # degenerate box: one pixel
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        crop_object(img, [0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- multi-scale encoder


def test_multiscale_shapes_and_concatenation_order():
    torch.manual_seed(0)
    encoder = MultiScaleEncoder(tiny_configs())
    assert encoder.num_patches == 4 and encoder.hidden_size == 64
    processor = pickle.loads(pickle.dumps(encoder.processor))  # DataLoader workers pickle it
    pixels = torch.stack([processor(noise_image(30, 20, seed=s)) for s in range(3)])  # [3, 2, 3, 28, 28]
    assert pixels.shape == (3, 2, 3, 28, 28)
    features = encoder(pixels)
    assert features.shape == (3, 4, 64)
    torch.testing.assert_close(features[..., :24], encoder.towers[0](pixels[:, 0]))
    torch.testing.assert_close(features[..., 24:], encoder.towers[1](pixels[:, 1]))
    assert features.requires_grad  # no forced no_grad: the shapes preset may train its towers
    with pytest.raises(ValueError, match=r"\[B, 2, 3, S, S\]"):
        encoder(pixels[:, :1])
    with pytest.raises(ValueError, match="same number of patches"):
        MultiScaleEncoder(tiny_configs()[:1] + tiny_configs(size=42)[1:])


def test_multiscale_from_pretrained(checkpoints):
    root, refs = checkpoints
    paths = [str(root / "clip_full"), str(root / "dinov2")]
    encoder = MultiScaleEncoder.from_pretrained(paths, image_size=16)
    assert [c.kind for c in encoder.configs] == ["clip", "dinov2"]
    assert encoder.configs[1].native_image_size == 20 and encoder.num_patches == 16
    pixels = torch.randn(2, 2, 3, 16, 16)
    with torch.no_grad():
        features = encoder(pixels)
    assert features.shape == (2, 16, 64)
    torch.testing.assert_close(features[..., 32:], reference_states(refs["dinov2"], pixels[:, 1])[-2][:, 1:],
                               atol=1e-5, rtol=0)
