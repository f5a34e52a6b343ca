"""The fast recipe's parts: whitening init, Muon, alternating flips, TTA, and a short learning run."""

from __future__ import annotations

import dataclasses
import json

import torch

from cifar10_cnn import augment
from cifar10_cnn import data as D
from cifar10_cnn.config import recipe_config, users
from cifar10_cnn.inference import evaluate_logits
from cifar10_cnn.models import create_model
from cifar10_cnn.optim import Muon, build_optimizer, orthogonalize
from cifar10_cnn.train import fit

from .conftest import error_line, in_process, on


def test_whitening_layer_decorrelates_real_patches(cifar):
    model = create_model("airbench")
    x = augment.normalize(torch.from_numpy(cifar.train_images[:2000]).permute(0, 3, 1, 2))
    model.init_whitening(x)
    out = torch.nn.functional.conv2d(x, model.whiten.weight[:12])  # the 12 positive filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    # Unit variance along every direction but the faintest (where eps matters) and no correlations.
    assert torch.allclose(cov.diagonal()[-8:], torch.ones(8), atol=0.05)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.05
    assert not model.whiten.weight.requires_grad


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(576, 64))
    g = u @ torch.diag(torch.logspace(-1, 1, 64)) @ v.T  # singular values 0.1 ... 10: condition number 100
    s = torch.linalg.svdvals(orthogonalize(g, steps=5))
    assert s.min() > 0.5 and s.max() < 1.5  # all near one: condition number below 3
    assert torch.linalg.svdvals(orthogonalize(g.T, steps=5)).max() < 1.5  # tall matrices too


def test_muon_sgd_groups_match_torch_sgd():
    torch.manual_seed(0)
    a, b = torch.randn(10, 5, requires_grad=True), None
    b = a.detach().clone().requires_grad_(True)
    ours = Muon([{"params": [a]}], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        for p, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            (p**2).sum().backward()
            opt.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_fast_recipe_groups_and_schedules():
    cfg = recipe_config("fast")
    model = create_model(cfg.model)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch=25)
    muon = [g for g in opt.param_groups if g.get("muon")]
    assert len(muon) == 1 and all(p.ndim == 4 for p in muon[0]["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    whiten = next(g for g in opt.param_groups if any(p is model.whiten.bias for p in g["params"]))
    for _ in range(75):  # three epochs: the whitening bias has stopped learning
        opt.step()
        sched.step()
    assert whiten["lr"] == 0 and opt.param_groups[0]["lr"] > 0


def test_alternating_flips_flip_every_image_every_other_epoch():
    base = augment.alternating_flips(1000, seed=0)
    odd, even = base ^ False, base ^ True
    assert bool((odd != even).all()) and 400 < int(base.sum()) < 600
    assert torch.equal(base, augment.alternating_flips(1000, seed=0))


def test_tta_levels_on_a_symmetric_model(cifar):
    """TTA views only average predictions: on a model that ignores mirroring, level 1 changes nothing."""
    model = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10)
    ).eval()
    split = D.to_split(cifar.test_images[:100], cifar.test_labels[:100])
    plain, mirrored = evaluate_logits(model, split, tta=0), evaluate_logits(model, split, tta=1)
    assert torch.allclose(plain, mirrored, atol=1e-5)
    assert evaluate_logits(model, split, tta=2).shape == (100, 10)


def test_fast_recipe_learns_in_one_short_epoch(cifar, tmp_path):
    """The whole fast recipe (whitening, Muon, alternating flip, label smoothing) on 4,500 images, 9 steps."""
    cfg = recipe_config("fast", epochs=1, subset=5000, val_size=500, batch_size=500, micro_batch=None, tta=0)
    splits = D.make_splits(cifar, val_size=500, split_seed=0, subset=5000)
    result = fit(cfg, splits, tmp_path, progress=False, echo=lambda *_: None)
    test = D.to_split(cifar.test_images[:2000], cifar.test_labels[:2000])
    acc = (evaluate_logits(result.model, test).argmax(1) == test.labels).float().mean().item()
    assert result.history[0]["val_acc"] > 0.25 and acc > 0.25, (result.history, acc)


def test_selective_tta_augments_only_the_unsure_images_each_on_its_own(trained_run, cifar):
    """tta_margin: images whose top-two margin is below it get the TTA logits, the others the plain ones; an
    image's logits never depend on the images evaluated with it; 0 and 1 are no TTA and TTA everywhere."""
    from cifar10_cnn.inference import selective_tta_logits
    from cifar10_cnn.weights import load_model

    model, _ = load_model(trained_run / "model.safetensors")
    split = D.to_split(cifar.test_images[:300], cifar.test_labels[:300])
    images, plain = split.images, evaluate_logits(model, split)
    full = selective_tta_logits(model, images, tta=2)[0]
    probs = plain.softmax(1).topk(2, dim=1).values
    margin = probs[:, 0] - probs[:, 1]
    m = float(margin.median())
    logits, unsure = selective_tta_logits(model, images, tta=2, tta_margin=m)
    assert torch.equal(unsure, margin < m) and 0 < int(unsure.sum()) < len(images)
    assert torch.allclose(logits[unsure], full[unsure], atol=1e-4)
    assert torch.allclose(logits[~unsure], plain[~unsure], atol=1e-4)
    passes: list[int] = []  # images per forward pass: the unsure ones' plain view is not computed twice
    hook = model.register_forward_hook(lambda _m, inputs, _out: passes.append(len(inputs[0])))
    selective_tta_logits(model, images, tta=2, tta_margin=m)
    hook.remove()
    assert sum(passes) == len(images) + 5 * int(unsure.sum()), passes
    alone = selective_tta_logits(model, images[unsure][:5], tta=2, tta_margin=m)[0]
    assert torch.allclose(alone, logits[unsure][:5], atol=1e-4)  # batch composition does not matter
    assert torch.allclose(selective_tta_logits(model, images, tta=2, tta_margin=0)[0], plain, atol=1e-4)
    assert not selective_tta_logits(model, images, tta=2, tta_margin=0)[1].any()


