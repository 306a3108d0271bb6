"""Evaluation of generated lesions and of segmentation models trained with them, one module per job:

``metrics``        sphericity, convexity, HU lesion vs organ, Dice (nnU-Net's metric code)
``alignment``      the prompt-alignment study (does a generator follow its prompts?)
``nnunet_runner``  nnU-Net's commands as logged subprocesses (plan/preprocess, train, predict)
``segmentation``   the segmentation study (nnU-Net Dice per setting, generator, source and seed)

The names below are re-exported so ``from lesiondiffusion.evaluation import dice`` keeps working.
"""

from .alignment import (AlignmentResult, AlignmentSample, format_alignment_table, plot_alignment, prompt_values,
                        run_alignment, write_alignment)
from .metrics import HUStats, convexity, dice, dice_on_folders, hu_stats, shape_metrics, sphericity
from .segmentation import (GENERATORS, SETTINGS, SOURCES, SegmentationProtocol, StudyResult,
                           format_dice_markdown, run_segmentation_study)

__all__ = ["AlignmentResult", "AlignmentSample", "format_alignment_table", "plot_alignment", "prompt_values",
           "run_alignment", "write_alignment", "HUStats", "convexity", "dice", "dice_on_folders", "hu_stats",
           "shape_metrics", "sphericity", "GENERATORS", "SETTINGS", "SOURCES", "SegmentationProtocol", "StudyResult",
           "format_dice_markdown", "run_segmentation_study"]
