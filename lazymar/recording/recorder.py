"""The redundancy recorder: forward hooks plus a step observer that turn features into per-step statistics.

Per sampling step s >= 1 and per layer (every encoder block, every decoder block, and the head conditioning z),
it compares each position's features with the same position's features at step s-1 and stores scalars only:

* token redundancy: cosine(h_s, h_{s-1}) of the block output, and of the attention keys K and values V (from the
  fused qkv projection). For K and V the cosine is computed per head and then averaged over heads, which is how
  LazyMAR ranks tokens by V similarity. Token statistics are measured on the conditional branch.
* condition redundancy (CFG on): with r_s = h_cond - h_uncond per position, cosine(r_s, r_{s-1}),
  ||r_s - r_{s-1}|| / ||r_{s-1}||, and the same relative change of h_cond and of h_uncond alone.
* diffusion head, across its own sampling steps inside one MAR step: the relative change of the eps CFG
  difference (cond eps - uncond eps) and of each res-block's residual update (output - input, on the cond rows),
  averaged over the tokens each sample decodes at that MAR step.

A position that is not computed at s or at s-1 (the encoder only sees known tokens; a cache engine may skip rows)
is missing (NaN), never 0.

Cost and memory: hooks only stash references to the features; the statistics are computed in batched ops over
groups of layers run on the same rows (when LAYER_CHUNK of them are stashed, else at step end) and over head steps
(every HEAD_CHUNK head steps, and at step end), so a step costs a few ops per group, not per layer and head step.
Held at most: the previous step's features per layer (unit vectors of the cond rows; for outputs with CFG also
the raw [cond; uncond] rows and the unit residual: 4B rows instead of 2B), up to LAYER_CHUNK stashed layers per
group and HEAD_CHUNK stashed head steps. The statistics equal the per-layer computation bit for bit.

Row-to-position contract with step runners (e.g. the cache engine), through the step context: a runner that
passes other rows through the blocks than the plain model sets ``ctx.encoder_rows`` / ``ctx.decoder_rows`` to a
LongTensor (network_batch, n) of indices into the buffer+sequence positions, and ``ctx.branches`` to the branches
of the network batch in order. None means the plain model's layout: encoder rows are the buffer and the known
positions in position order, decoder rows are all positions. ``ctx.phase`` tells the transformer pass from the head.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Optional

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from ..model import MAR
from ..sampling import BRANCHES, SamplingSettings, StepContext, StepObserver, current_step, observe_steps
from .batched import (HeadChanges, HeadStep, LayerFeatures, cfg_statistics, features_at_positions,
                      token_cosines)
from .dataset import CFG_STATS, FEATURE_KINDS, RecordingError, STATUS_CODES, concat_batches, make_dataset

# head steps stashed (references to res-block inputs/outputs) before their statistics are computed: bounds memory
HEAD_CHUNK = 25
LAYER_CHUNK = 8  # layers of one group stashed before their statistics are computed (memory: module doc)
OUTPUT, KEYS_VALUES = slice(0, 1), slice(1, 3)  # the FEATURE_KINDS a hook call delivers: (output,) or (k, v)
# (step, rows in the block call) -> the positions of those rows (None: all positions), for the encoder or decoder
RowsOf = Callable[[StepContext, int], Optional[Tensor]]


def layer_names(model: MAR) -> list[str]:
    """The recorded layers: "encoder.0" ... "decoder.N", then "z" (the head conditioning)."""
    return ([f"encoder.{i}" for i in range(len(model.encoder_blocks))]
            + [f"decoder.{i}" for i in range(len(model.decoder_blocks))] + ["z"])


def head_part_names(model: MAR) -> list[str]:
    """The recorded head quantities: the eps CFG difference, then each res-block's residual update."""
    return ["eps_cfg"] + [f"res_block.{i}" for i in range(len(model.diffloss.net.res_blocks))]