def test_train_sizes_downscale_the_first_epochs_and_nothing_else(cifar, tmp_path):
    """Progressive resizing: epoch 1 trains on 16x16 images, epoch 2 on 32x32; validation is always at 32x32,
    and the run learns. A bad list is one line."""
    from cifar10_cnn.errors import UserError
    from cifar10_cnn.train import setup

    cfg = recipe_config("quick", epochs=2, subset=3000, val_size=500, batch_size=500, tta=0, train_sizes="16")
    splits = D.make_splits(cifar, val_size=500, split_seed=0, subset=3000)
    trainer = setup(cfg, splits.train, torch.device("cpu"))
    seen: list[tuple[bool, int]] = []
    trainer.model.register_forward_pre_hook(  # a training step: train mode with gradients
        lambda m, args: seen.append((m.training and torch.is_grad_enabled(), args[0].shape[-1]))
    )
    epochs: list[list[tuple[bool, int]]] = []
    result = fit(
        cfg, splits, tmp_path, progress=False, echo=lambda *_: None, trainer=trainer,
        on_epoch_end=lambda *_: (epochs.append(seen[:]), seen.clear()),
    )  # fmt: skip
    first, second = ({size for training, size in e if training} for e in epochs)
    assert first == {16} and second == {32}
    assert {size for e in epochs for training, size in e if not training} == {32}  # validation, norms
    assert result.history[-1]["val_acc"] > 0.3, result.history
    # After an epoch at 16x16, batch-norm statistics are those of full-size images (what evaluation sees):
    # the first norm's running mean is the mean over the first training images' batch means at 32x32.
    captured: list[torch.Tensor] = []
    cfg16 = recipe_config(
        "quick", epochs=1, subset=3000, val_size=500, batch_size=500, tta=0, train_sizes="16"
    )
    trainer = setup(cfg16, splits.train, torch.device("cpu"))
    fit(cfg16, splits, tmp_path / "16", progress=False, echo=lambda *_: None, trainer=trainer)
    model, norm = trainer.model.eval(), trainer.model.layers[1].norm1
    norm.register_forward_hook(lambda m, args, out: captured.append(args[0].float().mean((0, 2, 3))))
    with (
        torch.no_grad(),
        torch.autocast("cpu", trainer.amp_dtype or torch.float32, enabled=bool(trainer.amp_dtype)),
    ):
        for x in splits.train.images[:4000].split(500):
            model(augment.normalize(x).contiguous(memory_format=trainer.memory_format))
    assert torch.allclose(norm.running_mean, torch.stack(captured).mean(0), atol=1e-3, rtol=1e-2)
    for bad, words in (("16,24", "joined by '/'"), ("4", "8 to 1024"), ("16/16/16", "lists 3 epochs")):
        try:
            recipe_config("quick", epochs=2, train_sizes=bad)
        except UserError as e:
            assert words in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(bad)


def test_sprint_recipe_runs_end_to_end_and_says_its_sizes(small_data, tmp_path):
    """`--recipe sprint` (2 epochs at 16x16, then 28x28): the header says so, the run completes and learns;
    a malformed --train-sizes is one line and writes nothing."""
    run = tmp_path / "run"
    small = ["--subset", "2000", "--val-size", "200", "--no-progress"]
    done = in_process("train", "--recipe", "sprint", *on(small_data), *small, "--out", str(run))
    assert done.returncode == 0, done.stderr
    assert "epochs 1-2 at 16x16/28x28 pixels (progressive resizing)" in done.stdout
    assert "batch 1000 in micro-batches of 500, lr" in done.stdout  # the recipe's, on this CPU
    assert json.loads((run / "results.json").read_text())["test_accuracy"] > 0.15  # chance: 10%
    bad = in_process("train", "--train-sizes", "16,24", *on(small_data), *small, "--out", str(tmp_path / "b"))
    assert bad.returncode != 0 and "--train-sizes must be sides" in error_line(bad)
    assert not (tmp_path / "b").exists()


def test_a_recipes_micro_batch_is_for_cpus_and_the_users_for_every_device(tmp_path):
    """fast's micro-batches of 500 are a CPU choice (a GPU steps whole batches of 2,000: 2.1x faster on an
    H200); --micro-batch given by the user, or by a config saved before this rule, holds on every device."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fast = recipe_config("fast")
    assert fast.micro_batch_on(cpu) == 500 and fast.micro_batch_on(cuda) is None
    assert fast.micro_batch_on(torch.device("mps")) == 500  # not measured there: the recipe's stays
    mine = recipe_config("fast", micro_batch=250)
    assert mine.micro_batch_on(cpu) == 250 and mine.micro_batch_on(cuda) == 250
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({k: v for k, v in fast.to_dict().items() if k != "micro_batch_by_recipe"}))
    old = type(fast).load(saved)
    assert old.micro_batch_on(cuda) == 500
    assert recipe_config("seed").micro_batch_on(cpu) is None
    # The tuner's trials and best config mark a searched micro-batch the user's, as the command line does.
    tuned = dataclasses.replace(fast, micro_batch=250, **users({"micro_batch": 250}))
    assert tuned.micro_batch_on(cuda) == 250
