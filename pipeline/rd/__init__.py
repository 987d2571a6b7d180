"""Rate-distortion building blocks of CIFD: entropy bottleneck, RDM bank, IBM."""

from pipeline.rd.entropy import BottleneckOutput, EntropyBottleneck, uniform_noise
from pipeline.rd.ibm import IBMOutput, InformationBottleneck
from pipeline.rd.rdm import (
    DISTORTIONS,
    RDMBank,
    RDMLoss,
    RDMOutput,
    bank_outputs,
    rdm_loss,
)

__all__ = [
    "DISTORTIONS",
    "BottleneckOutput",
    "EntropyBottleneck",
    "IBMOutput",
    "InformationBottleneck",
    "RDMBank",
    "RDMLoss",
    "RDMOutput",
    "bank_outputs",
    "rdm_loss",
    "uniform_noise",
]
