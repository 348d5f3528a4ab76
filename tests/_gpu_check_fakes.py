"""benchmarks/gpu_check.py with fake sections that stand in for what can go wrong on a lent machine.

    python -u tests/_gpu_check_fakes.py --dry-run --out DIR [--only raises,tests,hang,budget,peer,modes]

The dry run's CPU sections, then: one raises, a pytest run outlives its section (a pass, a failure and a
test that sleeps), one ignores SIGINT after a row (SIGKILL), one's rows overrun its time, one checks a peer
that is not installed, one never fits the budget. gpu_check starts every child as `python THIS_FILE
--section NAME`, so the children know these sections too. tests/test_gpu_check.py runs it, and runs the
headline section in its own process with `headline_conf()` (a provider that raises) and
`compile_failing_at_batch_1` in place of the dry run's stand-in compile.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402
from gpu_check import Context, Section  # noqa: E402

# the pytest section's tests, in a fresh temporary folder (out of this tree's pytest configuration)
FAKE_TESTS = (
    "import time\n\n"
    "def test_passes():\n    assert True\n\n"
    "def test_fails():\n    assert 1 == 2, 'dry run: a failing test'\n\n"
    "def test_outlives_the_section():\n    time.sleep(60)\n"
)


RAISES = (
    "raises (dry run)"  # a provider whose spec resolve_options rejects (TypeError): an error row per batch
)


def headline_conf() -> gpu_check.Conf:
    """The dry configuration whose headline has the provider that raises (imports torch)."""
    conf, specs = gpu_check.DRY_CONF, gpu_check._specs(True)
    return replace(
        conf,
        headline=((4, 1), ("reference", "fast-bf16", RAISES, "diffusers")),
        specs={**specs, RAISES: dict(specs["fast"], compile="yes")},
        need=dict(conf.need),
    )


def compile_failing_at_batch_1():
    """The dry run's stand-in compile, except that a call at batch 1 fails as inductor might: the fast provider
    falls back to eager there (batch 1 gets its own runner: the engine pads to a prepared size at most 2x),
    and its row must be labelled."""
    import torch

    def compile_(fn, **kw):
        def call(*args, **kwargs):
            if args and isinstance(args[0], torch.Tensor) and args[0].shape[0] == 1:
                raise RuntimeError("dry run: simulated compile failure at batch 1")
            return fn(*args, **kwargs)

        return call

    torch.compile = compile_


def section_raises(ctx: Context) -> int:
    raise RuntimeError("dry run: a section that raises")


def section_hang(ctx: Context) -> int:
    ctx.emit(
        {"kind": "note", "text": "dry run: this row is written, then the section ignores SIGINT and sleeps"}
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(60)
    return 0


def section_budget(ctx: Context) -> int:
    for i in range(6):
        if not ctx.fits(0.5, provider=f"row {i}", batch=i):
            continue
        time.sleep(0.5)
        ctx.emit({"kind": "note", "text": f"dry run: row {i} took 0.5 s"})
    return 0


def section_peer(ctx: Context) -> int:
    gpu_check.peer_status(ctx)  # the dry configuration's peer is not installed
    return 0


CHILDREN = {"raises": section_raises, "hang": section_hang, "budget": section_budget, "peer": section_peer}


def sections(tests_dir: str) -> tuple:
    return (
        Section("raises", 30, 0, "fake: raises"),
        Section(
            "tests",
            4,
            0,
            "fake pytest run: a pass, a failure and a test that outlives the section",
            pytest=True,
            tests=(tests_dir,),
        ),
        Section("hang", 1, 0, "fake: ignores SIGINT after one row"),
        Section("budget", 2, 0, "fake: six rows of 0.5 s each in a 2 s section"),
        Section("peer", 30, 0, "fake: the peer check with a peer that is not installed"),
        Section("modes", 60, 1e9, "fake: never fits the budget"),
    )


def main(argv: list[str]) -> int:
    entry = str(Path(__file__).resolve())
    if "--section" in argv:  # a child runs one section, never pytest: no test folder to make
        return gpu_check.main(argv, entry=entry, children=CHILDREN)
    with tempfile.TemporaryDirectory(prefix="gpu_check_fake_tests_") as d:
        (Path(d) / "test_fake.py").write_text(FAKE_TESTS)
        return gpu_check.main(argv, entry=entry, sections=sections(d), children=CHILDREN)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
