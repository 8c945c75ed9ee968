"""Golden trajectories: the suite's CODA-P, DualPrompt, L2P++, FT++ and ER against CODA-Prompt's own training loop.

The numbers below were produced by the official code (GT-RIPL/CODA-Prompt @ 6417d4f68754be68b697c7ca2323ee61e791e1a3)
on a tiny stream, on a CPU, with

    python scripts/golden_coda.py /path/to/CODA-Prompt --method all

(the script says what it changes at run time: ``.cuda()``, the data files, the transforms, the backbone's size, the
seeds of the batches and of the prompt initialisation; L2P++ also as published, under 4-GPU DataParallel; for ER the
random numbers of the coreset code, the suite's in their place). Each test runs the suite's recipe
(experiment=coda-prompt-cifar100, ...) on the same stream, from the same weights and seeds, and asserts per step the
learning rate (exactly: the schedule as the official runs step it, drop_last's batch count) and the loss (to 1e-5
relative), and at each task's end the correct test images per task (exactly), the norm of the trained parameters (to
1e-5 relative) and, for ER, the coreset: which training images, in which order, how many times (exactly). The
closer-look L2 / EWC / LwF.MC learners are not in CODA-Prompt's repository (the authors' own repository holds them:
docs/recipes.md).
"""

import numpy as np
import pytest
import torch
from conftest import compose, patch_loader_order, script_module

import cl_vit  # noqa: F401  (registers the suite's models)
from cl_vit.data.base import TensorImageDataset
from cl_vit.module import ContinualModule
from cl_vit.run import run

golden = script_module("golden_coda")

# -- the official numbers (python scripts/golden_coda.py CODA-Prompt --method all, at the commit above) ---------------

# the learning rate of each step: one schedule for the prompt methods (the script prints it for each)
LR = [0.001, 0.001, 0.001, 0.001, 0.0009520226269456766, 0.0009520226269456766, 0.000812694164433094,
      0.000812694164433094, 0.0005953838397083548, 0.0005953838397083548, 0.0003209436098072094,
      0.0003209436098072094, 0.001, 0.001, 0.001, 0.001, 0.0009520226269456766, 0.0009520226269456766,
      0.000812694164433094, 0.000812694164433094, 0.0005953838397083548, 0.0005953838397083548, 0.0003209436098072094,
      0.0003209436098072094, 0.001, 0.001, 0.001, 0.001, 0.0009520226269456766, 0.0009520226269456766,
      0.000812694164433094, 0.000812694164433094, 0.0005953838397083548, 0.0005953838397083548, 0.0003209436098072094,
      0.0003209436098072094]
