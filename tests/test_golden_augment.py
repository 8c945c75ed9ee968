"""Per-image augmentation against the official code under its own timm: the suite's DeiT pipelines, built from the
deit-lt-cifar10-lt, refiner-vit-{s,m,l}-imagenet, gcab-{cifar100,tiny-imagenet,imagenet100} and dytox-cifar100
recipes, give the official transforms' images exactly.

The numbers below were produced by the official code on a CPU: val-iisc/DeiT-LT @
bc369700932a950fa8535df80b37f973ac7aae11 (datasets.py ``build_transform_deit`` with arguments.py's defaults) under
timm 0.8.15.dev0 (its environment.yml), zhoudaquan/Refiner_ViT @ b3e8cb0c41524af6f501785f47eda691c85f25e4
(data/loader.py ``create_relabel_loader`` and timm's ``create_loader`` as main.py calls them, the evaluation crop
from each model's default_cfg) under the timm 0.4.8 it bundles, and OcraM17/GCAB-CFDC @
599e44d588f2de1006d32b882c8f28f4987b2c8c (continual/datasets.py ``build_transform`` with main.py's defaults and the
option files) under timm 0.5.4 (its requirements.txt), with

    pip download --no-deps timm==0.8.15.dev0 timm==0.5.4 continuum==1.2.4 -d /tmp/wheels
    pip install --no-deps --target /tmp/timm0815 /tmp/wheels/timm-0.8.15.dev0-py3-none-any.whl
    pip install --no-deps --target /tmp/timm054 /tmp/wheels/timm-0.5.4-py3-none-any.whl
    pip install --no-deps --target /tmp/continuum124 /tmp/wheels/continuum-1.2.4-py3-none-any.whl
    git clone https://github.com/val-iisc/DeiT-LT /tmp/DeiT-LT
    git clone https://github.com/zhoudaquan/Refiner_ViT /tmp/refgolden/Refiner_ViT
    git clone https://github.com/OcraM17/GCAB-CFDC /tmp/GCAB-CFDC
    python scripts/golden_augment.py /tmp/DeiT-LT /tmp/refgolden/Refiner_ViT --timm-0815 /tmp/timm0815 \
        --gcab /tmp/GCAB-CFDC --timm-054 /tmp/timm054 --continuum /tmp/continuum124

(torch 2.14, torchvision 0.29, Pillow 13 with the Pillow 9.5 result of a 0-bit posterize, as the script's docstring
says). Per run: the class names of the transform's steps and, per generated image, the checksums (sum and
position-weighted sum in float64) of its output, from the same seeds; ``loader`` of ``refiner_eval``, ``_m``, ``_l``:
the evaluation batch after the official PrefetchLoader's normalisation, which the recipe's evaluation transform gives
per image.
"""

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, compose, script_module
from data_gen import make_cifar, make_imagenet100, make_tiny_imagenet
from PIL import Image
from test_refiner_imagenet import make_imagenet

from cl_vit.builder import data_root, source_arguments
from cl_vit.data import build_source

golden = script_module("golden_augment")
DYTOX_WNIDS = yaml.safe_load((REPO_ROOT / "tasks" / "imagenet100-dytox.yaml").read_text())["wnids"]