class _StepBuffers:
    """The statistics of the step being computed, on the model's device (flushed to numpy at step end)."""

    def __init__(self, ctx: StepContext, num_layers: int, num_positions: int, head_steps: int, head_parts: int,
                 token_dim: int):
        B, device = ctx.batch_size, ctx.tokens.device
        nan = float("nan")
        self.step = ctx.step
        self.token_cosine = torch.full((B, num_layers, len(FEATURE_KINDS), num_positions), nan, device=device)
        self.token_norm = torch.full((B, num_layers, num_positions), nan, device=device)
        self.cfg = torch.full((B, num_layers, len(CFG_STATS), num_positions), nan, device=device)
        n = ctx.num_to_predict                              # the head's rows: sample by sample, n tokens each
        self.head_samples = torch.arange(B, device=device).repeat_interleave(n)  # sample of each head row
        self.num_tokens = B * n
        self.head = torch.full((head_steps, head_parts, self.num_tokens), nan, device=device)
        self.head_index = -1                               # head network evaluations so far in this step
        self.head_changes = HeadChanges(self.head, self.num_tokens, token_dim, head_parts - 1)
        self.head_stash: list[HeadStep] = []               # head steps not yet turned into statistics
        self.current_head: Optional[HeadStep] = None
        # (kinds, shape, dtype, rows, branches) -> (layer, features, row positions) of hooked block calls of this
        # step not yet turned into statistics: references to the model's tensors, no copies
        self.features: dict[tuple, list[tuple[int, Tensor, Optional[Tensor]]]] = {}
        self.encoder_positions: Optional[Tensor] = None
        self.encoder_rows: Optional[Tensor] = None


