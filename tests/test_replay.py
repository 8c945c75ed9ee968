"""Replay memory (cl_vit/strategies/replay.py), ER, DER++ and iCaRL: the memory's balance and size, herding, reservoir
sampling, exact resume, composition with L2, and each method's math against a direct computation of the reference
formula (Mammoth models/derpp.py, models/icarl.py)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, cut_and_resume, state_equal
from torch.utils.data import TensorDataset

from cl_vit.errors import ConfigError
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies.base import ExperienceInfo
from cl_vit.strategies.derpp import DERpp
from cl_vit.strategies.icarl import ICaRL, icarl_loss
from cl_vit.strategies.replay import Replay, class_quota, generator, herding_order, reservoir_slots

FAST = ["model=vit_micro", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.limit_train_batches=1",
        "logger=none"]


def _memory_by_experience(run_dir, name, n):
    rd = RunDirectory(run_dir)
    return [rd.load_checkpoint(i)["strategies"][name] for i in range(n)]


def test_coreset_is_class_balanced_and_of_its_size(tmp_path, data_root):
    # 5 experiences of 2 digits, 25 samples: 12/13 over 2 classes, then 8 or 9 over 3-4 ..., 2 or 3 over 10
    run(compose([*FAST, "strategy=replay", "strategy.replay.memory_size=25"], data_root), tmp_path / "r")
    for i, mem in enumerate(_memory_by_experience(tmp_path / "r", "replay", 5)):
        n_seen = 2 * (i + 1)
        counts = torch.bincount(mem["labels"], minlength=10)[:n_seen]
        assert len(mem["idx"]) == 25 and counts.sum() == 25, i
        assert counts.max() - counts.min() <= 1, (i, counts)
        # CODA-Prompt: the remainder goes to the latest classes
        assert counts.tolist() == sorted(counts.tolist()), (i, counts)
        # indices, not images: each (experience, position) names a training image of its label
        assert set(mem["exp"].tolist()) <= set(range(i + 1))
        assert len({(e, k) for e, k in zip(mem["exp"].tolist(), mem["idx"].tolist())}) == 25


def test_class_quota_drops_or_gives_the_remainder():
    assert class_quota({0: 50, 1: 50, 2: 50}, 10, "latest") == {0: 3, 1: 3, 2: 4}
    assert class_quota({0: 50, 1: 50, 2: 50}, 10, "none") == {0: 3, 1: 3, 2: 3}
    assert class_quota({0: 50, 1: 2, 2: 50}, 12, "latest") == {0: 4, 1: 2, 2: 4}  # a class short of its share


def test_herding_picks_what_the_direct_greedy_picks():
    feats = F.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    mu = feats.double().mean(0)
    chosen = []
    for i in range(12):
        best, best_cost = None, None
        for s in range(len(feats)):
            if s in chosen:
                continue
            mean = (sum(feats[j].double() for j in chosen) + feats[s].double()) / (i + 1)
            cost = float(torch.sqrt(((mu - mean) ** 2).sum()))
            if best_cost is None or cost < best_cost:
                best, best_cost = s, cost
        chosen.append(best)
    assert herding_order(feats, 12).tolist() == chosen
    # herding's mean is closer to the class mean than a random pick of the same size
    pick = herding_order(feats, 5)
    assert (feats[pick].mean(0) - feats.mean(0)).norm() < (feats[:5].mean(0) - feats.mean(0)).norm()


def test_reservoir_keeps_every_sample_with_equal_probability():
    size, n, trials = 4, 20, 2000
    kept = torch.zeros(n)
    for t in range(trials):
        memory = [-1] * size
        gen = generator(t)
        for start in range(0, n, 5):  # arriving in batches of 5
            for k, slot in enumerate(reservoir_slots(start, 5, size, gen).tolist()):
                if slot >= 0:
                    memory[slot] = start + k
        kept[memory] += 1
    assert torch.allclose(kept / trials, torch.full((n,), size / n), atol=0.04), kept / trials


def test_options_are_checked():
    with pytest.raises(ConfigError, match="strategy.replay.mix"):
        Replay(policy="reservoir", mix="resample")
    with pytest.raises(ConfigError, match="strategy.replay.memory_size"):
        Replay(memory_size=0)


class _Labels:
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def _coreset_after_two_experiences(rebuild, second_per_class):
    """A coreset of 8 over two experiences of 2 classes (10 images each, then ``second_per_class`` each)."""
    r = Replay(memory_size=8, rebuild=rebuild)
    data = [_Labels([0] * 10 + [1] * 10), _Labels([2] * second_per_class + [3] * second_per_class)]
    for i in (0, 1):
        info = ExperienceInfo(index=i, n_experiences=2, classes=[2 * i, 2 * i + 1], seen_classes=list(range(2 * i + 2)),
                              n_classes=4, dataset=lambda j, transform="train": data[j], seed=3)
        r.train_dataset(None, info, data[i])
        before = [(int(e), int(k), int(y)) for e, k, y in zip(r.exp[r._drawn], r.idx[r._drawn], r.labels[r._drawn])]
        r.after_experience(None, info)
    return r, before


def test_coreset_rebuilt_from_the_draws_keeps_what_the_experience_trained_on():
    # CODA-Prompt rebuilds from the training set append_coreset built: 2 draws of the old memory (4 per class) joined
    # the second experience, so the past classes keep at most those 2 (the default keeps 2 of each list: 4)
    r, drawn = _coreset_after_two_experiences("draws", 1)
    m, _ = _coreset_after_two_experiences("memory", 1)
    assert len(drawn) == 2
    assert (len(r), len(m)) == (2 + 2, 4 + 2)
    kept = sorted((int(e), int(k), int(y)) for e, k, y in zip(r.exp, r.idx, r.labels) if y < 2)
    assert kept == sorted(drawn)  # each a draw, a sample drawn twice kept twice
    # enough draws: each past class keeps its share (8 // 4 = 2), picked among its draws only
    r, drawn = _coreset_after_two_experiences("draws", 6)
    past = [(int(e), int(k), int(y)) for e, k, y in zip(r.exp, r.idx, r.labels) if y < 2]
    assert len(drawn) == 12 and len(past) == 4
    assert all(past.count(d) <= drawn.count(d) for d in past)
    with pytest.raises(ConfigError, match="strategy.replay.rebuild"):
        Replay(policy="reservoir", mix="batch", rebuild="draws")


@pytest.mark.parametrize("strategy", ["[replay,l2]", "derpp", "icarl"])
def test_resume_ends_as_the_uninterrupted_run(tmp_path, data_root, monkeypatch, strategy):
    name = strategy.strip("[]").split(",")[0]
    over = [*FAST, f"strategy={strategy}", f"strategy.{name}.memory_size=30", "benchmark.n_experiences=2"]
    whole = run(compose(over, data_root), tmp_path / "whole")
    resumed = cut_and_resume(monkeypatch, over, data_root, tmp_path / "cut", after=0)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    a, b = (_memory_by_experience(tmp_path / d, name, 2) for d in ("whole", "cut"))
    assert state_equal(a, b)
    assert len(a[1]["idx"]) == 30
    if strategy == "icarl":  # the evaluation predicts by nearest mean; the linear head is reported beside it
        assert {c["head"] for c in whole["confusion"]} >= {"main", "cnn"}


def test_replay_composes_with_l2_and_changes_the_run(tmp_path, data_root):
    over = [*FAST, "benchmark.n_experiences=2", "trainer.limit_train_batches=3"]
    both = run(compose([*over, "strategy=[replay,l2]", "strategy.replay.memory_size=40"], data_root), tmp_path / "a")
    alone = run(compose([*over, "strategy=l2"], data_root), tmp_path / "b")
    state = RunDirectory(tmp_path / "a").load_checkpoint(1)["strategies"]
    assert set(state) == {"replay", "l2"} and len(state["replay"]["idx"]) == 40
    assert both["accuracy_matrix"] != alone["accuracy_matrix"]


def _tiny(data_root, n=24, classes=(0, 1, 2, 3)):
    """A micro-ViT module and a one-dataset experience: items (x, y) of digits-shaped images."""
    _, _, _, module, _ = build(compose([*FAST, "benchmark.n_experiences=2"], data_root))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.tensor([classes[k % len(classes)] for k in range(n)])
    data = TensorDataset(x, y)
    info = ExperienceInfo(index=1, n_experiences=2, classes=list(classes), seen_classes=list(classes),
                          n_classes=module.n_classes, dataset=lambda j, transform="train": data)
    module.start_experience(info)
    module.net.eval()  # no dropout: the reference computations below see the same network
    return module, info, x, y


def test_derpp_loss_is_mammoths_formula(data_root):
    module, info, x, y = _tiny(data_root)
    m = 8
    derpp = DERpp(alpha=0.3, beta=0.5, memory_size=m, batch_size=m)
    derpp.train_dataset(module, info, None)
    derpp.exp, derpp.idx, derpp.labels = torch.ones(m, dtype=torch.long), torch.arange(m), y[:m].clone()
    derpp.logits = torch.randn(m, module.n_classes, generator=torch.Generator().manual_seed(2))
    derpp.n_seen = m
    stored = derpp.logits.clone()
    batch = {"x": x[m:m + 4], "y": y[m:m + 4], "key": torch.arange(m, m + 4)}
    outputs = module.forward_outputs(batch["x"])
    terms = derpp.training_loss(module, batch, outputs)
    # Mammoth models/derpp.py L41-51 on the whole memory (each draw takes all m samples: the means do not depend
    # on their order): alpha * mse(f(x'), z') + beta * CE(f(x''), y'') over the seen classes
    with torch.no_grad():
        z = module.forward_outputs(x[:m])["logits"]
        mse = ((z - stored) ** 2).mean()
        ce = F.cross_entropy(z.masked_fill(~module.seen_mask, float("-inf")), y[:m])
    torch.testing.assert_close(terms["logits"].detach(), 0.3 * mse)
    torch.testing.assert_close(terms["labels"].detach(), 0.5 * ce)
    # the memory is full: the 4 samples replaced memory slots with probability m / (m + k + 1) each
    assert derpp.n_seen == m + 4
    replaced = (derpp.idx >= m).nonzero().flatten()
    assert 0 < len(replaced) < 4  # with these draws
    for k in replaced.tolist():
        torch.testing.assert_close(derpp.logits[k], outputs["logits"][int(derpp.idx[k]) - m].detach())
    assert torch.equal(derpp.logits[derpp.idx < m], stored[derpp.idx[derpp.idx < m]])


def test_icarl_nearest_mean_of_exemplars_is_the_direct_computation(data_root):
    module, info, x, y = _tiny(data_root)
    icarl = ICaRL(memory_size=12)
    icarl.exp, icarl.idx, icarl.labels = torch.ones(12, dtype=torch.long), torch.arange(12), y[:12].clone()
    means = icarl.exemplar_means(module, info)
    with torch.no_grad():
        f = module.forward_outputs(x[:12])["pre_logits"]
        ff = module.forward_outputs(x[:12].flip(-1))["pre_logits"]
        for c in range(4):
            rows = y[:12] == c
            direct = (F.normalize(f[rows], dim=1).mean(0) + F.normalize(ff[rows], dim=1).mean(0)) / 2
            torch.testing.assert_close(means[c], direct / direct.norm())
        assert (means[4:] == 0).all()
        icarl.means = means
        outputs = module.forward_outputs(x[12:])
        nme = icarl.evaluation_outputs(module, outputs)
        q = F.normalize(outputs["pre_logits"], dim=1)
        dist = torch.cdist(q, means[:4]) ** 2
        assert nme["logits"][:, :4].argmax(1).tolist() == dist.argmin(1).tolist()
        torch.testing.assert_close(nme["logits"][:, :4], -dist, rtol=1e-4, atol=1e-5)
        assert torch.isinf(nme["logits"][:, 4:]).all()
        assert torch.equal(nme["heads"]["cnn"], outputs["logits"])


def test_icarl_loss_is_bce_with_the_old_networks_sigmoids():
    g = torch.Generator().manual_seed(3)
    logits, old_logits = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    y = torch.tensor([2, 3, 3, 2, 2])
    old = torch.tensor([True, True, False, False, False, False])
    # Mammoth icarl.py L153-155: cat(sigmoid(old)[:, :n_past], eye[y][:, n_past:]) against every output
    target = torch.cat([torch.sigmoid(old_logits[:, :2]), F.one_hot(y, 6).float()[:, 2:]], 1)
    direct = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(icarl_loss(logits, old_logits, y, old), direct)


def test_a_reservoir_restored_mid_experience_continues_with_the_same_draws(data_root):
    # what an epoch checkpoint restores (checkpoint_every_epochs): memory, stream count and draw counter
    module, info, x, y = _tiny(data_root)

    def step(s, k):
        batch = {"x": x[4 * k:4 * k + 4], "y": y[4 * k:4 * k + 4], "key": torch.arange(4 * k, 4 * k + 4)}
        with torch.no_grad():
            return s.training_loss(module, batch, module.forward_outputs(batch["x"]))

    a = DERpp(memory_size=6, batch_size=3)
    a.train_dataset(module, info, None)
    for k in range(3):
        step(a, k)
    b = DERpp(memory_size=6, batch_size=3)
    b.train_dataset(module, info, None)
    b.load_state_dict(a.state_dict())
    c = DERpp(memory_size=6, batch_size=3)  # the same memory without the draw counter
    c.train_dataset(module, info, None)
    c.load_state_dict({**a.state_dict(), "draws": 0})
    ta, tb = step(a, 3), step(b, 3)
    assert ta.keys() == {"logits", "labels"} and all(torch.equal(ta[n], tb[n]) for n in ta)
    assert state_equal(a.state_dict(), b.state_dict())
    drawn = [s.sample(module, 3)[0].tolist() for s in (a, b, c)]
    assert drawn[0] == drawn[1] != drawn[2]


@pytest.mark.slow
def test_under_ddp_every_process_draws_its_own_seeded_samples_from_the_same_memory(tmp_path, data_root):
    """trainer=ddp on 2 CPU processes (gloo), ER's reservoir (memory 20, 32 memory samples joined to every batch): the
    reservoir takes both processes' samples, the runner's consistency check finds the same memory on both after each
    experience (else the run stops), and each process's draws are the seeded function of (seed, experience, draw
    counter, rank): the same sequence on a rerun or resume, different between the processes."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, cli_env

    from cl_vit.strategies.replay import BATCH

    seed, run_dir = 5, tmp_path / "ddp"
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "data.num_workers=0", "data.pin_memory=false", "data.persistent_workers=false", *FAST,
            "trainer.limit_train_batches=2", "benchmark.n_experiences=2", "strategy=er", "strategy.replay.memory_size=20",
            "+strategy.probe_draws={}", f"seed={seed}", f"hydra.run.dir={run_dir}", f"data_root={data_root}"]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "ddp_probe.py"), *args], cwd=str(REPO_ROOT),
                          env={**cli_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Distributed run: 2 processes" in (run_dir / "run.log").read_text()
    rd = RunDirectory(run_dir)
    for i in (0, 1):
        state = rd.load_checkpoint(i)["strategies"]
        # 2 processes x 2 batches x 32 samples offered to the reservoir per experience
        assert (state["replay"]["n_seen"], len(state["replay"]["idx"])) == (128 * (i + 1), 20)
        ranks = state["probe_draws"]["draws"][i]
        assert len(ranks) == 2
        # the first experience draws once (its first batch meets an empty memory), the second twice
        assert len(ranks[0]) == (1 if i == 0 else 2)
        # both processes draw at the same points, from a memory of the same size
        assert [d[:4] for d in ranks[0]] == [d[:4] for d in ranks[1]]
        for rank, draws in enumerate(ranks):
            for exp, counter, size, n, pos in draws:
                gen = generator(seed, BATCH, exp, counter, rank)
                assert pos == torch.randperm(size, generator=gen)[: min(n, size)].tolist(), (i, rank, counter)
        assert all(a[4] != b[4] for a, b in zip(*ranks))  # each process its own draws


def test_herding_embeds_the_view_it_is_told_and_gives_every_module_its_mode_back(tmp_path, data_root, monkeypatch):
    """herding_view=test (Mammoth) embeds under the test transform, train (DyTox's main.py L625-627, the dytox
    strategy's default) under the training augmentation; the network in eval mode either way, each module's own
    mode restored after (a part kept in eval mode stays so)."""
    import cl_vit.strategies.embeddings as embeddings

    seen = []
    embed = embeddings.experience_embeddings

    def spy(module, experience, transform="test"):
        module.net.train()
        part = next(m for m in module.net.modules() if isinstance(m, torch.nn.LayerNorm))
        part.eval()
        out = embed(module, experience, transform)
        assert not part.training and all(m.training for m in module.net.modules() if m is not part)
        seen.append(transform)
        return out

    monkeypatch.setattr(embeddings, "experience_embeddings", spy)
    fast = [*FAST, "benchmark.n_experiences=2", "strategy.replay.memory_size=20"]
    run(compose([*fast, "strategy=replay", "strategy.replay.selection=herding"], data_root), tmp_path / "test")
    assert seen == ["test", "test"]
    seen.clear()
    run(compose([*fast, "strategy=dytox", "strategy.dytox.finetuning_epochs=0"], data_root), tmp_path / "train")
    assert seen == ["train", "train"]
    with pytest.raises(ConfigError, match="strategy.replay.herding_view"):
        Replay(herding_view="augmented")
