"""Tuned step tables as files: a learned table, what it was learned for, and how a run finds it.

A tuned table (`ddpm_fast.tuning` learns one) is a `StepTable` with method "tuned": the base method's
timesteps and columns with C_XT, C_X0 and the history weights learned for one model, schedule and NFE. Its
file is safetensors (`coefs`, `timesteps`; metadata: the model's weights digest, the schedule's digest, the
NFE, the base method), refused in one line on any other model, schedule or NFE. A native checkpoint carries
its tables as `tuned/nfe-<N>.safetensors` in its directory; `method="tuned", steps=N` runs the one for N.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddpm_fast.errors import BadType, BadValue
from ddpm_fast.schedule import Schedule
from ddpm_fast.shards import atomic_write_bytes
from ddpm_fast.steps import COLUMNS, StepTable
from ddpm_fast.weights import model_digest

__all__ = [
    "TunedTable",
    "save_tuned",
    "load_tuned",
    "schedule_digest",
    "carried_tables",
    "tuned_table_for",
    "tuned_digest_of",
    "find_carried",
    "FORMAT",
    "TUNED_DIR",
]

FORMAT = "ddpm-fast-tuned-1"
TUNED_DIR = "tuned"  # inside a native checkpoint directory: nfe-<N>.safetensors
_NAME = re.compile(r"^nfe-([1-9][0-9]*)\.safetensors$")


def schedule_digest(schedule: Schedule) -> str:
    """sha256 of the schedule's betas rounded to float32 (the whole schedule is a function of them).

    Not the float64 bytes: torch.linspace's float64 last bits depend on the CPU kernel that ran it (the scalar
    kernel of ATEN_CPU_CAPABILITY=default, or an ARM CPU, rounds otherwise than AVX2/AVX-512), so the same
    schedule would name two digests and a bundled table be refused on some machines. A float64 difference of a
    few ulps moves a float32 rounding only when a beta lies within those ulps of a float32 midpoint (odds
    about 2^-29 a value); two schedules that agree to float32 sample the same float32 chain."""
    b = schedule.betas.detach().to("cpu", torch.float64).to(torch.float32).contiguous()
    return hashlib.sha256(b.numpy().tobytes()).hexdigest()


class TunedTable:
    """A learned table with what it was learned for; `.table` is the StepTable every backend runs."""

    def __init__(self, table: StepTable, *, model: str, schedule: str, base: str, nfe: int, info: dict):
        self.table, self.model, self.schedule, self.base, self.nfe = table, model, schedule, base, nfe
        self.info = dict(info)

    def digest(self) -> str:
        """sha256 naming the table (what a run manifest records): its float64 coefficients, int64 timesteps
        and what it was learned for; not the file bytes, whose header order safetensors does not fix."""
        h = hashlib.sha256()
        h.update(
            f"{FORMAT};{self.model};{self.schedule};{self.base};{self.nfe};{self.table.history};".encode()
        )
        h.update(self.table.coefs.to(torch.float64).contiguous().numpy().tobytes())
        h.update(self.table.timesteps.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT,
            "model": self.model,
            "schedule": self.schedule,
            "base": self.base,
            "nfe": str(self.nfe),
            "history": str(self.table.history),
            "variance": self.table.variance,
            "info": json.dumps(self.info, sort_keys=True),
        }
        tensors = {"coefs": self.table.coefs.contiguous(), "timesteps": self.table.timesteps.contiguous()}
        return st_save(tensors, metadata=meta)


def save_tuned(tuned: TunedTable, path) -> None:
    """Write the table atomically (a reader never sees a half-written file)."""
    atomic_write_bytes(str(path), tuned.to_bytes())


def load_tuned(
    path, *, model=None, schedule: Schedule | None = None, nfe: int | None = None, digest: str | None = None
) -> TunedTable:
    """Read a tuned table; a corrupt or truncated file, or one learned for another model (or weights
    `digest`), schedule or NFE (when those are given), is a ValueError of one line naming `tuned`."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise BadValue(f"tuned: cannot read {path}: {e.strerror}") from e
    try:
        tensors = st_load(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__", {})
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise BadValue(f"tuned: {path} is not a tuned table (corrupt or truncated safetensors)") from e
    if meta.get("format") != FORMAT or set(tensors) != {"coefs", "timesteps"}:
        raise BadValue(f"tuned: {path} is not a tuned table (format {meta.get('format')!r}, want {FORMAT!r})")
    coefs, ts = tensors["coefs"].to(torch.float64), tensors["timesteps"].to(torch.int64)
    try:
        k, S, history = int(meta["nfe"]), ts.numel(), int(meta["history"])
    except (KeyError, ValueError) as e:
        raise BadValue(f"tuned: {path} has a damaged header (nfe/history)") from e
    if coefs.shape != (S, len(COLUMNS) + history) or k != S or not torch.isfinite(coefs).all():
        raise BadValue(f"tuned: {path} has inconsistent tables (coefs {tuple(coefs.shape)}, {S} timesteps)")
    table = StepTable(
        coefs=coefs,
        timesteps=ts,
        method="tuned",
        variance=meta.get("variance", "fixed_small"),
        eta=0.0,
        history=history,
        draws=(False,) * S,
    )
    info = json.loads(meta.get("info", "{}"))
    tuned = TunedTable(
        table,
        model=meta.get("model", ""),
        schedule=meta.get("schedule", ""),
        base=meta.get("base", ""),
        nfe=k,
        info=info,
    )
    if digest is None and model is not None:
        digest = tuned_digest_of(model)
    _check_fits(tuned, str(path), digest, schedule, nfe)
    return tuned


def _check_fits(t: TunedTable, name: str, digest: str | None, schedule: Schedule | None, nfe) -> None:
    """One line naming `tuned` where the table was learned for another model, schedule or NFE (each checked
    when given)."""
    if digest is not None and t.model != digest:
        raise BadValue(f"tuned: {name} was learned for another model (weights digest {t.model[:12]})")
    if schedule is not None and t.schedule != schedule_digest(schedule):
        raise BadValue(f"tuned: {name} was learned for another schedule")
    if nfe is not None and t.nfe != nfe:
        raise BadValue(f"tuned: {name} is a table for {t.nfe} NFE; got steps={nfe}")


def tuned_digest_of(model) -> str:
    """The weights digest a tuned table for `model` records: an exported ONNX file's `source_digest` (the
    Module it was exported from), else `ddpm_fast.weights.model_digest` of its float32 weights."""
    meta = getattr(model, "metadata", None)
    if isinstance(meta, dict) and meta.get("source_digest"):
        return str(meta["source_digest"])
    if isinstance(model, torch.nn.Module) and any(
        t.is_floating_point() and t.dtype != torch.float32 for t in model.state_dict().values()
    ):  # the same weights in another dtype (a float64 oracle, a float16 copy) are the same model
        return model_digest(copy.deepcopy(model).float())
    return model_digest(model)


def carried_tables(model) -> dict[int, Path]:
    """{NFE: file} of the tuned tables a loaded checkpoint carries (`model.tuned_tables`, set on load)."""
    found = getattr(model, "tuned_tables", None)
    return dict(found) if isinstance(found, dict) else {}


def find_carried(directory: Path) -> dict[int, Path]:
    """{NFE: file} of `directory/tuned/nfe-<N>.safetensors` (what checkpoint loading attaches)."""
    folder = Path(directory) / TUNED_DIR
    if not folder.is_dir():
        return {}
    out = {}
    for f in folder.iterdir():
        m = _NAME.match(f.name)
        if m and f.is_file():
            out[int(m.group(1))] = f
    return dict(sorted(out.items()))


def tuned_table_for(model, schedule: Schedule, steps, tuned) -> TunedTable:
    """The tuned table a run asked for: `tuned` (a path or a TunedTable) or, without it, the one `model`'s
    checkpoint carries for `steps` NFE; checked against the model, the schedule and the NFE."""
    if tuned is None:
        carried = carried_tables(model)
        if steps is None:
            raise BadValue(
                "method='tuned' needs steps=N (the NFE of a table the checkpoint carries: "
                f"{sorted(carried) or 'none'}) or tuned=PATH"
            )
        if steps not in carried:
            raise BadValue(
                f"method='tuned': the model carries tuned tables for NFE {sorted(carried) or 'none'}; got "
                f"steps={steps} (learn one with `ddpm-fast tune --nfe {steps}` and pass tuned=PATH)"
            )
        tuned = carried[steps]
    if isinstance(tuned, TunedTable):
        _check_fits(tuned, "the TunedTable", tuned_digest_of(model), schedule, steps)
        return tuned
    if not isinstance(tuned, (str, Path)):
        raise BadType(f"tuned must be a path or a ddpm_fast.TunedTable; got {type(tuned).__name__}")
    return load_tuned(tuned, digest=tuned_digest_of(model), schedule=schedule, nfe=steps)
