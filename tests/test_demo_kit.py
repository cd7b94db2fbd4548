"""The demo kit (issue #11): `sdxl demo --kit-only`, interrupted builds leave no half model, the VAE fit shows progress.

The real kit build fits the VAE (about a minute on 2 free cores, many on a busy machine), so the
CLI test replaces the builders with fast fakes and checks the calls and the output; the interrupted
build runs the real builder with a random VAE (``quick``), which takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdxl_trainer import console, demo
from sdxl_trainer.cli import app
from sdxl_trainer.models import tiny, vae_fit

runner = CliRunner()


def _fake_builders(monkeypatch, calls: list):
    def fake_model(folder, *, seed, fit_vae, fit_threads):
        calls.append(("model", Path(folder).name, seed, fit_vae, fit_threads))
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model_index.json").write_text("{}")
        return Path(folder)

    def fake_data(folder, *, n, seed):
        calls.append(("data", Path(folder).name, n, seed))
        Path(folder).mkdir(parents=True)
        (Path(folder) / "0.png").write_bytes(b"")
        return Path(folder)

    monkeypatch.setattr(demo, "build_tiny_model", fake_model)
    monkeypatch.setattr(demo, "build_synthetic_dataset", fake_data)


def test_kit_only_builds_the_kit_and_trains_nothing(tmp_path, monkeypatch):
    calls: list = []
    _fake_builders(monkeypatch, calls)
    monkeypatch.setattr(demo, "_run", lambda *a, **k: pytest.fail("--kit-only must not run the stages"))
    monkeypatch.setattr(demo.loop, "run", lambda *a, **k: pytest.fail("--kit-only must not train"))

    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--kit-only", "--images", "7", "--seed", "3",
                                 "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    # built in sibling .partial folders, then renamed into place; the VAE is fitted (no --quick)
    assert calls == [("model", "model.partial", 3, True, 1), ("data", "data.partial", 7, 3)]
    assert (tmp_path / "model" / "model_index.json").is_file() and (tmp_path / "data" / "0.png").is_file()
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "runs").exists()
    assert "kit ready" in result.output and "nothing trained" in result.output
    assert str(tmp_path / "model") in result.output.replace("\n", "")

    calls.clear()  # a second run reuses the kit
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--kit-only"])
    assert result.exit_code == 0, result.output
    assert calls == [] and "build tiny model" not in result.output


def test_an_interrupted_build_leaves_no_model_and_the_next_one_succeeds(tmp_path, monkeypatch):
    real = demo.build_tiny_model

    def interrupted(folder, **kw):
        real(folder, **kw)  # a whole folder written …
        assert (Path(folder) / "unet").is_dir()
        raise KeyboardInterrupt  # … and Ctrl-C before it is in place

    monkeypatch.setattr(demo, "build_tiny_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.build_kit(tmp_path, n_images=4, quick=True, threads=1)
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()

    # a kill (no clean-up) leaves model.partial: the next run removes it and builds again
    monkeypatch.setattr(demo, "build_tiny_model", real)
    (tmp_path / "model.partial" / "unet").mkdir(parents=True)
    (tmp_path / "model.partial" / "unet" / "half.safetensors").write_bytes(b"half")
    kit = demo.build_kit(tmp_path, n_images=4, quick=True, threads=1)
    assert kit["model"] == tmp_path / "model" and not (tmp_path / "model.partial").exists()
    assert not (tmp_path / "model" / "unet" / "half.safetensors").exists()
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert len(list((tmp_path / "data").glob("*.txt"))) == 4


def test_a_half_model_from_an_older_version_is_rebuilt(tmp_path, monkeypatch):
    calls: list = []
    _fake_builders(monkeypatch, calls)
    (tmp_path / "model" / "vae").mkdir(parents=True)  # no model_index.json
    demo.build_kit(tmp_path, n_images=2)
    assert calls[0][:2] == ("model", "model.partial") and (tmp_path / "model" / "model_index.json").is_file()
    assert not (tmp_path / "model" / "vae").exists()


def test_the_vae_fit_reports_progress(capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**tiny.vae_config())
    settings = vae_fit.FitSettings(steps=5, batch_size=2, crop=16, num_threads=1)
    losses = tiny.fit_tiny_vae(vae, seed=0, settings=settings)  # stdout is captured: not a terminal
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fit demo VAE")]
    assert len(lines) == 5  # every tenth of 5 steps is a step
    assert lines[-1].startswith("fit demo VAE 5/5 steps · loss ") and f"{losses[-1]:.4f}" in lines[-1]
    assert "elapsed 0:00:" in lines[-1] and "eta 0:00:00" in lines[-1]


def test_step_progress_prints_every_tenth_and_the_last_step(capsys):
    with console.step_progress("fit", 25, plain_lines=True, every_s=1e9) as advance:
        for i in range(25):
            advance(f"loss {i}")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" · ")[0] for line in lines] == [f"fit {s:>2}/25 steps" for s in (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)]
    with console.step_progress("fit", 25, plain_lines=False) as advance:
        advance()
    console.set_quiet(True)
    try:
        with console.step_progress("fit", 2, plain_lines=True) as advance:
            advance(), advance()
    finally:
        console.set_quiet(False)
    assert "fit" not in capsys.readouterr().out


@pytest.mark.parametrize("cores, load, expected", [(2, 0.1, 2), (2, 0.4, 2), (2, 0.9, 1), (2, 2.5, 1), (1, 0.0, 1),
                                                   (16, 0.2, 2), (16, 15.8, 1)])  # fmt: skip
def test_auto_threads_follow_the_load(monkeypatch, cores, load, expected):
    """Idle: 2 threads (1.5× faster on 2 cores); another process busy: 1 (2 threads measured 3.7× slower)."""
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (load, load, load))
    threads, why = demo.auto_threads()
    assert threads == expected and f"{load:.1f}" in why
