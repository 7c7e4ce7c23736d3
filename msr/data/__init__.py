"""Few-shot image data: Omniglot and mini-ImageNet loaders, episode sampling (also as a
``torch.utils.data`` dataset), augmentation."""

from msr.data.augment import augment_images
from msr.data.episodes import ImageClasses, check_episodes, sample_episodes
from msr.data.fingerprint import fingerprint
from msr.data.loader import EpisodeDataset
from msr.data.miniimagenet import load_miniimagenet
from msr.data.omniglot import OMNIGLOT_SPLITS, find_omniglot, load_omniglot

__all__ = [
    "OMNIGLOT_SPLITS",
    "EpisodeDataset",
    "ImageClasses",
    "augment_images",
    "check_episodes",
    "find_omniglot",
    "fingerprint",
    "load_miniimagenet",
    "load_omniglot",
    "sample_episodes",
]
