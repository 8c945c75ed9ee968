"""DeiT-LT: the CLS + DIST student, the CNN teacher (LDAM + DRW + SAM), the distillation strategy, per-epoch shot-group
logging, and the recipes. Runs are tiny (a few batches of digits-lt) and seeded, so two code paths can be compared
number for number."""
from __future__ import annotations

import glob
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CONFIG_DIR, TINY, compose
from omegaconf import OmegaConf

import cl_vit  # noqa: F401  (registers the models)
from cl_vit.errors import ConfigError, UserError
from cl_vit.models import build_model, load_checkpoint
from cl_vit.models.distilled import distill
from cl_vit.models.teachers import load_teacher
from cl_vit.optim.sam import SAM
from cl_vit.run import build, run
from cl_vit.strategies import STRATEGIES, register_strategy
from cl_vit.strategies import deit_lt as deit_lt_module
from cl_vit.strategies.base import Strategy
from cl_vit.strategies.deit_lt import hard_distillation_loss, soft_distillation_loss, teacher_permutation
from cl_vit.strategies.ldam import class_balanced_weights, ldam_loss, ldam_margins

FAST = [*TINY, "trainer.limit_train_batches=3", "data.batch_size=16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one intra-op thread is several times faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -- plain functions ---------------------------------------------------------------------------------------------


def test_drw_weights_match_the_class_balanced_formula():
    counts = [500, 120, 40, 7, 1]
    beta = 0.9999
    w = class_balanced_weights(counts, beta).double().numpy()
    raw = np.array([(1 - beta) / (1 - beta**n) for n in counts])
    np.testing.assert_allclose(w, raw / raw.sum() * len(counts), rtol=1e-6)
    assert w.sum() == pytest.approx(len(counts), rel=1e-6)
    assert np.all(np.diff(w) > 0)  # rarer classes weigh more
    assert torch.equal(class_balanced_weights(counts, 0.0), torch.ones(5))  # LDAM-DRW's first phase (beta = 0)


def test_drw_weights_are_indexed_by_the_teachers_prediction():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    w = class_balanced_weights([90, 30, 10, 3])
    t = teacher.argmax(1)
    per_sample = F.cross_entropy(student, t, reduction="none")
    expected = (w[t] * per_sample).sum() / w[t].sum()
    assert torch.allclose(hard_distillation_loss(student, teacher, w), expected)
    assert torch.allclose(hard_distillation_loss(student, teacher), per_sample.mean())
    # soft: legacy DeiT normalisation (sum over all logits), and weighted per sample by the teacher's class
    tau = 2.0
    kl = F.kl_div(F.log_softmax(student / tau, 1), F.log_softmax(teacher / tau, 1), reduction="none", log_target=True)
    assert torch.allclose(soft_distillation_loss(student, teacher, tau), kl.sum() * tau**2 / student.numel())
    kl_i = kl.sum(1)
    assert torch.allclose(soft_distillation_loss(student, teacher, tau, w),
                          (w[t] * kl_i).sum() / w[t].sum() * tau**2 / 4)


def test_ldam_margins_and_loss():
    counts = [1000, 100, 10]
    m = ldam_margins(counts, max_margin=0.5)
    assert m.max().item() == pytest.approx(0.5) and m.argmax().item() == 2
    np.testing.assert_allclose(m.numpy() * np.power(counts, 0.25), 0.5 * 10**0.25, rtol=1e-5)  # m_c ~ n_c^(-1/4)
    logits, y = torch.tensor([[0.2, 0.9, -0.1], [0.5, 0.1, 0.3]]), torch.tensor([1, 2])
    shifted = logits.clone()
    shifted[0, 1] -= m[1]
    shifted[1, 2] -= m[2]
    assert torch.allclose(ldam_loss(logits, y, m, scale=30.0), F.cross_entropy(30 * shifted, y))


def test_teacher_permutation_maps_and_refuses():
    assert teacher_permutation(["a", "b", "c"], ["a", "b", "c"]) is None
    assert teacher_permutation(["c", "a", "b"], ["a", "b", "c"]) == [1, 2, 0]
    with pytest.raises(UserError, match="do not match"):
        teacher_permutation(["a", "b", "x"], ["a", "b", "c"])


def test_sam_step_is_the_two_pass_update():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    w0 = [p.detach().clone() for p in lin.parameters()]
    loss_fn = lambda params: F.cross_entropy(F.linear(x, *params), y)  # noqa: E731
    # by hand: e = rho g / ||g|| at w; the SGD step uses the gradient at w + e
    g = torch.autograd.grad(loss_fn(w0_req := [p.clone().requires_grad_() for p in w0]), w0_req)
    norm = torch.norm(torch.stack([gi.norm() for gi in g]))
    adv = [(p + 0.5 * gi / norm).requires_grad_() for p, gi in zip(w0, g)]
    g_adv = torch.autograd.grad(loss_fn(adv), adv)
    expected = [p - 0.1 * ga for p, ga in zip(w0, g_adv)]

    opt = SAM(torch.optim.SGD(lin.parameters(), lr=0.1), rho=0.5)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    for p, e in zip(lin.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# -- models -------------------------------------------------------------------------------------------------------


def test_resnet32_is_ldam_drws():
    net = timm.create_model("resnet32_cifar", num_classes=10)
    stages = [net.layer1, net.layer2, net.layer3]
    assert [len(s) for s in stages] == [5, 5, 5]
    assert [s[-1].conv2.out_channels for s in stages] == [16, 32, 64]
    assert sum(p.numel() for p in net.parameters()) == 464_154  # LDAM-DRW's table: ResNet32, 0.46M
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    normed = build_model({"name": "resnet32_cifar", "use_norm": True}, 5, in_chans=1, img_size=8)
    out = normed.eval()(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 5) and out.abs().max() <= 1 + 1e-5  # cosine classifier
    r50 = timm.create_model("resnet50_ldam", num_classes=7, device="meta")  # structure only, no init cost
    assert type(r50.fc).__name__ == "NormedLinear" and r50.get_classifier() is r50.fc


def test_distilled_vit_micro_student():
    torch.manual_seed(0)
    plain = build_model({"name": "vit_micro_patch2_8"}, 10, in_chans=1, img_size=8)
    student = build_model({"name": "vit_micro_patch2_8", "distilled": True}, 10, in_chans=1, img_size=8)
    assert student.num_prefix_tokens == 2 and student.pos_embed.shape == plain.pos_embed.shape
    x = torch.randn(3, 1, 8, 8)
    assert student.forward_features(x).shape[1] == plain.forward_features(x).shape[1] + 1
    student.eval()
    out = student.forward_outputs(x)
    heads = out["heads"]
    assert torch.allclose(out["logits"], (heads["cls"] + heads["dist"]) / 2)
    assert torch.allclose(student(x), out["logits"])
    student.train().set_distilled_training(True)  # vit_micro has no dropout: train mode is deterministic
    assert torch.equal(student.forward_outputs(x)["logits"], student.forward_outputs(x)["heads"]["cls"])
    assert "dist_token" in student.no_weight_decay()
    # the registered twin, and a plain checkpoint loading into a student (DIST token and head left at init)
    assert timm.create_model("vit_micro_patch2_8_distilled", num_classes=4).forward_outputs(x)["heads"]["dist"].shape == (3, 4)


def test_plain_checkpoint_loads_into_a_student(tmp_path):
    plain = build_model({"name": "vit_micro_patch2_8"}, 10, in_chans=1, img_size=8)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    student = build_model({"name": "vit_micro_patch2_8", "distilled": True,
                           "checkpoint": str(tmp_path / "plain.pth")}, 10, in_chans=1, img_size=8)
    assert torch.equal(student.pos_embed, plain.pos_embed) and torch.equal(student.head.weight, plain.head.weight)
    torch.save(student.state_dict(), tmp_path / "student.pth")
    again = build_model({"name": "vit_micro_patch2_8", "distilled": True}, 10, in_chans=1, img_size=8)
    load_checkpoint(again, tmp_path / "student.pth")
    assert torch.equal(again.dist_token, student.dist_token)


def test_timm_deit_distilled_is_a_student_with_timms_inference():
    torch.manual_seed(0)
    net = build_model({"name": "deit_tiny_distilled_patch16_224", "img_size": 32, "depth": 2}, 5, 3, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    out = net.forward_outputs(x)
    assert set(out["heads"]) == {"cls", "dist"}
    # timm's own forward averages the two heads at inference: the student's "logits" are exactly that
    assert torch.allclose(timm.models.deit.VisionTransformerDistilled.forward(net, x), out["logits"], atol=1e-6)


def test_distill_refuses_a_cnn():
    with pytest.raises(UserError, match="distillation token"):
        distill(timm.create_model("resnet32_cifar", num_classes=3))


# -- runs ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher trained by the real recipe (LDAM + DRW + SAM), cut to a few batches."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = compose(["experiment=teacher-digits-lt", *FAST, "trainer.limit_train_batches=2"], root / "data")
    run(cfg, root / "run")
    return root / "run"


def test_teacher_run_is_a_self_describing_teacher(teacher_dir):
    teacher = load_teacher(teacher_dir)
    assert teacher.class_names == [str(c) for c in range(10)]
    assert teacher.class_counts[0] > teacher.class_counts[-1]  # the long-tail profile travels with the weights
    assert teacher.input_size == (1, 8, 8) and not teacher.net.training
    assert not any(p.requires_grad for p in teacher.net.parameters())
    module = build(compose(["experiment=teacher-digits-lt", *FAST, "scheduler.name=constant"]))[3]
    opt = module.configure_optimizers()
    assert isinstance(opt, SAM) and opt.param_groups[0]["rho"] == 0.8


def _student_cfg(teacher_dir, *overrides, data_root=None):
    return compose(["experiment=deit-lt-digits-lt", f"strategy.deit_lt.teacher={teacher_dir}", *FAST, *overrides],
                   data_root)


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "exp_000.pt", weights_only=False)["module"]


class _PlainCLS(Strategy):
    """Plain training of the student's CLS head: the classification loss alone, on the CLS logits."""

    name = "plain_cls"

    def setup(self, module):
        module.net.set_distilled_training(True)


def test_alpha_zero_is_plain_training(teacher_dir, tmp_path, data_root):
    if "plain_cls" not in STRATEGIES:
        register_strategy(_PlainCLS)
    no_mix = ["strategy.deit_lt.mixup=0", "strategy.deit_lt.cutmix=0", "strategy.deit_lt.random_erasing=0",
              "strategy.deit_lt.drw_start_epoch=0"]
    run(_student_cfg(teacher_dir, "strategy.deit_lt.alpha=0", *no_mix, data_root=data_root), tmp_path / "alpha0")
    plain = _student_cfg(teacher_dir, *no_mix, data_root=data_root)
    OmegaConf.set_struct(plain, False)
    plain.strategy = {"plain_cls": {}}
    run(plain, tmp_path / "plain")
    run(_student_cfg(teacher_dir, "strategy.deit_lt.alpha=0.5", *no_mix, data_root=data_root), tmp_path / "alpha05")
    a0, p, a5 = _state(tmp_path / "alpha0"), _state(tmp_path / "plain"), _state(tmp_path / "alpha05")
    assert all(torch.equal(a0[k], p[k]) for k in p)
    assert not all(torch.equal(a5[k], p[k]) for k in p)
    conf = lambda d: json.loads((d / "results.json").read_text())["confusion"]  # noqa: E731
    assert conf(tmp_path / "alpha0") == conf(tmp_path / "plain")


def test_a_distilled_refiner_vit_is_a_deit_lt_student(teacher_dir, tmp_path, data_root):
    """The suite's own backbone with a DIST token: both heads trained and evaluated, attention maps still readable."""
    doc = run(_student_cfg(teacher_dir, "model.name=refiner_vit_tiny", data_root=data_root),
              tmp_path / "run")
    assert doc["model"] == "refiner_vit_tiny" and set(doc["heads"]) == {"cls", "dist"}
    assert set(doc["shot_accuracy"]) == {"main", "cls", "dist"}
    net = build(_student_cfg(teacher_dir, "model.name=refiner_vit_tiny"))[3].net
    assert net.num_prefix_tokens == 2
    maps = net.get_attention_maps(torch.randn(1, 1, 8, 8))
    assert maps[0]["raw"].shape[-1] == 16 + 2  # 4x4 patches, CLS and DIST


def test_teacher_sees_the_students_augmented_batch_frozen_and_in_eval_mode(teacher_dir, tmp_path, data_root,
                                                                           monkeypatch):
    seen = {"student": [], "teacher": [], "teacher_training": [], "grad_enabled": []}
    loaded = {}

    def spy_load(path):
        t = load_teacher(path)
        loaded["initial"] = {k: v.clone() for k, v in t.net.state_dict().items()}
        loaded["teacher"] = t

        def hook(mod, args):
            seen["teacher"].append(args[0].detach().clone())
            seen["teacher_training"].append(mod.training)
            seen["grad_enabled"].append(torch.is_grad_enabled())

        t.net.register_forward_pre_hook(hook)
        return t

    monkeypatch.setattr(deit_lt_module, "load_teacher", spy_load)
    # Mixup/CutMix and in-batch erasing on, the teacher at twice the student's size, DRW from the start
    cfg = _student_cfg(teacher_dir, "strategy.deit_lt.teacher_size=16", "strategy.deit_lt.drw_start_epoch=0",
                       "strategy.deit_lt.random_erasing=1.0", "logger=tensorboard", data_root=data_root)
    source, scenario, info, module, counts = build(cfg)
    module.net.patch_embed.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].detach().clone()))
    monkeypatch.setattr("cl_vit.run.build", lambda *a, **k: (source, scenario, info, module, counts))
    run(cfg, tmp_path / "spy")

    teacher = loaded["teacher"]
    n_train = len(seen["teacher"])
    assert n_train == 3
    train_inputs = seen["student"][:n_train]  # then the evaluation passes, which the teacher never sees
    for s, t in zip(train_inputs, seen["teacher"]):
        assert torch.equal(t, F.interpolate(s, size=(16, 16), mode="bicubic", align_corners=False))
    assert train_inputs[0].abs().max() > 1  # erased with Gaussian noise: not the raw digits, which lie in [-1, 1]
    assert seen["teacher_training"] == [False] * n_train and seen["grad_enabled"] == [False] * n_train
    assert all(p.grad is None and not p.requires_grad for p in teacher.net.parameters())
    assert all(torch.equal(v, loaded["initial"][k]) for k, v in teacher.net.state_dict().items())
    assert not any(teacher.net is m for m in module.modules())  # never part of what the optimiser sees

    # per-epoch shot-group accuracy of the averaged, CLS and DIST heads went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in glob.glob(str(tmp_path / "spy" / "tensorboard" / "events*")):
        ea = EventAccumulator(f)
        ea.Reload()
        tags |= set(ea.Tags()["scalars"])
    for head in ("main", "cls", "dist"):
        assert {f"epoch_eval/{head}/{g}" for g in ("overall", "many", "medium", "few")} <= tags
    doc = json.loads((tmp_path / "spy" / "results.json").read_text())
    assert {"cls", "dist"} <= set(doc["heads"])

    # the same run without TensorBoard and spies: the per-epoch evaluation changed nothing
    monkeypatch.undo()
    run(_student_cfg(teacher_dir, "strategy.deit_lt.teacher_size=16", "strategy.deit_lt.drw_start_epoch=0",
                     "strategy.deit_lt.random_erasing=1.0", data_root=data_root), tmp_path / "quiet")
    assert json.loads((tmp_path / "quiet" / "results.json").read_text())["confusion"] == doc["confusion"]


