"""The cache-mechanism protocol: a toy fifth mechanism, defined in this file alone and added to the engine's list,
runs inside the engine, is priced by the analytic FLOPs model, and the ledger and the estimate agree."""
import pytest
import torch

from lazymar.cache import flops as F
from lazymar.cache.engine import CacheEngine, default_mechanisms, estimate_generation_flops
from lazymar.cache.head import HeadCache
from lazymar.cache.mechanism import CacheMechanism, EngineRun, StepPrice, TransformerPass
from lazymar.cache.schedule_file import load_schedule
from lazymar.sampling import SamplingSettings, StepContext, generate, rows_at
from builders import tiny_model

LABELS = [1, 7, 3]
NUM_ITER = 6
CLASSES = 10


class ClassifierProbe(CacheMechanism):
    """A linear read-out (decoder width -> 10 classes) of the last decoder block's output at the cond rows'
    to-predict positions, at every step: it keeps the logits and counts its calls, and charges its matrix product
    to the decoder. It changes nothing that the sampler computes."""

    def __init__(self) -> None:
        self.calls, self.logits, self.ledger, self.weight = 0, [], None, None

    def start(self, run: EngineRun) -> None:
        generator = torch.Generator().manual_seed(0)
        width = run.model.config.decoder_embed_dim
        self.weight = torch.randn(width, CLASSES, generator=generator).to(next(run.model.parameters()).device)
        self.ledger, self.calls, self.logits = run.ledger, 0, []

    def run_output(self, ctx: StepContext, step: TransformerPass) -> None:
        cond = step.x[: ctx.batch_size, ctx.model.buffer_size:]              # (B, seq, width)
        rows = rows_at(cond, ctx.to_predict_positions)                     # (B * to_predict, width)
        self.logits.append(rows @ self.weight.to(rows.dtype))
        self.ledger.add("decoder", F.linear_flops(rows.shape[0], rows.shape[1], CLASSES))
        self.calls += 1

    def flops(self, price: StepPrice) -> dict[str, int]:
        rows = price.batch_size * price.counts.to_predict
        return {"decoder": F.linear_flops(rows, price.config.decoder_embed_dim, CLASSES)}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_a_fifth_mechanism_runs_is_priced_and_the_ledger_matches_the_estimate(model, cfg):
    settings = SamplingSettings(num_iter=NUM_ITER, cfg=cfg)
    schedule = load_schedule("lazymar", NUM_ITER, model.config)
    four = CacheEngine(schedule, torch.float32)
    probe = ClassifierProbe()
    five = CacheEngine(schedule, torch.float32, mechanisms=default_mechanisms() + [probe])
    plain_tokens = generate(model, LABELS, settings, seed=0, runner=four)
    probed_tokens = generate(model, LABELS, settings, seed=0, runner=five)

    assert probe.calls == NUM_ITER  # it ran at every step, beside the four mechanisms
    assert sum(len(logits) for logits in probe.logits) == len(LABELS) * model.seq_len  # every token read once
    assert torch.equal(probed_tokens, plain_tokens)  # and changed nothing the sampler computes

    use_cfg = cfg != 1.0
    estimate = estimate_generation_flops(model.config, schedule, len(LABELS), use_cfg,
                                         mechanisms=default_mechanisms() + [ClassifierProbe()])
    assert five.flops.steps == estimate.steps  # the ledger of the run is the analytic model's, step by step
    probe_flops = F.linear_flops(len(LABELS) * model.seq_len, model.config.decoder_embed_dim, CLASSES)
    assert five.flops.totals()["decoder"] - four.flops.totals()["decoder"] == probe_flops
    assert estimate.total - estimate_generation_flops(model.config, schedule, len(LABELS), use_cfg).total == probe_flops


def test_the_engine_runs_only_the_mechanisms_it_is_given(model):
    """Without a head mechanism nothing samples the head: the engine says so instead of returning nothing."""
    schedule = load_schedule("none", 2, model.config)
    headless = [m for m in default_mechanisms() if not isinstance(m, HeadCache)]
    with pytest.raises(RuntimeError, match="no cache mechanism sampled the head"):
        generate(model, LABELS, SamplingSettings(num_iter=2, cfg=3.0), seed=0,
                 runner=CacheEngine(schedule, mechanisms=headless))
