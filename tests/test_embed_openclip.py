"""The open_clip backend, offline: a tiny random OpenCLIP model loaded through ``pretrained=<checkpoint>``."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dataopt.config import validate
from dataopt.embed.gpu_preprocess import preprocess
from dataopt.embed.openclip import DEFAULT_TEMPLATES, OpenClipEmbedder
from dataopt.errors import ConfigError
from dataopt.io import file_digest, load_npy, read_json
from dataopt.plugins import check_methods
from dataopt.stages import run_stage

from conftest import write_tiny_openclip


def _params(**kwargs):
    embed = {"backend": "open_clip", "kwargs": kwargs, "batch_size": 256}
    return check_methods(validate({"embed": embed}))


def _kwargs(tiny, **extra):
    name, config, checkpoint = tiny
    return {"model": name, "model_config": str(config), "pretrained": str(checkpoint), **extra}


def _direct_model(tiny):
    """The same weights through OpenCLIP's own API, without dataopt."""
    import open_clip

    name, config, checkpoint = tiny
    open_clip.add_model_config(config)
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    return model.eval(), transform, open_clip.get_tokenizer(name)


def test_stage_with_local_checkpoint_matches_the_model_called_directly(digits_writer, tmp_path,
                                                                        tiny_openclip_checkpoint):
    name, config, checkpoint = tiny_openclip_checkpoint
    digits_ingested = digits_writer(tmp_path, n=200)
    # a project-relative checkpoint path resolves against the project root
    shutil.copy(checkpoint, digits_ingested.root / "tiny.safetensors")
    params = _params(**_kwargs(tiny_openclip_checkpoint, pretrained="tiny.safetensors"))
    metrics = run_stage("embed", params, digits_ingested)
    out = digits_ingested.artifacts / "embed"
    emb = load_npy(out / "embeddings.npy", mmap=False)
    assert emb.dtype == np.float16 and emb.shape == (200, 32) and metrics["dim"] == 32
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    text = load_npy(out / "text_embeddings.npy", mmap=False)
    assert text.dtype == np.float16 and text.shape == (10, 32)
    np.testing.assert_allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1.0, atol=2e-3)

    meta = read_json(out / "meta.json")
    assert meta["backend"] == "open_clip" and meta["model"] == name
    assert meta["pretrained"] == str(digits_ingested.root / "tiny.safetensors")
    assert meta["checkpoint_sha256"] == file_digest(checkpoint)
    assert meta["precision"] == "fp32" and meta["device"] == "cpu" and meta["dim"] == 32
    assert meta["text_embeddings"] is True and meta["images_per_s"] > 0
    assert meta["features"]["preprocess"]["size"] == [32, 32]
    assert meta["features"]["templates"] == list(DEFAULT_TEMPLATES)

    # the same numbers from OpenCLIP itself on the same preprocessed tensors
    model, _, tokenizer = _direct_model(tiny_openclip_checkpoint)
    images = load_npy(digits_ingested.artifacts / "ingest" / "images.npy", mmap=False)
    x = preprocess(images, 32, model.visual.image_mean, model.visual.image_std, "bicubic", "shortest")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), ref, atol=2e-3)

    import pyarrow.parquet as pq

    table = pq.read_table(digits_ingested.artifacts / "ingest" / "samples.parquet").to_pandas()
    names = table.groupby("label").label_name.first().sort_index().tolist()
    prompts = [t.format(c) for c in names for t in DEFAULT_TEMPLATES]
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        t = torch.nn.functional.normalize(t.view(10, len(DEFAULT_TEMPLATES), -1).mean(1), dim=-1).numpy()
    np.testing.assert_allclose(text.astype(np.float32), t, atol=2e-3)

    run_stage("embed", params, digits_ingested)  # deterministic
    assert np.array_equal(emb, load_npy(out / "embeddings.npy", mmap=False))

    # switching to a backend without text replaces the stale text embeddings by an empty (0, d) table
    run_stage("embed", validate({"embed": {"kwargs": {"dim": 8}}}), digits_ingested)
    assert load_npy(out / "text_embeddings.npy").shape == (0, 8)
    assert read_json(out / "meta.json")["text_embeddings"] is False


def test_device_preprocessing_equals_openclip_transform_at_model_size(tiny_openclip_checkpoint):
    model, transform, _ = _direct_model(tiny_openclip_checkpoint)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ref = torch.stack([transform(Image.fromarray(im)) for im in images])
    cfg = model.visual.preprocess_cfg
    ours = preprocess(images, cfg["size"], cfg["mean"], cfg["std"], cfg["interpolation"], cfg["resize_mode"])
    assert ours.shape == (5, 3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)  # no resize needed: the same float ops, bit for bit

    # upsampling 8 -> 32 px and a non-square centre crop: close to PIL's bicubic (kernels differ slightly)
    small = rng.integers(0, 256, (4, 8, 12, 3), dtype=np.uint8)
    ref = torch.stack([transform(Image.fromarray(im)) for im in small])
    ours = preprocess(small, cfg["size"], cfg["mean"], cfg["std"], cfg["interpolation"], cfg["resize_mode"])
    assert ours.shape == ref.shape == (4, 3, 32, 32)
    assert (ours - ref).abs().mean() < 0.15
    # squash and longest (padding) modes keep the requested size
    for mode in ("squash", "longest"):
        assert preprocess(small, 32, cfg["mean"], cfg["std"], resize_mode=mode).shape == (4, 3, 32, 32)


