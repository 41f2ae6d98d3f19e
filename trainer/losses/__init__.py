"""The trainer's losses, one module each; every loss is an ``nn.Module`` returning an unweighted
scalar (ESS returns its two terms), and the stages multiply by the weights of the YAML config."""

from .adversarial import AdversarialLoss, discriminator_loss, generator_loss
from .diffloss import DiffLoss
from .discriminators import FeatureHeads, UNetDiscriminator
from .hfp import HFPLoss, hfp_loss, laplacian_bands, wavelet_bands
from .lpips import LPIPS, load_lpips
from .reconstruction import ReconstructionLoss, reconstruction_loss
from .regression import TeacherRegressionLoss
from .semantic import SemanticLoss, load_semantic_model
from .sr_teacher import SRTeacher, load_sr_teacher
from .vsd import VSDLoss, vsd_target

__all__ = [
    "AdversarialLoss",
    "DiffLoss",
    "FeatureHeads",
    "HFPLoss",
    "LPIPS",
    "ReconstructionLoss",
    "SRTeacher",
    "SemanticLoss",
    "TeacherRegressionLoss",
    "UNetDiscriminator",
    "VSDLoss",
    "discriminator_loss",
    "generator_loss",
    "hfp_loss",
    "laplacian_bands",
    "load_lpips",
    "load_semantic_model",
    "load_sr_teacher",
    "reconstruction_loss",
    "vsd_target",
    "wavelet_bands",
]