def test_a_teacher_of_other_classes_is_refused_before_training(teacher_dir, tmp_path, data_root):
    ckpt = torch.load(teacher_dir / "checkpoints" / "exp_000.pt", weights_only=False)
    ckpt["class_names"] = [f"class{c}" for c in range(10)]
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(UserError) as err:
        run(_student_cfg(tmp_path / "other.pt", data_root=data_root), tmp_path / "run")
    assert "do not match" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match="does not exist"):
        run(_student_cfg(tmp_path / "missing", data_root=data_root), tmp_path / "run2")
    with pytest.raises(UserError, match="teacher is not set"):
        build(compose(["experiment=deit-lt-digits-lt", *FAST], data_root))
    with pytest.raises(UserError, match="has none"):
        build(_student_cfg(teacher_dir, "model.distilled=false", data_root=data_root))
    with pytest.raises(ConfigError, match="trainer.precision"):
        from cl_vit.config import validate

        validate(compose(["experiment=teacher-digits-lt", "trainer.precision=16-mixed"]))


def test_recipes_compose():
    """Every DeiT-LT recipe composes once its benchmark exists (the real-dataset benchmarks come from the dataset
    issue; a recipe whose benchmark config is not in this checkout is skipped here)."""
    import re

    from hydra.errors import MissingConfigException

    checked = []
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        if not path.stem.startswith(("deit-lt-", "teacher-")):
            continue
        try:
            cfg = compose([f"experiment={path.stem}"])
        except MissingConfigException as e:
            missing = re.search(r"benchmark/([\w.-]+)", str(e))
            if missing and not (CONFIG_DIR / "benchmark" / f"{missing.group(1)}.yaml").exists():
                continue
            raise
        assert cfg.benchmark.long_tailed, path.stem
        if path.stem.startswith("deit-lt-"):
            assert cfg.strategy.deit_lt.drw_start_epoch < cfg.trainer.max_epochs and cfg.model.distilled is not False
        checked.append(path.stem)
    assert {"teacher-digits-lt", "deit-lt-digits-lt"} <= set(checked)