OFFICIAL = {'coda': {'lr': LR,
          'loss': [0.7667471170425415, 0.9134482145309448, 0.7825704216957092, 0.6870518922805786, 0.705180287361145,
                   0.8216869235038757, 0.7070149183273315, 0.5868287086486816, 0.5821141004562378, 0.5756370425224304,
                   0.5719782114028931, 0.5355464816093445, 0.9353476166725159, 0.8043000102043152, 0.8475180864334106,
                   0.6406531929969788, 0.6004638671875, 0.6772092580795288, 0.6121411323547363, 0.5958480834960938,
                   0.5861333012580872, 0.5671120285987854, 0.5594975352287292, 0.5773825645446777, 0.894682765007019,
                   0.4730871319770813, 0.3975565433502197, 0.4549578130245209, 0.28072819113731384,
                   0.3195786774158478, 0.24908506870269775, 0.16768930852413177, 0.15180404484272003,
                   0.12978379428386688, 0.12671160697937012, 0.113423652946949],
          'correct': [[9], [5, 7], [0, 0, 10]],
          'norm': [5.709200987874044, 7.98631555366952, 9.809911116013994]},
 'dual': {'lr': LR,
          'loss': [24.999343872070312, 25.146514892578125, 24.908559799194336, 24.92981719970703, 24.941022872924805,
                   24.996986389160156, 24.794567108154297, 24.65837860107422, 24.660329818725586, 24.657377243041992,
                   24.5899658203125, 24.52117919921875, 24.905803680419922, 24.865522384643555, 24.84591293334961,
                   24.58974838256836, 24.528818130493164, 24.549177169799805, 24.47626304626465, 24.45290756225586,
                   24.401702880859375, 24.368148803710938, 24.330007553100586, 24.3543701171875, 25.148216247558594,
                   24.896451950073242, 24.735897064208984, 24.7537899017334, 24.538299560546875, 24.5301513671875,
                   24.450862884521484, 24.375280380249023, 24.33334732055664, 24.29509735107422, 24.267364501953125,
                   24.2366943359375],
          'correct': [[5], [5, 0], [0, 0, 10]],
          'norm': [112.09884235522435, 112.09849095169365, 112.09778267019517]},
 'l2p': {'lr': LR,
         'loss': [322.6535949707031, 322.38226318359375, 321.73675537109375, 321.2330627441406, 320.8920593261719,
                  320.7123718261719, 320.2582702636719, 319.51641845703125, 319.1445617675781, 318.9419860839844,
                  318.6568908691406, 318.6632995605469, 318.5758972167969, 317.9788513183594, 317.6285705566406,
                  316.96246337890625, 316.3315734863281, 316.3443298339844, 315.6723937988281, 315.27239990234375,
                  314.8638000488281, 314.66326904296875, 314.3900451660156, 314.3879699707031, 314.25616455078125,
                  313.93218994140625, 313.1255798339844, 312.9983215332031, 312.0955810546875, 312.071044921875,
                  311.70623779296875, 311.0764465332031, 310.71466064453125, 310.5931091308594, 310.2746887207031,
                  310.04425048828125],
         'correct': [[7], [7, 0], [6, 0, 10]],
         'norm': [87.66502672393446, 87.67019165122386, 87.66058730902739]},
 'l2p4': {'lr': LR,
          'loss': [81.16857147216797, 81.38684844970703, 81.01512908935547, 80.82106018066406, 80.80530548095703,
                   80.8849105834961, 80.69544982910156, 80.33507537841797, 80.23089599609375, 80.1900863647461,
                   80.12454223632812, 80.0996322631836, 80.483154296875, 80.05528259277344, 80.04248046875,
                   79.73844909667969, 79.52227020263672, 79.68426513671875, 79.42940521240234, 79.29173278808594,
                   79.18976593017578, 79.13432312011719, 79.06147003173828, 79.07271575927734, 79.12693786621094,
                   78.94813537597656, 78.64423370361328, 78.64225006103516, 78.30408477783203, 78.28231048583984,
                   78.14899444580078, 78.01252746582031, 77.91364288330078, 77.82605743408203, 77.75289154052734,
                   77.67247009277344],
          'correct': [[7], [7, 0], [6, 0, 10]],
          'norm': [87.66502672373306, 87.67019164572359, 87.6605873179384]},
 'ftpp': {'lr': [5e-05, 5e-05, 5e-05, 5e-05, 4.760113134728383e-05, 4.760113134728383e-05, 4.06347082216547e-05,
                 4.06347082216547e-05, 2.9769191985417743e-05, 2.9769191985417743e-05, 1.604718049036047e-05,
                 1.604718049036047e-05, 5e-05, 5e-05, 5e-05, 5e-05, 4.760113134728383e-05, 4.760113134728383e-05,
                 4.06347082216547e-05, 4.06347082216547e-05, 2.9769191985417743e-05, 2.9769191985417743e-05,
                 1.604718049036047e-05, 1.604718049036047e-05, 5e-05, 5e-05, 5e-05, 5e-05, 4.760113134728383e-05,
                 4.760113134728383e-05, 4.06347082216547e-05, 4.06347082216547e-05, 2.9769191985417743e-05,
                 2.9769191985417743e-05, 1.604718049036047e-05, 1.604718049036047e-05],
          'loss': [0.7632989287376404, 4.247512340545654, 2.1645395755767822, 0.5729905366897583, 1.2123864889144897,
                   1.6915340423583984, 1.2615065574645996, 0.5965585708618164, 0.5692822337150574, 0.6447046995162964,
                   0.6425626873970032, 0.5650279521942139, 0.8891333937644958, 2.2091150283813477, 1.6057144403457642,
                   0.6230130791664124, 0.873696506023407, 0.6370943188667297, 0.7708376049995422, 0.8162737488746643,
                   0.678429901599884, 0.6040956974029541, 0.5797941088676453, 0.7330004572868347, 0.909680962562561,
                   1.3252800703048706, 0.6037445068359375, 0.511282205581665, 0.560038149356842, 0.39379608631134033,
                   0.2565110921859741, 0.38061946630477905, 0.22471538186073303, 0.15189963579177856,
                   0.13107681274414062, 0.12190265953540802],
          'correct': [[5], [5, 0], [0, 0, 10]],
          'norm': [125.64453731696173, 125.64680369390118, 125.65004297216744]},
 'er': {'lr': [5e-05, 5e-05, 5e-05, 5e-05, 4.760113134728383e-05, 4.760113134728383e-05, 4.06347082216547e-05,
                4.06347082216547e-05, 2.9769191985417743e-05, 2.9769191985417743e-05, 1.604718049036047e-05,
                1.604718049036047e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05,
                4.760113134728383e-05, 4.760113134728383e-05, 4.760113134728383e-05, 4.760113134728383e-05,
                4.760113134728383e-05, 4.06347082216547e-05, 4.06347082216547e-05, 4.06347082216547e-05,
                4.06347082216547e-05, 4.06347082216547e-05, 2.9769191985417743e-05, 2.9769191985417743e-05,
                2.9769191985417743e-05, 2.9769191985417743e-05, 2.9769191985417743e-05, 1.604718049036047e-05,
                1.604718049036047e-05, 1.604718049036047e-05, 1.604718049036047e-05, 1.604718049036047e-05, 5e-05,
                5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 4.760113134728383e-05,
                4.760113134728383e-05, 4.760113134728383e-05, 4.760113134728383e-05, 4.760113134728383e-05,
                4.06347082216547e-05, 4.06347082216547e-05, 4.06347082216547e-05, 4.06347082216547e-05,
                4.06347082216547e-05, 2.9769191985417743e-05, 2.9769191985417743e-05, 2.9769191985417743e-05,
                2.9769191985417743e-05, 2.9769191985417743e-05, 1.604718049036047e-05, 1.604718049036047e-05,
                1.604718049036047e-05, 1.604718049036047e-05, 1.604718049036047e-05],
         'loss': [0.7632989287376404, 4.247512340545654, 2.1645395755767822, 0.5729905366897583, 1.2123864889144897,
                  1.6915340423583984, 1.2615065574645996, 0.5965585708618164, 0.5692822337150574, 0.6447046995162964,
                  0.6425626873970032, 0.5650279521942139, 1.2897093296051025, 2.972428798675537, 2.1419425010681152,
                  1.562400221824646, 1.1891685724258423, 1.305999755859375, 1.6946601867675781, 1.257799744606018,
                  1.4979476928710938, 1.337129831314087, 1.114980697631836, 1.253124713897705, 1.2419297695159912,
                  1.2402230501174927, 1.2975114583969116, 1.0858733654022217, 1.4726142883300781, 1.0974972248077393,
                  1.3111271858215332, 1.1199839115142822, 0.9401344656944275, 1.0262974500656128, 0.9271016120910645,
                  1.0519013404846191, 1.1028079986572266, 0.8719014525413513, 0.908744215965271, 0.8609774112701416,
                  0.776677131652832, 0.7476043105125427, 1.3447198867797852, 1.2510430812835693, 2.787627696990967,
                  2.369633436203003, 1.9803258180618286, 1.7101788520812988, 1.2195240259170532, 0.6578595638275146,
                  1.479585886001587, 1.4285550117492676, 1.135730266571045, 1.2767819166183472, 0.6431597471237183,
                  0.7475546598434448, 0.7867634892463684, 0.5718293190002441, 0.4276764988899231, 0.7470377087593079,
                  0.3058231472969055, 0.5089824199676514, 0.24007339775562286, 0.27070683240890503,
                  0.12277780473232269, 0.46331465244293213, 0.17031942307949066, 0.1881292164325714,
                  0.1572776883840561, 0.3090551197528839, 0.2503852844238281, 0.05874042212963104],
         'correct': [[5], [10, 10], [10, 10, 10]],
         'norm': [125.64453731696173, 125.6560743432075, 125.67105129598171],
         'memory': [[52, 20, 22, 5, 35, 34, 23, 49, 16, 42], [22, 35, 34, 23, 21, 32, 53, 19, 56, 38],
                    [35, 23, 53, 53, 56, 38, 17, 44, 58, 12]]}}


