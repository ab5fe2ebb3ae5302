"""Cache schedules: a validated, JSON-serialisable plan of what each MAR step recomputes and what it reuses.

A schedule fixes, for every one of ``num_iter`` steps:

- ``refresh``: compute everything (encoder over all known tokens, decoder over all positions) and refill caches;
- ``keep_fraction``: on a cached step, the fraction of all decoder positions (buffer + sequence) recomputed after
  the selection layer; at least the always-kept positions plus ``keep_min_extra`` (a fraction of all positions);
- ``condition_cache``: run only the conditional branch; the unconditional output of the last decoder block is
  cond + (uncond - cond) cached at the last step that ran both branches;
- ``head_cache``: run the diffusion head under the head policy.

and, for the whole generation, the selection rule of the token cache (lowest cosine similarity of V with the
previous step's V at ``selection_layer``, as LazyMAR; random; or by status only, which keeps just the always-kept
positions), which statuses are always kept, the encoder policy on cached steps ("incremental": only the buffer
and the tokens decoded at the previous step run, older tokens' K/V stay cached; "new-tokens": only the tokens
decoded at the previous step run, the buffer's K/V and outputs stay cached too; "full") and the head policy.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import MARConfig
from ..errors import LazymarError
from ..fingerprint import ModelFingerprint, check_made_for
from ..seeds import SEED_LIMIT

SELECTION_RULES = ("similarity", "random", "status", "attention")  # attention: MARché (cache/attention_selection)
KEEPABLE_STATUSES = ("to_predict", "new", "buffer")  # what a schedule's always_keep may name
ENCODER_POLICIES = ("full", "incremental", "new-tokens")
FORMAT = "lazymar-cache-schedule/1"


class ScheduleError(LazymarError):
    """A cache schedule that cannot be run; the message names the problem."""


@dataclass(frozen=True)
class HeadCachePolicy:
    """The diffusion-head cache, over the head's reverse steps i = T-1, ..., 0 (T = 100 for the released models).

    Step i runs the full network on both CFG halves when i == T-1 or i % refresh_every == 0 and refills the
    caches. The other steps run only the conditional half when ``cfg_cache`` (uncond eps = cond eps - the cached
    cond - uncond eps), add the cached residual update of the res-blocks in ``reuse_blocks`` instead of running
    them, and, when ``reuse_mlp``, run the remaining res-blocks with fresh modulation but the cached MLP output
    (except while i > mlp_fresh_above * T, a warm-up where those MLPs still run). The released values:
    refresh_every 7, cfg_cache, reuse_blocks 1-4, reuse_mlp, mlp_fresh_above 0.9.

    ``hoist_invariants`` is exact: cond_embed(z) is computed once per MAR step rather than at every head step, and
    the time embedding once per head step rather than once per row (all rows share t). The released code does
    not do it; it changes FLOPs, not results (up to float rounding).
    """

    refresh_every: int = 1
    cfg_cache: bool = False
    reuse_blocks: tuple[int, ...] = ()
    reuse_mlp: bool = False
    mlp_fresh_above: float = 0.9
    hoist_invariants: bool = False

    def __post_init__(self) -> None:
        where = "head "
        object.__setattr__(self, "reuse_blocks", tuple(_integer(b, where + "reuse_blocks entries")
                                                       for b in _sequence(self.reuse_blocks, where + "reuse_blocks")))
        if _integer(self.refresh_every, where + "refresh_every") < 1:
            raise ScheduleError(f"head refresh_every must be an integer >= 1, got {self.refresh_every!r}")
        if any(b < 0 for b in self.reuse_blocks) or len(set(self.reuse_blocks)) != len(self.reuse_blocks):
            raise ScheduleError(f"head reuse_blocks must be distinct indices >= 0, got {list(self.reuse_blocks)}")
        if not 0.0 <= _number(self.mlp_fresh_above, where + "mlp_fresh_above") <= 1.0:
            raise ScheduleError(f"head mlp_fresh_above must lie in [0, 1], got {self.mlp_fresh_above}")
        for name in ("cfg_cache", "reuse_mlp", "hoist_invariants"):
            object.__setattr__(self, name, _as_bool(getattr(self, name), where + name))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadCachePolicy":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ScheduleError(f"unknown head policy field {unknown[0]!r}")
        return cls(**data)

    @property
    def active(self) -> bool:
        return self.hoist_invariants or (self.refresh_every > 1 and (
            self.cfg_cache or bool(self.reuse_blocks) or self.reuse_mlp))

    def full_step(self, i: int, num_steps: int) -> bool:
        """Whether head step i (respaced index, counting down from num_steps - 1) recomputes everything."""
        return i == num_steps - 1 or i % self.refresh_every == 0

    def mlp_fresh(self, i: int, num_steps: int) -> bool:
        """Whether a cached head step still runs the MLPs of the blocks whose residual it does not reuse."""
        return not self.reuse_mlp or i > self.mlp_fresh_above * num_steps


@dataclass(frozen=True)
class StepPlan:
    """What one step runs, derived from the schedule (and whether CFG is on)."""

    step: int
    refresh: bool
    token_cache: bool          # decoder: later layers on the kept positions only (off on refresh steps)
    keep_fraction: float
    incremental_encoder: bool  # encoder: only the new tokens (and the buffer, if encoder_buffer) run
    encoder_buffer: bool       # the incremental encoder recomputes the buffer (False: its K/V and outputs are reused)
    branches: int              # 2 = cond and uncond run, 1 = cond only (condition cache, or no CFG)
    condition_cache: bool      # uncond = cond + cached difference
    head_cache: bool


@dataclass(frozen=True)
class CacheSchedule:
    num_iter: int
    refresh: tuple[bool, ...]
    keep_fraction: tuple[float, ...]
    condition_cache: tuple[bool, ...]
    head_cache: tuple[bool, ...]
    name: str = "custom"
    keep_min_extra: float = 0.0
    selection: str = "similarity"
    selection_layer: int = 3
    always_keep: tuple[str, ...] = ("to_predict", "new")
    encoder: str = "incremental"
    head: HeadCachePolicy = field(default_factory=HeadCachePolicy)
    seed: int = 0  # of the "random" selection rule
    # provenance of a searched schedule (seeds, samples, objective: lazymar.schedules.quality); not part of the plan
    search: Optional[dict] = field(default=None, compare=False, hash=False)
    # the model the schedule was derived for (lazymar.fingerprint); None: any model (presets map to every model;
    # files written before fingerprints carry none). Provenance, not part of the plan.
    made_for: Optional[ModelFingerprint] = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        if _integer(self.num_iter, "num_iter") < 1:
            raise ScheduleError(f"num_iter must be an integer >= 1, got {self.num_iter!r}")
        for name in ("refresh", "keep_fraction", "condition_cache", "head_cache"):
            values = _sequence(getattr(self, name), name, "with one entry per step")
            if len(values) != self.num_iter:
                raise ScheduleError(f"{name} has {len(values)} entries but the schedule has {self.num_iter} steps")
            set_(name, tuple(_number(v, f"{name} entries") if name == "keep_fraction" else _as_bool(v, f"{name} entries")
                             for v in values))
        bad = [(s, f) for s, f in enumerate(self.keep_fraction) if not 0.0 <= f <= 1.0]
        if bad:
            raise ScheduleError(f"keep_fraction must lie in [0, 1]; step {bad[0][0]} has {bad[0][1]}")
        if not 0.0 <= _number(self.keep_min_extra, "keep_min_extra") <= 1.0:
            raise ScheduleError(f"keep_min_extra must lie in [0, 1], got {self.keep_min_extra}")
        if not self.refresh[0]:
            raise ScheduleError("step 0 must refresh: nothing is cached before it")
        if self.condition_cache[0]:
            raise ScheduleError("step 0 cannot use the condition cache: no cond-uncond difference is cached yet")
        if not isinstance(self.name, str):
            raise ScheduleError(f"name must be a string, got {type(self.name).__name__}")
        if not isinstance(self.selection, str) or self.selection not in SELECTION_RULES:
            raise ScheduleError(f"unknown selection rule {self.selection!r}; known: {', '.join(SELECTION_RULES)}")
        if _integer(self.selection_layer, "selection_layer") < 0:
            raise ScheduleError(f"selection_layer must be an integer >= 0, got {self.selection_layer!r}")
        keepable = ", ".join(KEEPABLE_STATUSES)
        set_("always_keep", tuple(_sequence(self.always_keep, "always_keep", f"of statuses ({keepable})")))
        unknown = [k for k in self.always_keep if not isinstance(k, str) or k not in KEEPABLE_STATUSES]
        if unknown:
            raise ScheduleError(f"unknown always_keep status {unknown[0]!r}; known: {keepable}")
        if not isinstance(self.encoder, str) or self.encoder not in ENCODER_POLICIES:
            raise ScheduleError(f"unknown encoder policy {self.encoder!r}; known: {', '.join(ENCODER_POLICIES)}")
        if not 0 <= _integer(self.seed, "seed") < SEED_LIMIT:
            raise ScheduleError(f"seed must lie in [0, 2**63), got {self.seed}")
        if isinstance(self.head, dict):
            set_("head", HeadCachePolicy.from_dict(self.head))
        elif not isinstance(self.head, HeadCachePolicy):
            raise ScheduleError(f"head must be an object, got {type(self.head).__name__}")
        if self.search is not None and not isinstance(self.search, dict):
            raise ScheduleError(f"search must be an object (seeds, num_samples, objective), got {self.search!r}")
        if isinstance(self.made_for, dict) or self.made_for == MADE_FOR_ANY:
            set_("made_for", _made_for(self.made_for))
        elif self.made_for is not None and not isinstance(self.made_for, ModelFingerprint):
            raise ScheduleError(f"made_for must be an object of model fields or \"any\", got {self.made_for!r}")

    # --- checks against a model --------------------------------------------------------------------------------
    def validate_for(self, config: Optional[MARConfig], num_iter: Optional[int] = None,
                     source: Optional[str] = None) -> None:
        """Raise ScheduleError if this schedule cannot run on a model of ``config`` (None: any model) with
        ``num_iter`` steps, and ModelMismatchError if it was made for another model; ``source`` names it."""
        where = source or f"schedule {self.name!r}"
        if config is not None:
            check_made_for(where, self.made_for, config)
        if num_iter is not None and num_iter != self.num_iter:
            raise ScheduleError(f"{where} has {self.num_iter} steps but sampling uses {num_iter}")
        if config is None:
            return
        if not all(self.refresh) and self.selection_layer >= config.decoder_depth:
            raise ScheduleError(f"selection_layer {self.selection_layer} out of range: the decoder has "
                                f"{config.decoder_depth} blocks")
        bad = [b for b in self.head.reuse_blocks if b >= config.diffloss_d and any(self.head_cache)]
        if bad:
            raise ScheduleError(f"head reuse block {bad[0]} out of range: the head has {config.diffloss_d} res-blocks")

    # --- per step ----------------------------------------------------------------------------------------------
    def step_plan(self, step: int, use_cfg: bool = True) -> StepPlan:
        refresh = self.refresh[step]
        condition_cache = use_cfg and self.condition_cache[step]
        branches = 2 if use_cfg and not condition_cache else 1
        # a branch that did not run at the previous step misses that step's tokens in its encoder cache
        behind = step > 0 and branches > (2 if use_cfg and not self.condition_cache[step - 1] else 1)
        return StepPlan(
            step=step, refresh=refresh, token_cache=not refresh, keep_fraction=self.keep_fraction[step],
            incremental_encoder=(not refresh and self.encoder != "full" and not behind),
            encoder_buffer=self.encoder != "new-tokens",
            branches=branches, condition_cache=condition_cache,
            head_cache=self.head_cache[step] and self.head.active,
        )

    def kept_count(self, step: int, total: int, n_always: int) -> int:
        """Decoder positions recomputed after the selection layer on cached step ``step`` (per sample), out of
        ``total`` (buffer + seq), of which ``n_always`` are always kept."""
        if self.selection == "status":
            return n_always
        extra = int(total * self.keep_min_extra)
        return min(total, max(n_always + extra, int(total * self.keep_fraction[step])))

    @property
    def caches_anything(self) -> bool:
        return not all(self.refresh) or any(self.condition_cache) or (any(self.head_cache) and self.head.active)

    # --- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["head"]["reuse_blocks"] = list(self.head.reuse_blocks)
        for k in ("refresh", "keep_fraction", "condition_cache", "head_cache", "always_keep"):
            d[k] = list(d[k])
        if d["search"] is None:
            del d["search"]
        d["made_for"] = self.made_for.to_dict() if self.made_for is not None else None
        if d["made_for"] is None:
            del d["made_for"]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheSchedule":
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ScheduleError(f"unsupported schedule format {fmt!r}; expected {FORMAT!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ScheduleError(f"unknown schedule field {unknown[0]!r}")
        missing = [n for n in ("num_iter", "refresh", "keep_fraction", "condition_cache", "head_cache") if n not in data]
        if missing:
            raise ScheduleError(f"schedule is missing the field {missing[0]!r}")
        head = data.get("head", {})
        if not isinstance(head, dict):
            raise ScheduleError("schedule field 'head' must be an object")
        data["head"] = HeadCachePolicy.from_dict(head)
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def with_changes(self, **changes: Any) -> "CacheSchedule":
        return replace(self, **changes)


MADE_FOR_ANY = "any"  # a schedule file's made_for that says so: it applies to every model


def _made_for(value: Any) -> Optional[ModelFingerprint]:
    """A schedule's stored made_for: "any" (None: no model check) or a fingerprint object."""
    if value == MADE_FOR_ANY:
        return None
    return ModelFingerprint.from_dict(value, ScheduleError)


