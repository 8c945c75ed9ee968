"""Per-image augmentation against the official code under its own timm: the suite's DeiT pipelines, built from the
deit-lt-cifar10-lt and refiner-vit-s-imagenet recipes, give the official transforms' images exactly.

The numbers below were produced by the official code on a CPU: val-iisc/DeiT-LT @
bc369700932a950fa8535df80b37f973ac7aae11 (datasets.py ``build_transform_deit`` with arguments.py's defaults) under
timm 0.8.15.dev0 (its environment.yml), and zhoudaquan/Refiner_ViT @ b3e8cb0c41524af6f501785f47eda691c85f25e4
(data/loader.py ``create_relabel_loader`` and timm's ``create_loader`` as main.py calls them) under the timm 0.4.8 it
bundles, with

    pip download --no-deps timm==0.8.15.dev0 -d /tmp/wheels
    pip install --no-deps --target /tmp/timm0815 /tmp/wheels/timm-0.8.15.dev0-py3-none-any.whl
    git clone https://github.com/val-iisc/DeiT-LT /tmp/DeiT-LT
    git clone https://github.com/zhoudaquan/Refiner_ViT /tmp/refgolden/Refiner_ViT
    python scripts/golden_augment.py /tmp/DeiT-LT /tmp/refgolden/Refiner_ViT --timm-0815 /tmp/timm0815

(torch 2.14, torchvision 0.29, Pillow 13 with the Pillow 9.5 result of a 0-bit posterize, as the script's docstring
says). Per run: the class names of the transform's steps and, per generated image, the checksums (sum and
position-weighted sum in float64) of its output, from the same seeds; ``refiner_eval``'s ``loader``: the evaluation
batch after the official PrefetchLoader's normalisation, which the recipe's evaluation transform gives per image.
"""
import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, compose
from data_gen import make_cifar
from PIL import Image
from test_refiner_imagenet import make_imagenet

from cl_vit.builder import data_root, source_arguments
from cl_vit.data import build_source

