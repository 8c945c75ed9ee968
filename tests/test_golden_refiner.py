"""Golden trajectory: the suite's Refiner-ViT ImageNet recipe against Refiner-ViT's own training loop (main.py).

The numbers below were produced by the official code (zhoudaquan/Refiner_ViT @
b3e8cb0c41524af6f501785f47eda691c85f25e4) with the timm 0.4.8 it bundles, on a tiny stream (6 generated 32-px classes,
42 training and 24 test images), on a CPU, with

    git clone https://github.com/zhoudaquan/Refiner_ViT /tmp/refgolden/Refiner_ViT
    python scripts/golden_refiner.py /tmp/refgolden/Refiner_ViT

(the script says what it changes at run time: ``stty``, ``.cuda()`` and the prefetcher's CUDA stream, Mixup's target
device, float64, the model's size, the data, the batch order, the seeds at each epoch, and which values of
scripts/refiner_s.yaml it overrides). Three runs: ``no_prefetcher`` (main.py ``--no-prefetcher``: Mixup on the
normalised batch in train_one_epoch, CutMix and random erasing off) and ``prefetcher`` (main.py's default loader:
FastCollateMixup on the uint8 batch with CutMix 1.0, then the PrefetchLoader's normalisation and random erasing 0.25
on the mixed batch; the suite's ``augment.prefetcher``, the recipe's default) with scripts/refiner_s.yaml, and
``dense``, the prefetcher run with scripts/refiner_l.yaml's loss: no cos_reg term, relabel / return_dense true,
relabel_size 24, dense_weight 0.5, mix_token false (RelabelCrossEntropy: the class token's soft-target cross-entropy
plus 0.5 x that of the dense head on each of the 16 patch tokens against its image's mixed target; evaluated as
x_cls + 0.5 x max over patches). The test runs experiment=refiner-vit-s-imagenet (refiner-vit-l-imagenet for
``dense``: strategy token_label, model.return_dense=true), sized down alike, in float64 (trainer.precision=64-true),
on the same images, from the same weights and in the same batch order, and asserts per step the learning rate
(exactly: timm's per-epoch cosine, one warm-up epoch at 1e-6, one cool-down epoch at min_lr after a 3-epoch cosine:
scheduler.name=timm_cosine; 5 steps an epoch: the last incomplete batch dropped) and the loss (to 1e-10 relative:
Mixup with smoothing, soft-target cross-entropy, the cos_reg term over 2 pairs, AdamW with timm's weight-decay
groups), and after each epoch the correct test images (exactly), the mean test loss and the parameter norm (to 1e-10
relative) of the model and of its EMA (updated after every step). In the ``prefetcher`` run 8 of the 20 batches are
cut (4 with an odd box side, where timm 1.0's box would be a pixel larger: the losses then part by up to 0.9 %) and
42 of the 160 images erased.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, patch_loader_order, script_module

import cl_vit  # noqa: F401  (registers the suite's models)
from cl_vit.data.base import TensorImageDataset
from cl_vit.module import ContinualModule, net_outputs
from cl_vit.run import run

golden = script_module("golden_refiner")


# -- the official numbers (python scripts/golden_refiner.py Refiner_ViT, at the commit above) --------------------------

OFFICIAL = {
    'no_prefetcher':
    {'lr': [1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 0.0003775, 0.0003775, 0.0003775, 0.0003775, 0.0003775,
            0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005,
            0.00013250000000000005, 1e-05, 1e-05, 1e-05, 1e-05, 1e-05],
     'loss': [1.8836279144352654, 1.8390286188210891, 1.8893376460214863, 1.9140389498696901, 1.9307265632496644,
              1.8639403622789532, 1.8422747457810518, 1.787768922317604, 1.6986743860068596, 1.736047328363789,
              1.5942590327760993, 1.7970573153630178, 1.6028123439848794, 1.677576153852081, 1.5573333204837732,
              1.5510208175686402, 1.4577554423800285, 1.610839713923128, 1.5698055325023337, 1.6250723484731413],
     'correct': [4, 8, 4, 6],
     'eval_loss': [1.7861379619307873, 1.7403270698624753, 1.689521414893883, 1.6493723532344238],
     'norm': [29.379436840372783, 29.382228218087604, 29.383709394786585, 29.383847090026475],
     'ema_correct': [4, 4, 4, 8],
     'ema_eval_loss': [1.786602085010541, 1.763239133343627, 1.7533275825952153, 1.7393211013399814],
     'ema_norm': [29.37943769418836, 29.379767157116678, 29.380704808329437, 29.38175626033365]},
    'prefetcher':
    {'lr': [1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 0.0003775, 0.0003775, 0.0003775, 0.0003775, 0.0003775,
            0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005,
            0.00013250000000000005, 1e-05, 1e-05, 1e-05, 1e-05, 1e-05],
     'loss': [1.8926909469401663, 1.8571484127852838, 1.8999366759394878, 1.9167402943968381, 1.936031867133167,
              1.8384776790751802, 1.8427197867459288, 1.8354918414672787, 1.7603451080110533, 1.7039064890648075,
              1.6714798875473142, 1.656652938154553, 1.8226834661536304, 1.8079494517951413, 1.5999237638847892,
              1.692124602547746, 1.638778824856722, 1.717847467342328, 1.6263414398631588, 1.614027575214838],
     'correct': [4, 4, 9, 8],
     'eval_loss': [1.7860516208085635, 1.7307862968491745, 1.658954149066237, 1.6140636800417012],
     'norm': [29.379436739154713, 29.38205683111095, 29.383583395523335, 29.383710783792903],
     'ema_correct': [4, 4, 4, 4],
     'ema_eval_loss': [1.7876573677586063, 1.7610803193227202, 1.7494101618799698, 1.7296987636857561],
     'ema_norm': [29.37943747217776, 29.379775795716014, 29.38068897997512, 29.38170961679471]},
    'dense':
    {'lr': [1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 0.0003775, 0.0003775, 0.0003775, 0.0003775, 0.0003775,
            0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005, 0.00013250000000000005,
            0.00013250000000000005, 1e-05, 1e-05, 1e-05, 1e-05, 1e-05],
     'loss': [2.6961932470012764, 2.6814279158445222, 2.7049311426286264, 2.687783365644152, 2.7176637675579984,
              2.635262791853268, 2.6407914516945787, 2.6363202587068346, 2.5793726736058185, 2.4940528541118097,
              2.444182852275916, 2.4228790677449683, 2.6272228659416217, 2.601359816935834, 2.406030656079647,
              2.4517663046473253, 2.400689341899075, 2.5080333061987847, 2.4010480098898306, 2.376536559472504],
     'correct': [4, 8, 11, 12],
     'eval_loss': [1.7935284682759738, 1.7295685789782713, 1.6301505993138392, 1.5725770523199805],
     'norm': [29.38153903426675, 29.384153463408328, 29.38591559234736, 29.386063654537164],
     'ema_correct': [3, 4, 7, 4],
     'ema_eval_loss': [1.7866631225032819, 1.7656351034778737, 1.7539959500684315, 1.7249297373553147],
     'ema_norm': [29.381540297793343, 29.381851562637358, 29.382815907984014, 29.383917931379838]},
}


def stream(name: str):
    """The script's images as a one-experience scenario, as its loaders feed them: normalised, or, for the prefetcher
    run, the training images in uint8 (the suite's DeiT pipeline with ``augment.prefetcher`` gives uint8 too)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import as_classification_dataset

    def dataset(x, y):
        return as_classification_dataset(TensorImageDataset(golden.to_input(x), y.tolist()))

    def uint8(x, y):
        return as_classification_dataset(TensorImageDataset(golden.to_uint8(x), y.tolist()))

    data = golden.images()
    train = (dataset if name == "no_prefetcher" else uint8)(*data["train"])
    return with_classes_timeline(benchmark_from_datasets(train=[train], test=[dataset(*data["test"])]))


def evaluate(net, x, y) -> tuple[int, float, float]:
    """main.py ``validate``'s numbers for ``net``: correct test images, mean cross-entropy; and the parameter norm.
    The logits as the suite's evaluation computes them (net_outputs: with the dense head, its eval form)."""
    was = net.training
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net_outputs(net, x[i:i + golden.RUN["batch"]])["logits"]
                            for i in range(0, len(x), golden.RUN["batch"])])
    net.train(was)
    return (int((logits.argmax(1) == y).sum()), float(F.cross_entropy(logits, y)),
            golden.trained_norm(net.parameters()))