#: the suite's recipe of each official run, its strategy and the names of its --prompt_param values, and what else
#: differs: the one-device official L2P++ run computes the key loss over the whole batch (the recipe: per quarter, as
#: 4 GPUs do); FT++ has no recipe of its own: CODA-Prompt's CIFAR-100 protocol with strategy=ftpp and its loader;
#: ER is its recipe with the script's memory (--memory 10: 10 images over the stream's 6 classes)
RECIPES = {"coda": (["experiment=coda-prompt-cifar100"], "coda_prompt", ["pool_size", "length", "ortho_mu"]),
           "dual": (["experiment=dualprompt-cifar100"], "dualprompt", ["pool_size", "e_length", "g_length"]),
           "l2p": (["experiment=l2p-cifar100", "strategy.l2p.key_loss_shards=1"], "l2p", ["pool_size", "length"]),
           "l2p4": (["experiment=l2p-cifar100"], "l2p", ["pool_size", "length"]),
           "ftpp": (["benchmark=cifar100-coda", "strategy=ftpp", "data.drop_last=true"], "finetune", []),
           "er": (["experiment=er-cifar100", f"strategy.replay.memory_size={golden.MEMORY['er']}"], "replay", [])}


def task_positions(labels, task: int) -> np.ndarray:
    """Where task ``task``'s images sit in the script's array of ``labels`` (train or test), in the stored order."""
    return np.isin(labels, [2 * task, 2 * task + 1]).nonzero()[0]


