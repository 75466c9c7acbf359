"""`mnist-gan generate`: outputs, determinism, digits on request and clear errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import BIN, ROOT, load_stage
from mlflow import MlflowClient
from PIL import Image

from mnist_gan import project
from mnist_gan.models import build_discriminator, build_generator, load_generator, save_gan
from mnist_gan.params import TrainParams
from mnist_gan_cli import main, tracking_uri


def make_gan(folder: Path, conditional: bool) -> Path:
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=6, conditional=conditional)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_gan(folder, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    return folder


@pytest.fixture
def gans(tmp_path: Path) -> dict[str, Path]:
    return {
        "conditional": make_gan(tmp_path / "cond", conditional=True),
        "plain": make_gan(tmp_path / "plain", conditional=False),
    }


def generate(*args: str) -> object:
    return CliRunner().invoke(main, ["generate", *args])


def test_outputs_are_a_grid_an_array_or_a_folder(gans: dict, tmp_path: Path) -> None:
    model = str(gans["plain"])
    res = generate("--model", model, "-n", "16", "--out", str(tmp_path / "grid.png"))
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (4 * 28 + 5 * 2,) * 2  # 4 x 4, torchvision's 2-pixel padding
    assert generate("--model", model, "-n", "5", "--out", str(tmp_path / "s.npy")).exit_code == 0
    array = np.load(tmp_path / "s.npy")
    assert array.shape == (5, 1, 28, 28) and array.dtype == np.float32
    assert array.min() >= -1 and array.max() <= 1
    # The same images the library's generator makes from the same seeded noise.
    generator, cfg = load_generator(gans["plain"])
    z = torch.randn(5, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(array, generator(z).numpy())
    assert generate("--model", model, "-n", "3", "--out", str(tmp_path / "imgs")).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]


def test_a_seed_gives_the_same_images(gans: dict, tmp_path: Path) -> None:
    def draw(seed: int, name: str) -> np.ndarray:
        out = tmp_path / name
        args = ["--model", str(gans["conditional"]), "-n", "8", "--seed", str(seed)]
        assert generate(*args, "--out", str(out)).exit_code == 0
        return np.load(out)

    first, again, other = draw(3, "a.npy"), draw(3, "b.npy"), draw(4, "c.npy")
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_digits_on_request(gans: dict, tmp_path: Path) -> None:
    args = ["--model", str(gans["conditional"]), "-n", "4", "--digit", "7"]
    assert generate(*args, "--out", str(tmp_path / "sevens.npy")).exit_code == 0
    generator, cfg = load_generator(gans["conditional"])
    z = torch.randn(4, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sevens = generator(z, torch.full((4,), 7)).numpy()
        threes = generator(z, torch.full((4,), 3)).numpy()
    got = np.load(tmp_path / "sevens.npy")
    np.testing.assert_array_equal(got, sevens)
    assert not np.array_equal(got, threes)


def test_errors_are_one_line(gans: dict, tmp_path: Path, monkeypatch) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    res = generate(
        "--model", "models:/mnist-gan-generator@champion", "--out", str(tmp_path / "x.png")
    )
    assert res.exit_code == 1 and f"there is no tracking store at {store}" in res.output
    assert not (tmp_path / "mlflow.db").exists()  # not made by asking
    MlflowClient(store).search_experiments()  # an empty store
    cases = {
        ("--model", str(gans["plain"]), "--digit", "3"): "is an unconditional generator",
        ("--model", str(tmp_path / "nowhere")): "config.json: not found",
        ("--model", "models:/mnist-gan-generator@champion"): "not found in the tracking store",
        ("--model", "runs:/0123456789abcdef/generator"): "not found in the tracking store",
    }
    for args, message in cases.items():
        res = generate(*args, "--out", str(tmp_path / "x.png"))
        assert res.exit_code == 1, res.output
        assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "x.png").exists()
    res = generate("--model", str(gans["plain"]), "--digit", "10", "--out", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "0<=x<=9" in res.output


def test_out_names_a_grid_an_array_or_a_folder_it_may_replace(
    gans: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ["--model", str(gans["plain"]), "-n", "4"]
    # The suffix in any case.
    assert generate(*model, "--out", str(tmp_path / "GRID.PNG")).exit_code == 0
    with Image.open(tmp_path / "GRID.PNG") as grid:
        assert grid.format == "PNG" and grid.size == (2 * 28 + 3 * 2,) * 2
    assert generate(*model, "--out", str(tmp_path / "S.Npy")).exit_code == 0
    assert np.load(tmp_path / "S.Npy").shape == (4, 1, 28, 28)
    # Another suffix is not silently taken for a folder.
    res = generate(*model, "--out", str(tmp_path / "grid.jpg"))
    assert res.exit_code == 2 and "give a .png file" in res.output
    assert not (tmp_path / "grid.jpg").exists()
    # A folder holding other files is never replaced; one of earlier images is.
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    res = generate(*model, "--out", str(work))
    assert res.exit_code == 2 and "holding other files (notes.txt)" in res.output
    assert (work / "notes.txt").read_text() == "mine"
    # A file without a suffix is not a folder to replace; nor is the current folder.
    (tmp_path / "LICENSE").write_text("keep me")
    res = generate(*model, "--out", str(tmp_path / "LICENSE"))
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    assert (tmp_path / "LICENSE").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for here in (".", str(empty)):
        res = generate(*model, "--out", here)
        assert res.exit_code == 2 and "not the current one" in res.output, res.output
    assert empty.is_dir() and not list(empty.iterdir())
    assert generate(*model, "--out", str(tmp_path / "imgs")).exit_code == 0
    res = generate("--model", str(gans["plain"]), "-n", "2", "--out", str(tmp_path / "imgs"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["00000.png", "00001.png"]


def test_more_images_than_one_batch_are_the_same_images(gans: dict, tmp_path: Path) -> None:
    """Drawn in batches of 1,000 (memory stays flat), from one seeded stream of noise."""
    args = ["--model", str(gans["conditional"]), "--seed", "5"]
    assert generate(*args, "-n", "1500", "--out", str(tmp_path / "many.npy")).exit_code == 0
    many = np.load(tmp_path / "many.npy")
    generator, cfg = load_generator(gans["conditional"])
    z = torch.randn(1500, cfg.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = generator(z, torch.arange(1500) % 10).numpy()
    np.testing.assert_allclose(many, want, rtol=0, atol=1e-6)


def test_the_installed_command_and_the_stages_use_one_store(monkeypatch) -> None:
    res = subprocess.run([str(BIN / "mnist-gan"), "generate", "--help"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and "--digit" in res.stdout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(ROOT / "src")  # anywhere in the project: its root's mlflow.db
    assert tracking_uri() == f"sqlite:///{ROOT / 'mlflow.db'}"
    monkeypatch.chdir(ROOT)
    # One resolver: the command's is the library's, which the stages' tracking module uses.
    assert tracking_uri is project.tracking_uri
    assert load_stage("train").tracking.tracking_uri is project.tracking_uri
    assert tracking_uri() == load_stage("train").tracking.tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
