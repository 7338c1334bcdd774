"""What a job will cost: a model's work per token, the calibration table, and the estimate from them.

The cost model is the simplest that calibrations can pin down: one model actor spends

    prompt tokens / prefill rate  +  decoded tokens / decode rate  +  images / image rate

seconds (a classify task's scored candidate tokens are priced as decoder work at the prefill's
arithmetic rate: they pass the decoder all at once), where each rate is a measured one (a row of
CALIBRATIONS, or a timed run made now by `t5g2 run --dry-run --calibrate`) moved to the job's model
shape by the ratio of the work per token (ModelCost: 2 x the weights each token passes through).
Actors work in parallel on disjoint rows, so wall time is that total over the actors; GPU-hours are
actor-hours times gpus_per_actor.

What it leaves out, on purpose (the dry run says so): attention's growth with prompt length (the
rates are measured at a few hundred tokens), model loading (once per actor), the CPU stages (read,
prepare, finish run beside the model), and batch shapes (rates are measured with full batches of
rows; a job whose calls hold few rows runs slower per row). Moving a rate from one shape to another
by work per token is rough on CPUs at small shapes, where per-operation overhead rather than
arithmetic sets the time; an estimate from a calibration of another shape says so.

CALIBRATIONS mirrors the table "Dry-run calibration" in docs/perf.md (a test keeps the two equal).
There is no GPU row yet: no GPU has been lent to this project. A GPU job is then priced from the
CPU rows, and the estimate says plainly that it is a CPU figure.

Not here: sampling and tokenizing rows (dryrun.py), the timed calibration run (jobs/calibrate.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelCost:
    """The work (floating-point operations, 2 per multiply-add) one unit of input costs a model."""

    prefill_per_token: float  # a prompt token: the encoder's layers and each decoder layer's cross keys/values
    decode_per_token: float  # a decoded token (per beam): the decoder's layers and the LM head over the vocabulary
    per_image: float  # an image: the vision tower over its patches and the projection


def _text_layer_weights(t) -> int:
    """Weights of one text layer: q, k, v, o projections and the GeGLU MLP (gate, up, down)."""
    attention = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    return attention + 3 * t.hidden_size * t.intermediate_size


def model_cost(config) -> ModelCost:
    """ModelCost of a T5Gemma2Config (model.config), from its shapes alone."""
    e, d, v = config.encoder, config.decoder, config.vision
    cross_kv = d.num_layers * 2 * d.hidden_size * d.num_kv_heads * d.head_dim  # once per prompt token
    prefill = 2 * (e.num_layers * _text_layer_weights(e) + cross_kv)
    decode = 2 * (d.num_layers * _text_layer_weights(d) + d.hidden_size * config.vocab_size)
    patches = (v.image_size // v.patch_size) ** 2
    vision_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    image = 2 * (patches * v.num_layers * vision_layer + config.mm_tokens_per_image * v.hidden_size * e.hidden_size)
    return ModelCost(float(prefill), float(decode), float(image))


@dataclass(frozen=True)
class Calibration:
    """Rates measured on one machine at one model shape (a row of docs/perf.md's table, or measured now)."""

    name: str  # the row's name in docs/perf.md ("measured now" for --calibrate)
    device: str  # "cpu" or "cuda"
    machine: str  # what was measured: CPU model and cores, or the GPU card
    shape: str  # the model shape measured (demo, small, 270m, ... or "this job's")
    dtype: str  # compute dtype
    threads: int  # torch threads (CPU); 0 on a GPU
    rows: int  # requests per timed run (the batch the rates hold for)
    prefill_tokens_per_s: float  # prompt tokens per second
    decode_tokens_per_s: float  # decoded tokens per second, summed over the batch's rows
    images_per_s: float | None  # images per second through the vision tower (None: not measured)
    prefill_flops: float  # ModelCost.prefill_per_token of the measured shape
    decode_flops: float  # ModelCost.decode_per_token of the measured shape
    image_flops: float  # ModelCost.per_image of the measured shape
    date: str  # when it was measured

    def as_dict(self) -> dict:
        return asdict(self)


# Measured on the build machine with `python -m jobs.calibrate` (docs/perf.md, "Dry-run calibration").
_BUILD_MACHINE = "AMD EPYC, 1 thread(s) on 2 core(s)"
CALIBRATIONS: tuple[Calibration, ...] = (
    Calibration(name="cpu-demo", device="cpu", machine=_BUILD_MACHINE, shape="demo", dtype="float32", threads=1,
                rows=32, prefill_tokens_per_s=43833.0, decode_tokens_per_s=13457.8, images_per_s=None,
                prefill_flops=491500.0, decode_flops=704500.0, image_flops=2163000.0, date="2026-12-02"),
    Calibration(name="cpu-small", device="cpu", machine=_BUILD_MACHINE, shape="small", dtype="float32", threads=1,
                rows=32, prefill_tokens_per_s=4839.9, decode_tokens_per_s=2753.6, images_per_s=None,
                prefill_flops=11800000.0, decode_flops=15600000.0, image_flops=8913000.0, date="2026-12-02"),
    Calibration(name="cpu-270m", device="cpu", machine=_BUILD_MACHINE, shape="270m", dtype="float32", threads=1,
                rows=16, prefill_tokens_per_s=358.6, decode_tokens_per_s=69.6, images_per_s=None,
                prefill_flops=212300000.0, decode_flops=536100000.0, image_flops=3368000000000.0, date="2026-12-02"),
)


@dataclass(frozen=True)
class Work:
    """What a job (or what is left of it) asks of the model actors, summed over its tasks."""

    rows: int  # rows to compute
    prompt_tokens: float  # prompt tokens over all tasks (images' tokens included)
    decode_tokens: float  # tokens decoded, beams counted (an upper bound: every row to max_new_tokens)
    images: float  # images through the vision tower (once per image task and row)
    decode_tokens_typical: float | None = None  # the same at the typical output length, when one is known
    scored_tokens: float = 0.0  # classify: candidate tokens scored in one teacher-forced decoder pass per row


def pick(calibrations: tuple[Calibration, ...], device: str, cost: ModelCost) -> tuple[Calibration | None, str]:
    """The calibration to price a job with on `device` ("cpu" | "cuda"), and a note saying what it is:
    one of that device kind at the shape nearest by decode work; none of that kind (no GPU row yet)
    -> the nearest CPU row, with a note that says so."""
    same = [c for c in calibrations if c.device == device]
    note = ""
    if not same:
        same = [c for c in calibrations if c.device == "cpu"]
        note = (f"no {device.upper()} calibration has been measured yet (no such device was lent to this project); "
                f"the figures below are a CPU calibration's, not a {device.upper()} estimate")
    if not same:
        return None, "no calibration at all"
    best = min(same, key=lambda c: abs(math.log(c.decode_flops / cost.decode_per_token)))
    return best, note


def scaled(cal: Calibration, cost: ModelCost, threads: int) -> dict:
    """The calibration's rates moved to a model of `cost` (and, on CPU, to `threads` torch threads,
    assumed linear), with how far each was moved."""
    thread_factor = max(1, threads) / max(1, cal.threads) if cal.device == "cpu" else 1.0
    factors = {"prefill": cal.prefill_flops / cost.prefill_per_token,
               "decode": cal.decode_flops / cost.decode_per_token,
               "image": cal.image_flops / cost.per_image if cost.per_image else 1.0}
    # A row without an image rate (a tower too slow to time there): its work at the prefill's arithmetic rate.
    images_per_s = cal.images_per_s or cal.prefill_tokens_per_s * cal.prefill_flops / cal.image_flops
    return {
        "prefill_tokens_per_s": cal.prefill_tokens_per_s * factors["prefill"] * thread_factor,
        "decode_tokens_per_s": cal.decode_tokens_per_s * factors["decode"] * thread_factor,
        "images_per_s": images_per_s * factors["image"] * thread_factor,
        "images_timed": cal.images_per_s is not None,
        "shape_factors": factors,
        "thread_factor": thread_factor,
        "same_shape": all(abs(math.log(f)) < 0.01 for f in factors.values()),
    }


def estimate(work: Work, cost: ModelCost, *, device: str, threads: int, min_actors: int, max_actors: int,
             gpus_per_actor: float, calibration: Calibration | None = None,
             calibrations: tuple[Calibration, ...] = CALIBRATIONS) -> dict:
    """Actor-hours, GPU-hours and wall time of `work`, from `calibration` (measured now) or the table."""
    note = ""
    if calibration is None:
        calibration, note = pick(calibrations, device, cost)
    if calibration is None:
        return {"calibration": None, "note": note}
    rates = scaled(calibration, cost, threads)
    if work.images and not rates["images_timed"]:
        note = "; ".join(n for n in (note, f"images priced at the prefill's arithmetic rate (the tower was not timed "
                                           f"at shape {calibration.shape!r})") if n)
    if not rates["same_shape"]:
        moved = ", ".join(f"{k} x{v:.3g}" for k, v in rates["shape_factors"].items())
        moved_note = (f"moved from shape {calibration.shape!r} by work per token ({moved}): rough, small shapes on "
                      f"CPU are bound by per-operation overhead")
        note = "; ".join(n for n in (note, moved_note) if n)

    # Scored tokens pass the decoder and the LM head as a decoded token does, but all at once, as a
    # prompt passes the encoder: their work at the prefill's arithmetic rate.
    scored_per_s = rates["prefill_tokens_per_s"] * cost.prefill_per_token / cost.decode_per_token

    def seconds(decode_tokens: float) -> float:
        total = work.prompt_tokens / rates["prefill_tokens_per_s"] + decode_tokens / rates["decode_tokens_per_s"]
        return total + work.images / rates["images_per_s"] + work.scored_tokens / scored_per_s

    def figures(decode_tokens: float) -> dict:
        actor_s = seconds(decode_tokens)
        return {"actor_hours": actor_s / 3600, "gpu_hours": actor_s * gpus_per_actor / 3600,
                "wall_hours_at_max_actors": actor_s / max_actors / 3600,
                "wall_hours_at_min_actors": actor_s / min_actors / 3600}

    return {
        "calibration": calibration.as_dict(),
        "note": note,
        "rates": {k: rates[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "images_per_s")},
        "upper_bound": figures(work.decode_tokens),
        "typical": figures(work.decode_tokens_typical) if work.decode_tokens_typical is not None else None,
    }
