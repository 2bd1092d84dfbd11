from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cpal.cls.train import load_trained_model, train_classifier
from cpal.core.training import CheckpointError, load_checkpoint, poly_lambda
from cpal.data.voc import VOCDataset
from cpal.seeds.evaluate import evaluate_seeds, thresholds_from
from cpal.seeds.make import make_seeds
from cpal.seeds.store import SeedError, load_seeds, seed_path

LOG = logging.getLogger("test")


def _params(tiny_params: dict, **train) -> dict:
    p = copy.deepcopy(tiny_params)
    p["train_cls"].update({"epochs": 2, **train})
    return p


def test_poly_schedule() -> None:
    f = poly_lambda(100, 0.9)
    assert f(0) == 1.0 and f(100) == 0.0 and 0 < f(50) < 1
    w = poly_lambda(100, 0.9, warmup_iters=10)
    assert w(0) == pytest.approx(0.1) and w(9) == pytest.approx(1.0)


def test_sgd_gets_momentum_and_weight_decay_by_name(tiny_params: dict, tiny_data: Path, tmp_path: Path) -> None:
    from cpal.cls.train import build_model, param_groups
    from cpal.core.training import build_optimizer

    model = build_model(tiny_params, 6)
    opt = build_optimizer(param_groups(model, 0.1, 10.0), "sgd", 0.1, momentum=0.9, weight_decay=1e-4)
    for group in opt.param_groups:
        assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert [g["lr"] for g in opt.param_groups] == [0.1, pytest.approx(1.0)]


@pytest.mark.parametrize("method", ["cam", "cpal"])
def test_killed_run_resumes_to_the_same_weights(tiny_params: dict, tiny_data: Path, tmp_path: Path,
                                                method: str) -> None:
    params = _params(tiny_params)
    params["params"]["method"] = method
    full = train_classifier(params, tiny_data, tmp_path / "full", LOG, progress=False)
    stopped = train_classifier(params, tiny_data, tmp_path / "resumed", LOG, progress=False, stop_after_epoch=1)
    assert stopped == {"stopped_after_epoch": 1}
    assert (tmp_path / "resumed" / "resume.pt").is_file()
    # train_cls.amp is on in the tiny preset and ignored on CPU: the grad scaler stays off (empty state)
    assert load_checkpoint(tmp_path / "resumed" / "resume.pt")["scaler"] == {}
    timing = json.loads((tmp_path / "full" / "timing.json").read_text())
    assert timing["device"] == "cpu" and timing["amp"] is False and timing["cuda_peak_mib"] is None
    assert not (tmp_path / "resumed" / "model.pt").exists()
    resumed = train_classifier(params, tiny_data, tmp_path / "resumed", LOG, progress=False)
    a = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "model.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full == resumed
    assert (tmp_path / "full" / "metrics.json").read_bytes() == (tmp_path / "resumed" / "metrics.json").read_bytes()
    assert not (tmp_path / "resumed" / "resume.pt").exists()
    if method == "cpal":
        assert int(b["cpal.bank.count"].sum()) > 0


