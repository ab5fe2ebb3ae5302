"""The cache engine: run MAR under a cache schedule (token cache, condition cache, incremental encoder K/V,
diffusion-head cache) with FLOPs accounting."""
from .engine import CacheEngine, default_mechanisms, estimate_cache_bytes, estimate_generation_flops
from .flops import FlopsLedger, floor_flops
from .mechanism import CacheMechanism
from .schedule_file import (PRESETS, CacheSchedule, HeadCachePolicy, ScheduleError, StepPlan, lazymar_schedule,
                       load_schedule, none_schedule)

__all__ = ["CacheEngine", "CacheMechanism", "CacheSchedule", "HeadCachePolicy", "ScheduleError", "StepPlan", "PRESETS",
           "default_mechanisms", "estimate_cache_bytes", "estimate_generation_flops", "lazymar_schedule",
           "load_schedule", "none_schedule", "FlopsLedger", "floor_flops"]
