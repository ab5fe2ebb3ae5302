"""The one run/compare core: which samples a run draws (plan), sampling them under a cache schedule (execute),
their images and quality (images), peak memory (memory), a candidate against the uncached reference (compare), and
the interleaved benchmark of a schedule against the uncached sampler (bench).
``sample``, ``eval``, ``bench``, ``sweep``, ``derive``, the explorer and the notebooks all go through it."""
from .compare import DEFAULT, Reference, RunError, fidelity, sample_squared_errors
from .execute import Run, generate_tokens
from .images import (IMAGE_DATA_RANGE, DigitsQuality, ImageSpace, QualityEvaluator, QualityStream,
                     decode_and_score, is_digits_model, quality_evaluator, score_images)
from .memory import PeakMemory, cpu_memory_measurement, resident_mb, weights_mb
from .plan import SEED_RULE, Batch, SamplePlan, balanced_labels, batch_seed

__all__ = ["DEFAULT", "IMAGE_DATA_RANGE", "SEED_RULE", "Batch", "DigitsQuality", "ImageSpace", "PeakMemory",
           "QualityEvaluator", "QualityStream", "Reference", "Run", "RunError", "SamplePlan", "balanced_labels",
           "batch_seed", "decode_and_score", "fidelity", "generate_tokens", "is_digits_model",
           "cpu_memory_measurement", "quality_evaluator", "resident_mb", "weights_mb",
           "sample_squared_errors", "score_images"]