def test_sipe_faithful_switches_in_the_training_loop(tiny_params: dict, tiny_data: Path, tmp_path: Path) -> None:
    """Frozen stages and BatchNorm statistics, gradient clipping, the padding mask and structure-aware seeds
    all pass through train_classifier: the frozen stages end exactly at their ImageNet weights."""
    from cpal.backbone import build_backbone

    params = _params(tiny_params, epochs=1, freeze_stages=2, freeze_bn=True, grad_clip=0.5, mask_padding=True,
                     scale_range=[0.5, 0.7])  # small scales: every crop is padded
    params["params"].update(method="sipe", seed_mode="structure", seed_bg_scale=0.5)
    metrics = train_classifier(params, tiny_data, tmp_path, LOG, progress=False)
    assert np.isfinite(metrics["final_loss"])
    trained = load_checkpoint(tmp_path / "model.pt")["model"]
    imagenet = build_backbone(params["train_cls"]["backbone"], pretrained=True).state_dict()
    frozen = [k for k in imagenet if k.startswith(("stages.0.", "stages.1."))]
    moved = [k for k in imagenet if k.startswith("stages.3.") and k.endswith("weight")
             and not torch.equal(trained[f"backbone.{k}"], imagenet[k])]
    assert frozen and all(torch.equal(trained[f"backbone.{k}"], imagenet[k]) for k in frozen)
    assert moved  # the stages after the frozen ones did train
    # BatchNorm statistics of a trained stage stayed at ImageNet's too (freeze_bn)
    stats = [k for k in imagenet if k.startswith("stages.3.") and k.endswith("running_mean")]
    assert stats and all(torch.equal(trained[f"backbone.{k}"], imagenet[k]) for k in stats)


def test_resume_ignores_checkpoint_of_other_settings(tiny_params: dict, tiny_data: Path, tmp_path: Path) -> None:
    params = _params(tiny_params)
    train_classifier(params, tiny_data, tmp_path, LOG, progress=False, stop_after_epoch=1)
    other = copy.deepcopy(params)
    other["params"]["K"] = 2
    metrics = train_classifier(other, tiny_data, tmp_path, LOG, progress=False)
    assert len(metrics["history"]) == 2  # trained from scratch, not resumed