def _as_bool(value: Any, name: str) -> bool:
    """true/false (or 0/1) in a JSON file; anything else is a ScheduleError naming the field."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ScheduleError(f"{name} must be booleans (true/false), got {value!r}")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScheduleError(f"{name} must be an integer, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    """A finite number (int or float, not a string or boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{name} must be numbers, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ScheduleError(f"{name} must be finite numbers, got {value!r}") from None
    if not math.isfinite(number):
        raise ScheduleError(f"{name} must be finite numbers, got {value!r}")
    return number


def _sequence(value: Any, name: str, what: str = "") -> Sequence:
    """A list (or tuple); a string is not a list of statuses (\"new\" is not [\"n\", \"e\", \"w\"])."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ScheduleError(f"{name} must be a list{' ' + what if what else ''}, got {value!r}"[:200])
    return value


# --- presets -------------------------------------------------------------------------------------------------
LAZYMAR_STEPS = 64
LAZYMAR_REFRESH = frozenset([0, 1, 2, 3, 4, *range(5, LAZYMAR_STEPS, 9)])  # 0-4, 5, 14, 23, 32, 41, 50, 59
LAZYMAR_POSITIONS = 320  # buffer 64 + 256 tokens of the released models
LAZYMAR_MIN_EXTRA = 15 / LAZYMAR_POSITIONS  # the "+ 15" of the released kept count (exactly representable)
LAZYMAR_HEAD = HeadCachePolicy(refresh_every=7, cfg_cache=True, reuse_blocks=(1, 2, 3, 4), reuse_mlp=True,
                               mlp_fresh_above=0.9)


def lazymar_keep_ratio(step: int) -> float:
    """The released per-step ratio of the 64-step schedule."""
    for last, ratio in ((19, 1.0), (20, 0.6), (24, 0.5), (29, 0.4), (34, 0.15), (39, 0.12)):
        if step <= last:
            return ratio
    return 0.05


def _covered_64_steps(step: int, num_iter: int) -> range:
    """The 64-step indices k with step/num_iter <= k/64 < (step+1)/num_iter (may be empty when num_iter > 64)."""
    return range(-(-LAZYMAR_STEPS * step // num_iter), -(-LAZYMAR_STEPS * (step + 1) // num_iter))


def none_schedule(num_iter: int) -> CacheSchedule:
    """No caching: every step computes everything (bit for bit the plain sampler)."""
    return CacheSchedule(num_iter=num_iter, refresh=[True] * num_iter, keep_fraction=[1.0] * num_iter,
                         condition_cache=[False] * num_iter, head_cache=[False] * num_iter, name="none",
                         selection_layer=0)


def exact_schedule(num_iter: int) -> CacheSchedule:
    """The fastest exact sampler, the uncached reference every ratio is measured against: no caching, the head's
    invariants hoisted (HeadCachePolicy.hoist_invariants: the same results up to float rounding, fewer FLOPs),
    as every cached schedule here does. ``none_schedule`` is the plain sampler bit for bit."""
    return none_schedule(num_iter).with_changes(head_cache=[True] * num_iter,
                                                head=HeadCachePolicy(hoist_invariants=True), name="none")


def lazymar_selection_layer(decoder_depth: int) -> int:
    """Layer 3 for the released models (12-20 decoder blocks); for shallower decoders the layer after the same
    fraction of the 12-block MAR-B decoder (a third) ran on all positions."""
    if decoder_depth >= 12:
        return 3
    return max(0, round(decoder_depth / 3) - 1)


def lazymar_schedule(num_iter: int = LAZYMAR_STEPS, config: Optional[MARConfig] = None,
                     hoist_invariants: bool = True) -> CacheSchedule:
    """The scheme of the released LazyMAR code (refresh steps, keep ratios, head blocks); exact at 64 steps for the
    released models.

    Other step counts map by step fraction: step s covers [s/N, (s+1)/N) of the generation and refreshes if that
    interval holds a released refresh step; its keep ratio is the released one at floor(64 s / N). The "+ 15" of
    the kept count becomes 15/320 of all decoder positions. With ``config`` the scheme fits the model: reused head
    blocks (1-4) limited to those the head has, selection layer by :func:`lazymar_selection_layer`.
    ``hoist_invariants`` (exact, see HeadCachePolicy) is not in the released code: "lazymar-released" leaves it off.
    """
    refresh, keep = [], []
    for s in range(num_iter):
        refresh.append(any(k in LAZYMAR_REFRESH for k in _covered_64_steps(s, num_iter)))
        keep.append(lazymar_keep_ratio(LAZYMAR_STEPS * s // num_iter))
    head = replace(LAZYMAR_HEAD, hoist_invariants=hoist_invariants)
    selection_layer = 3
    if config is not None:
        head = replace(head, reuse_blocks=tuple(b for b in head.reuse_blocks if b < config.diffloss_d))
        selection_layer = lazymar_selection_layer(config.decoder_depth)
    return CacheSchedule(
        num_iter=num_iter, refresh=refresh, keep_fraction=keep, condition_cache=[not r for r in refresh],
        head_cache=[True] * num_iter, name="lazymar" if hoist_invariants else "lazymar-released",
        keep_min_extra=LAZYMAR_MIN_EXTRA, selection="similarity", selection_layer=selection_layer,
        always_keep=("to_predict", "new"), encoder="incremental", head=head)


PRESETS = ("none", "lazymar", "lazymar-released", "lazymar-new-tokens")


def read_schedule_file(path: str | Path) -> CacheSchedule:
    """The schedule in a JSON file; ScheduleError naming the file and the problem for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"unknown schedule {str(path)!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScheduleError(f"schedule file {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ScheduleError(f"schedule file {path}: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ScheduleError(f"schedule file {path} must hold a JSON object")
    try:
        return CacheSchedule.from_dict(data)
    except ScheduleError as err:
        raise ScheduleError(f"schedule file {path}: {err}") from None


@dataclass(frozen=True)
class ScheduleChoice:
    """A --schedule value, parsed once: a preset name (mapped to the model and step count by :meth:`resolve`) or a
    schedule file, read and checked here, once. ``str()`` gives the text given. :data:`NO_CACHE` ("none") is the
    one value for uncached sampling."""

    text: str
    file: Optional[CacheSchedule] = field(default=None, compare=False)  # the file's schedule; None for a preset

    @classmethod
    def parse(cls, text: "str | Path | ScheduleChoice") -> "ScheduleChoice":
        """The choice named by ``text``; ScheduleError naming the file for an unusable one."""
        if isinstance(text, ScheduleChoice):
            return text
        text = str(text)
        if text == NO_CACHE.text:
            return NO_CACHE
        return cls(text) if text in PRESETS else cls(text, read_schedule_file(text))

    def __str__(self) -> str:
        return self.text

    @property
    def is_file(self) -> bool:
        return self.file is not None

    def resolve(self, num_iter: int, config: Optional[MARConfig] = None) -> CacheSchedule:
        """The schedule for ``num_iter`` steps: a preset mapped to them (and to ``config``: it fits any model), a
        file's as read (its step count must be ``num_iter``). With ``config`` it is checked against the model,
        and a file made for another model is refused (ModelMismatchError). "none" plans no caching."""
        if self.file is not None:
            self.file.validate_for(config, num_iter, f"schedule {self.text}")
            return self.file
        if self.text == "none":
            schedule = none_schedule(num_iter)
        elif self.text in ("lazymar", "lazymar-released"):
            schedule = lazymar_schedule(num_iter, config, hoist_invariants=self.text == "lazymar")
        else:  # lazymar-new-tokens: the encoder policy the released code's cache sizing suggests (REFERENCE.md)
            schedule = lazymar_schedule(num_iter, config).with_changes(encoder="new-tokens", name=self.text)
        schedule.validate_for(config, num_iter)
        return schedule

    def sampler_schedule(self, num_iter: int, config: Optional[MARConfig] = None) -> Optional[CacheSchedule]:
        """What sampling runs: None for "none" (the plain sampler, no cache engine), else :meth:`resolve`."""
        return None if self is NO_CACHE else self.resolve(num_iter, config)


NO_CACHE = ScheduleChoice("none")


def load_schedule(name_or_path: "str | Path | ScheduleChoice", num_iter: int,
                  config: Optional[MARConfig] = None) -> CacheSchedule:
    """A preset by name (see PRESETS) mapped to ``num_iter`` steps, or a schedule JSON file (see
    :class:`ScheduleChoice`, which a parsed --schedule already is: its file is not read again).

    With ``config`` the schedule is also checked against the model (and presets fit the model)."""
    return ScheduleChoice.parse(name_or_path).resolve(num_iter, config)
