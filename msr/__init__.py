"""msr: meta-learning symmetries by reparameterization (Zhou, Knowles & Finn, ICLR 2021).

A layer stores its weight as vec(W) = U v; a MAML inner loop adapts v (and biases) per task,
while the outer loop learns the sharing matrix U and the initial v.
"""

from msr import bases, groups, stats
from msr.episodic import EpisodicLearner, NonFiniteLossError, TaskBatch, accuracy
from msr.layers import MSRConv2d, MSRLinear, SymmetryLayer
from msr.maml import MAML, partition_parameters
from msr.norm import TaskBatchNorm
from msr.protonet import ProtoNet
from msr.saving import ModelFileError, load, save

__all__ = [
    "MAML",
    "EpisodicLearner",
    "MSRConv2d",
    "MSRLinear",
    "ModelFileError",
    "NonFiniteLossError",
    "ProtoNet",
    "SymmetryLayer",
    "TaskBatch",
    "TaskBatchNorm",
    "accuracy",
    "bases",
    "groups",
    "load",
    "partition_parameters",
    "save",
    "stats",
]
__version__ = "0.1.0"