class RedundancyRecorder(StepObserver):
    """Record token and condition redundancy of every generation of ``model`` run inside the ``with`` block.

    >>> with RedundancyRecorder(model, model_name="digits") as rec:
    ...     generate(model, labels, settings, seed=0)
    >>> ds = rec.to_dataset()

    Several generations append batches along ``sample`` (numbered from ``first_sample``); they must share the
    sampling settings. Recording never changes the computation: hooks only read tensors and return None.
    The Dataset layout is described in :mod:`lazymar.recording.dataset` (token_cosine, cfg_*, head_change,
    status, tokens). Cosines use ``torch.nn.functional.cosine_similarity`` (0 for a zero vector).
    """

    def __init__(self, model: MAR, model_name: str = "", seed: Optional[int] = None, schedule: str = "none",
                 first_sample: int = 0, extra_attrs: Optional[dict[str, Any]] = None):
        self.model = model
        self.model_name = model_name or type(model).__name__
        self.seed = seed
        self.schedule = schedule
        self.next_sample = first_sample
        self.next_batch_index: Optional[int] = None  # set by drivers that number batches; stored per sample
        self.extra_attrs = dict(extra_attrs or {})
        self.layers = layer_names(model)
        self.head_parts = head_part_names(model)
        self.num_encoder = len(model.encoder_blocks)
        self.buffer_size = model.buffer_size
        self.num_positions = model.buffer_size + model.seq_len
        self.head_steps = model.diffloss.gen_diffusion.num_timesteps
        self._batches: list[xr.Dataset] = []
        self._settings: Optional[SamplingSettings] = None
        self._handles: list[Any] = []
        self._stack: Optional[contextlib.ExitStack] = None
        self._active = False

    # --- context manager ----------------------------------------------------------------------------------
    def __enter__(self) -> "RedundancyRecorder":
        if self._stack is not None:
            raise RecordingError("this RedundancyRecorder is already active")
        m = self.model
        for i, block in enumerate(m.encoder_blocks):
            self._hook_block(block, i, self._encoder_rows)
        for i, block in enumerate(m.decoder_blocks):
            self._hook_block(block, self.num_encoder + i, self._decoder_rows)
        net = m.diffloss.net
        self._handles.append(net.time_embed.register_forward_pre_hook(self._on_head_call))
        for k, block in enumerate(net.res_blocks):
            self._handles.append(block.register_forward_hook(self._res_block_hook(k)))
        self._handles.append(net.final_layer.register_forward_hook(self._on_head_output))
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(observe_steps(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._active = False

    def _hook_block(self, block: torch.nn.Module, layer: int, rows_of: RowsOf) -> None:
        heads = block.attn.num_heads

        def on_output(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            self._on_features(layer, OUTPUT, out[:, :, None, None], rows_of)

        def on_qkv(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            NB, n, C3 = out.shape
            qkv = out.reshape(NB, n, 3, heads, C3 // (3 * heads))
            self._on_features(layer, KEYS_VALUES, qkv[:, :, 1:], rows_of)

        self._handles.append(block.register_forward_hook(on_output))
        self._handles.append(block.attn.qkv.register_forward_hook(on_qkv))

    # --- step observer ------------------------------------------------------------------------------------
    def on_generation_start(self, model: MAR, settings: SamplingSettings, labels: Tensor) -> None:
        self._active = model is self.model
        if not self._active:
            return
        if settings.head_steps.allocation is not None:  # the head statistics index every token's head steps alike
            raise RecordingError(f"recording needs uniform head steps, got head_steps={settings.head_steps!r}")
        if self._settings is not None and self._settings != settings:
            raise RecordingError(f"one recorder records one setting: got {settings} after {self._settings}")
        self._settings = settings
        B, S, P = labels.shape[0], settings.num_iter, self.num_positions
        L, T, H = len(self.layers), self.head_steps, len(self.head_parts)
        self._labels = labels.cpu().numpy()
        self._arrays = {
            "status": np.full((B, S, P), -1, dtype=np.int8),
            "token_cosine": np.full((B, S, L, len(FEATURE_KINDS), P), np.nan, dtype=np.float32),
            "token_norm": np.full((B, S, L, P), np.nan, dtype=np.float32),
            "cfg": np.full((B, S, L, len(CFG_STATS), P), np.nan, dtype=np.float32),
            "head_change": np.full((B, S, T, H), np.nan, dtype=np.float32),
        }
        # the same arrays as tensors on the model's device (views of the numpy arrays on CPU): steps write here,
        # the batch end copies them back once (no host round-trip per step)
        device = labels.device
        self._device_arrays = {name: torch.from_numpy(array) if device.type == "cpu" else
                               torch.from_numpy(array).to(device) for name, array in self._arrays.items()}
        self._mask_ratio = np.zeros(S, dtype=np.float32)
        self._cfg_scale = np.zeros(S, dtype=np.float32)
        # (layer, kinds) -> (the stacked features of its group at the last step, its index there)
        self._previous: dict[tuple[int, int], tuple[LayerFeatures, int]] = {}
        self._earlier: dict[tuple[int, int], tuple[LayerFeatures, int]] = {}
        self._step: Optional[_StepBuffers] = None

    def on_step_start(self, ctx: StepContext) -> None:
        if not self._active:
            return
        self._step = _StepBuffers(ctx, len(self.layers), self.num_positions, self.head_steps, len(self.head_parts),
                                  self.model.token_dim)
        self._earlier, self._previous = self._previous, {}  # the last step's features, released as they are used
        status = self._device_arrays["status"][:, ctx.step]
        status[:, :self.buffer_size] = STATUS_CODES["buffer"]
        tokens = status[:, self.buffer_size:]
        for name in ("known", "new", "to_predict", "masked"):
            tokens.masked_fill_(getattr(ctx, name), STATUS_CODES[name])
        self._mask_ratio[ctx.step] = ctx.mask_ratio
        self._cfg_scale[ctx.step] = ctx.cfg_scale

    def on_step_end(self, ctx: StepContext) -> None:
        if not self._active or self._step is None:
            return
        z = ctx.z
        branches = BRANCHES if (ctx.use_cfg and z.shape[0] == 2 * ctx.batch_size) else BRANCHES[:1]
        positions = torch.arange(self.buffer_size, self.num_positions, device=z.device).expand(z.shape[0], -1)
        buf, s = self._step, ctx.step
        z_key = (OUTPUT.start, tuple(z[:, :, None, None].shape), z.dtype, id(positions), branches)
        buf.features[z_key] = [(len(self.layers) - 1, z[:, :, None, None], positions)]
        for key, members in buf.features.items():
            self._token_statistics(members, key, ctx)
        buf.features = {}
        self._earlier = {}
        buf.head_changes.add(buf.head_stash)
        buf.head_stash = []
        arrays = self._device_arrays
        arrays["token_cosine"][:, s] = buf.token_cosine
        arrays["token_norm"][:, s] = buf.token_norm
        arrays["cfg"][:, s] = buf.cfg
        # head: mean over the tokens each sample decodes at this step
        B = ctx.batch_size
        sums = buf.head.new_zeros(buf.head.shape[:2] + (B,)).index_add_(2, buf.head_samples, buf.head)
        counts = torch.full((B,), buf.num_tokens // max(B, 1), dtype=sums.dtype, device=sums.device)
        arrays["head_change"][:, s] = (sums / counts).permute(2, 0, 1)
        self._step = None

    def on_generation_end(self, model: MAR, tokens: Tensor) -> None:
        if not self._active:
            return
        self._active = False
        self._previous, self._earlier = {}, {}
        for name, array in self._arrays.items():
            if self._device_arrays[name].device.type != "cpu":
                array[...] = self._device_arrays[name].cpu().numpy()  # the batch's one copy to the host
        self._device_arrays = {}
        B = tokens.shape[0]
        samples = np.arange(self.next_sample, self.next_sample + B)
        self.next_sample += B
        cfg = self._arrays.pop("cfg")
        variables = {**self._arrays, "tokens": tokens.float().cpu().numpy()}
        for k, name in enumerate(CFG_STATS):
            variables[f"cfg_{name}"] = cfg[:, :, :, k]
        batch = np.full(B, -1 if self.next_batch_index is None else self.next_batch_index, dtype=np.int64)
        self._batches.append(make_dataset(
            variables, samples=samples, labels=self._labels, batch=batch, mask_ratio=self._mask_ratio,
            cfg_scale=self._cfg_scale, layers=self.layers, head_parts=self.head_parts,
            buffer_size=self.buffer_size, grid_size=self.model.config.grid_size, attrs=self.attributes()))
        self._arrays = {}

    # --- results ------------------------------------------------------------------------------------------
    def attributes(self, settings: Optional[SamplingSettings] = None) -> dict[str, Any]:
        """The dataset attributes: model, config, sampling settings (those recorded unless given), seed, ..."""
        s = settings or self._settings or SamplingSettings()
        return {
            "model": self.model_name, "config": json.dumps(self.model.config.to_dict(), sort_keys=True),
            "num_iter": s.num_iter, "cfg": float(s.cfg), "temperature": float(s.temperature),
            "cfg_schedule": s.cfg_schedule, "seed": -1 if self.seed is None else int(self.seed),
            "schedule": self.schedule, **self.extra_attrs,
        }

    def take_batches(self) -> list[xr.Dataset]:
        """The batches recorded since the last call (and forget them): for streaming writers."""
        batches, self._batches = self._batches, []
        return batches

    def to_dataset(self) -> xr.Dataset:
        """All recorded batches as one Dataset along ``sample``."""
        if not self._batches:
            raise RecordingError("nothing recorded: run generate() inside the recorder's with-block")
        return concat_batches(self._batches)

    # --- transformer hooks --------------------------------------------------------------------------------
    def _on_features(self, layer: int, kinds: slice, feats: Tensor, rows_of: RowsOf) -> None:
        ctx = current_step()
        if ctx is None or not self._active or self._step is None or ctx.phase != "transformer":
            return
        rows, branches = rows_of(ctx, feats.shape[1]), tuple(ctx.branches)
        if feats.shape[0] != len(branches) * ctx.batch_size:
            raise RecordingError(f"network batch of {feats.shape[0]} rows does not match branches {branches} "
                                 f"x {ctx.batch_size} samples")
        key = (kinds.start, tuple(feats.shape), feats.dtype, None if rows is None else id(rows), branches)
        group = self._step.features.setdefault(key, [])
        group.append((layer, feats, rows))
        if len(group) == LAYER_CHUNK:  # bound the stash: compute the chunk now
            self._token_statistics(self._step.features.pop(key), key, ctx)

    def _decoder_rows(self, ctx: StepContext, n: int) -> Optional[Tensor]:
        if ctx.decoder_rows is None and n != self.num_positions:
            raise RecordingError(f"a decoder block ran {n} of {self.num_positions} rows but ctx.decoder_rows "
                                 "does not say which")
        return ctx.decoder_rows

    def _encoder_rows(self, ctx: StepContext, n: int) -> Tensor:
        if ctx.encoder_rows is not None:
            return ctx.encoder_rows
        buf = self._step
        if buf.encoder_positions is None:
            visible = ~self.model.with_buffer(ctx.unknown)
            buf.encoder_positions = visible.nonzero()[:, 1].reshape(ctx.batch_size, -1)
        if buf.encoder_positions.shape[1] != n:
            raise RecordingError(f"an encoder block ran {n} rows, not the buffer and known positions "
                                 f"({buf.encoder_positions.shape[1]}), and ctx.encoder_rows is not set")
        if buf.encoder_rows is None or buf.encoder_rows.shape[0] != len(ctx.branches) * ctx.batch_size:
            buf.encoder_rows = buf.encoder_positions.repeat(len(ctx.branches), 1)
        return buf.encoder_rows

    def _token_statistics(self, members: list[tuple[int, Tensor, Optional[Tensor]]], key: tuple,
                          ctx: StepContext) -> None:
        """Stashed features of layers run on the same rows -> their token cosines and CFG statistics, in one
        batched computation (the encoder blocks, the decoder blocks, z; outputs and K/V apart)."""
        B, P, step, buf, previous = ctx.batch_size, self.num_positions, ctx.step, self._step, self._earlier
        start, branches = key[0], key[4]
        kinds = OUTPUT if start == OUTPUT.start else KEYS_VALUES
        keep = BRANCHES if (kinds == OUTPUT and "uncond" in branches) else ("cond",)
        stacked = torch.stack([feats for _, feats, _ in members])               # (L, NB, n, K, G, d)
        full, valid = features_at_positions(stacked, members[0][2], branches, keep, B, P)
        valid = valid.expand(len(members), -1, -1)
        layers = tuple(layer for layer, _, _ in members)
        current = LayerFeatures(step, layers, full, valid, B, with_cfg=len(keep) == 2)
        if kinds == OUTPUT:  # the norms of every step (absolute change = norms and cosine)
            norms = torch.where(valid[:, :B], current.cond_norms.flatten(2), float("nan"))  # (L, B, P)
            buf.token_norm[:, list(layers)] = norms.transpose(0, 1)
        for i, layer in enumerate(layers):
            self._previous[(layer, kinds.start)] = (current, i)
        earlier = [previous.pop((layer, kinds.start), (None, 0)) for layer in layers]
        if earlier[0][0] is not None and earlier[0][0].layers == layers:  # the same group ran at step - 1
            if earlier[0][0].step == step - 1:
                self._compare(buf, kinds, current, earlier[0][0], B)
            return
        by_group: dict[int, list[int]] = {}  # the layers that ran at both steps, by their group at step - 1
        for i, (p, _) in enumerate(earlier):
            if p is not None and p.step == step - 1:
                by_group.setdefault(id(p), []).append(i)
        for both in by_group.values():
            before = earlier[both[0]][0].rows([earlier[i][1] for i in both])
            self._compare(buf, kinds, current.rows(both), before, B)

    @staticmethod
    def _compare(buf: _StepBuffers, kinds: slice, now: LayerFeatures, before: LayerFeatures, B: int) -> None:
        """Layers' stacked features against their previous step's -> this step's statistics of those layers."""
        layers = now.layers
        where = (slice(layers[0], layers[-1] + 1) if layers == tuple(range(layers[0], layers[-1] + 1))
                 else torch.tensor(layers, device=now.units.device))
        buf.token_cosine[:, where, kinds] = token_cosines(now, before, B)
        if now.features is not None and before.features is not None:
            buf.cfg[:, where] = cfg_statistics(now, before, B)

    # --- diffusion-head hooks -----------------------------------------------------------------------------
    def _head_step(self) -> Optional[_StepBuffers]:
        ctx = current_step()
        if ctx is None or not self._active or self._step is None or ctx.phase != "head":
            return None
        return self._step

    def _on_head_call(self, module: torch.nn.Module, args: tuple) -> None:
        buf = self._head_step()
        if buf is not None:
            buf.head_index += 1
            buf.current_head = HeadStep(buf.head_index)
            if len(buf.head_stash) >= HEAD_CHUNK:  # bound the stash: compute what is there
                buf.head_changes.add(buf.head_stash)
                buf.head_stash = []

    def _res_block_hook(self, k: int):
        def hook(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            head = self._step.current_head if self._step is not None else None  # set only in the head phase
            if head is not None:
                head.blocks[k] = (args[0], out)
        return hook

    def _on_head_output(self, module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        buf = self._step
        if buf is None or buf.current_head is None:
            return
        if 0 <= buf.head_index < self.head_steps:
            buf.current_head.output = out
            buf.head_stash.append(buf.current_head)
        buf.current_head = None