@pytest.fixture(scope="module")
def trained(tiny_params: dict, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train_classifier(_params(tiny_params, epochs=1), tiny_data, out, LOG, progress=False)
    return out / "model.pt"


def test_checkpoint_of_other_method_or_classes_is_refused(tiny_params: dict, tiny_data: Path, trained: Path) -> None:
    ds = VOCDataset(tiny_data, "train")
    other = copy.deepcopy(tiny_params)
    other["params"]["method"] = "sipe"
    with pytest.raises(CheckpointError, match="method = 'cpal'.*method = 'sipe'"):
        load_trained_model(trained, other, ds, torch.device("cpu"))
    state = load_checkpoint(trained)
    state["meta"]["num_classes"] = 20
    torch.save(state, trained.parent / "other.pt")
    with pytest.raises(CheckpointError, match="num_classes = 20"):
        load_trained_model(trained.parent / "other.pt", tiny_params, ds, torch.device("cpu"))


def test_pickled_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {}, "evil": Path("x")}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(tmp_path / "bad.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bad.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_seeds_written_and_evaluated(tiny_params: dict, tiny_data: Path, trained: Path, tmp_path: Path) -> None:
    ds = VOCDataset(tiny_data, tiny_params["seeds"]["split"])
    model = load_trained_model(trained, tiny_params, ds, torch.device("cpu"))
    make_seeds(model, ds, tmp_path / "seeds", tiny_params["seeds"], torch.device("cpu"), LOG, progress=False)
    for image_id in ds.ids:
        seeds = load_seeds(seed_path(tmp_path / "seeds", image_id), expected_size=ds.image_size(image_id))
        assert seeds["cam"].dtype == np.float16 and seeds["pacam"].dtype == np.float16
        assert seeds["keys"].tolist() == ds.labels(image_id).tolist()
        for kind in ("cam", "pacam"):
            assert seeds[kind].min() >= 0 and seeds[kind].max() <= 1
            peaks = seeds[kind].reshape(len(seeds["keys"]), -1).max(axis=1).astype(np.float32)
            # each class map is divided by its maximum; a class the model never activates stays all zero
            assert np.all(np.isclose(peaks, 1.0, atol=1e-3) | (peaks == 0)), peaks
        bg = seeds["pacam_bg"].astype(np.float32)  # the prototype map's own background, for SIPE's protocol
        # divided by its maximum; all zero where the image has no background seed (a barely trained model)
        assert bg.shape == ds.image_size(image_id) and bg.min() >= 0
        assert np.isclose(bg.max(), 1.0, atol=1e-3) or bg.max() == 0
    results = evaluate_seeds(ds, tmp_path / "seeds", thresholds_from(tiny_params["seeds"]), LOG, progress=False)
    for kind in ("cam", "pacam"):
        assert 0 <= results[kind]["miou"] <= 1
        assert len(results[kind]["curve"]) == len(results["thresholds"])
        assert results[kind]["best_threshold"] in results["thresholds"]
    assert 0 <= results["pacam_argmax"]["miou"] <= 1 and "SIPE" in results["pacam_argmax"]["protocol"]
    # a missing seed file is named; a seed of the wrong size is named
    seed_path(tmp_path / "seeds", ds.ids[3]).unlink()
    with pytest.raises(SeedError, match=ds.ids[3]):
        evaluate_seeds(ds, tmp_path / "seeds", thresholds_from(tiny_params["seeds"]), LOG, progress=False)
    with pytest.raises(SeedError, match="but the image is"):
        load_seeds(seed_path(tmp_path / "seeds", ds.ids[0]), expected_size=(5, 5))


def test_seeds_amp_is_ignored_on_the_cpu(tiny_params: dict, tiny_data: Path, trained: Path, tmp_path: Path) -> None:
    """seeds.amp on a CPU device computes in float32: the seed files equal the amp-off ones byte for byte."""
    ds = VOCDataset(tiny_data, tiny_params["seeds"]["split"])
    ds.ids = ds.ids[:8]
    model = load_trained_model(trained, tiny_params, ds, torch.device("cpu"))
    for amp in (False, True):
        timing = make_seeds(model, ds, tmp_path / str(amp), dict(tiny_params["seeds"], amp=amp), torch.device("cpu"),
                            LOG, progress=False)
        assert timing["amp"] is False and timing["cuda_peak_mib"] is None
    for image_id in ds.ids:
        off, on = seed_path(tmp_path / "False", image_id), seed_path(tmp_path / "True", image_id)
        assert off.read_bytes() == on.read_bytes()


def test_context_analysis_reads_the_bank_of_a_cpal_model(tiny_params: dict, tiny_data: Path, trained: Path,
                                                        tmp_path: Path) -> None:
    """python -m cpal.cls.context_analysis: cosines in [-1, 1] for the classes the bank holds, the nearest entry
    at least as close as the top-K mean, and a table naming the model; a model without a bank is refused."""
    from cpal.cls import context_analysis

    ds = VOCDataset(tiny_data, tiny_params["seeds"]["split"])
    model = load_trained_model(trained, tiny_params, ds, torch.device("cpu"))
    stats = context_analysis.analyse(model, ds, ds.ids)
    assert stats and set(stats) <= set(ds.classes[1:])
    for figures in stats.values():
        for name in ("nearest", "top_k", "own_bank", "instance_vs_context"):
            assert all(-1.0 - 1e-5 <= v <= 1.0 + 1e-5 for v in figures.get(name, []))
        assert all(n >= k - 1e-6 for n, k in zip(figures.get("nearest", []), figures.get("top_k", []), strict=True))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params))
    out = tmp_path / "context.md"
    assert context_analysis.main(["--params", str(params_file), "--data", str(tiny_data), "--model", str(trained),
                                  "--images", "4", "--out", str(out)]) == 0
    assert "| class | instances |" in out.read_text() and str(trained) in out.read_text()
    cam = copy.deepcopy(tiny_params)
    cam["params"]["method"] = "cam"
    train_classifier(_params(cam, epochs=1), tiny_data, tmp_path / "cam", LOG, progress=False)
    params_file.write_text(yaml.safe_dump(cam))
    with pytest.raises(SystemExit, match="needs a cpal model"):
        context_analysis.main(["--params", str(params_file), "--data", str(tiny_data), "--model",
                               str(tmp_path / "cam" / "model.pt"), "--out", str(out)])