def stream():
    """The official script's images as a scenario: per task its classes' images in the stored order (as the official
    data set keeps them, dataloader.py L93-96; the suite's own streams group them by class), ``ToTensor`` values."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import as_classification_dataset

    def tasks(x, y):
        out = []
        for t in range(golden.STREAM["tasks"]):
            idx = task_positions(y, t)
            images = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float().div(255)
            out.append(as_classification_dataset(TensorImageDataset(images, y[idx].tolist())))
        return out

    data = golden.images()
    return with_classes_timeline(benchmark_from_datasets(train=tasks(*data["train"]), test=tasks(*data["test"])))


def record_steps(monkeypatch, order=golden.fixed_order) -> list:
    """Patches the suite's runs to a fixed batch order (``order(DataLoader)``, by default the scripts'
    ``golden_coda.fixed_order``) and returns the list that collects (learning rate, loss) per training step."""
    steps = []
    step = ContinualModule.training_step

    def training_step(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        steps.append((self.trainer.optimizers[0].param_groups[0]["lr"], float(loss.detach())))
        return loss

    monkeypatch.setattr(ContinualModule, "training_step", training_step)
    patch_loader_order(monkeypatch, order)
    return steps


def suite_run(method, tmp_path, monkeypatch):
    """The suite's recipe of ``method`` on the stream; returns the same numbers as the official script."""
    from cl_vit.strategies.coda_prompt import CodaPromptPool
    from cl_vit.strategies.dualprompt import PromptPool

    recipe, strategy, keys = RECIPES[method]
    _, _, param, _, lr = golden.METHODS[method]
    over = [*recipe, f"+model.depth={golden.BACKBONE['depth']}", f"trainer.max_epochs={golden.STREAM['epochs']}",
            f"optimizer.lr={lr}", *(f"strategy.{strategy}.{k}={v}" for k, v in zip(keys, param))]
    start_coda, start_pool = CodaPromptPool.start_task, PromptPool.start_task

    def coda_start(self, index, n_tasks):
        torch.manual_seed(golden.prompt_seed(index))
        start_coda(self, index, n_tasks)

    def pool_start(self, index, n_tasks):
        if index == 0:
            start = golden.initial_prompts({k: tuple(p.shape) for k, p in self.named_parameters()})
            with torch.no_grad():
                for k, p in self.named_parameters():
                    p.copy_(start[k])
        start_pool(self, index, n_tasks)

    monkeypatch.setattr(CodaPromptPool, "start_task", coda_start)
    monkeypatch.setattr(PromptPool, "start_task", pool_start)
    return stream_run(over, golden.initial_backbone(), tmp_path, monkeypatch, golden.fixed_order)


