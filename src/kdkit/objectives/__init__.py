"""What is minimised: classifier objective terms (`objectives.classifier`, registry `OBJECTIVES`)
and LM objectives (`objectives.lm`, registry `LM_OBJECTIVES`), one small file each."""

from kdkit.objectives import classifier, lm
from kdkit.objectives.params import DivergenceChoice

__all__ = ["DivergenceChoice", "classifier", "lm"]