# -- the official numbers (python scripts/golden_augment.py ... as above, at the commits above) ------------------------

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
    'refiner_eval_m': {
        'transform':
        ['Resize', 'CenterCrop', 'ToNumpy'],
        'images':
        [[3185895.0, 379142980.0], [5269316.0, 626777815.0], [1932885.0, 230210676.0], [6001609.0, 714133259.0],
         [1929700.0, 229804466.0], [6663198.0, 792997168.0], [5216445.0, 621299377.0], [6438599.0, 766436051.0],
         [4705511.0, 559928846.0], [4636853.0, 551914503.0], [2615279.0, 311292443.0], [5328897.0, 634367917.0],
         [5344216.0, 636199466.0], [3873594.0, 460617433.0], [3987274.0, 474541331.0], [7202484.0, 857178751.0],
         [4917364.0, 585323673.0], [5655330.0, 672576856.0]],
        'loader':
        [[-12644.588425274007, -1505305.5912158685], [3695.9686671900563, 436928.43611978507],
         [-22472.11804789491, -2673402.118254494], [9439.443314812612, 1122069.1897775657],
         [-22497.098438533023, -2676588.078868529], [14628.376759229228, 1740609.6657350073],
         [3281.2941756946966, 393960.2970151133], [12866.815906281583, 1532287.1712665595],
         [-726.0313848298974, -87377.20915575046], [-1264.5255105504766, -150234.8024651003],
         [-17120.00818228908, -2037466.6836347915], [4163.270614411682, 496458.64618305117],
         [4283.419719779864, 510823.74670269806], [-7250.870718607213, -866290.2664749552],
         [-6359.262858801987, -757083.2213961659], [18858.070931802038, 2243994.637010405],
         [935.5607676343061, 111797.90390688414], [6723.5295445206575, 796136.611769204]],
    },
    'refiner_eval_l': {
        'transform':
        ['Resize', 'CenterCrop', 'ToNumpy'],
        'images':
        [[2836492.0, 337631826.0], [4672196.0, 556330293.0], [1733979.0, 206444899.0], [5279582.0, 628530109.0],
         [1705952.0, 202755589.0], [5886019.0, 700907407.0], [4075792.0, 485217357.0], [5692929.0, 677990482.0],
         [4164620.0, 495772361.0], [4110680.0, 489207960.0], [2316986.0, 275673928.0], [4695103.0, 558835962.0],
         [4675967.0, 556636108.0], [3026458.0, 360184154.0], [3519524.0, 418800803.0], [6313830.0, 751448464.0],
         [3878121.0, 461702372.0], [4858067.0, 577902973.0]],
        'loader':
        [[-15385.004089247435, -1830883.2670485144], [-987.3254524446093, -115601.14849024592],
         [-24032.16505681118, -2859800.363355263], [3776.4864268372767, 450671.9319424662],
         [-24251.984668512363, -2888736.128455651], [8532.855154359713, 1018337.0261484757],
         [-5665.003875027876, -673349.6650346764], [7018.4237244371325, 838596.431071219],
         [-4968.313736712094, -590565.3267512922], [-5391.372563885059, -642050.8252227041],
         [-19459.56108371727, -2316827.58058903], [-807.6627219691873, -95948.84437520383],
         [-957.7489280551672, -113202.59301285399], [-13895.074613221921, -1654002.25531863],
         [-10027.890294997022, -1194263.8313858635], [11888.235583174974, 1414737.4775362643],
         [-7215.364718803205, -857780.927196275], [470.48636999959126, 53596.34834636329]],
    },
    'gcab_train32': {
        'transform':
        ['RandomCrop', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize'],
        'images':
        [[929.7118657543324, 114621.83340894943], [-1782.113354170695, -207410.90103843482],
         [-3568.3531875219196, -423501.137151666], [-1328.1436833306216, -159692.7030916363],
         [-1863.6783845291939, -218956.22331060772], [-1367.2968197666341, -161192.8661136008],
         [-1716.071631044615, -205528.84336320078], [-1355.3438950530253, -163986.98121432355],
         [-4650.947192907333, -553178.8880476952], [-3048.3099912775215, -359184.4946357069],
         [-1140.2615191717632, -134206.42423194041], [-4696.063106417656, -556719.70246768],
         [-1191.5820016174112, -142293.88628690143], [-1675.2829791009426, -198933.68824221194],
         [-2929.3791467372794, -347762.8081815295], [-995.5003183633089, -117206.27185847377],
         [2583.0398514652625, 306962.9282442038], [1789.2934419941157, 216736.119437078]],
    },
    'gcab_eval32': {
        'transform':
        ['ToTensor', 'Normalize'],
        'images':
        [[2332.925249314867, 277461.9812637437], [-768.0706419637427, -88756.14675920783],
         [-1102.7521761469543, -127884.7244498916], [-1132.6423753439449, -136335.34700669907],
         [-1607.8995005555917, -189059.71135676338], [-742.0349478402641, -87514.55246417713],
         [1214.905563938897, 141682.70891364757], [1257.3324641480576, 149246.52713658335],
         [-2011.8746955014067, -240220.07385344058], [-2431.3045517734718, -287803.18476859794],
         [-963.2509144553915, -111370.29761462705], [-610.9058000697987, -73288.83432604687],
         [-1390.6453390435781, -164574.92730143445], [-901.6587450449588, -108636.29981092748],
         [-2375.924098982243, -281137.8930264615], [-1639.822969501838, -193872.56539714895],
         [2413.3070193846943, 287741.9144521691], [-1981.4099248629063, -231440.97684424906]],
    },
    'gcab_train64': {
        'transform':
        ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize'],
        'images':
        [[-6269.346869970672, -755510.7058549873], [6427.267168759368, 759955.9220468979],
         [-10799.674094666727, -1289139.8986036498], [6319.2474980806, 752352.695051413],
         [3957.8145884484984, 468837.5236689304], [6834.869250659365, 810237.0539420978],
         [-8588.878693580627, -1022192.294355303], [-6012.326112952083, -717999.0044877143],
         [-21169.541903614998, -2519426.954985738], [939.5945413601585, 112713.37129476946],
         [-18843.816367551684, -2236532.4464909136], [1461.8934341985732, 167194.41383280605],
         [8157.948857194744, 972727.0104543664], [7060.5045600547455, 834305.9625793328],
         [-2227.34921785444, -265463.9947724957], [-8973.793957112357, -1069999.3362778039],
         [2153.8734099240974, 256756.70542425755], [-20397.41912126541, -2428263.111939907]],
    },
    'gcab_eval64': {
        'transform':
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize'],
        'images':
        [[-6369.81742318999, -752975.591510165], [5334.990586410742, 630455.0278062513],
         [-13709.053448015824, -1632821.9242320834], [9880.898660598788, 1175662.8469858058],
         [-13396.100925893988, -1603340.8478169246], [13550.600215914194, 1611923.9276051377],
         [5144.512500028126, 612705.1178523256], [12160.961310458835, 1452035.5935515594],
         [2004.7235040552914, 217180.26417298056], [1611.5390912829898, 186210.33848288003],
         [-9830.978550606407, -1170904.320810644], [5724.821592778899, 675897.9803593485],
         [6436.991323526017, 767574.0467496258], [-2700.85223700013, -329168.59969649557],
         [-1869.415474687703, -215451.5408994821], [17020.378375332803, 2026814.5081409682],
         [3436.131556391716, 413329.6021250114], [8886.873006014619, 1062424.1942284107]],
    },
    'gcab_train224': {
        'transform':
        ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize'],
        'images':
        [[-76811.03066641884, -9136071.597299643], [78782.53254691139, 9380515.053824183],
         [-132076.32509769965, -15708881.412298026], [77476.98846803, 9221820.998070057],
         [42630.85739377141, 5055218.7442264445], [83135.73352598771, 9895211.484426659],
         [-105650.26610478759, -12543245.327595621], [-73693.76135742664, -8763946.396666031],
         [-259424.91294312477, -30870612.885563612], [11516.688843189739, 1369568.1268653702],
         [-230620.5700442195, -27446430.112324104], [17881.80165545363, 2128235.616523391],
         [99916.62576938467, 11885537.990062352], [85465.6128144986, 10180641.616729759],
         [-27269.579114545137, -3248600.621305425], [-108797.58205068018, -12954318.636575194],
         [26374.7749569593, 3139039.878521028], [-249864.76289987564, -29733424.709593177]],
    },
    'gcab_eval224': {
        'transform':
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize'],
        'images':
        [[-78062.2179947421, -9289505.029691774], [66050.70973238954, 7863655.753319973],
         [-166626.7050697729, -19832230.491901465], [121218.19919855008, 14434298.018535975],
         [-163369.46338221058, -19438296.348647974], [166152.07776421355, 19768159.752184436],
         [63229.62989340862, 7532424.816340415], [148084.45872120652, 17620948.54757521],
         [23481.564345662016, 2793013.2873891327], [19499.81477928441, 2319267.133412628],
         [-119789.93465548474, -14261981.442640156], [70156.92889341991, 8351638.033097936],
         [78461.01114578545, 9331037.8659114], [-32856.3950801976, -3911530.34105664],
         [-23906.308824724518, -2844429.7435191157], [209190.4580222722, 24897537.19047011],
         [43339.13503649365, 5160207.8099517], [107797.04025432002, 12810850.825887416]],
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
    "refiner_eval_m": ("refiner-vit-m-imagenet", [], "test"),
    "refiner_eval_l": ("refiner-vit-l-imagenet", [], "test"),
    "gcab_train32": ("gcab-cifar100", [], "train"),
    "gcab_eval32": ("gcab-cifar100", [], "test"),
    "gcab_train64": ("gcab-tiny-imagenet", [], "train"),
    "gcab_eval64": ("gcab-tiny-imagenet", [], "test"),
    "gcab_train224": ("gcab-imagenet100", [], "train"),
    "gcab_eval224": ("gcab-imagenet100", [], "test"),
}
#: recipe -> the data set its source is built from (the roots fixture)
DATA = {"deit-lt-cifar10-lt": "cifar10", "gcab-cifar100": "cifar100", "dytox-cifar100": "cifar100",
        "gcab-tiny-imagenet": "tiny-imagenet", "gcab-imagenet100": "imagenet100"}
#: the steps after the augmentation: conversion, normalisation, erasing (compared by the images)
FINAL = {"ToNumpy", "ToTensor", "MaybeToTensor", "MaybePILToTensor", "PILToTensor", "Normalize",
         "LoaderNormalization", "RandomErasing"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Tiny CIFAR-10, CIFAR-100, ImageNet, Tiny-ImageNet and ImageNet-100 folders to build the recipes' sources
    from (their transforms are what is checked)."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("cifar10", "cifar100", "imagenet", "tiny-imagenet",
                                                               "imagenet100")}
    make_cifar(roots["cifar10"], "cifar10", train_counts=[100] * 10, test_per_class=1)
    make_cifar(roots["cifar100"], "cifar100", train_counts=[1] * 100, test_per_class=1)
    make_imagenet(roots["imagenet"])
    make_tiny_imagenet(roots["tiny-imagenet"], n_classes=2, train=1, val=1)
    make_imagenet100(roots["imagenet100"], DYTOX_WNIDS[:2], train=1, val=1)
    return roots