def suite_run(tmp_path, monkeypatch, name):
    """The suite's recipe on the script's stream for the official run ``name``; returns the same numbers."""
    from cl_vit.ema import ModelEma

    dense = name == "dense"  # experiment=refiner-vit-l-imagenet: the dense head and its loss
    torch.save(golden.initial_official(dense), tmp_path / "init.pth")
    m, r = golden.MODEL, golden.RUN
    over = [f"experiment=refiner-vit-{'l' if dense else 's'}-imagenet", f"model.checkpoint={tmp_path / 'init.pth'}",
            f"model.img_size={m['img_size']}", f"model.patch_size={m['patch_size']}",
            f"+model.embed_dim={m['embed_dim']}", f"+model.depth={m['depth']}", f"+model.num_heads={m['num_heads']}",
            "model.drop_path_rate=0", f"trainer.max_epochs={r['epochs'] + r['cooldown']}",
            f"scheduler.cooldown_epochs={r['cooldown']}", f"scheduler.warmup_epochs={r['warmup']}",
            f"ema.decay={r['ema']}", f"data.batch_size={r['batch']}", "trainer.precision=64-true",
            "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0", "data.persistent_workers=false",
            "logger=none", f"seed={golden.SEED}"]
    if name == "no_prefetcher":  # the recipe's prefetcher and CutMix off, as the script's run
        over += ["benchmark.source_args.augment.prefetcher=false",
                 f"strategy.mixup.cutmix={golden.RUNS[name]['cutmix']}"]
    cfg = compose(over, tmp_path / "data")
    x, y = golden.images()["test"]
    x, y = golden.to_input(x).double(), torch.from_numpy(y).long()
    steps, model, ema = [], [], []
    step, epoch_start, epoch_end = (ContinualModule.training_step, ContinualModule.on_train_epoch_start,
                                    ContinualModule.on_train_epoch_end)

    def training_step(self, batch, batch_idx):
        if name != "no_prefetcher" and batch_idx == 0:  # where the script seeds: the epoch's first batch, before mixing
            golden.seed_all(golden.mixing_seed(self.current_epoch))
        loss = step(self, batch, batch_idx)
        steps.append((self.trainer.optimizers[0].param_groups[0]["lr"], float(loss.detach())))
        return loss

    def seeded_epoch_start(self):
        if name == "no_prefetcher":
            np.random.seed(golden.mixing_seed(self.current_epoch))
        epoch_start(self)

    def evaluated_epoch_end(self):
        average = next(c for c in self.trainer.callbacks if isinstance(c, ModelEma)).ema.module
        model.append(evaluate(self.net, x, y))
        ema.append(evaluate(average, x, y))
        epoch_end(self)

    monkeypatch.setattr(ContinualModule, "training_step", training_step)
    monkeypatch.setattr(ContinualModule, "on_train_epoch_start", seeded_epoch_start)
    monkeypatch.setattr(ContinualModule, "on_train_epoch_end", evaluated_epoch_end)
    patch_loader_order(monkeypatch, golden.fixed_order)
    run(cfg, tmp_path / "run", scenario=stream(name))
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps],
            "correct": [e[0] for e in model], "eval_loss": [e[1] for e in model], "norm": [e[2] for e in model],
            "ema_correct": [e[0] for e in ema], "ema_eval_loss": [e[1] for e in ema], "ema_norm": [e[2] for e in ema]}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_suite_recipe_follows_the_official_run(tmp_path, data_root, monkeypatch, name):
    ours, theirs = suite_run(tmp_path, monkeypatch, name), OFFICIAL[name]
    # 4 epochs x 5 batches of 8 (42 images, the last 2 dropped): warm-up epoch at 1e-6, cosine, cool-down at 1e-5
    assert ours["lr"] == theirs["lr"]
    # float64 on both sides: equal to the last bits on one machine; across CPUs the kernels' rounding moves both by up
    # to 8e-10 (regenerated on an AMD EPYC, the official run gives the suite's digits there, not the stored ones)
    for key in ("loss", "eval_loss", "norm", "ema_eval_loss", "ema_norm"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-8, atol=0, err_msg=key)
    assert (ours["correct"], ours["ema_correct"]) == (theirs["correct"], theirs["ema_correct"])
