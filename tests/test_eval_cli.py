"""``distillpp eval``: on zoo images against the Fashion-MNIST test set it reproduces
:mod:`distillpp.metrics` exactly; custom TorchScript features, stats files and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillpp.cli import main as cli_main
from distillpp.metrics import fid_from_features

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _eval(*argv: str) -> int:
    return cli_main(["eval", *argv])


def _save(folder: Path, arrays: np.ndarray) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def _small_test_set(folder: Path, n: int = 300) -> Path:
    """The first ``n`` Fashion-MNIST test images (random ones when it is not installed), as IDX files:
    scoring all 10,000 twice would take a minute on a CI core."""
    from distillpp.zoo.data import read_idx, write_idx

    folder.mkdir()
    if (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:n]
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    return folder


def test_zoo_images_against_the_test_set_equal_metrics_fid(tmp_path):
    from distillpp.metrics import RealFeatures, evaluate_samples
    from distillpp.zoo.harness import load_test_set
    from distillpp.pipelines import from_preset
    from distillpp.zoo import load_classifier

    data = _small_test_set(tmp_path / "fmnist")
    classes = [0, 1, 2, 3, 5, 7, 8, 9] * 2
    pipe = from_preset("zoo-lcm", device="cpu")
    images = pipe([str(c) for c in classes], generator=[torch.Generator().manual_seed(i) for i in range(16)]).images
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:06d}_000.png")
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"file": f"{i:06d}_000.png", "prompt": str(c)}) + "\n" for i, c in enumerate(classes)))
    assert _eval("--images", str(folder), "--data-dir", str(data), "--out", str(tmp_path / "report")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "| FID |" in (tmp_path / "report.md").read_text()

    # The same PNGs scored the way metrics scores zoo samples: [-1, 1], padded to 32 x 32.
    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / f"{i:06d}_000.png")) for i in range(16)]))
    x = torch.nn.functional.pad(x.float().unsqueeze(1) / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)
    clf = load_classifier()
    real = RealFeatures.from_images(clf, load_test_set(data_dir=data)[0])
    expected = evaluate_samples(x, torch.tensor(classes), clf, real)
    assert report["fid"] == expected["fid"]
    assert report["precision"] == pytest.approx(expected["precision"], abs=1e-12)
    assert report["recall"] == pytest.approx(expected["recall"], abs=1e-12)
    assert report["class_consistency"] == expected["class_consistency"]
    assert report["num_images"] == 16 and report["reference"].startswith("Fashion-MNIST test set (300")


class _Projection(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.weight


def test_torchscript_features_reference_folder_and_stats_file(tmp_path):
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    real = np.clip(rng.normal(128, 40, (20, 16, 16, 3)), 0, 255).astype(np.uint8)
    _save(tmp_path / "fake", fake)
    _save(tmp_path / "real", real)
    net = torch.jit.script(_Projection())
    net.save(str(tmp_path / "feat.pt"))
    feats = lambda a: net(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0).detach()  # noqa: E731

    assert _eval("--images", str(tmp_path / "fake"), "--reference", str(tmp_path / "real"), "--features",
                 str(tmp_path / "feat.pt"), "--save-stats", str(tmp_path / "real.safetensors"),
                 "--out", str(tmp_path / "a")) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["fid"] == pytest.approx(fid_from_features(feats(fake), feats(real)), rel=1e-6)
    assert a["feature_dim"] == 6 and 0 <= a["precision"] <= 1 and 0 <= a["recall"] <= 1
    assert _eval("--images", str(tmp_path / "fake"), "--stats", str(tmp_path / "real.safetensors"), "--features",
                 str(tmp_path / "feat.pt"), "--out", str(tmp_path / "b")) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert (b["fid"], b["precision"], b["recall"]) == (a["fid"], a["precision"], a["recall"])


def test_missing_extractor_or_reference_says_what_to_pass(tmp_path, capsys):
    _save(tmp_path / "big", np.zeros((2, 64, 64, 3), dtype=np.uint8))
    assert _eval("--images", str(tmp_path / "big"), "--stats", str(tmp_path / "none.safetensors")) == 2
    assert "no such file" in capsys.readouterr().err
    assert _eval("--images", str(tmp_path / "big"), "--features", str(tmp_path / "inception.pt")) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "never downloaded" in err and len(err.strip().splitlines()) == 1
    assert _eval("--images", str(tmp_path / "big"), "--reference", str(tmp_path / "big")) == 2
    assert "pass --features FILE" in capsys.readouterr().err


def test_torchmetrics_fid_agrees_with_ours_on_the_same_features():
    """Cross-check against torchmetrics' FID (a custom feature module; skipped when not installed).

    We report our float64 FID: torchmetrics returns its value in the features' dtype (float32 here).
    """
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) * 1.1 + 0.2

    class Identity(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    metric = fid_mod.FrechetInceptionDistance(feature=Identity(), normalize=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert float(metric.compute()) == pytest.approx(fid_from_features(b, a), rel=1e-5)


def _tiny_clip_parts(folder: Path):
    """Processor (saved to ``folder``) and config of a random CLIP with a byte-level vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=32,
                                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)
    return processor, config


def test_clip_score_from_a_local_clip_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import CLIPModel

    rng = np.random.default_rng(1)
    prompts = ["Bag", "Coat", "Sneaker", "Dress"]
    _save(tmp_path / "gen", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8))
    (tmp_path / "gen" / "manifest.jsonl").write_text(
        "".join(json.dumps({"file": f"{i:04d}.png", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    images = [Image.open(tmp_path / "gen" / f"{i:04d}.png").convert("RGB") for i in range(4)]
    proc, config = _tiny_clip_parts(tmp_path / "clip")
    inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
    for seed in range(20):  # a random model whose image-text cosines are not all clamped to 0
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        with torch.no_grad():
            img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
            txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                         attention_mask=inputs["attention_mask"]).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        if (cos > 0).any() and (cos < 0).any():
            break
    model.save_pretrained(tmp_path / "clip")
    assert _eval("--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen"), "--clip",
                 str(tmp_path / "clip"), "--out", str(tmp_path / "r")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert report["clip_score"] > 0
    assert _eval("--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen"), "--clip",
                 str(tmp_path / "nowhere")) == 2
    assert "not a local CLIP folder" in capsys.readouterr().err
