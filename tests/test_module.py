"""The module's classification losses: unseen classes never count; FT++ keeps only the current experience's."""
import torch

from cl_vit.module import ContinualModule, classification_loss
from cl_vit.strategies.base import ExperienceInfo


def _mask(n, classes):
    m = torch.zeros(n, dtype=torch.bool)
    m[classes] = True
    return m


def test_unseen_logits_do_not_change_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    y = torch.randint(0, 4, (8,))
    seen = _mask(10, [0, 1, 2, 3])
    poked = logits.clone()
    poked[:, 4:] = 1e4  # huge logits on classes not seen yet
    for kind in ("ce", "bce"):
        assert torch.equal(classification_loss(logits, y, seen, kind), classification_loss(poked, y, seen, kind))
        assert not torch.equal(classification_loss(logits, y, _mask(10, range(10)), kind),
                               classification_loss(poked, y, _mask(10, range(10)), kind))


def test_bce_is_lwf_mc_form():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([0])
    got = classification_loss(logits, y, _mask(3, [0, 1]), "bce")
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(got, expected)


def test_ftpp_masks_old_classes_in_training_but_not_in_prediction():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6))
    module = ContinualModule(net, 6, mask_old_logits=True)
    module.forward_outputs = lambda x: {"logits": net(x)}
    module.start_experience(ExperienceInfo(1, 3, classes=[2, 3], seen_classes=[0, 1, 2, 3], n_classes=6))
    assert module.current_mask.tolist() == [False, False, True, True, False, False]
    assert module.seen_mask.tolist() == [True, True, True, True, False, False]
    x = torch.randn(5, 4)
    out = module.predict_step((x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)), 0)
    assert set(out["preds"]["main"].tolist()) <= {0, 1, 2, 3}