def test_pt_checkpoint_and_bf16_autocast_on_cpu(digits_writer, tmp_path, tiny_openclip_checkpoint):
    paths = digits_writer(tmp_path / "p", n=40)
    name, config, st = tiny_openclip_checkpoint
    _, _, pt = write_tiny_openclip(tmp_path / "pt", fmt="pt")  # same seed: the same weights as a .pt file
    run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint)), paths)
    ref = load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False)
    run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, pretrained=str(pt))), paths)
    assert np.array_equal(ref, load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False))

    # the autocast code path a GPU takes, exercised on the CPU with bf16
    run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, precision="bf16")), paths)
    bf16 = load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False).astype(np.float32)
    cos = (bf16 * ref.astype(np.float32)).sum(1)
    assert cos.min() > 0.97 and not np.array_equal(bf16, ref.astype(np.float32))
    assert read_json(paths.artifacts / "embed" / "meta.json")["precision"] == "bf16"
    with pytest.raises(ConfigError, match="'fp16' needs a GPU"):
        run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, precision="fp16")), paths)


def test_random_weights_are_explicit_and_recorded(digits_writer, tmp_path, tiny_openclip_checkpoint):
    paths = digits_writer(tmp_path, n=20)
    run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, pretrained="random")), paths)
    meta = read_json(paths.artifacts / "embed" / "meta.json")
    assert meta["checkpoint_sha256"] is None and "RANDOMLY INITIALISED" in meta["features"]["features"]


def test_loading_errors_name_the_file_and_the_model(digits_writer, tmp_path, tiny_openclip_checkpoint,
                                                    monkeypatch):
    paths = digits_writer(tmp_path / "p", n=20)
    name, config, checkpoint = tiny_openclip_checkpoint
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(ConfigError, match=f"checkpoint file {missing} not found.*'{name}'"):
        run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, pretrained=str(missing))), paths)

    # an architecture whose projection is 16-d cannot take the 32-d checkpoint
    other, other_cfg, _ = write_tiny_openclip(tmp_path / "c16", name="dataopt-tiny-clip16", embed_dim=16)
    with pytest.raises(ConfigError, match=f"checkpoint {checkpoint} does not fit OpenCLIP model '{other}'.*"
                                          "size mismatch"):
        run_stage("embed", _params(model=other, model_config=str(other_cfg), pretrained=str(checkpoint)), paths)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=f"checkpoint {junk} does not fit"):
        run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, pretrained=str(junk))), paths)

    with pytest.raises(ConfigError, match="unknown OpenCLIP model 'ViT-B-99'.*e.g. .*ViT-B-"):
        run_stage("embed", _params(model="ViT-B-99", pretrained="random"), paths)
    with pytest.raises(ConfigError, match="defines model 'dataopt-tiny-clip' .* is 'ViT-B-32'"):
        run_stage("embed", _params(model="ViT-B-32", model_config=str(config), pretrained="random"), paths)
    with pytest.raises(ConfigError, match="neither an OpenCLIP tag of model 'ViT-B-32'.*laion2b_s34b_b79k"):
        run_stage("embed", _params(model="ViT-B-32", pretrained="no_such_tag"), paths)
    with pytest.raises(ConfigError, match="templates must be a non-empty list"):
        run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint, templates=["no slot"])), paths)

    # a tag needs a download: offline (simulated, the test never touches the network) -> a clear error
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(ConfigError, match="could not download the OpenCLIP weights 'ViT-B-32' / "
                                          "'laion2b_s34b_b79k'.*Network is unreachable.*local file"):
        run_stage("embed", _params(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), paths)
    with pytest.raises(ConfigError, match="quick_gelu"):
        run_stage("embed", _params(model="ViT-B-32", pretrained="openai"), paths)
    assert not (paths.artifacts / "embed" / "embeddings.npy").exists()


def test_class_names_come_from_label_name(digits_writer, tmp_path, tiny_openclip_checkpoint):
    import pyarrow.parquet as pq

    from dataopt.io import write_parquet

    paths = digits_writer(tmp_path, n=30)
    path = paths.artifacts / "ingest" / "samples.parquet"
    table = pq.read_table(path).to_pandas()
    table.loc[table.label == 3, "label_name"] = "three"
    write_parquet(path, table)
    emb = OpenClipEmbedder(**_kwargs(tiny_openclip_checkpoint), device="cpu").fit(None)
    run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint)), paths)
    text = load_npy(paths.artifacts / "embed" / "text_embeddings.npy", mmap=False)
    names = [str(c) for c in range(10)]
    names[3] = "three"
    np.testing.assert_allclose(text, emb.encode_classes(names).astype(np.float16), atol=1e-3)
    assert not np.allclose(text[3], emb.encode_classes(["3"])[0], atol=1e-2)

    table.loc[table.index[table.label == 5][0], "label_name"] = "five"  # two names for label 5
    write_parquet(path, table)
    from dataopt.errors import DataError

    with pytest.raises(DataError, match="label 5 has several label_name values"):
        run_stage("embed", _params(**_kwargs(tiny_openclip_checkpoint)), paths)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_autocast_agrees_with_cpu_fp32(digits_writer, tmp_path, tiny_openclip_checkpoint):
    paths = digits_writer(tmp_path, n=200)
    run_stage("embed", validate({"embed": {"backend": "open_clip", "device": "cpu",
                                           "kwargs": _kwargs(tiny_openclip_checkpoint)}}), paths)
    cpu = load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False).astype(np.float32)
    run_stage("embed", validate({"embed": {"backend": "open_clip", "device": "cuda",
                                           "kwargs": _kwargs(tiny_openclip_checkpoint)}}), paths)
    gpu = load_npy(paths.artifacts / "embed" / "embeddings.npy", mmap=False).astype(np.float32)
    meta = read_json(paths.artifacts / "embed" / "meta.json")
    assert meta["device"].startswith("cuda") and meta["precision"] in ("bf16", "fp16")
    assert (cpu * gpu).sum(1).min() > 0.97