def suite_transform(name: str, roots, overrides=(), recipe=None):
    """The recipe's (default: the run's) training or test transform, from its source built as the run builds it, at
    the run's size."""
    own, extra, split = RECIPES[name]
    recipe = recipe or own
    cfg = compose([f"experiment={recipe}", f"benchmark.source_args.img_size={golden.RUNS[name][2]}", *extra,
                   *overrides], roots[DATA.get(recipe, "imagenet")])
    source = build_source(cfg.benchmark.source, data_root=data_root(cfg), **source_arguments(cfg))
    return getattr(source, split).transform


def suite_run(name: str, transform) -> dict:
    """The run's images through the suite's transform (a PILTransform), seeded as the script seeds the official
    one. The evaluation runs also give ``loader``: ``images`` of the prefetcher evaluation runs (``refiner_eval``,
    ``_m``, ``_l``) is the uint8 crop (CHW, as ToNumpy) that the official prefetcher loader normalises into
    ``loader``."""
    steps = transform.transform.transforms
    golden.seed_all()
    out = {"transform": [type(t).__name__ for t in steps], "images": [], "loader": []}
    for img in golden.images(name):
        x = transform(image=img)["image"]
        out["loader"].append(golden.checksums(x))
        if name in ("refiner_eval", "refiner_eval_m", "refiner_eval_l"):
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
    ours = suite_run(name, suite_transform(name, roots))
    theirs = OFFICIAL[name]
    assert _augmenting(ours["transform"]) == _augmenting(theirs["transform"])
    assert ("RandomErasing" in ours["transform"]) == ("RandomErasing" in theirs["transform"])
    assert ours["images"] == theirs["images"]
    if "loader" in theirs:  # evaluation: the images as the official evaluation loop gets them
        assert ours["loader"] == theirs["loader"]