_spec = importlib.util.spec_from_file_location("golden_augment", REPO_ROOT / "scripts" / "golden_augment.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

# -- the official numbers (python scripts/golden_augment.py DeiT-LT Refiner_ViT --timm-0815 DIR, commits above) -------

OFFICIAL = {
    'deit_train32': {
        'transform':
        ['RandomCrop', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize', 'RandomErasing'],
        'images':
        [[1512.1036932943389, 184616.80645391857], [-1033.1970265386626, -119868.33855225611],
         [-3878.5675758719444, -460481.12837822735], [-1409.1718405690044, -169880.22616154375],
         [-1496.643661598675, -179475.48476204416], [-1079.2642053877935, -129653.74925939878],
         [-2027.870870321989, -241683.23396389186], [968.022304231301, 110239.29257972306],
         [326.05732118399465, 46550.08079251135], [1365.7520299977623, 166214.77616534708],
         [-6101.0560302734375, -724653.6893880367], [-1455.3774543232284, -175479.63885455532],
         [-864.0769080179743, -104195.60061591584], [1514.7652314604493, 184480.99222712917],
         [-1702.9696530681103, -201850.52566586854], [-2153.714829414006, -254958.10777320035],
         [3731.1951197832823, 443333.64159564674], [-5659.647715091705, -672144.2511640787]],
    },
    'deit_train112': {
        'transform':
        ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize',
         'RandomErasing'],
        'images':
        [[-19203.203154117335, -2278800.911837144], [14526.306243121624, 1735090.0760981357],
         [-74130.25005811453, -8822994.392510831], [13298.58868252609, 1582628.0851347446],
         [8029.916685364209, 969121.2798621003], [23691.58787975833, 2818629.2743497994],
         [51043.03520144429, 6078080.777002125], [46363.101726691704, 5516650.35643959],
         [-1832.464838249376, -231364.34189153742], [32287.28549467554, 3838917.837417596],
         [-67820.01510314643, -8071468.504000068], [16095.409748752601, 1916934.3000536235],
         [13274.860348486807, 1575796.5520194033], [20863.274578661192, 2484282.870501561],
         [-6282.855810353067, -746338.0096102776], [37363.83504258891, 4451985.416656167],
         [19543.984782798216, 2327364.3248384893], [36150.875254425104, 4306498.031830361]],
    },
    'deit_eval112': {
        'transform':
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize'],
        'images':
        [[-19507.023647089954, -2323312.564608185], [16490.277460089885, 1963622.3251734474],
         [-41652.33598397486, -4957030.910840867], [30307.245284560136, 3607879.7326451647],
         [-40858.3283402361, -4858199.088502808], [41535.3283736296, 4943555.008018645],
         [15807.353570732754, 1885752.2476472775], [36948.09494335018, 4400711.35439008],
         [5830.498153433669, 690630.2395723695], [5130.64959642943, 609379.831263443],
         [-29855.270802610088, -3553505.5463441764], [17701.214328733273, 2112934.3143172734],
         [19613.602376876865, 2335590.6506396406], [-8216.321142961737, -978922.4060625364],
         [-5871.346641397569, -696433.1831840244], [52218.08282148559, 6214423.023241711],
         [10837.16738401819, 1289277.7592186313], [26952.878352327738, 3200964.9213667237]],
    },
    'refiner_train_prefetcher': {
        'transform':
        ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToNumpy'],
        'images':
        [[3770899.0, 448543520.0], [4637196.0, 551923659.0], [1556842.0, 185165053.0], [5541280.0, 659386133.0],
         [4757334.0, 566358542.0], [5574603.0, 663581477.0], [735744.0, 87946496.0], [6565352.0, 781558035.0],
         [889675.0, 105867838.0], [4540030.0, 540516232.0], [2511860.0, 298852598.0], [4850610.0, 577506859.0],
         [5565665.0, 661953498.0], [5211933.0, 620323011.0], [3824451.0, 455050962.0], [2955859.0, 351905724.0],
         [4985370.0, 593714963.0], [4601304.0, 547172275.0]],
    },
    'refiner_train': {
        'transform':
        ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize',
         'RandomErasing'],
        'images':
        [[-8056.320524096489, -960987.4835376143], [5768.4239882826805, 685797.5684521794],
         [-35658.29007935524, -4244006.13512373], [9548.771253897256, 1138989.6746914783],
         [1044.102519094944, 129253.01579797268], [6149.358469009399, 732582.3323400617],
         [-18109.740021944046, -2151689.9015823603], [-8697.975931227207, -1036819.5830525756],
         [-34742.67468202114, -4135567.055762887], [15332.36192125082, 1823600.4962685108],
         [-15251.970422055514, -1818745.0406134096], [16488.149049954416, 1971640.4951211957],
         [-873.3252421617508, -103294.4409518838], [14458.401381254196, 1719946.1722941399],
         [-6138.375613510609, -730681.4353605509], [22623.789027392864, 2693549.890313804],
         [12801.569872319698, 1523004.9718165398], [28621.749491274357, 3411394.8794161677]],
    },
    'refiner_eval': {
        'transform':
        ['Resize', 'CenterCrop', 'ToNumpy'],
        'images':
        [[3173260.0, 377534321.0], [5262782.0, 626279143.0], [1907541.0, 227081293.0], [6036595.0, 718378786.0],
         [1940446.0, 231243553.0], [6682592.0, 795321190.0], [5206653.0, 620085545.0], [6439511.0, 766568775.0],
         [4656418.0, 554276542.0], [4614660.0, 549302900.0], [2591688.0, 308492573.0], [5329285.0, 634674780.0],
         [5399003.0, 642903754.0], [3836488.0, 456237545.0], [3962892.0, 471555469.0], [7289034.0, 867543579.0],
         [4909721.0, 584363743.0], [5813516.0, 691519482.0]],
        'loader':
        [[-12743.686465613544, -1517922.5246860753], [3644.7216033856384, 433017.28262210963],
         [-22670.894521454815, -2697946.298979256], [9713.843320705462, 1155367.4414402149],
         [-22412.81609100895, -2665301.1227368833], [14780.486566103064, 1758837.2897213767],
         [3204.4941757516935, 384440.0462942063], [12873.968850127421, 1533328.1439410918],
         [-1111.0745297321118, -131709.0062931273], [-1438.588258803822, -170717.96352971112],
         [-17305.035643336363, -2059426.4493735922], [4166.313752812333, 498865.4150741338],
         [4713.12168847071, 563406.3985103657], [-7541.898176241666, -900642.330068585],
         [-6550.494238072075, -780501.7476061275], [19536.894471204374, 2325287.4067654326],
         [875.6156641384587, 104269.04051272664], [7964.204079037998, 944706.230480785]],
    },
    'refiner_eval_float': {
        'transform':
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize'],
        'images':
        [[-12743.685984551907, -1517922.4675087333], [3644.722316980362, 433017.3676626682],
         [-22670.89419412613, -2697946.259917915], [9713.844044148922, 1155367.5273017883],
         [-22412.8157633543, -2665301.083794713], [14780.48722410202, 1758837.3679395914],
         [3204.494769871235, 384440.11710602045], [12873.969486653805, 1533328.2202566266],
         [-1111.0739836096764, -131708.94104635715], [-1438.5877317786217, -170717.90088766813],
         [-17305.03514933586, -2059426.3905379176], [4166.314426183701, 498865.49522167444],
         [4713.12217271328, 563406.4559867978], [-7541.897682189941, -900642.2712827921],
         [-6550.493532776833, -780501.6638712287], [19536.894936084747, 2325287.46205765],
         [875.6161912083626, 104269.10323154926], [7964.204740583897, 944706.3094044924]],
    },
}


