"""The cache engine: run MAR under a cache schedule (token cache, condition cache, incremental encoder K/V,
diffusion-head cache) with FLOPs accounting."""
from .engine import CacheEngine
from .flops import FlopsLedger, estimate_generation_flops, floor_flops
from .schedule_file import (PRESETS, CacheSchedule, HeadCachePolicy, ScheduleError, StepPlan, lazymar_schedule,
                            load_schedule, none_schedule)

__all__ = ["CacheEngine", "CacheSchedule", "HeadCachePolicy", "ScheduleError", "StepPlan", "PRESETS",
           "lazymar_schedule", "load_schedule", "none_schedule", "FlopsLedger", "estimate_generation_flops",
           "floor_flops"]