@pytest.mark.parametrize("name", ["gcab_train32", "gcab_eval32"])
def test_dytox_recipe_gives_gcabs_images(name, roots):
    """DyTox (arthurdouillard/dytox, which pins no timm version) builds its transforms with the same
    continual/datasets.py ``build_transform`` and the same values (options/model/cifar_dytox.yaml L11 input 32, L51
    reprob 0; main.py's aa and colour jitter): its recipe gives GCAB's official images."""
    ours = suite_run(name, suite_transform(name, roots, recipe="dytox-cifar100"))
    assert ours["images"] == OFFICIAL[name]["images"]


@pytest.mark.parametrize("name, override", [
    ("refiner_train_prefetcher", "benchmark.source_args.augment.interpolation=bicubic"),
    ("refiner_train", "benchmark.source_args.augment.re_prob=0.3"),
    ("deit_train112", "benchmark.source_args.augment.auto_augment=rand-m9-mstd0.5"),
    ("refiner_eval_float", "benchmark.source_args.test_crop_pct=0.875"),
    ("refiner_eval_l", "benchmark.source_args.test_crop_pct=1.0"),
    ("gcab_train32", "benchmark.source_args.augment.fill_mean=null"),
    ("gcab_eval224", "benchmark.source_args.normalize=cifar100"),
])
def test_a_changed_pipeline_gives_other_images(name, override, roots):
    """The checksums see a change of one option: the interpolation (the crop's and RandAugment's), the erasing
    probability, RandAugment's increasing ops, the evaluation crop (also the padded one of crop_pct > 1),
    RandAugment's fill (GCAB's ImageNet mean under a CIFAR normalisation), the normalisation."""
    ours = suite_run(name, suite_transform(name, roots, [override]))
    assert ours["images"] != OFFICIAL[name]["images"]


