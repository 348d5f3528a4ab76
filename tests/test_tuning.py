"""Tuned step tables (ddpm_fast.tuning): the table walk equals the base method's reference loop, the tuner
lowers the held-out distance to its teacher, and a table file is refused on another model, NFE or when damaged."""

from __future__ import annotations

import copy

import pytest
import torch

import ddpm_fast as df
from ddpm_fast.tuning import _base_table, load_tuned, run_table, tune


@pytest.fixture(scope="module")
def model():
    return df.default_model()


@pytest.fixture(scope="module")
def tuned(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tuned") / "t.safetensors"
    t = tune(
        model, base="unipc", nfe=3, train=16, val=16, iters=10, teacher_steps=20, out=path, log=lambda s: None
    )
    return t, path


def test_table_walk_equals_base_reference_loop(model):
    # run_table walks the table columns; the base loop runs the solver's natural update. The two differ only
    # in the order of a few float64 multiply-adds per step (~1e-16 relative each, 4 steps, |x| <= ~5):
    # 1e-12 leaves three orders of margin.
    s = model.defaults.schedule
    table = _base_table(s, "unipc", 4, "fixed_small")
    xT = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    m64 = copy.deepcopy(model).to(torch.float64).eval()
    from ddpm_fast.samplers import family

    with torch.no_grad():
        ref = family("unipc").loop(
            lambda x, t: (m64(x, torch.full((x.shape[0],), t, dtype=torch.int64)), None),
            xT.clone(),
            table,
            lambda i, t: torch.zeros_like(xT),  # unipc draws no noise (SIGMA = 0); the loop still multiplies
            sigma=None,
            clip=lambda x0: x0,
        )
    with torch.no_grad():
        ours = run_table(m64, xT.clone(), table.coefs, table.timesteps, table.history)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)


def test_tuner_improves_held_out_and_round_trips(model, tuned):
    t, path = tuned
    assert (
        t.info["rmse_after"] <= t.info["rmse_before"]
    )  # the best validation point, never worse than the start
    back = load_tuned(path, model=model, schedule=model.defaults.schedule, nfe=3)
    assert torch.equal(back.table.coefs, t.table.coefs)
    assert torch.equal(back.table.timesteps, t.table.timesteps)
    assert back.digest() == t.digest()


def test_refused_on_other_nfe_model_and_damage(model, tuned, tmp_path):
    _, path = tuned
    with pytest.raises(ValueError, match="tuned: .* table for 3 NFE; got steps=5"):
        load_tuned(path, nfe=5)
    other = df.UNet(df.UNetConfig.digits())  # same architecture, fresh weights: another digest
    with pytest.raises(ValueError, match="another model"):
        load_tuned(path, model=other)
    with pytest.raises(ValueError, match="another schedule"):
        load_tuned(path, schedule=df.Schedule.cosine(1000))
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_tuned(cut)


def test_cli_tune_bad_input_is_one_line(capsys):
    from ddpm_fast.cli import main

    assert main(["tune", "--base", "nope", "--nfe", "5", "--out", "x.safetensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method must be one of" in err[0]
    assert main(["tune", "--nfe", "5", "--out", "x.pt"]) == 2
    assert "--out must end in .safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("base", ["ipndm", "deis"])
def test_eps_history_bases_are_refused(model, base):
    """run_table and the file header read a history of x0 predictions; iPNDM and DEIS keep eps."""
    with pytest.raises(ValueError, match=f"base must keep x0 predictions in its history .*got '{base}'"):
        tune(model, base=base, nfe=5, train=1, val=1, iters=1, teacher_steps=5, log=lambda s: None)