def test_probe_reads_teacher_and_heads_as_the_runs_evaluated_them(teacher_dir, tmp_path, data_root, capsys):
    """python -m cl_vit.experiments.deit_lt_probe: its accuracies are the ones the runs recorded (two code paths: the
    runner's evaluation and the probe's own), and agreement with the teacher is counted, mistakes included."""
    from cl_vit.experiments import deit_lt_probe

    student = tmp_path / "student"
    doc = run(_student_cfg(teacher_dir, data_root=data_root), student)
    p = deit_lt_probe.predictions(student)
    s = deit_lt_probe.summary(p)
    teacher_doc = json.loads((teacher_dir / "results.json").read_text())
    assert s["teacher/all"]["acc"] == pytest.approx(100 * teacher_doc["metrics"]["final_average_accuracy"])
    for head in ("cls", "dist"):
        assert s[f"{head}/all"]["acc"] == pytest.approx(100 * doc["heads"][head]["metrics"]["final_average_accuracy"])
        agree = (p[head] == p["teacher"]).mean()
        assert s[f"{head}/all"]["agree"] == pytest.approx(100 * agree)
    wrong = p["teacher"] != p["y"]
    assert wrong.any()  # a teacher trained for 2 batches is wrong on some images: "copies" is defined
    assert s["dist/all"]["copies"] == pytest.approx(100 * (p["dist"][wrong] == p["teacher"][wrong]).mean())
    assert set(p["group"]) <= {"many", "medium", "few"} and len(p["group"]) == len(p["y"])
    assert deit_lt_probe.main([str(student)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"| {student} |") == 3
    assert deit_lt_probe.main([str(teacher_dir)]) == 2  # a run without a teacher: one line, exit 2
    assert "names no strategy.deit_lt.teacher" in capsys.readouterr().err
    # the seeds driver (deit_lt_digits --setting fmnist-regime) reads the run's own shot groups from its confusions:
    # the same numbers the runner's metrics give, and the probe's numbers through probe_numbers
    from cl_vit.experiments import deit_lt_digits

    heads = deit_lt_digits.head_accuracies(doc, "run")
    for head in ("cls", "dist"):
        assert heads[head]["overall"] == pytest.approx(doc["heads"][head]["metrics"]["final_average_accuracy"])
    for g in ("many", "medium", "few"):  # per group the runner records the main head's
        assert heads["main"][g] == pytest.approx(doc["metrics"][f"{g}_shot_accuracy"], nan_ok=True)
    assert deit_lt_digits.probe_numbers(student)["dist_copies"] == pytest.approx(s["dist/all"]["copies"])