def test_the_golden_images_reach_a_0_bit_posterize(roots, monkeypatch):
    """One training run keeps 0 bits in RandAugment's posterize (the Pillow 9.5 result, a black image, that
    cl_vit.data.transforms.posterize gives): with the installed Pillow's own posterize it stops there."""
    from cl_vit.data import transforms

    monkeypatch.setattr(transforms, "_pillow_safe", lambda transform: transform)
    raised = []
    for name in ("deit_train32", "deit_train112", "refiner_train_prefetcher", "refiner_train"):
        try:
            suite_run(name, suite_transform(name, roots))
        except ValueError as e:
            raised.append((name, "bits" in str(e)))
    assert raised and all(bits for _, bits in raised), raised


def test_evaluation_normalises_as_the_prefetcher_loader(roots):
    """With ``augment.prefetcher`` the evaluation crop is normalised from uint8 as the official PrefetchLoader does;
    ToTensor + Normalize (the pipeline without it) gives the same crop but other last bits."""
    ours = suite_run("refiner_eval", suite_transform("refiner_eval", roots,
                                                     ["benchmark.source_args.augment.prefetcher=false"]))
    assert ours["images"] == OFFICIAL["refiner_eval"]["images"]
    assert ours["loader"] != OFFICIAL["refiner_eval"]["loader"]
