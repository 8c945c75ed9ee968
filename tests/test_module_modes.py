"""Each experience's training starts in the modules' modes of the first: Lightning's fit keeps the modes it finds
(it does not call ``train()``), so a strategy whose pass between two fits (statistics, herding, finetuning, Fisher)
left a module in eval mode would train the next experience without its dropout, drop path or training-only heads.
DyTox's balanced finetuning did so until its golden run caught it (docs/recipes.md, "DyTox against its own loop")."""
import pytest
from conftest import TINY, compose

from cl_vit.module import ContinualModule
from cl_vit.run import run

#: strategies with a pass of their own between two experiences' fits
BETWEEN_FITS = ["dytox", "icarl", "ewc", "inflora", "slca", "ease", "replay"]
EXTRA = {"dytox": ["strategy.dytox.finetuning_epochs=1"], "replay": ["strategy.replay.selection=herding"]}


@pytest.mark.parametrize("strategy", BETWEEN_FITS)
def test_every_fit_starts_in_the_modes_of_the_first(strategy, tmp_path, monkeypatch):
    modes = []
    fit_start = ContinualModule.on_fit_start

    def on_fit_start(self):
        fit_start(self)
        modes.append({n: m.training for n, m in self.net.named_modules()})

    monkeypatch.setattr(ContinualModule, "on_fit_start", on_fit_start)
    run(compose([*TINY, f"strategy={strategy}", "trainer.limit_train_batches=1", "benchmark.n_experiences=5",
                 "data.batch_size=16", *EXTRA.get(strategy, [])], tmp_path / "data"), tmp_path / "run")
    assert len(modes) == 5
    changed = [(i, n) for i, later in enumerate(modes[1:], 1) for n, training in modes[0].items()
               if n in later and later[n] != training]
    assert not changed, changed[:5]
