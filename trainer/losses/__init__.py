"""The student's losses, one module each: ``<key>.py`` holds the config of the YAML section
``losses.<key>``, the loss itself (an ``nn.Module`` returning an unweighted scalar) and its
registered ``StudentLoss``, which builds it for a run and gives its weighted terms (see ``registry``).
"""

# isort: skip_file
# The loss modules, in the order the student stage builds their losses and adds up their terms
# (each registers on import). Building may draw random numbers, so the order is part of what a
# config trains: a new loss module is imported last. test_losses checks the order.
from .reconstruction import ReconstructionLoss, ReconstructionLossConfig, reconstruction_loss
from .hfp import HFPLoss, HFPLossConfig, hfp_loss, laplacian_bands, wavelet_bands
from .sr_teacher import SRTeacher, SRTeacherLossConfig, load_sr_teacher
from .semantic import SemanticLoss, SemanticLossConfig, load_semantic_model
from .regression import RegressionLossConfig, TeacherRegressionLoss
from .vsd import VSDLoss, VSDLossConfig, vsd_target
from .diffloss import DiffLoss, DiffLossConfig
from .adversarial import AdversarialLoss, AdversarialLossConfig, discriminator_loss, generator_loss
from .grid import GridLoss, GridLossConfig, grid_loss

from .discriminators import FeatureHeads, UNetDiscriminator
from .lpips import LPIPS, load_lpips
from .registry import LOSSES, LossContext, LossesConfig, StudentLoss, StudentStep, build_losses

__all__ = [
    "LOSSES",
    "LPIPS",
    "AdversarialLoss",
    "AdversarialLossConfig",
    "DiffLoss",
    "DiffLossConfig",
    "FeatureHeads",
    "GridLoss",
    "GridLossConfig",
    "HFPLoss",
    "HFPLossConfig",
    "LossContext",
    "LossesConfig",
    "ReconstructionLoss",
    "ReconstructionLossConfig",
    "RegressionLossConfig",
    "SRTeacher",
    "SRTeacherLossConfig",
    "SemanticLoss",
    "SemanticLossConfig",
    "StudentLoss",
    "StudentStep",
    "TeacherRegressionLoss",
    "UNetDiscriminator",
    "VSDLoss",
    "VSDLossConfig",
    "build_losses",
    "discriminator_loss",
    "generator_loss",
    "grid_loss",
    "hfp_loss",
    "laplacian_bands",
    "load_lpips",
    "load_semantic_model",
    "load_sr_teacher",
    "reconstruction_loss",
    "vsd_target",
    "wavelet_bands",
]
