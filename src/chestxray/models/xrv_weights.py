"""torchxrayvision's published weights: names, addresses, output names, operating thresholds
and input resolution, and the mapping of their output names to this project's vocabulary.

Torch-free, so that `chestxray import xrv` can look a name up and try the download (and fail
fast offline) before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chestxray.data.harmonise import VOCABULARY
from chestxray.data.transforms import XRV_RESIZE, Preprocessing
from chestxray.labels import ALIASES

DENSENET = "xrv-densenet121"
RESNET = "xrv-resnet50"
XRV_SCALING = "torchxrayvision [-1024, 1024]: (x / 255) * 2048 - 1024 on one channel"
LICENCE = (
    "torchxrayvision (github.com/mlmed/torchxrayvision), Apache License 2.0; the weights were trained "
    "on public data sets whose own terms of use apply (NIH, CheXpert, MIMIC-CXR, PadChest, RSNA, ...)"
)


def xrv_preprocessing(size: int) -> Preprocessing:
    """torchxrayvision's input: centre crop, their resize to `size`, one channel in [-1024, 1024]."""
    return Preprocessing(
        size=size, mean=(0.5,), std=(1.0 / 2048.0,), crop="center", scaling=XRV_SCALING, resize=XRV_RESIZE
    )


# ---- their published weights --------------------------------------------------------------
# Copied from torchxrayvision 1.5.7, torchxrayvision/models.py `model_urls` (labels, op_threshs,
# input_resolution, weights_url). "" marks an output slot the weights never trained.
_N = math.nan
_ALL = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
]  # fmt: skip
_CHEX = [
    "Atelectasis", "Consolidation", "", "Pneumothorax", "Edema", "", "", "Effusion", "Pneumonia", "",
    "Cardiomegaly", "", "", "", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
]  # fmt: skip
_BASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"


@dataclass(frozen=True)
class XrvWeights:
    name: str
    architecture: str
    url: str
    labels: tuple[str, ...]
    op_threshs: tuple[float, ...]
    resolution: int
    description: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def pickled_model(self) -> bool:
        """Their DenseNet files are whole pickled models; the ResNet file is a state dict."""
        return self.architecture == DENSENET


def _w(name: str, arch: str, file: str, labels: list[str], thr: list[float], res: int, desc: str) -> XrvWeights:
    return XrvWeights(name, arch, _BASE + file, tuple(labels), tuple(thr), res, desc)


_D = DENSENET
_DF = "densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_WEIGHTS: dict[str, XrvWeights] = {
    w.name: w
    for w in (
        _w(
            "densenet121-res224-all", _D, "nih-pc-chex-mimic_ch-google-openi-kaggle-" + _DF, _ALL,
            [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724,
             0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766,
             0.053369623, 0.035975814, 0.20204692, 0.05015312],
            224, "trained on NIH, PadChest, CheXpert, MIMIC-CXR (CheXpert labels), Google NIH, OpenI, RSNA",
        ),
        _w(
            "densenet121-res224-nih", _D, "nih-" + _DF, [*_ALL[:14], "", "", "", ""],
            [0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827,
             0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434,
             _N, _N, _N, _N],
            224, "trained on NIH ChestX-ray14 (random split)",
        ),
        _w(
            "densenet121-res224-pc", _D, "pc-" + _DF, [*_ALL[:14], "", "Fracture", "", ""],
            [0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071,
             0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895,
             _N, 0.026507627, _N, _N],
            224, "trained on PadChest",
        ),
        _w(
            "densenet121-res224-chex", _D, "chex-" + _DF, _CHEX,
            [0.1988969, 0.05710573, _N, 0.0531293, 0.1435217, _N, _N, 0.27212676, 0.07749717, _N,
             0.19712369, _N, _N, _N, 0.09932402, 0.09273402, 0.3270967, 0.10888247],
            224, "trained on CheXpert",
        ),
        _w(
            "densenet121-res224-rsna", _D, "kaggle-" + _DF,
            ["", "", "", "", "", "", "", "", "Pneumonia", "", "", "", "", "", "", "", "Lung Opacity", ""],
            [_N] * 8 + [0.13486601] + [_N] * 7 + [0.13511065, _N],
            224, "trained on the RSNA Pneumonia Challenge",
        ),
        _w(
            "densenet121-res224-mimic_nb", _D, "mimic_nb-" + _DF, _CHEX,
            [0.08558747, 0.011884617, _N, 0.0040595434, 0.010733786, _N, _N, 0.118761964, 0.022924708, _N,
             0.06358637, _N, _N, _N, 0.022143636, 0.017476924, 0.1258702, 0.014020768],
            224, "trained on MIMIC-CXR (NegBio labels)",
        ),
        _w(
            "densenet121-res224-mimic_ch", _D, "mimic_ch-" + _DF, _CHEX,
            [0.09121389, 0.010573786, _N, 0.005023008, 0.003698257, _N, _N, 0.08001232, 0.037242252, _N,
             0.05006329, _N, _N, _N, 0.019866971, 0.03823637, 0.11303808, 0.0069147074],
            224, "trained on MIMIC-CXR (CheXpert labels)",
        ),
        _w(
            "resnet50-res512-all", RESNET, "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt", _ALL,
            [0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943,
             0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, _N, 0.5080557, 0.5138526, _N],
            512, "trained on PadChest, NIH, RSNA, SIIM, VinDr-CXR at 512 px",
        ),
    )
}  # fmt: skip


# ---- their names in this project's vocabulary ---------------------------------------------
# The one mapping: NIH's 14 through chestxray.labels (its spellings and ALIASES), the others
# (CheXpert's Lung Lesion, Fracture, Lung Opacity, Enlarged Cardiomediastinum) are already
# spelled as in the shared vocabulary, chestxray.data.harmonise.VOCABULARY.
def vocabulary_name(xrv_name: str) -> str:
    name = ALIASES.get(xrv_name, xrv_name)
    if name not in VOCABULARY:
        raise ValueError(f"torchxrayvision output {xrv_name!r} has no name in chestxray.data.harmonise.VOCABULARY")
    return name


def kept_outputs(weights: XrvWeights) -> list[tuple[int, str, float]]:
    """(their output index, our name, their op threshold) of the outputs a bundle keeps:
    empty slots and outputs with a NaN threshold (never trained) are dropped."""
    return [
        (i, vocabulary_name(lab), thr)
        for i, (lab, thr) in enumerate(zip(weights.labels, weights.op_threshs))
        if lab and not math.isnan(thr)
    ]