#: run -> (recipe, overrides, split); the recipes' own pipelines at the run's input size
RECIPES = {
    "deit_train32": ("deit-lt-cifar10-lt", [], "train"),
    "deit_train112": ("deit-lt-cifar10-lt", [], "train"),
    "deit_eval112": ("deit-lt-cifar10-lt", [], "test"),
    "refiner_train_prefetcher": ("refiner-vit-s-imagenet", [], "train"),
    "refiner_train": ("refiner-vit-s-imagenet", ["benchmark.source_args.augment.prefetcher=false"], "train"),
    "refiner_eval": ("refiner-vit-s-imagenet", [], "test"),
    "refiner_eval_float": ("refiner-vit-s-imagenet", ["benchmark.source_args.augment.prefetcher=false"], "test"),
}
#: the steps after the augmentation: conversion, normalisation, erasing (compared by the images)
FINAL = {"ToNumpy", "ToTensor", "MaybeToTensor", "MaybePILToTensor", "PILToTensor", "Normalize",
         "LoaderNormalization", "RandomErasing"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A tiny CIFAR-10 and ImageNet to build the recipes' sources from (their transforms are what is checked)."""
    cifar, imagenet = tmp_path_factory.mktemp("cifar"), tmp_path_factory.mktemp("imagenet")
    make_cifar(cifar, "cifar10", train_counts=[100] * 10, test_per_class=1)
    make_imagenet(imagenet)
    return {"deit": cifar, "refiner": imagenet}


def suite_transform(name: str, root, overrides=()):
    """The recipe's training or test transform, from its source built as the run builds it, at the run's size."""
    recipe, extra, split = RECIPES[name]
    cfg = compose([f"experiment={recipe}", f"benchmark.source_args.img_size={golden.RUNS[name][2]}", *extra,
                   *overrides], root)
    source = build_source(cfg.benchmark.source, data_root=data_root(cfg), **source_arguments(cfg))
    return getattr(source, split).transform


def suite_run(name: str, transform) -> dict:
    """The run's images through the suite's transform (a PILTransform), seeded as the script seeds the official
    one. The evaluation runs also give ``loader``: ``images`` of ``refiner_eval`` is the uint8 crop (CHW, as
    ToNumpy) that the official prefetcher loader normalises into ``loader``."""
    steps = transform.transform.transforms
    golden.seed_all()
    out = {"transform": [type(t).__name__ for t in steps], "images": [], "loader": []}
    for img in golden.images(name):
        x = transform(image=img)["image"]
        out["loader"].append(golden.checksums(x))
        if name == "refiner_eval":
            pil = Image.fromarray(img)
            for step in steps[:-2]:  # Resize, CenterCrop; not PILToTensor, LoaderNormalization
                pil = step(pil)
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)))
        out["images"].append(golden.checksums(x))
    return out


def _augmenting(steps):
    return [s for s in steps if s not in FINAL]


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_recipe_pipeline_gives_the_official_images(name, roots):
    ours = suite_run(name, suite_transform(name, roots[name.split("_")[0]]))
    theirs = OFFICIAL[name]
    assert _augmenting(ours["transform"]) == _augmenting(theirs["transform"])
    assert ("RandomErasing" in ours["transform"]) == ("RandomErasing" in theirs["transform"])
    assert ours["images"] == theirs["images"]
    if "loader" in theirs:  # evaluation: the images as the official evaluation loop gets them
        assert ours["loader"] == theirs["loader"]


@pytest.mark.parametrize("name, override", [
    ("refiner_train_prefetcher", "benchmark.source_args.augment.interpolation=bicubic"),
    ("refiner_train", "benchmark.source_args.augment.re_prob=0.3"),
    ("deit_train112", "benchmark.source_args.augment.auto_augment=rand-m9-mstd0.5"),
    ("refiner_eval_float", "benchmark.source_args.test_crop_pct=0.875"),
])
def test_a_changed_pipeline_gives_other_images(name, override, roots):
    """The checksums see a change of one option: the interpolation (the crop's and RandAugment's), the erasing
    probability, RandAugment's increasing ops, the evaluation crop."""
    ours = suite_run(name, suite_transform(name, roots[name.split("_")[0]], [override]))
    assert ours["images"] != OFFICIAL[name]["images"]


def test_the_golden_images_reach_a_0_bit_posterize(roots, monkeypatch):
    """One training run keeps 0 bits in RandAugment's posterize (the Pillow 9.5 result, a black image, that
    cl_vit.data.transforms.posterize gives): with the installed Pillow's own posterize it stops there."""
    from cl_vit.data import transforms

    monkeypatch.setattr(transforms, "_pillow_safe", lambda transform: transform)
    raised = []
    for name in ("deit_train32", "deit_train112", "refiner_train_prefetcher", "refiner_train"):
        try:
            suite_run(name, suite_transform(name, roots[name.split("_")[0]]))
        except ValueError as e:
            raised.append((name, "bits" in str(e)))
    assert raised and all(bits for _, bits in raised), raised


def test_evaluation_normalises_as_the_prefetcher_loader(roots):
    """With ``augment.prefetcher`` the evaluation crop is normalised from uint8 as the official PrefetchLoader does;
    ToTensor + Normalize (the pipeline without it) gives the same crop but other last bits."""
    ours = suite_run("refiner_eval", suite_transform("refiner_eval", roots["refiner"],
                                                     ["benchmark.source_args.augment.prefetcher=false"]))
    assert ours["images"] == OFFICIAL["refiner_eval"]["images"]
    assert ours["loader"] != OFFICIAL["refiner_eval"]["loader"]
