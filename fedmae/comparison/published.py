"""The paper's published figures, printed beside a comparison's own (``compare.paper``).

SelfMedMAE (Zhou et al., "Self Pre-training with Masked Autoencoders for Medical Image Analysis",
arXiv 2203.05573v1; the same abstract is on OpenReview, id zcBlm0Boms) fine-tunes a ViT-B on one
data set, trained centrally, from scratch and after MAE self pre-training on that data set's own
training images. Its abstract gives:

- ChestX-ray14: "the mAUC on lung disease classification is increased by 9.4%" (neither AUC is
  given, nor whether the 9.4% is relative or in points);
- BraTS: "The average DSC on brain tumor segmentation is improved from 77.4% to 78.9%";
- BTCV (N=30): "the average DSC improves from 78.8% to 83.5%".

Nothing else is published here: the per-class tables were not available to us, and no figure is
estimated. A comparison's two matching arms are "none" (from scratch) and "centralised" (MAE
self pre-training on the pooled training images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmae.data.tasks import TaskSpec
from fedmae.metrics import main_metric

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

SOURCE = "SelfMedMAE (Zhou et al., arXiv 2203.05573v1), abstract"
PAPER_ARMS = ("none", "centralised")  # the paper's two settings, as a comparison's arms


@dataclass(frozen=True)
class Published:
    """One data set's published figures, in fedmae's units (a fraction, not a percentage)."""

    title: str  # the data set and what is scored
    task: str  # classification | segmentation
    metric: str  # fedmae's name of the paper's metric (fedmae.metrics.main_metric)
    scratch: float | None  # fine-tuned from scratch; None: not published
    mae: float | None  # fine-tuned after MAE self pre-training; None: not published
    quote: str  # the figures in the abstract's words
    gain: str | None = None  # the gain as stated, where the two figures are not published

    def gain_text(self) -> str:
        """'+0.047 (+6.0%)': the gain in points and relative; or as the paper states it."""
        if self.scratch is None or self.mae is None:
            return self.gain or "not published"
        return f"{self.mae - self.scratch:+.3f} ({(self.mae - self.scratch) / self.scratch:+.1%})"


PUBLISHED = {
    "btcv": Published("BTCV, 13 abdominal organs", "segmentation", "mean_dice", 0.788, 0.835,
                      "average DSC improves from 78.8% to 83.5%"),
    "brats": Published("BraTS, tumour regions", "segmentation", "mean_dice", 0.774, 0.789,
                       "average DSC improved from 77.4% to 78.9%"),
    "chestxray14": Published("ChestX-ray14, 14 findings", "classification", "mean_auc", None, None,
                             "mAUC increased by 9.4%", gain="+9.4% (relative or in points: not stated)"),
}


def check_paper(cfg: ExperimentConfig) -> None:
    """Refuse, in one line, a ``compare.paper`` whose figures this comparison cannot be set beside:
    another metric than the run's, or without the arms the paper's two settings correspond to."""
    paper = cfg.compare.paper
    if paper == "none":
        return
    figures = PUBLISHED[paper]
    metric = main_metric(TaskSpec(cfg.task.type, cfg.multi_label, ()))
    if metric != figures.metric:
        raise ValueError(f"compare.paper: {paper}'s published figures are {figures.metric} ({figures.task}), but this "
                         f"comparison reports {metric} ({cfg.task.type}); set compare.paper to the matching data set or none")
    missing = [arm for arm in PAPER_ARMS if arm not in cfg.compare.arms]
    if missing:
        raise ValueError(f"compare.paper: the paper's settings are the none and centralised arms; add "
                         f"{' and '.join(missing)} to compare.arms, or set compare.paper to none")