def stream_run(over, weights, tmp_path, monkeypatch, order, batch=golden.STREAM["batch"]):
    """The suite run of the overrides ``over`` on the stream, from ``weights`` (``golden.initial_backbone``'s, of
    which the head's stream rows), with the training loaders ordered by ``order(DataLoader)``, in batches of
    ``batch``: per step the learning rate and the loss, at each experience's end the correct test images per task
    and the norm of the trained parameters (also tests/test_golden_closer.py's)."""
    n = golden.STREAM["n_classes"]
    weights = {**weights, "head.weight": weights["head.weight"][:n], "head.bias": weights["head.bias"][:n]}
    torch.save(weights, tmp_path / "init.pth")
    b = golden.BACKBONE
    over = [*over, "model.pretrained=false", f"model.checkpoint={tmp_path / 'init.pth'}",
            f"model.patch_size={b['patch_size']}", f"+model.mlp_ratio={b['mlp_ratio']}",
            f"data.batch_size={batch}", "trainer.accelerator=cpu", "logger=none",
            "data.num_workers=0", "data.persistent_workers=false", f"seed={golden.SEED}"]
    cfg = compose(over, tmp_path / "data")
    steps, norms = record_steps(monkeypatch, order), []
    import cl_vit.plots

    monkeypatch.setattr(cl_vit.plots, "run_figures", lambda run: {})  # the end-of-run figures: a sixth of the time

    labels, memory = golden.images()["train"][1], []

    def norm_at_end(runner, i):
        params = [p for p in runner.module.net.parameters() if p.requires_grad]
        norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))))
        for s in runner.module.strategies:  # a replay memory: the script's ids of its training images, in its order
            if s.name == "replay":
                memory.append([int(task_positions(labels, e)[k]) for e, k in zip(s.exp.tolist(), s.idx.tolist())])

    from cl_vit.runner import ContinualRunner

    init = ContinualRunner.__init__
    monkeypatch.setattr(ContinualRunner, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "on_experience_end": norm_at_end}))
    doc = run(cfg, tmp_path / "run", scenario=stream())
    per_task = 2 * golden.STREAM["n_test"]
    correct = [[int(round(v * per_task)) for v in row[: i + 1]] for i, row in enumerate(doc["accuracy_matrix"])]
    out = {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "correct": correct, "norm": norms}
    return {**out, "memory": memory} if memory else out


@pytest.mark.parametrize("recipe", ["coda-prompt", "dualprompt", "l2p"])
@pytest.mark.parametrize("benchmark", ["cifar100", "imagenet-r"])
def test_coda_protocol_recipes_run_as_the_official_runs(recipe, benchmark):
    import timm

    cfg = compose([f"experiment={recipe}-{benchmark}"])
    # trainer.py L185 drop_last; utils/schedulers.py L19-20 as the runs step it; learners/prompt.py L66-67 Adam
    assert cfg.data.drop_last is True and cfg.scheduler.name == "coda_cosine"
    assert (cfg.optimizer.name, cfg.optimizer.weight_decay) == ("adam", 0.0)
    if recipe == "l2p":
        assert cfg.strategy.l2p.key_loss_shards == 4  # experiments/*.sh GPUID='0 1 2 3'
    # requirements.txt's timm 0.4.12 weights; the upgraded timm's default is the other candidate, selectable
    assert cfg.model.pretrained_tag == "augreg_in21k_ft_in1k"
    files = {tag: timm.models.get_pretrained_cfg(f"vit_base_patch16_224.{tag}").hf_hub_id
             for tag in ("augreg_in21k_ft_in1k", "augreg2_in21k_ft_in1k")}
    assert len(set(files.values())) == 2
    other = compose([f"experiment={recipe}-{benchmark}", "model.pretrained_tag=augreg2_in21k_ft_in1k"])
    assert other.model.pretrained_tag == "augreg2_in21k_ft_in1k"
    if (recipe, benchmark) == ("l2p", "imagenet-r"):  # once: the closer-look recipes, whose loop drops it too
        for closer in ("closer-look-imagenet-r", "closer-look-imagenet-r-predkd"):
            assert compose([f"experiment={closer}"]).data.drop_last is True


@pytest.mark.parametrize("method", list(RECIPES))
def test_suite_recipe_follows_the_official_run(method, tmp_path, data_root, monkeypatch):
    if method not in OFFICIAL:
        pytest.skip("no official numbers recorded")
    ours, theirs = suite_run(method, tmp_path, monkeypatch), OFFICIAL[method]
    assert ours["lr"] == theirs["lr"]  # 3 tasks x 3 epochs x 2 full batches of 8 (20 images, the last 4 dropped)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=0)
    assert ours["correct"] == theirs["correct"]
    np.testing.assert_allclose(ours["norm"], theirs["norm"], rtol=1e-5, atol=0)
    assert ours.get("memory") == theirs.get("memory")  # ER: the coreset's images in order, duplicates included


def test_the_golden_scripts_run_in_the_checkout_and_restore_the_directory_even_when_the_run_fails(tmp_path):
    import os

    from _official import in_checkout  # (scripts/ is on sys.path since the golden script above was loaded)

    cwd = os.getcwd()
    with pytest.raises(RuntimeError):
        with in_checkout(tmp_path, "golden_test_") as work:
            assert os.getcwd() == str(tmp_path) and work.is_dir() and work.name.startswith("golden_test_")
            raise RuntimeError("the official run failed")
    assert os.getcwd() == cwd and not work.exists()
